//! `cargo bench --bench gunzip`: the relay's gunzip against flate2's own `MultiGzDecoder` on a
//! typical Catena body, so the per-thread decoder reuse in `src/gunzip.rs` keeps paying for
//! itself. Plain timing loop (no criterion) to keep the dependency tree and CI build lean.

use std::hint::black_box;
use std::io::Read;
use std::time::Instant;

const BODY: &[u8] = br#"{"data":[{"fleet_id":"fa3ae76d-3956-4c23-92a7-fb7c1981391f","id":"39f1b769-694e-41c1-a604-bd10a9d799b4","source_name":"motive","status":"active","tsp_id":"9894465a-74c9-4af1-8ebf-ce82e450d2ea"}],"delivery_attempt":1,"event_name":"connection.created","id":"01a216c6-51da-7f25-9dc4-f93a82f8e51f","timestamp":"2026-11-26T07:33:45Z","version":"1.0","webhook_id":"247b2dea-a030-48b7-9a05-ee33c1b6ab0a"}"#;
const CAP: usize = 10 << 20;

fn per_iteration(iterations: u32, mut f: impl FnMut()) -> f64 {
    let started = Instant::now();
    for _ in 0..iterations {
        f();
    }
    started.elapsed().as_nanos() as f64 / f64::from(iterations)
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test` runs this too, as a quick smoke test.
    let (rounds, iterations) = if std::env::args().any(|a| a == "--bench") {
        (3, 200_000)
    } else {
        (1, 1_000)
    };
    let gzipped = catena_ingest::relay::gunzip::gzip(BODY);
    for round in 1..=rounds {
        let flate2 = per_iteration(iterations, || {
            let mut out = Vec::with_capacity(gzipped.len() * 4);
            flate2::bufread::MultiGzDecoder::new(&gzipped[..])
                .take(CAP as u64 + 1)
                .read_to_end(&mut out)
                .expect("valid gzip");
            black_box(out);
        });
        let ours = per_iteration(iterations, || {
            black_box(
                catena_ingest::relay::gunzip::gunzip_capped(black_box(&gzipped), CAP)
                    .expect("valid gzip"),
            );
        });
        println!(
            "round {round}: {} -> {} bytes: flate2 MultiGzDecoder {flate2:.0} ns, gunzip_capped {ours:.0} ns",
            gzipped.len(),
            BODY.len()
        );
    }
}
