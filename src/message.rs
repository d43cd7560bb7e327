//! The AMQP message contract: every header and property a catena-ingest message carries, the
//! builders that write them and the readers that read them back.
//!
//! An event message is the uncompressed Catena body, persistent, published straight into
//! `<prefix>.events` through the default exchange (README, "Broker contract"). Its Catena
//! metadata travels in standard properties where one fits (`message_id` = `X-Request-ID`,
//! `correlation_id` = `X-Webhook-ID`, `type` = the event name, `timestamp` = the relay's receive
//! second) and the rest in one header, [`CATENA_META`], so a consumer parses one header entry
//! instead of eight: lapin's header-table parsing was a quarter of the worker's CPU.
//!
//! A *group* message carries several requests that the relay published together (see
//! [`crate::broker::EventPublisher`]): content type [`GROUP_CONTENT_TYPE`], and a body of
//! length-prefixed entries, each with the same metadata as a single message's and its own body.
//!
//! Messages of the shape before (routing key = event name, one header per Catena header,
//! `received_at` as text) are still read: they may sit in the queues when a new worker starts.
//!
//! The relay writes these, `send --target amqp` writes the same shape, the worker reroutes an
//! event to a retry tier or the parking lot with its own headers added (always as a single
//! message, so a poison event travels alone), and `parked replay` strips those again. All of it
//! lives here so the producers and consumers cannot drift apart.

use std::borrow::Cow;

use chrono::{DateTime, SecondsFormat, Utc};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, ShortString};

/// The one header of an event message: the Catena metadata no standard property holds, as
/// `received_at=<µs since the epoch>;schema_version=..;source=..;delivery_attempt=..;
/// catena_timestamp=..` (absent fields left out, values percent-escaped where needed).
pub const CATENA_META: &str = "x-catena";
/// The content type of a single event message (the Catena body as it came).
pub const EVENT_CONTENT_TYPE: &str = "application/json";
/// The content type of a group message (see [`encode_group`]).
pub const GROUP_CONTENT_TYPE: &str = "application/vnd.catena-ingest.group";
/// The `type` property of a group message.
pub const GROUP_TYPE: &str = "catena-ingest.group";

/// Catena's delivery headers, by their (lower-case) HTTP names; before the one-header shape,
/// each was a header of its own on the message under the same name.
pub const WEBHOOK_ID: &str = "x-webhook-id";
pub const REQUEST_ID: &str = "x-request-id";
pub const EVENT_TYPE: &str = "x-event-type";
pub const SCHEMA_VERSION: &str = "x-schema-version";
pub const SOURCE: &str = "x-source";
pub const DELIVERY_ATTEMPT: &str = "x-delivery-attempt";
pub const CATENA_TIMESTAMP: &str = "x-catena-timestamp";

/// The relay's receive time (the start of the event-lag clock): a field of [`CATENA_META`]; in
/// the shape before, a header of its own (RFC 3339, microseconds, UTC).
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

/// The metadata of one event, whichever way it travels: the properties and [`CATENA_META`]
/// header of a single message, an entry of a group, or the headers of the shape before.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventMeta<'a> {
    pub request_id: Option<Cow<'a, str>>,
    pub webhook_id: Option<Cow<'a, str>>,
    /// The event name (the verified body's `event_name`, else `X-Event-Type`).
    pub event_type: Option<Cow<'a, str>>,
    pub received_at: Option<DateTime<Utc>>,
    pub schema_version: Option<Cow<'a, str>>,
    pub source: Option<Cow<'a, str>>,
    pub delivery_attempt: Option<Cow<'a, str>>,
    pub catena_timestamp: Option<Cow<'a, str>>,
}

impl EventMeta<'static> {
    /// What the relay knows of a request it is about to publish.
    pub fn of_request(
        catena: &CatenaHeaders<'_>,
        event_type: &str,
        received_at: DateTime<Utc>,
    ) -> Self {
        let owned = |v: Option<&str>| v.map(|v| Cow::Owned(v.to_owned()));
        Self {
            request_id: owned(catena.request_id),
            webhook_id: owned(catena.webhook_id),
            event_type: Some(Cow::Owned(event_type.to_owned())),
            received_at: Some(received_at),
            schema_version: owned(catena.schema_version),
            source: owned(catena.source),
            delivery_attempt: owned(catena.delivery_attempt),
            catena_timestamp: owned(catena.catena_timestamp),
        }
    }
}

/// Field names inside [`CATENA_META`] and group entries.
const F_REQUEST_ID: &str = "request_id";
const F_WEBHOOK_ID: &str = "webhook_id";
const F_TYPE: &str = "type";

impl<'a> EventMeta<'a> {
    /// The `;`-separated fields: the ids and type only in group entries (a single message has
    /// standard properties for them).
    fn write_fields(&self, out: &mut String, with_ids: bool) {
        let mut field = |name: &str, value: &str| {
            if !out.is_empty() {
                out.push(';');
            }
            out.push_str(name);
            out.push('=');
            escape_into(value, out);
        };
        if let Some(t) = self.received_at {
            field(RECEIVED_AT, &t.timestamp_micros().to_string());
        }
        if with_ids {
            for (name, value) in [
                (F_REQUEST_ID, &self.request_id),
                (F_WEBHOOK_ID, &self.webhook_id),
                (F_TYPE, &self.event_type),
            ] {
                if let Some(value) = value {
                    field(name, value);
                }
            }
        }
        for (name, value) in [
            ("schema_version", &self.schema_version),
            ("source", &self.source),
            ("delivery_attempt", &self.delivery_attempt),
            ("catena_timestamp", &self.catena_timestamp),
        ] {
            if let Some(value) = value {
                field(name, value);
            }
        }
    }

    /// Read fields written by [`Self::write_fields`] into `self`; unknown names are skipped (a
    /// newer relay may add some).
    fn read_fields(&mut self, text: &'a str) {
        for pair in text.split(';') {
            let Some((name, value)) = pair.split_once('=') else {
                continue;
            };
            let value = unescape(value);
            match name {
                RECEIVED_AT => self.received_at = parse_micros(&value),
                F_REQUEST_ID => self.request_id = Some(value),
                F_WEBHOOK_ID => self.webhook_id = Some(value),
                F_TYPE => self.event_type = Some(value),
                "schema_version" => self.schema_version = Some(value),
                "source" => self.source = Some(value),
                "delivery_attempt" => self.delivery_attempt = Some(value),
                "catena_timestamp" => self.catena_timestamp = Some(value),
                _ => {}
            }
        }
    }

    /// Every field by the name an operator knows it under (Catena's header names), for `parked
    /// show` and tests.
    pub fn fields(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        for (name, value) in [
            (REQUEST_ID, &self.request_id),
            (WEBHOOK_ID, &self.webhook_id),
            (EVENT_TYPE, &self.event_type),
            (SCHEMA_VERSION, &self.schema_version),
            (SOURCE, &self.source),
            (DELIVERY_ATTEMPT, &self.delivery_attempt),
            (CATENA_TIMESTAMP, &self.catena_timestamp),
        ] {
            if let Some(value) = value {
                out.push((name, value.to_string()));
            }
        }
        if let Some(t) = self.received_at {
            out.push((RECEIVED_AT, t.to_rfc3339_opts(SecondsFormat::Micros, true)));
        }
        out
    }
}

fn parse_micros(text: &str) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp_micros(text.parse().ok()?)
}

/// Values are Catena header values (ids, versions, times): escaping is for the odd one that
/// holds a separator.
fn escape_into(value: &str, out: &mut String) {
    for c in value.chars() {
        match c {
            ';' | '=' | '%' => out.push_str(&format!("%{:02X}", c as u32)),
            c => out.push(c),
        }
    }
}

fn unescape(value: &str) -> Cow<'_, str> {
    if !value.contains('%') {
        return Cow::Borrowed(value);
    }
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(byte) = value
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(byte);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

fn base_properties(received_at: Option<DateTime<Utc>>, producer: Producer) -> BasicProperties {
    let properties = BasicProperties::default().with_app_id(producer.app_id().into());
    match received_at {
        Some(t) => properties.with_timestamp(t.timestamp() as u64),
        None => properties,
    }
}

/// The properties of a single event message.
pub fn event_properties(meta: &EventMeta<'_>, producer: Producer) -> BasicProperties {
    let mut text = String::with_capacity(128);
    meta.write_fields(&mut text, false);
    let mut table = FieldTable::default();
    table.insert(CATENA_META.into(), long_string(&text));
    let mut properties = base_properties(meta.received_at, producer)
        .with_content_type(EVENT_CONTENT_TYPE.into())
        .with_headers(table);
    if let Some(request_id) = &meta.request_id {
        properties = properties.with_message_id(request_id.as_ref().into());
    }
    if let Some(webhook_id) = &meta.webhook_id {
        properties = properties.with_correlation_id(webhook_id.as_ref().into());
    }
    if let Some(event_type) = &meta.event_type {
        properties = properties.with_type(event_type.as_ref().into());
    }
    properties
}

/// The properties of a group message: no headers at all (each entry carries its own metadata).
pub fn group_properties(received_at: DateTime<Utc>, producer: Producer) -> BasicProperties {
    base_properties(Some(received_at), producer)
        .with_content_type(GROUP_CONTENT_TYPE.into())
        .with_type(GROUP_TYPE.into())
}

/// Whether a message is a group (see [`decode_group`]).
pub fn is_group(properties: &BasicProperties) -> bool {
    properties
        .content_type()
        .as_ref()
        .is_some_and(|t| t.as_str() == GROUP_CONTENT_TYPE)
}

/// The metadata of a single message, of this shape or the one before.
pub fn meta_of(properties: &BasicProperties) -> EventMeta<'_> {
    fn short(v: &Option<ShortString>) -> Option<Cow<'_, str>> {
        v.as_ref().map(|s| Cow::Borrowed(s.as_str()))
    }
    let mut meta = EventMeta {
        request_id: short(properties.message_id()),
        webhook_id: short(properties.correlation_id()),
        event_type: short(properties.kind()),
        ..Default::default()
    };
    if let Some(text) = header_str(properties, CATENA_META) {
        meta.read_fields(text);
        return meta;
    }
    // The shape before: one header each, the receive time as RFC 3339 text.
    let old = |name| header_str(properties, name).map(Cow::Borrowed);
    meta.webhook_id = meta.webhook_id.or_else(|| old(WEBHOOK_ID));
    meta.request_id = meta.request_id.or_else(|| old(REQUEST_ID));
    meta.event_type = meta.event_type.or_else(|| old(EVENT_TYPE));
    meta.schema_version = old(SCHEMA_VERSION);
    meta.source = old(SOURCE);
    meta.delivery_attempt = old(DELIVERY_ATTEMPT);
    meta.catena_timestamp = old(CATENA_TIMESTAMP);
    meta.received_at = old_received_at(properties);
    meta
}

/// The event name a single message travels under: its `type`, else (the shape before) its
/// `x-event-type` header or routing key.
pub fn event_name_of<'a>(properties: &'a BasicProperties, routing_key: &'a str) -> &'a str {
    match properties.kind() {
        Some(kind) if kind.as_str() != GROUP_TYPE => kind.as_str(),
        _ => header_str(properties, EVENT_TYPE).unwrap_or(routing_key),
    }
}

fn old_received_at(properties: &BasicProperties) -> Option<DateTime<Utc>> {
    header_str(properties, RECEIVED_AT)
        .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
        .map(|t| t.with_timezone(&Utc))
}

// -------------------------------------------------------------------------------------------
// Groups

/// The first bytes of a group body, so a body that is not one is told at once.
const GROUP_MAGIC: &[u8] = b"catena-group/1\n";

/// One request of a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupEntry<'a> {
    pub meta: EventMeta<'a>,
    pub body: &'a [u8],
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GroupError {
    #[error("not a group body (bad magic)")]
    Magic,
    #[error("group body truncated at byte {0}")]
    Truncated(usize),
    #[error("group entry metadata is not UTF-8")]
    Utf8,
    #[error("empty group")]
    Empty,
}

/// A group body: the magic line, then per entry a big-endian `u32` length and the metadata
/// fields (as in [`CATENA_META`], ids and type included), and a `u32` length and the body.
/// Length-prefixed rather than JSON, so a body that is not valid JSON travels (and is parked)
/// as it came, and the worker slices entries out without parsing them twice.
pub fn encode_group<'a>(
    entries: impl Iterator<Item = (&'a EventMeta<'a>, &'a [u8])> + Clone,
) -> Vec<u8> {
    // Metadata fields run to ~150 bytes an entry; one allocation in the common case.
    let capacity: usize = entries.clone().map(|(_, body)| body.len() + 200).sum();
    let mut out = Vec::with_capacity(GROUP_MAGIC.len() + capacity);
    out.extend_from_slice(GROUP_MAGIC);
    let mut text = String::with_capacity(256);
    for (meta, body) in entries {
        text.clear();
        meta.write_fields(&mut text, true);
        out.extend_from_slice(&(text.len() as u32).to_be_bytes());
        out.extend_from_slice(text.as_bytes());
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(body);
    }
    out
}

/// How many events a message carries: 1, or a group's entry count (read from the length
/// prefixes alone; a broken group counts as the 1 message it will be parked as).
pub fn events_in(properties: &BasicProperties, body: &[u8]) -> usize {
    if !is_group(properties) {
        return 1;
    }
    let Some(mut rest) = body.strip_prefix(GROUP_MAGIC) else {
        return 1;
    };
    let mut entries = 0;
    while !rest.is_empty() {
        for _ in 0..2 {
            let Some((len, tail)) = rest.split_first_chunk::<4>() else {
                return entries.max(1);
            };
            let len = u32::from_be_bytes(*len) as usize;
            let Some(tail) = tail.get(len..) else {
                return entries.max(1);
            };
            rest = tail;
        }
        entries += 1;
    }
    entries.max(1)
}

/// The entries of a group body, borrowing from it.
pub fn decode_group(body: &[u8]) -> Result<Vec<GroupEntry<'_>>, GroupError> {
    let rest = body.strip_prefix(GROUP_MAGIC).ok_or(GroupError::Magic)?;
    let mut at = GROUP_MAGIC.len();
    let mut rest = rest;
    let mut entries = Vec::new();
    let take = |rest: &mut &'_ [u8], at: &mut usize| -> Result<usize, GroupError> {
        let (len, tail) = rest
            .split_first_chunk::<4>()
            .ok_or(GroupError::Truncated(*at))?;
        *rest = tail;
        *at += 4;
        Ok(u32::from_be_bytes(*len) as usize)
    };
    while !rest.is_empty() {
        let meta_len = take(&mut rest, &mut at)?;
        if rest.len() < meta_len {
            return Err(GroupError::Truncated(at));
        }
        let (meta_bytes, tail) = rest.split_at(meta_len);
        let text = std::str::from_utf8(meta_bytes).map_err(|_| GroupError::Utf8)?;
        rest = tail;
        at += meta_len;
        let body_len = take(&mut rest, &mut at)?;
        if rest.len() < body_len {
            return Err(GroupError::Truncated(at));
        }
        let (entry_body, tail) = rest.split_at(body_len);
        rest = tail;
        at += body_len;
        let mut meta = EventMeta::default();
        meta.read_fields(text);
        entries.push(GroupEntry {
            meta,
            body: entry_body,
        });
    }
    if entries.is_empty() {
        return Err(GroupError::Empty);
    }
    Ok(entries)
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

/// The relay's receive time of a single message, when it carries a readable one (either shape).
pub fn received_at(properties: &BasicProperties) -> Option<DateTime<Utc>> {
    match header_str(properties, CATENA_META) {
        // Written first, so the common case reads one field.
        Some(text) => text
            .split(';')
            .find_map(|pair| pair.strip_prefix("received_at="))
            .and_then(parse_micros),
        None => old_received_at(properties),
    }
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

    fn meta(received_at: DateTime<Utc>) -> EventMeta<'static> {
        EventMeta::of_request(&catena(), "connection.staled", received_at)
    }

    #[test]
    fn an_event_message_carries_its_metadata_in_properties_and_one_header() {
        let now = Utc::now();
        let p = event_properties(&meta(now), Producer::Relay);
        assert_eq!(p.message_id().as_ref().map(|m| m.as_str()), Some("r1"));
        assert_eq!(p.correlation_id().as_ref().map(|m| m.as_str()), Some("w1"));
        assert_eq!(
            p.kind().as_ref().map(|m| m.as_str()),
            Some("connection.staled")
        );
        assert_eq!(p.headers().as_ref().unwrap().inner().len(), 1, "one header");
        let read = received_at(&p).unwrap();
        assert_eq!(read.timestamp_micros(), now.timestamp_micros());
        assert_eq!(attempts(&p), 0);

        let back = meta_of(&p);
        assert_eq!(back.delivery_attempt.as_deref(), Some("2"));
        assert_eq!(back.source, None, "absent fields stay absent");
        assert_eq!(
            back.received_at.unwrap().timestamp_micros(),
            now.timestamp_micros()
        );
        assert_eq!(back.webhook_id.as_deref(), Some("w1"));
    }

    #[test]
    fn separators_in_values_survive_the_round_trip() {
        let mut m = meta(Utc::now());
        m.source = Some("a;b=c%d".into());
        let p = event_properties(&m, Producer::Relay);
        assert_eq!(meta_of(&p).source.as_deref(), Some("a;b=c%d"));
        assert_eq!(
            received_at(&p),
            m.received_at
                .map(|t| { DateTime::from_timestamp_micros(t.timestamp_micros()).unwrap() })
        );
    }

    /// A message as the relay wrote it before the one-header shape: routing key = event name,
    /// one header per Catena header, `received_at` as RFC 3339 text.
    fn old_shape(received_at: &str) -> BasicProperties {
        let mut table = FieldTable::default();
        for (name, value) in [
            (WEBHOOK_ID, "w1"),
            (REQUEST_ID, "r1"),
            (EVENT_TYPE, "connection.staled"),
            (SCHEMA_VERSION, "1.2"),
            (DELIVERY_ATTEMPT, "3"),
            (RECEIVED_AT, received_at),
        ] {
            table.insert(name.into(), long_string(value));
        }
        BasicProperties::default()
            .with_message_id("r1".into())
            .with_headers(table)
    }

    #[test]
    fn a_message_of_the_shape_before_is_still_read() {
        let p = old_shape("2026-11-30T10:00:00.123456Z");
        let m = meta_of(&p);
        assert_eq!(m.webhook_id.as_deref(), Some("w1"));
        assert_eq!(m.event_type.as_deref(), Some("connection.staled"));
        assert_eq!(m.schema_version.as_deref(), Some("1.2"));
        assert_eq!(m.delivery_attempt.as_deref(), Some("3"));
        let t = received_at(&p).unwrap();
        assert_eq!(
            t.to_rfc3339_opts(SecondsFormat::Micros, true),
            "2026-11-30T10:00:00.123456Z"
        );
        assert_eq!(m.received_at, Some(t));
    }

    #[test]
    fn a_group_round_trips_its_entries_and_refuses_broken_bodies() {
        let now = Utc::now();
        let mut second = meta(now);
        second.request_id = Some("r2".into());
        second.event_type = Some("execution.failed".into());
        second.source = Some("x;y".into());
        let first = meta(now);
        let bodies: [&[u8]; 2] = [b"{\"a\":1}", b"not json at all"];
        let metas = [first.clone(), second.clone()];
        let body = encode_group(metas.iter().zip(bodies));
        let entries = decode_group(&body).unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].body, bodies[0]);
        assert_eq!(entries[1].body, bodies[1]);
        assert_eq!(entries[1].meta.request_id.as_deref(), Some("r2"));
        assert_eq!(
            entries[1].meta.event_type.as_deref(),
            Some("execution.failed")
        );
        assert_eq!(entries[1].meta.source.as_deref(), Some("x;y"));
        assert_eq!(
            entries[0].meta.received_at.unwrap().timestamp_micros(),
            now.timestamp_micros()
        );

        assert_eq!(decode_group(b"{}"), Err(GroupError::Magic));
        assert_eq!(decode_group(GROUP_MAGIC), Err(GroupError::Empty));
        for cut in [GROUP_MAGIC.len() + 2, body.len() - 1, body.len() - 20] {
            assert!(
                matches!(decode_group(&body[..cut]), Err(GroupError::Truncated(_))),
                "cut at {cut}"
            );
        }
        let p = group_properties(now, Producer::Relay);
        assert!(is_group(&p));
        assert_eq!(events_in(&p, &body), 2);
        assert_eq!(
            events_in(&p, &body[..body.len() - 3]),
            1,
            "broken: one message"
        );
        assert_eq!(events_in(&BasicProperties::default(), &body), 1);
        assert!(!is_group(&event_properties(&first, Producer::Relay)));
    }

    #[test]
    fn retry_and_park_count_attempts_and_replay_starts_afresh() {
        let p = event_properties(&meta(Utc::now()), Producer::Relay);
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
        assert_eq!(meta_of(&replayed).webhook_id.as_deref(), Some("w1"));
    }
}
