//! Decoding a Catena envelope into the change it describes.
//!
//! Pure and allocation-light: no I/O, so it is unit- and fuzz-testable. Everything that can be
//! wrong with a message *by itself* is caught here and is a permanent failure (parked); only
//! what depends on the database can fail later.

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// Highest schema major version this build understands.
pub const SUPPORTED_MAJOR: u32 = 1;

/// Records per envelope beyond which a message is parked rather than applied: Catena sends
/// one or a few; a hundred thousand is a bug or an attack, and one transaction should not carry it.
pub const MAX_RECORDS: usize = 10_000;

/// Largest accepted record (JSON bytes). Real records are under 2 KiB; megabyte strings are
/// parked instead of stored.
pub const MAX_RECORD_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("body is not a JSON envelope: {0}")]
    NotJson(String),
    #[error("envelope has no `{0}`")]
    MissingField(&'static str),
    #[error("unsupported schema version `{0}`")]
    UnsupportedVersion(String),
    #[error("record {index} of {event_name} is invalid: {reason}")]
    InvalidRecord {
        event_name: String,
        index: usize,
        reason: String,
    },
    /// A group message whose framing is broken (it is parked whole, as it came).
    #[error("group message cannot be unpacked: {0}")]
    Group(String),
}

impl DecodeError {
    /// Short machine-readable reason for the parking lot header.
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::NotJson(_) => "malformed",
            DecodeError::MissingField(_) | DecodeError::Group(_) => "malformed",
            DecodeError::UnsupportedVersion(_) => "unsupported_version",
            DecodeError::InvalidRecord { .. } => "invalid_record",
        }
    }
}

#[derive(Deserialize)]
struct RawEnvelope<'a> {
    version: Option<String>,
    event_name: Option<String>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
    webhook_id: Option<String>,
    timestamp: Option<String>,
    id: Option<String>,
}

/// Where an event's dedup key came from (the `source` label of `catena_worker_dedup_keys_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySource {
    /// The envelope `id`, a UUID.
    EnvelopeId,
    /// No `id`: a hash of `event_name` and `data`.
    ContentHash,
    /// An `id` that is not a UUID: hashed like a missing one, and counted, since Catena
    /// promises UUIDs and a change there would deserve a look.
    InvalidId,
}

impl KeySource {
    pub const ALL: [KeySource; 3] = [
        KeySource::EnvelopeId,
        KeySource::ContentHash,
        KeySource::InvalidId,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            KeySource::EnvelopeId => "envelope_id",
            KeySource::ContentHash => "content_hash",
            KeySource::InvalidId => "invalid_id",
        }
    }
}

/// A decoded message: identity, time, and the change to apply.
#[derive(Debug, Clone)]
pub struct Event {
    /// Deduplication key: the envelope id, else a hash of `event_name` and `data`.
    pub key: String,
    pub key_source: KeySource,
    pub event_id: Option<Uuid>,
    pub event_name: String,
    pub webhook_id: Option<String>,
    /// UUIDv7 time of the id, else the records' own timestamps, else the envelope timestamp.
    pub event_time: DateTime<Utc>,
    pub change: Change,
}

impl Event {
    /// The fleet the records name, if any (for indexing `webhook_events`).
    pub fn fleet_id(&self) -> Option<Uuid> {
        match &self.change {
            Change::Invitation(_, r) => r.iter().find_map(|i| i.fleet_id),
            Change::ShareAgreement(r) => r.first().map(|s| s.fleet_id),
            Change::Connection { records, .. } => records.iter().find_map(|c| c.fleet_id),
            Change::FleetConnection(r) => r.first().map(|f| f.fleet_id),
            Change::ExecutionFailed(r) => r.iter().find_map(|e| e.fleet_id),
            Change::ScheduleDeactivated(_) | Change::Webhook(_) | Change::Ignored => None,
        }
    }
}

/// What an event asks of the fleet state. Unknown names are [`Change::Ignored`] (forward
/// compatible: recorded and acked).
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Invitation(InvitationStatus, Vec<Invitation>),
    ShareAgreement(Vec<ShareAgreement>),
    Connection {
        staled: bool,
        records: Vec<Connection>,
    },
    FleetConnection(Vec<FleetConnection>),
    ExecutionFailed(Vec<Execution>),
    ScheduleDeactivated(Vec<Schedule>),
    /// `webhook.*`: what Catena says about subscriptions (ours among them). It only wakes the
    /// reconciler up; Catena's API stays the source of truth.
    Webhook(Vec<WebhookStatusChange>),
    Ignored,
}

/// One subject of a `webhook.*` event and the status it announces.
#[derive(Debug, Clone, PartialEq)]
pub struct WebhookStatusChange {
    pub webhook_id: String,
    pub status: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvitationStatus {
    Created,
    Sent,
    Viewed,
    Accepted,
    Declined,
    Rejected,
    Expired,
    Deleted,
}

impl InvitationStatus {
    fn from_event(action: &str) -> Option<Self> {
        Some(match action {
            "created" => Self::Created,
            "sent" => Self::Sent,
            "viewed" => Self::Viewed,
            "accepted" => Self::Accepted,
            "declined" => Self::Declined,
            "rejected" => Self::Rejected,
            "expired" => Self::Expired,
            "deleted" => Self::Deleted,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Sent => "sent",
            Self::Viewed => "viewed",
            Self::Accepted => "accepted",
            Self::Declined => "declined",
            Self::Rejected => "rejected",
            Self::Expired => "expired",
            Self::Deleted => "deleted",
        }
    }

    /// Lifecycle order: a status only replaces one of lower rank (or equal rank and older).
    pub fn rank(self) -> i16 {
        match self {
            Self::Created => 0,
            Self::Sent => 1,
            Self::Viewed => 2,
            _ => 3,
        }
    }

    /// The fleet's onboarding stage this status implies.
    pub fn onboarding(self) -> Onboarding {
        match self {
            Self::Created | Self::Sent => Onboarding::Invited,
            Self::Viewed => Onboarding::Viewed,
            Self::Accepted => Onboarding::Accepted,
            Self::Declined | Self::Rejected => Onboarding::Declined,
            Self::Expired => Onboarding::Expired,
            Self::Deleted => Onboarding::Deleted,
        }
    }
}

/// `fleets.onboarding_status`: stages never move backwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Onboarding {
    Invited,
    Viewed,
    Declined,
    Expired,
    Deleted,
    Accepted,
    ShareAgreed,
    Connected,
}

impl Onboarding {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Invited => "invited",
            Self::Viewed => "viewed",
            Self::Declined => "declined",
            Self::Expired => "expired",
            Self::Deleted => "deleted",
            Self::Accepted => "accepted",
            Self::ShareAgreed => "share_agreed",
            Self::Connected => "connected",
        }
    }

    pub fn rank(self) -> i16 {
        match self {
            Self::Invited => 0,
            Self::Viewed => 1,
            Self::Declined | Self::Expired | Self::Deleted => 2,
            Self::Accepted => 3,
            Self::ShareAgreed => 4,
            Self::Connected => 5,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Invitation {
    pub id: Uuid,
    #[serde(default)]
    pub fleet_ref: Option<String>,
    #[serde(default)]
    pub fleet_id: Option<Uuid>,
    #[serde(default)]
    pub created_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub expires_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub accepted_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub declined_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub decline_reason: Option<String>,
    #[serde(default)]
    pub magic_link: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ShareAgreement {
    pub id: Uuid,
    pub fleet_id: Uuid,
    #[serde(default)]
    pub invitation_id: Option<Uuid>,
    #[serde(default)]
    pub fleet_ref: Option<String>,
    pub status: String,
    #[serde(default)]
    pub scopes: Option<serde_json::Value>,
    #[serde(default)]
    pub effective_date: Option<DateTime<Utc>>,
    #[serde(default)]
    pub expiration_date: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Connection {
    pub id: Uuid,
    #[serde(default)]
    pub fleet_id: Option<Uuid>,
    #[serde(default)]
    pub tsp_id: Option<Uuid>,
    #[serde(default)]
    pub source_name: Option<String>,
    #[serde(default)]
    pub status: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct FleetConnection {
    pub id: Uuid,
    pub fleet_id: Uuid,
    pub connection_id: Uuid,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Execution {
    pub id: Uuid,
    pub schedule_id: Uuid,
    #[serde(default)]
    pub connection_id: Option<Uuid>,
    #[serde(default)]
    pub fleet_id: Option<Uuid>,
    #[serde(default)]
    pub source_name: Option<String>,
    #[serde(default)]
    pub resource: Option<String>,
    #[serde(default)]
    pub created_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub updated_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Schedule {
    pub id: Uuid,
    pub connection_id: Uuid,
    #[serde(default)]
    pub resource: Option<String>,
    #[serde(default)]
    pub consecutive_error_threshold: Option<i32>,
    #[serde(default)]
    pub execution_interval_seconds: Option<i32>,
}

/// Decode a message body. `received_at` is the last-resort event time.
pub fn decode(body: &[u8], received_at: DateTime<Utc>) -> Result<Event, DecodeError> {
    let raw: RawEnvelope<'_> =
        serde_json::from_slice(body).map_err(|e| DecodeError::NotJson(e.to_string()))?;
    let version = raw.version.ok_or(DecodeError::MissingField("version"))?;
    let major = version
        .split('.')
        .next()
        .and_then(|m| m.trim().parse::<u32>().ok())
        .ok_or_else(|| DecodeError::UnsupportedVersion(version.clone()))?;
    if major == 0 || major > SUPPORTED_MAJOR {
        return Err(DecodeError::UnsupportedVersion(version));
    }
    let event_name = raw
        .event_name
        .ok_or(DecodeError::MissingField("event_name"))?;
    let data = raw.data.ok_or(DecodeError::MissingField("data"))?;
    let event_id = raw.id.as_deref().and_then(|s| Uuid::parse_str(s).ok());
    let (key, key_source) = match (event_id, raw.id.as_deref()) {
        (Some(id), _) => (id.to_string(), KeySource::EnvelopeId),
        (None, None) => (content_hash_key(&event_name, data)?, KeySource::ContentHash),
        (None, Some(_)) => (content_hash_key(&event_name, data)?, KeySource::InvalidId),
    };

    let change = decode_change(&event_name, data)?;
    let envelope_time = raw
        .timestamp
        .as_deref()
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.with_timezone(&Utc));
    let event_time = event_id
        .and_then(uuid_v7_time)
        .or_else(|| record_time(&change))
        .or(envelope_time)
        .unwrap_or(received_at);
    Ok(Event {
        key,
        key_source,
        event_id,
        event_name,
        webhook_id: raw.webhook_id,
        event_time,
        change,
    })
}

fn records<'a, T: Deserialize<'a>>(
    event_name: &str,
    data: &'a RawValue,
) -> Result<Vec<T>, DecodeError> {
    let items: Vec<&'a RawValue> =
        serde_json::from_str(data.get()).map_err(|_| DecodeError::InvalidRecord {
            event_name: event_name.to_owned(),
            index: 0,
            reason: "`data` is not an array".into(),
        })?;
    let invalid = |index, reason: String| DecodeError::InvalidRecord {
        event_name: event_name.to_owned(),
        index,
        reason,
    };
    if items.len() > MAX_RECORDS {
        return Err(invalid(
            MAX_RECORDS,
            format!("{} records exceed the limit of {MAX_RECORDS}", items.len()),
        ));
    }
    items
        .into_iter()
        .enumerate()
        .map(|(index, item)| {
            if item.get().len() > MAX_RECORD_BYTES {
                return Err(invalid(
                    index,
                    format!(
                        "record of {} bytes exceeds {MAX_RECORD_BYTES}",
                        item.get().len()
                    ),
                ));
            }
            serde_json::from_str(item.get()).map_err(|e| DecodeError::InvalidRecord {
                event_name: event_name.to_owned(),
                index,
                reason: e.to_string(),
            })
        })
        .collect()
}

fn decode_change(event_name: &str, data: &RawValue) -> Result<Change, DecodeError> {
    let (resource, action) = event_name.split_once('.').unwrap_or((event_name, ""));
    Ok(match (resource, action) {
        ("invitation", action) => match InvitationStatus::from_event(action) {
            Some(status) => Change::Invitation(status, records(event_name, data)?),
            None => Change::Ignored,
        },
        ("share_agreement", "created" | "updated" | "deleted") => {
            let mut agreements: Vec<ShareAgreement> = records(event_name, data)?;
            if action == "deleted" {
                for a in &mut agreements {
                    a.status = "deleted".into();
                }
            }
            Change::ShareAgreement(agreements)
        }
        ("connection", "created" | "staled") => Change::Connection {
            staled: action == "staled",
            records: records(event_name, data)?,
        },
        ("fleet_connection", "created") => Change::FleetConnection(records(event_name, data)?),
        ("execution", "failed") => Change::ExecutionFailed(records(event_name, data)?),
        ("schedule", "deactivated") => Change::ScheduleDeactivated(records(event_name, data)?),
        ("webhook", "created" | "updated" | "deleted" | "staled" | "activated" | "paused") => {
            let subjects: Vec<crate::catena::model::WebhookEventData> = records(event_name, data)?;
            Change::Webhook(
                subjects
                    .into_iter()
                    .map(|s| WebhookStatusChange {
                        status: match action {
                            "staled" => "stale".to_owned(),
                            "deleted" => "deleted".to_owned(),
                            "activated" => "active".to_owned(),
                            "paused" => "paused".to_owned(),
                            _ => s.status.map_or("active", |st| st.as_str()).to_owned(),
                        },
                        webhook_id: s.id,
                    })
                    .collect(),
            )
        }
        _ => Change::Ignored,
    })
}

/// The Unix-millisecond time in a UUIDv7, if it is one.
pub fn uuid_v7_time(id: Uuid) -> Option<DateTime<Utc>> {
    if id.get_version_num() != 7 {
        return None;
    }
    let (secs, nanos) = id.get_timestamp()?.to_unix();
    DateTime::from_timestamp(secs as i64, nanos)
}

fn record_time(change: &Change) -> Option<DateTime<Utc>> {
    let times: Vec<Option<DateTime<Utc>>> = match change {
        Change::Invitation(_, r) => r
            .iter()
            .flat_map(|i| [i.declined_at, i.accepted_at, i.created_at])
            .collect(),
        Change::ShareAgreement(r) => r.iter().map(|s| s.effective_date).collect(),
        Change::ExecutionFailed(r) => r
            .iter()
            .flat_map(|e| [e.updated_at, e.created_at])
            .collect(),
        _ => Vec::new(),
    };
    times.into_iter().flatten().max()
}

/// Dedup key for an envelope without a usable id: SHA-256 of its `event_name` and `data` only.
/// `timestamp` is Catena's dispatch time and `delivery_attempt` grows per retry, so hashing the
/// whole body gave every retry a key of its own; object keys are sorted (serde_json's map), so
/// formatting differences do not matter either.
fn content_hash_key(event_name: &str, data: &RawValue) -> Result<String, DecodeError> {
    let data: serde_json::Value =
        serde_json::from_str(data.get()).map_err(|e| DecodeError::NotJson(e.to_string()))?;
    let canonical =
        serde_json::to_vec(&serde_json::json!({"event_name": event_name, "data": data}))
            .expect("serialising a Value cannot fail");
    let digest = Sha256::digest(&canonical);
    let mut key = String::with_capacity(7 + 64);
    key.push_str("sha256:");
    for byte in digest {
        key.push_str(&format!("{byte:02x}"));
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(format!(
            "{}/tests/fixtures/events/{name}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap()
    }

    #[test]
    fn decodes_every_fixture() {
        let dir = format!("{}/tests/fixtures/events", env!("CARGO_MANIFEST_DIR"));
        for entry in std::fs::read_dir(dir).unwrap() {
            let body = std::fs::read(entry.unwrap().path()).unwrap();
            let event = decode(&body, Utc::now()).unwrap();
            assert_ne!(event.change, Change::Ignored, "{}", event.event_name);
            assert!(event.event_id.is_some());
        }
    }

    #[test]
    fn event_time_comes_from_the_uuid_v7() {
        let event = decode(&fixture("01-invitation.created.json"), Utc::now()).unwrap();
        // 019abf9b-0900-... = 2025-11-26T10:00:00Z
        assert_eq!(event.event_time.to_rfc3339(), "2025-11-26T10:00:00+00:00");
    }

    #[test]
    fn null_id_keys_ignore_dispatch_time_delivery_attempt_and_key_order() {
        let a = br#"{"version":"1.0","event_name":"x.y","data":[{"a":1,"b":2}],"webhook_id":"w","id":null,"delivery_attempt":1,"timestamp":"2025-11-26T10:00:00Z"}"#;
        let b = br#"{"delivery_attempt":3,"id":null,"webhook_id":"w","data":[{"b":2,"a":1}],"event_name":"x.y","version":"1.0","timestamp":"2025-11-26T10:00:05Z"}"#;
        let (ka, kb) = (
            decode(a, Utc::now()).unwrap().key,
            decode(b, Utc::now()).unwrap().key,
        );
        assert_eq!(ka, kb);
        assert!(ka.starts_with("sha256:"));
        assert_eq!(
            decode(a, Utc::now()).unwrap().key_source,
            KeySource::ContentHash
        );
        let c = br#"{"version":"1.0","event_name":"x.z","data":[{"a":1,"b":2}],"webhook_id":"w","delivery_attempt":1}"#;
        assert_ne!(decode(c, Utc::now()).unwrap().key, ka, "another event name");
        let d = br#"{"version":"1.0","event_name":"x.y","data":[{"a":1,"b":3}],"webhook_id":"w"}"#;
        assert_ne!(decode(d, Utc::now()).unwrap().key, ka, "other data");
        let e = br#"{"version":"1.0","event_name":"x.y","data":[{"a":1,"b":2}],"webhook_id":"w","id":"evt_123"}"#;
        let invalid = decode(e, Utc::now()).unwrap();
        assert_eq!(
            (invalid.key, invalid.key_source),
            (ka, KeySource::InvalidId)
        );
    }

    #[test]
    fn permanent_errors() {
        let now = Utc::now();
        assert!(matches!(
            decode(b"not json", now),
            Err(DecodeError::NotJson(_))
        ));
        assert_eq!(
            decode(br#"{"event_name":"a.b","data":[]}"#, now).err(),
            Some(DecodeError::MissingField("version"))
        );
        assert!(matches!(
            decode(br#"{"version":"2.0","event_name":"a.b","data":[]}"#, now),
            Err(DecodeError::UnsupportedVersion(_))
        ));
        let missing_id =
            br#"{"version":"1.0","event_name":"connection.staled","data":[{"source_name":"x"}]}"#;
        assert!(matches!(
            decode(missing_id, now),
            Err(DecodeError::InvalidRecord { .. })
        ));
        let unknown = br#"{"version":"1.1","event_name":"vehicle.added","data":[{"anything":1}]}"#;
        assert_eq!(decode(unknown, now).unwrap().change, Change::Ignored);
    }
}
