//! Catena's webhook signature: `base64(HMAC-SHA256(secret, timestamp + "." + uncompressed body))`.
//!
//! The timestamp is signed as the header's bytes, never re-formatted: Catena may send `Z` or
//! `+00:00`, and re-rendering a parsed time would break the MAC.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use chrono::{DateTime, Duration, Utc};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::secrets::SecretStore;

type HmacSha256 = Hmac<Sha256>;

/// Why a request failed verification. Each maps to a relay [`Outcome`](super::Outcome) label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("X-Catena-Timestamp header missing")]
    MissingTimestamp,
    #[error("X-Catena-Timestamp is not RFC 3339")]
    MalformedTimestamp,
    #[error("X-Catena-Timestamp outside the accepted window")]
    StaleTimestamp,
    #[error("X-Catena-Signature header missing")]
    MissingSignature,
    #[error("X-Catena-Signature is not base64 of a SHA-256 MAC")]
    MalformedSignature,
    #[error("no secret configured for this X-Webhook-ID")]
    UnknownWebhook,
    #[error("signature does not match any configured secret")]
    BadSignature,
}

/// How far a timestamp may lie in the past and in the future.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    pub max_age: Duration,
    pub max_skew: Duration,
}

impl Default for Window {
    fn default() -> Self {
        Self {
            max_age: Duration::minutes(5),
            max_skew: Duration::seconds(60),
        }
    }
}

/// Compute the header value Catena would send.
pub fn sign(secret: &[u8], timestamp: &str, body: &[u8]) -> String {
    STANDARD.encode(mac(secret, timestamp, body).finalize().into_bytes())
}

fn mac(secret: &[u8], timestamp: &str, body: &[u8]) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC accepts any key length");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// The signed headers of one request, as raw strings.
#[derive(Debug, Clone, Copy, Default)]
pub struct SignedHeaders<'a> {
    pub timestamp: Option<&'a str>,
    pub signature: Option<&'a str>,
    pub webhook_id: Option<&'a str>,
}

/// Check the timestamp window, then the MAC against every candidate secret for the webhook id,
/// in constant time per comparison. Returns the accepted timestamp.
pub fn verify(
    secrets: &SecretStore,
    headers: SignedHeaders<'_>,
    body: &[u8],
    now: DateTime<Utc>,
    window: Window,
) -> Result<DateTime<Utc>, Rejection> {
    let raw_ts = headers.timestamp.ok_or(Rejection::MissingTimestamp)?;
    let ts = DateTime::parse_from_rfc3339(raw_ts.trim())
        .map_err(|_| Rejection::MalformedTimestamp)?
        .with_timezone(&Utc);
    if now - ts > window.max_age || ts - now > window.max_skew {
        return Err(Rejection::StaleTimestamp);
    }
    let raw_sig = headers.signature.ok_or(Rejection::MissingSignature)?;
    let expected = STANDARD
        .decode(raw_sig.trim())
        .map_err(|_| Rejection::MalformedSignature)?;
    if expected.len() != 32 {
        return Err(Rejection::MalformedSignature);
    }
    let mut candidates = secrets
        .candidates(headers.webhook_id.unwrap_or(""))
        .peekable();
    if candidates.peek().is_none() {
        return Err(Rejection::UnknownWebhook);
    }
    // Check every candidate (no early exit) so timing does not reveal which secret matched.
    let matched = candidates.fold(false, |ok, secret| {
        mac(secret.as_bytes(), raw_ts, body)
            .verify_slice(&expected)
            .is_ok()
            | ok
    });
    if matched {
        Ok(ts)
    } else {
        Err(Rejection::BadSignature)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> SecretStore {
        SecretStore::parse("wh=new-secret-123,wh=old-secret-123").unwrap()
    }

    fn headers<'a>(ts: &'a str, sig: &'a str) -> SignedHeaders<'a> {
        SignedHeaders {
            timestamp: Some(ts),
            signature: Some(sig),
            webhook_id: Some("wh"),
        }
    }

    #[test]
    fn accepts_both_secrets_during_rotation_and_rejects_others() {
        let now = Utc::now();
        let ts = now.to_rfc3339();
        for secret in ["new-secret-123", "old-secret-123"] {
            let sig = sign(secret.as_bytes(), &ts, b"{}");
            assert!(verify(&store(), headers(&ts, &sig), b"{}", now, Window::default()).is_ok());
        }
        let sig = sign(b"wrong", &ts, b"{}");
        assert_eq!(
            verify(&store(), headers(&ts, &sig), b"{}", now, Window::default()),
            Err(Rejection::BadSignature)
        );
        let sig = sign(b"new-secret-123", &ts, b"{}");
        assert_eq!(
            verify(&store(), headers(&ts, &sig), b"{ }", now, Window::default()),
            Err(Rejection::BadSignature)
        );
    }

    #[test]
    fn enforces_the_window_and_header_presence() {
        let now = Utc::now();
        let old = (now - Duration::seconds(301)).to_rfc3339();
        let future = (now + Duration::seconds(61)).to_rfc3339();
        let edge = (now - Duration::seconds(299)).to_rfc3339();
        for (ts, want) in [
            (old.as_str(), Err(Rejection::StaleTimestamp)),
            (future.as_str(), Err(Rejection::StaleTimestamp)),
            ("yesterday", Err(Rejection::MalformedTimestamp)),
        ] {
            let sig = sign(b"new-secret-123", ts, b"x");
            assert_eq!(
                verify(&store(), headers(ts, &sig), b"x", now, Window::default()).map(|_| ()),
                want
            );
        }
        let sig = sign(b"new-secret-123", &edge, b"x");
        assert!(verify(&store(), headers(&edge, &sig), b"x", now, Window::default()).is_ok());
        let ts = now.to_rfc3339();
        let no_sig = SignedHeaders {
            signature: None,
            ..headers(&ts, "")
        };
        assert_eq!(
            verify(&store(), no_sig, b"x", now, Window::default()),
            Err(Rejection::MissingSignature)
        );
        assert_eq!(
            verify(
                &store(),
                headers(&ts, "not base64!"),
                b"x",
                now,
                Window::default()
            ),
            Err(Rejection::MalformedSignature)
        );
        let good = sign(b"new-secret-123", &ts, b"x");
        let unknown = SignedHeaders {
            webhook_id: Some("other"),
            ..headers(&ts, &good)
        };
        assert_eq!(
            verify(&store(), unknown, b"x", now, Window::default()),
            Err(Rejection::UnknownWebhook)
        );
    }

    #[test]
    fn the_catch_all_never_widens_an_id_with_a_secret_of_its_own() {
        let store = SecretStore::parse("wh=own-secret-123,*=catch-all-123").unwrap();
        let now = Utc::now();
        let ts = now.to_rfc3339();
        let by_catch_all = sign(b"catch-all-123", &ts, b"x");
        assert_eq!(
            verify(
                &store,
                headers(&ts, &by_catch_all),
                b"x",
                now,
                Window::default()
            ),
            Err(Rejection::BadSignature),
            "`wh` has its own secret"
        );
        let other = SignedHeaders {
            webhook_id: Some("other"),
            ..headers(&ts, &by_catch_all)
        };
        assert!(verify(&store, other, b"x", now, Window::default()).is_ok());
        let anonymous = SignedHeaders {
            webhook_id: None,
            ..headers(&ts, &by_catch_all)
        };
        assert_eq!(
            verify(&store, anonymous, b"x", now, Window::default()),
            Err(Rejection::UnknownWebhook),
            "no X-Webhook-ID, no secret"
        );
    }
}
