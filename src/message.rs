//! The AMQP message contract: every header and property a catena-ingest message carries, the
//! builders that write them and the readers that read them back.
//!
//! An event message is the uncompressed Catena body, persistent, with Catena's delivery headers,
//! the relay's receive time and a few standard properties. The relay writes it, `send --target
//! amqp` writes the same shape, the worker reroutes it to a retry tier or the parking lot with
//! its own headers added, and `parked replay` strips those again. All of it lives here so the
//! producers and consumers cannot drift apart.

use std::borrow::Cow;

use chrono::{DateTime, SecondsFormat, Utc};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, ShortString};

/// Catena's delivery headers carried onto the message (lower-case, as the broker stores them).
pub const CATENA_HEADERS: [&str; 7] = [
    WEBHOOK_ID,
    REQUEST_ID,
    EVENT_TYPE,
    SCHEMA_VERSION,
    SOURCE,
    DELIVERY_ATTEMPT,
    CATENA_TIMESTAMP,
];
pub const WEBHOOK_ID: &str = "x-webhook-id";
pub const REQUEST_ID: &str = "x-request-id";
pub const EVENT_TYPE: &str = "x-event-type";
pub const SCHEMA_VERSION: &str = "x-schema-version";
pub const SOURCE: &str = "x-source";
pub const DELIVERY_ATTEMPT: &str = "x-delivery-attempt";
pub const CATENA_TIMESTAMP: &str = "x-catena-timestamp";

/// The relay's receive time (RFC 3339, microseconds, UTC): the start of the event-lag clock.
pub const RECEIVED_AT: &str = "received_at";

/// Our own attempt counter (never `x-death`, which the broker rewrites and caps).
pub const ATTEMPTS: &str = "x-catena-ingest-attempts";
pub const PARK_REASON: &str = "x-park-reason";
pub const PARK_DETAIL: &str = "x-park-detail";
pub const PARKED_AT: &str = "x-parked-at";
/// A unique id per parked copy, so `parked show ID` can name one message.
pub const PARK_ID: &str = "x-park-id";
pub const ORIGINAL_ROUTING_KEY: &str = "x-original-routing-key";
pub const REPLAYED_AT: &str = "x-replayed-at";
/// The broker's own dead-letter history (messages it parked past the delivery limit).
pub const X_DEATH: &str = "x-death";

/// Park details are cut to this many characters (a database error can be long).
const MAX_PARK_DETAIL_CHARS: usize = 512;

/// Why a message went to the parking lot (the `x-park-reason` header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParkReason {
    Malformed,
    UnsupportedVersion,
    InvalidRecord,
    RetriesExhausted,
    Rejected,
    HandlerPanic,
}

impl ParkReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ParkReason::Malformed => "malformed",
            ParkReason::UnsupportedVersion => "unsupported_version",
            ParkReason::InvalidRecord => "invalid_record",
            ParkReason::RetriesExhausted => "retries_exhausted",
            ParkReason::Rejected => "rejected_by_database",
            ParkReason::HandlerPanic => "handler_panic",
        }
    }
}

/// Catena's delivery headers of one request, as far as the request had them.
#[derive(Debug, Clone, Copy, Default)]
pub struct CatenaHeaders<'a> {
    pub webhook_id: Option<&'a str>,
    pub request_id: Option<&'a str>,
    pub event_type: Option<&'a str>,
    pub schema_version: Option<&'a str>,
    pub source: Option<&'a str>,
    pub delivery_attempt: Option<&'a str>,
    pub catena_timestamp: Option<&'a str>,
}

impl<'a> CatenaHeaders<'a> {
    /// Read them from any header map, by their (case-insensitive) HTTP names.
    pub fn from_lookup(get: impl Fn(&str) -> Option<&'a str>) -> Self {
        Self {
            webhook_id: get(WEBHOOK_ID),
            request_id: get(REQUEST_ID),
            event_type: get(EVENT_TYPE),
            schema_version: get(SCHEMA_VERSION),
            source: get(SOURCE),
            delivery_attempt: get(DELIVERY_ATTEMPT),
            catena_timestamp: get(CATENA_TIMESTAMP),
        }
    }

    fn pairs(&self) -> [(&'static str, Option<&'a str>); 7] {
        [
            (WEBHOOK_ID, self.webhook_id),
            (REQUEST_ID, self.request_id),
            (EVENT_TYPE, self.event_type),
            (SCHEMA_VERSION, self.schema_version),
            (SOURCE, self.source),
            (DELIVERY_ATTEMPT, self.delivery_attempt),
            (CATENA_TIMESTAMP, self.catena_timestamp),
        ]
    }
}

/// Who published an event message (the `app_id` property).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Producer {
    Relay,
    /// `catena-ingest send --target amqp`, the broker-only baseline.
    LoadGenerator,
}

impl Producer {
    fn app_id(self) -> &'static str {
        match self {
            Producer::Relay => "catena-ingest-relay",
            Producer::LoadGenerator => "catena-ingest-send",
        }
    }
}

/// The properties of a new event message. The request id doubles as `message_id`.
pub fn event_properties(
    catena: &CatenaHeaders<'_>,
    received_at: DateTime<Utc>,
    producer: Producer,
) -> BasicProperties {
    let mut table = FieldTable::default();
    for (name, value) in catena.pairs() {
        if let Some(value) = value {
            table.insert(name.into(), long_string(value));
        }
    }
    table.insert(
        RECEIVED_AT.into(),
        long_string(&received_at.to_rfc3339_opts(SecondsFormat::Micros, true)),
    );
    let mut properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_timestamp(received_at.timestamp() as u64)
        .with_app_id(producer.app_id().into())
        .with_headers(table);
    if let Some(request_id) = catena.request_id {
        properties = properties.with_message_id(request_id.into());
    }
    properties
}

/// A copy for the next retry tier: the same message with its failure count raised.
pub fn retry_properties(
    properties: &BasicProperties,
    routing_key: &str,
    failures: u32,
) -> BasicProperties {
    with_headers(
        properties,
        routing_key,
        [(ATTEMPTS, AMQPValue::LongLongInt(failures as i64))],
    )
}

/// A copy for the parking lot, saying why, when and after how many attempts.
pub fn park_properties(
    properties: &BasicProperties,
    routing_key: &str,
    reason: ParkReason,
    detail: &str,
    parked_at: DateTime<Utc>,
) -> BasicProperties {
    let detail: String = detail.chars().take(MAX_PARK_DETAIL_CHARS).collect();
    with_headers(
        properties,
        routing_key,
        [
            (PARK_REASON, long_string(reason.as_str())),
            (PARK_DETAIL, long_string(&detail)),
            (
                PARKED_AT,
                long_string(&parked_at.to_rfc3339_opts(SecondsFormat::Millis, true)),
            ),
            (
                ATTEMPTS,
                AMQPValue::LongLongInt(attempts(properties) as i64 + 1),
            ),
            (PARK_ID, long_string(&uuid::Uuid::new_v4().to_string())),
        ],
    )
}

/// A replayed copy starts afresh: park headers and our attempt counter are dropped, and the
/// broker's own `x-death` history too (it is not ours to carry).
pub fn replay_properties(
    original: &BasicProperties,
    replayed_at: DateTime<Utc>,
) -> BasicProperties {
    let mut headers = FieldTable::default();
    if let Some(table) = original.headers() {
        for (key, value) in table.inner() {
            let k = key.as_str();
            let ours_or_the_brokers = k.starts_with("x-park")
                || k == ATTEMPTS
                || k == X_DEATH
                || k.starts_with("x-first-death")
                || k.starts_with("x-last-death");
            if !ours_or_the_brokers {
                headers.insert(key.clone(), value.clone());
            }
        }
    }
    headers.insert(REPLAYED_AT.into(), long_string(&replayed_at.to_rfc3339()));
    original.clone().with_headers(headers)
}

/// The original's properties with `extra` headers set, remembering where it was first routed.
fn with_headers<const N: usize>(
    properties: &BasicProperties,
    routing_key: &str,
    extra: [(&str, AMQPValue); N],
) -> BasicProperties {
    let mut headers = properties.headers().clone().unwrap_or_default();
    for (name, value) in extra {
        headers.insert(ShortString::from(name), value);
    }
    if !headers.inner().contains_key(ORIGINAL_ROUTING_KEY) {
        headers.insert(ORIGINAL_ROUTING_KEY.into(), long_string(routing_key));
    }
    properties.clone().with_headers(headers)
}

fn long_string(value: &str) -> AMQPValue {
    AMQPValue::LongString(value.into())
}

// -------------------------------------------------------------------------------------------
// Readers

/// A header's raw value.
pub fn header<'a>(properties: &'a BasicProperties, name: &str) -> Option<&'a AMQPValue> {
    properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(name))
}

/// A string header (long or short string); `None` for other types.
pub fn header_str<'a>(properties: &'a BasicProperties, name: &str) -> Option<&'a str> {
    match header(properties, name)? {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str()),
        _ => None,
    }
}

/// Failures so far, from our own header.
pub fn attempts(properties: &BasicProperties) -> u32 {
    match header(properties, ATTEMPTS) {
        Some(AMQPValue::LongLongInt(n)) => (*n).clamp(0, u32::MAX as i64) as u32,
        Some(AMQPValue::LongInt(n)) => (*n).max(0) as u32,
        Some(AMQPValue::LongString(s)) => std::str::from_utf8(s.as_bytes())
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0),
        _ => 0,
    }
}

/// The relay's receive time, when the message carries a readable one.
pub fn received_at(properties: &BasicProperties) -> Option<DateTime<Utc>> {
    header_str(properties, RECEIVED_AT)
        .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
        .map(|t| t.with_timezone(&Utc))
}

/// Any AMQP value as JSON, for operators (`parked list --json`) and tests.
pub fn to_json(value: &AMQPValue) -> serde_json::Value {
    match value {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned().into(),
        AMQPValue::ShortString(s) => s.as_str().into(),
        AMQPValue::LongLongInt(n) => (*n).into(),
        AMQPValue::LongInt(n) => (*n).into(),
        AMQPValue::ShortInt(n) => (*n).into(),
        AMQPValue::Boolean(b) => (*b).into(),
        AMQPValue::Timestamp(t) => (*t).into(),
        AMQPValue::FieldTable(t) => serde_json::Value::Object(headers_json(t)),
        AMQPValue::FieldArray(a) => a.as_slice().iter().map(to_json).collect(),
        other => format!("{other:?}").into(),
    }
}

/// Every header as JSON.
pub fn headers_json(table: &FieldTable) -> serde_json::Map<String, serde_json::Value> {
    table
        .inner()
        .iter()
        .map(|(k, v)| (k.to_string(), to_json(v)))
        .collect()
}

/// A header rendered as text whatever its type (numbers as digits), for display and tests.
pub fn header_text<'a>(properties: &'a BasicProperties, name: &str) -> Option<Cow<'a, str>> {
    if let Some(text) = header_str(properties, name) {
        return Some(Cow::Borrowed(text));
    }
    header(properties, name).map(|value| match to_json(value) {
        serde_json::Value::String(s) => Cow::Owned(s),
        other => Cow::Owned(other.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catena() -> CatenaHeaders<'static> {
        CatenaHeaders {
            webhook_id: Some("w1"),
            request_id: Some("r1"),
            event_type: Some("connection.staled"),
            delivery_attempt: Some("2"),
            ..Default::default()
        }
    }

    #[test]
    fn an_event_message_carries_catena_headers_and_the_receive_time() {
        let now = Utc::now();
        let p = event_properties(&catena(), now, Producer::Relay);
        assert_eq!(header_str(&p, WEBHOOK_ID), Some("w1"));
        assert_eq!(header_str(&p, DELIVERY_ATTEMPT), Some("2"));
        assert_eq!(header(&p, SOURCE), None, "absent headers stay absent");
        assert_eq!(p.message_id().as_ref().map(|m| m.as_str()), Some("r1"));
        let read = received_at(&p).unwrap();
        assert_eq!(read.timestamp_micros(), now.timestamp_micros());
        assert_eq!(attempts(&p), 0);
    }

    #[test]
    fn retry_and_park_count_attempts_and_replay_starts_afresh() {
        let p = event_properties(&catena(), Utc::now(), Producer::Relay);
        let retried = retry_properties(&p, "connection.staled", 1);
        assert_eq!(attempts(&retried), 1);
        let retried = retry_properties(&retried, "ignored.key", 2);
        assert_eq!(attempts(&retried), 2);
        assert_eq!(
            header_str(&retried, ORIGINAL_ROUTING_KEY),
            Some("connection.staled"),
            "the first routing key is kept"
        );

        let long = "x".repeat(2000);
        let parked = park_properties(&retried, "k", ParkReason::Rejected, &long, Utc::now());
        assert_eq!(attempts(&parked), 3);
        assert_eq!(
            header_str(&parked, PARK_REASON),
            Some("rejected_by_database")
        );
        assert_eq!(header_str(&parked, PARK_DETAIL).unwrap().len(), 512);
        assert_eq!(header_text(&parked, ATTEMPTS).as_deref(), Some("3"));
        let again = park_properties(&retried, "k", ParkReason::Rejected, "d", Utc::now());
        assert_ne!(
            header_str(&parked, PARK_ID),
            header_str(&again, PARK_ID),
            "each parked copy has an id of its own"
        );

        let replayed = replay_properties(&parked, Utc::now());
        assert_eq!(attempts(&replayed), 0);
        assert_eq!(header(&replayed, PARK_REASON), None);
        assert!(header(&replayed, REPLAYED_AT).is_some());
        assert_eq!(header_str(&replayed, WEBHOOK_ID), Some("w1"));
    }
}
