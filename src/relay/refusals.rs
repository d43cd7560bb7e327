//! Which subscriptions' deliveries this relay refused for their signature or timestamp, for the
//! reconciler (`GET /secrets/refusals`).
//!
//! The relay answers 503 to refusals so Catena keeps the event, which also means Catena's own
//! delivery logs cannot tell a secret mismatch from an outage. The reconciler must not
//! reactivate a subscription whose deliveries we refuse (they would fail again and trip the
//! breaker again), and it must say "rotate the secret" instead: this log is how it knows. The
//! ids come from an unauthenticated header, so the map is bounded; ids past the bound are
//! counted together under [`OTHER`].

use std::collections::HashMap;
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Most webhook ids tracked; Catena gives us a few dozen subscriptions.
pub const MAX_IDS: usize = 1024;

/// Where refusals of ids past [`MAX_IDS`] are counted.
pub const OTHER: &str = "other";

/// What one id's deliveries were refused for, since the relay started.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refused {
    pub invalid_signature: u64,
    pub stale_timestamp: u64,
    pub last_at: Option<DateTime<Utc>>,
}

/// `GET /secrets/refusals`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusalReport {
    pub webhooks: HashMap<String, Refused>,
}

#[derive(Default)]
pub struct RefusalLog {
    by_id: Mutex<HashMap<String, Refused>>,
}

/// Which kind of refusal is counted.
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    Signature,
    Timestamp,
}

impl RefusalLog {
    pub fn record(&self, webhook_id: &str, kind: Kind, at: DateTime<Utc>) {
        let mut by_id = self
            .by_id
            .lock()
            .expect("never poisoned: no panics under the lock");
        let key = if by_id.contains_key(webhook_id) || by_id.len() < MAX_IDS {
            webhook_id
        } else {
            OTHER
        };
        let entry = by_id.entry(key.to_owned()).or_default();
        match kind {
            Kind::Signature => entry.invalid_signature += 1,
            Kind::Timestamp => entry.stale_timestamp += 1,
        }
        entry.last_at = Some(at);
    }

    pub fn report(&self) -> RefusalReport {
        RefusalReport {
            webhooks: self.by_id.lock().expect("never poisoned").clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_bounded() {
        let log = RefusalLog::default();
        let now = Utc::now();
        for n in 0..MAX_IDS + 10 {
            log.record(&format!("id-{n}"), Kind::Signature, now);
        }
        log.record("id-0", Kind::Timestamp, now);
        let report = log.report();
        assert_eq!(report.webhooks.len(), MAX_IDS + 1);
        assert_eq!(report.webhooks[OTHER].invalid_signature, 10);
        assert_eq!(report.webhooks["id-0"].stale_timestamp, 1);
    }
}
