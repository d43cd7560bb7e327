//! Known answers for X-Catena-Signature from ../shared/fixtures (copied into tests/fixtures).

use catena_ingest::relay::secrets::SecretStore;
use catena_ingest::relay::signature::{self, SignedHeaders, Window};

use crate::helpers::fixture;

#[test]
fn known_answer_vectors_sign_and_verify() {
    let file: serde_json::Value =
        serde_json::from_slice(&fixture("signature-vectors.json")).unwrap();
    let vectors = file["vectors"].as_array().unwrap();
    assert!(vectors.len() >= 4);
    for v in vectors {
        let (secret, ts, body, want) = (
            v["secret"].as_str().unwrap(),
            v["timestamp"].as_str().unwrap(),
            v["body"].as_str().unwrap(),
            v["signature"].as_str().unwrap(),
        );
        assert_eq!(
            signature::sign(secret.as_bytes(), ts, body.as_bytes()),
            want,
            "vector {ts}"
        );
        // Verify at the vector's own time, through the same path the relay uses.
        let now = chrono::DateTime::parse_from_rfc3339(ts).unwrap().to_utc();
        let store = SecretStore::parse(&format!("wh={secret}")).unwrap();
        let headers = SignedHeaders {
            timestamp: Some(ts),
            signature: Some(want),
            webhook_id: Some("wh"),
        };
        assert!(
            signature::verify(&store, headers, body.as_bytes(), now, Window::default()).is_ok()
        );
        let mut tampered = body.as_bytes().to_vec();
        tampered.push(b' ');
        assert!(signature::verify(&store, headers, &tampered, now, Window::default()).is_err());
    }
}
