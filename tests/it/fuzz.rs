//! Bounded fuzzing in `cargo test`: the verifier, the gzip limiter and the envelope decoder get
//! arbitrary and mutated inputs (seeded from the fixtures) and must never panic, allocate past
//! their caps, or accept what they should not. Case counts are fixed so CI time is bounded;
//! raise PROPTEST_CASES for a longer run.

use catena_ingest::envelope::decode;
use catena_ingest::relay::gunzip::{GunzipError, gunzip_capped};
use catena_ingest::relay::secrets::SecretStore;
use catena_ingest::relay::signature::{self, SignedHeaders, Window};
use chrono::Utc;
use proptest::prelude::*;

use crate::helpers::fixture_events;

/// Flip, delete or insert bytes at random positions of a seed.
fn mutate(seed: &[u8], edits: &[(usize, u8, u8)]) -> Vec<u8> {
    let mut out = seed.to_vec();
    for &(pos, byte, op) in edits {
        if out.is_empty() {
            out.push(byte);
            continue;
        }
        let at = pos % out.len();
        match op % 3 {
            0 => out[at] ^= byte | 1,
            1 => {
                out.remove(at);
            }
            _ => out.insert(at, byte),
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, .. ProptestConfig::default() })]

    #[test]
    fn decoder_never_panics_on_mutated_fixtures(seed in 0usize..9, edits in prop::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 0..12)) {
        let fixtures = fixture_events();
        let body = mutate(&fixtures[seed % fixtures.len()], &edits);
        let _ = decode(&body, Utc::now());
    }

    #[test]
    fn decoder_never_panics_on_arbitrary_bytes(body in prop::collection::vec(any::<u8>(), 0..2048)) {
        let _ = decode(&body, Utc::now());
    }

    #[test]
    fn verifier_accepts_exactly_the_authentic(body in prop::collection::vec(any::<u8>(), 0..1024), secret in "[a-zA-Z0-9]{12,40}", flip in any::<usize>()) {
        let store = SecretStore::parse(&format!("wh={secret}")).unwrap();
        let now = Utc::now();
        let ts = now.to_rfc3339();
        let sig = signature::sign(secret.as_bytes(), &ts, &body);
        let headers = SignedHeaders { timestamp: Some(&ts), signature: Some(&sig), webhook_id: Some("wh") };
        prop_assert!(signature::verify(&store, headers, &body, now, Window::default()).is_ok());
        let mut tampered = body.clone();
        if tampered.is_empty() { tampered.push(1) } else { let i = flip % tampered.len(); tampered[i] ^= 0x20; }
        prop_assert!(signature::verify(&store, headers, &tampered, now, Window::default()).is_err());
    }

    #[test]
    fn verifier_never_panics_on_arbitrary_headers(ts in ".{0,64}", sig in ".{0,96}", id in ".{0,40}", body in prop::collection::vec(any::<u8>(), 0..256)) {
        let store = SecretStore::parse("*=some-secret-value").unwrap();
        let headers = SignedHeaders { timestamp: Some(&ts), signature: Some(&sig), webhook_id: Some(&id) };
        let _ = signature::verify(&store, headers, &body, Utc::now(), Window::default());
    }

    /// The hand-parsed gzip framing must agree with flate2's own `MultiGzDecoder` on every input:
    /// same bytes when it succeeds, too large exactly when flate2 reads past the cap, corrupt
    /// exactly when flate2 fails.
    #[test]
    fn gunzip_agrees_with_flate2(data in prop::collection::vec(any::<u8>(), 0..3000), cap in 0usize..4096, members in 1usize..3, named in any::<bool>(), edits in prop::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 0..4)) {
        let mut compressed = Vec::new();
        for _ in 0..members {
            let builder = if named {
                flate2::GzBuilder::new().filename("body.json").comment("c").extra(vec![1, 2, 3])
            } else {
                flate2::GzBuilder::new()
            };
            let mut enc = builder.write(Vec::new(), flate2::Compression::fast());
            std::io::Write::write_all(&mut enc, &data).unwrap();
            compressed.extend(enc.finish().unwrap());
        }
        let compressed = mutate(&compressed, &edits);
        let mut reference = Vec::new();
        let flate = std::io::Read::read_to_end(
            &mut std::io::Read::take(flate2::bufread::MultiGzDecoder::new(&compressed[..]), cap as u64 + 1),
            &mut reference,
        );
        let expected = match flate {
            Ok(_) if reference.len() > cap => Err(GunzipError::TooLarge(cap)),
            Ok(_) => Ok(reference),
            Err(_) => Err(GunzipError::Corrupt),
        };
        prop_assert_eq!(gunzip_capped(&compressed, cap), expected);
    }

    #[test]
    fn gunzip_limiter_never_exceeds_its_cap(data in prop::collection::vec(any::<u8>(), 0..4096), cap in 0usize..8192, edits in prop::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 0..6)) {
        let compressed = mutate(&catena_ingest::relay::gunzip::gzip(&data), &edits);
        match gunzip_capped(&compressed, cap) {
            Ok(out) => prop_assert!(out.len() <= cap),
            Err(GunzipError::TooLarge(c)) => prop_assert_eq!(c, cap),
            Err(GunzipError::Corrupt) => {}
        }
        if edits.is_empty() && data.len() <= cap {
            prop_assert_eq!(gunzip_capped(&compressed, cap).unwrap(), data);
        }
    }
}

#[test]
fn absurd_sizes_are_refused_not_applied() {
    let many: Vec<String> = (0..100_000)
        .map(|i| format!(r#"{{"id":"6b0d549b-6f03-475a-9600-{i:012}","status":"stale"}}"#))
        .collect();
    let body = format!(
        r#"{{"version":"1.0","event_name":"connection.staled","data":[{}]}}"#,
        many.join(",")
    );
    assert!(matches!(
        decode(body.as_bytes(), Utc::now()),
        Err(catena_ingest::envelope::DecodeError::InvalidRecord { .. })
    ));
    let huge = "x".repeat(1024 * 1024);
    let body = format!(
        r#"{{"version":"1.0","event_name":"invitation.created","data":[{{"id":"6513270e-269e-4d37-b2a7-4de452e6b438","fleet_ref":"{huge}"}}]}}"#
    );
    assert!(matches!(
        decode(body.as_bytes(), Utc::now()),
        Err(catena_ingest::envelope::DecodeError::InvalidRecord { .. })
    ));
}
