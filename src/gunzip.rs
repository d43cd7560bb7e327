//! Size-capped gunzip: a gzip bomb is refused after `max_out + 1` bytes, never expanded in full.

use std::io::Read;

use flate2::bufread::MultiGzDecoder;

pub const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum GunzipError {
    #[error("decompressed body exceeds {0} bytes")]
    TooLarge(usize),
    #[error("body is not valid gzip")]
    Corrupt,
}

pub fn looks_gzipped(body: &[u8]) -> bool {
    body.starts_with(&GZIP_MAGIC)
}

/// Decompress `input`, reading at most `max_out + 1` bytes of output so an oversized expansion is
/// detected without materialising it.
pub fn gunzip_capped(input: &[u8], max_out: usize) -> Result<Vec<u8>, GunzipError> {
    // Webhook bodies compress ~5-10x; start near that to avoid regrowth without over-reserving.
    let mut out = Vec::with_capacity((input.len() * 8).min(max_out).max(256));
    // The bufread decoder reads the slice in place; `read::MultiGzDecoder` would first copy it
    // into a fresh 32 KiB BufReader on every request (memmove + allocation in the relay profile).
    let mut reader = MultiGzDecoder::new(input).take(max_out as u64 + 1);
    reader
        .read_to_end(&mut out)
        .map_err(|_| GunzipError::Corrupt)?;
    if out.len() > max_out {
        return Err(GunzipError::TooLarge(max_out));
    }
    Ok(out)
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    use flate2::{Compression, write::GzEncoder};
    use std::io::Write;
    let mut enc = GzEncoder::new(Vec::with_capacity(data.len() / 3 + 32), Compression::fast());
    enc.write_all(data).expect("writing to a Vec cannot fail");
    enc.finish().expect("writing to a Vec cannot fail")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_detects_magic() {
        let z = gzip(b"hello world");
        assert!(looks_gzipped(&z));
        assert_eq!(gunzip_capped(&z, 100).unwrap(), b"hello world");
        assert_eq!(gunzip_capped(&z, 11).unwrap(), b"hello world");
    }

    #[test]
    fn refuses_bombs_and_garbage() {
        let bomb = gzip(&vec![0u8; 5 * 1024 * 1024]);
        assert!(bomb.len() < 64 * 1024);
        assert_eq!(
            gunzip_capped(&bomb, 1024 * 1024),
            Err(GunzipError::TooLarge(1024 * 1024))
        );
        assert_eq!(
            gunzip_capped(b"\x1f\x8bnot really gzip", 100),
            Err(GunzipError::Corrupt)
        );
        let mut truncated = gzip(b"some longer text that compresses");
        truncated.truncate(truncated.len() - 6);
        assert_eq!(gunzip_capped(&truncated, 100), Err(GunzipError::Corrupt));
    }
}
