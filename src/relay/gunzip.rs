//! Size-capped gunzip: a gzip bomb is refused after `max_out + 1` bytes, never expanded in full.
//!
//! The gzip framing (RFC 1952) is parsed here and only the raw deflate stream goes to a
//! per-thread `flate2::Decompress` that is reset, not rebuilt, for every body. A fresh decoder
//! allocates and zeroes its ~40 KiB of state and window per request, which at relay rates was
//! a tenth of the relay's CPU for bodies of a few hundred bytes.

use std::cell::RefCell;

use flate2::{Decompress, FlushDecompress, Status};

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

thread_local! {
    static INFLATE: RefCell<Decompress> = RefCell::new(Decompress::new(false));
}

/// Decompress `input` (one or more concatenated gzip members), writing at most `max_out + 1`
/// bytes of output so an oversized expansion is detected without materialising it.
pub fn gunzip_capped(input: &[u8], max_out: usize) -> Result<Vec<u8>, GunzipError> {
    // Webhook bodies compress ~1.2-10x; start near that to avoid regrowth without over-reserving.
    let mut out = Vec::with_capacity((input.len() * 4).max(256).min(max_out.saturating_add(1)));
    gunzip_into(input, &mut out, max_out)?;
    Ok(out)
}

/// [`gunzip_capped`] appending to `out`, which grows only when it is full (never past
/// `max_out + 1` bytes): given a buffer of that capacity, nothing is allocated. Output past
/// `max_out` may fill what capacity `out` already has before the error is seen.
pub fn gunzip_into(input: &[u8], out: &mut Vec<u8>, max_out: usize) -> Result<(), GunzipError> {
    INFLATE.with(|cell| {
        let mut inflate = cell.borrow_mut();
        let mut rest = input;
        loop {
            rest = member(&mut inflate, rest, out, max_out)?;
            if rest.is_empty() {
                return Ok(());
            }
        }
    })
}

/// The uncompressed size the last gzip member of `input` claims (its ISIZE field, modulo
/// 2^32): a hint to choose where to inflate, never trusted for anything else.
pub fn size_hint(input: &[u8]) -> Option<usize> {
    let at = input.len().checked_sub(4)?;
    Some(u32::from_le_bytes(input[at..].try_into().ok()?) as usize)
}

const FHCRC: u8 = 0x02;
const FEXTRA: u8 = 0x04;
const FNAME: u8 = 0x08;
const FCOMMENT: u8 = 0x10;
const FRESERVED: u8 = 0xe0;

/// Inflate one gzip member from the start of `input` onto `out`; returns the input after it.
fn member<'a>(
    inflate: &mut Decompress,
    input: &'a [u8],
    out: &mut Vec<u8>,
    max_out: usize,
) -> Result<&'a [u8], GunzipError> {
    let deflate = skip_header(input).ok_or(GunzipError::Corrupt)?;
    inflate.reset(false);
    let start = out.len();
    let mut pos = 0;
    loop {
        if out.len() == out.capacity() {
            // Grow by doubling, but never past cap + 1: one byte over is proof enough.
            let room = max_out.saturating_add(1).saturating_sub(out.len());
            if room == 0 {
                return Err(GunzipError::TooLarge(max_out));
            }
            out.reserve_exact(out.len().max(4096).min(room));
        }
        let (in_before, out_before) = (inflate.total_in(), out.len());
        let status = inflate
            .decompress_vec(&deflate[pos..], out, FlushDecompress::None)
            .map_err(|_| GunzipError::Corrupt)?;
        pos += (inflate.total_in() - in_before) as usize;
        if out.len() > max_out {
            return Err(GunzipError::TooLarge(max_out));
        }
        match status {
            Status::StreamEnd => break,
            // No progress with output room left means the stream is truncated.
            _ if inflate.total_in() == in_before
                && out.len() == out_before
                && out.len() < out.capacity() =>
            {
                return Err(GunzipError::Corrupt);
            }
            _ => {}
        }
    }
    let trailer = deflate.get(pos..pos + 8).ok_or(GunzipError::Corrupt)?;
    let crc = u32::from_le_bytes(trailer[..4].try_into().expect("4 bytes"));
    let size = u32::from_le_bytes(trailer[4..].try_into().expect("4 bytes"));
    let produced = &out[start..];
    if crc32fast::hash(produced) != crc || produced.len() as u32 != size {
        return Err(GunzipError::Corrupt);
    }
    Ok(&deflate[pos + 8..])
}

/// The deflate stream after a gzip member header, or `None` when the header is malformed.
fn skip_header(input: &[u8]) -> Option<&[u8]> {
    let (fixed, mut rest) = input.split_at_checked(10)?;
    let flags = fixed[3];
    if fixed[..3] != [0x1f, 0x8b, 8] || flags & FRESERVED != 0 {
        return None;
    }
    if flags & FEXTRA != 0 {
        let len = u16::from_le_bytes([*rest.first()?, *rest.get(1)?]) as usize;
        rest = rest.get(2 + len..)?;
    }
    for flag in [FNAME, FCOMMENT] {
        if flags & flag != 0 {
            let end = rest.iter().position(|&b| b == 0)?;
            rest = &rest[end + 1..];
        }
    }
    if flags & FHCRC != 0 {
        let crc = u16::from_le_bytes([*rest.first()?, *rest.get(1)?]);
        let header_len = input.len() - rest.len();
        if crc32fast::hash(&input[..header_len]) as u16 != crc {
            return None;
        }
        rest = &rest[2..];
    }
    Some(rest)
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

    #[test]
    fn into_a_buffer_of_the_cap_allocates_nothing() {
        let data = vec![7u8; 300_000];
        let z = gzip(&data);
        let mut out = Vec::with_capacity(300_001);
        let address = out.as_ptr();
        gunzip_into(&z, &mut out, 300_000).unwrap();
        assert_eq!(out, data);
        assert_eq!((out.as_ptr(), out.capacity()), (address, 300_001));
        out.clear();
        let bomb = gzip(&vec![0u8; 1_000_000]);
        assert_eq!(
            gunzip_into(&bomb, &mut out, 300_000),
            Err(GunzipError::TooLarge(300_000))
        );
        assert_eq!((out.as_ptr(), out.capacity()), (address, 300_001));
    }

    #[test]
    fn the_size_hint_is_the_last_members_isize() {
        assert_eq!(size_hint(&gzip(&[1u8; 5000])), Some(5000));
        assert_eq!(size_hint(b"abc"), None);
    }
}
