//! Every knob of the fake (catena-control-plane.md §3), with the spec's defaults.
//!
//! Read from `--config f.json` at start and merged with `PUT /_fake/config` while running, so a
//! test can break delivery, drop scopes or slow the API without restarting. Durations are written
//! as strings with a unit (`"500ms"`, `"5s"`, `"15m"`, `"6h"`, `"14d"`) or as a number of
//! milliseconds.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The scopes a token carries unless `scopes` drops some (G1).
pub const ALL_SCOPES: [&str; 5] = [
    "organization",
    "webhook:create",
    "webhook:read",
    "webhook:update",
    "webhook:delete",
];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct FakeConfig {
    // --- auth
    pub client_id: String,
    pub client_secret: String,
    /// `expires_in` of issued tokens; short values exercise the client's refresh.
    #[serde(with = "duration")]
    pub token_ttl: Duration,
    /// What a token grants; calls needing a scope it lacks get 403.
    pub scopes: Vec<String>,

    // --- API
    /// Which `event_name` enum is accepted (catena-webhooks.md §5.3).
    #[serde(rename = "enum")]
    pub event_enum: EventEnum,
    /// A token bucket over the subscription API (not the token endpoint, not the hooks).
    pub rate_limit: Option<RateLimit>,
    /// Answers to inject, for the client's retry tests; each rule is used up after `count` calls.
    pub fail_next: Vec<FailRule>,
    /// Pages never hold more than this, whatever `size` asks (the client must follow cursors).
    pub max_page_size: Option<usize>,

    // --- delivery
    /// Beyond this an attempt counts as a timeout (status_code 0) and is retried.
    #[serde(with = "duration")]
    pub timeout: Duration,
    /// Waits before each retry: their count is the number of retries after the first attempt.
    pub retry_delays_ms: Vec<u64>,
    /// Deliveries in flight per subscription.
    pub max_in_flight: usize,
    /// What happens to a message answered with a 4xx (never retried).
    pub four_xx: FourXx,

    // --- health and breaker (S4)
    /// Below this many messages in a window its `success_rate` is null.
    pub min_messages_for_rate: u64,
    pub ewma_alpha: f64,
    #[serde(with = "duration")]
    pub breaker_window: Duration,
    /// No breaker evaluation for this long after a create or an update.
    #[serde(with = "duration")]
    pub grace: Duration,
    /// Whether `activate` starts a new grace period too.
    pub grace_on_activate: bool,

    // --- DLQ and replay
    #[serde(with = "duration")]
    pub dlq_ttl: Duration,
    pub replay_id: ReplayId,
    /// Whether a replayed message's `delivery_attempt` goes on from its last attempt or restarts.
    pub attempt: ReplayAttempt,
    pub replay_when_inactive: ReplayWhenInactive,

    // --- faults
    /// After a PATCH of the secret, the old one keeps signing for this long.
    #[serde(with = "duration")]
    pub secret_switch_delay: Duration,
    pub sign_retries_with: SignRetriesWith,
}

impl Default for FakeConfig {
    fn default() -> Self {
        Self {
            client_id: "catena-ingest-dev".into(),
            client_secret: "fake-catena-dev-secret".into(),
            token_ttl: Duration::from_secs(300),
            scopes: ALL_SCOPES.iter().map(|s| s.to_string()).collect(),
            event_enum: EventEnum::New,
            rate_limit: None,
            fail_next: Vec::new(),
            max_page_size: None,
            timeout: Duration::from_secs(3),
            retry_delays_ms: vec![500, 1000, 2000],
            max_in_flight: 8,
            four_xx: FourXx::Dlq,
            min_messages_for_rate: 200,
            ewma_alpha: 0.1,
            breaker_window: Duration::from_secs(6 * 3600),
            grace: Duration::from_secs(15 * 60),
            grace_on_activate: true,
            dlq_ttl: Duration::from_secs(14 * 86_400),
            replay_id: ReplayId::Stable,
            attempt: ReplayAttempt::Continue,
            replay_when_inactive: ReplayWhenInactive::Reject,
            secret_switch_delay: Duration::ZERO,
            sign_retries_with: SignRetriesWith::Current,
        }
    }
}

impl FakeConfig {
    pub fn has_scope(&self, scope: &str) -> bool {
        self.scopes.iter().any(|s| s == scope)
    }

    /// Merge a partial JSON object (RFC 7396 merge patch) into this config.
    pub fn merge(&mut self, patch: &serde_json::Value) -> Result<(), serde_json::Error> {
        let mut current = serde_json::to_value(&*self)?;
        merge_patch(&mut current, patch);
        *self = serde_json::from_value(current)?;
        Ok(())
    }
}

fn merge_patch(target: &mut serde_json::Value, patch: &serde_json::Value) {
    use serde_json::Value;
    let Value::Object(fields) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Default::default());
    }
    let object = target.as_object_mut().expect("made an object above");
    for (key, value) in fields {
        if value.is_null() {
            object.insert(key.clone(), Value::Null);
        } else {
            merge_patch(object.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventEnum {
    /// `WebhookEventNameEnum` of G4 at 5cbf8f29.
    New,
    /// The older spec: no `webhook.activated`/`webhook.paused` and a few families fewer.
    Old,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RateLimit {
    pub per_second: f64,
    pub burst: u32,
    /// Whether a 429 carries `Retry-After: <seconds>`.
    #[serde(default)]
    pub retry_after: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailRule {
    /// Matches calls whose path contains this (e.g. `/activate`, or `/webhooks` for all).
    pub path_contains: String,
    /// Only this method, if given (`GET`, `POST`, ...).
    #[serde(default)]
    pub method: Option<String>,
    pub status: u16,
    #[serde(default = "one")]
    pub count: u32,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FourXx {
    Dlq,
    Drop,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplayId {
    /// A replayed message keeps its envelope `id`.
    Stable,
    /// A replayed message gets a fresh UUIDv7 at replay time (the §2.2 hazard).
    Remint,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplayAttempt {
    Continue,
    Reset,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplayWhenInactive {
    /// 409 for a replay of a stale or paused subscription.
    Reject,
    Deliver,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SignRetriesWith {
    /// Every attempt is signed with the secret in force when it is sent.
    Current,
    /// Retries are signed with the secret that signed the message's first attempt.
    First,
}

/// A duration as `"<n><unit>"` (the units of [`crate::config::parse_duration`]) or as a number of
/// milliseconds; written back in milliseconds.
mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&format!("{}ms", value.as_millis()))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Millis(u64),
            Text(String),
        }
        match Raw::deserialize(deserializer)? {
            Raw::Millis(ms) => Ok(Duration::from_millis(ms)),
            Raw::Text(text) => crate::config::parse_duration(&text).map_err(D::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partial_object_merges_and_durations_take_both_forms() {
        let mut config: FakeConfig =
            serde_json::from_str(r#"{"grace": "5s", "timeout": 250}"#).unwrap();
        assert_eq!(config.grace, Duration::from_secs(5));
        assert_eq!(config.timeout, Duration::from_millis(250));
        assert_eq!(config.client_id, "catena-ingest-dev");
        config
            .merge(&serde_json::json!({
                "ewma_alpha": 0.2,
                "rate_limit": {"per_second": 5.0, "burst": 2},
                "enum": "old"
            }))
            .unwrap();
        assert_eq!(config.ewma_alpha, 0.2);
        assert_eq!(config.event_enum, EventEnum::Old);
        assert_eq!(
            config.grace,
            Duration::from_secs(5),
            "untouched by the merge"
        );
        assert!(!config.rate_limit.unwrap().retry_after);
    }
}
