//! Sending a message elsewhere: the next retry tier, or the parking lot.
//!
//! Both are confirmed publishes: the original is acked only after the broker holds the copy,
//! so a crash in between yields a duplicate (harmless, deduplicated), never a loss.

use std::time::Duration;

use chrono::{SecondsFormat, Utc};
use lapin::BasicProperties;
use lapin::message::Delivery;
use lapin::types::{AMQPValue, ShortString};

use crate::broker::{PublishError, Publisher};
use crate::topology::Names;

/// Our own attempt counter (never `x-death`, which the broker rewrites and caps).
pub const ATTEMPTS_HEADER: &str = "x-catena-ingest-attempts";
pub const PARK_REASON_HEADER: &str = "x-park-reason";
pub const PARK_DETAIL_HEADER: &str = "x-park-detail";
pub const PARKED_AT_HEADER: &str = "x-parked-at";
/// A unique id per parked copy, so `parked show ID` can name one message.
pub const PARK_ID_HEADER: &str = "x-park-id";
pub const ORIGINAL_ROUTING_KEY_HEADER: &str = "x-original-routing-key";

const CONFIRM_DEADLINE: Duration = Duration::from_secs(5);

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

pub fn header<'a>(delivery: &'a Delivery, name: &str) -> Option<&'a AMQPValue> {
    delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(name))
}

pub fn header_str<'a>(delivery: &'a Delivery, name: &str) -> Option<&'a str> {
    match header(delivery, name)? {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str()),
        _ => None,
    }
}

/// Failures so far, from our own header.
pub fn attempts(delivery: &Delivery) -> u32 {
    match header(delivery, ATTEMPTS_HEADER) {
        Some(AMQPValue::LongLongInt(n)) => (*n).clamp(0, u32::MAX as i64) as u32,
        Some(AMQPValue::LongInt(n)) => (*n).max(0) as u32,
        Some(AMQPValue::LongString(s)) => std::str::from_utf8(s.as_bytes())
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0),
        _ => 0,
    }
}

fn copy_properties(delivery: &Delivery, extra: &[(&str, AMQPValue)]) -> BasicProperties {
    let mut headers = delivery.properties.headers().clone().unwrap_or_default();
    for (name, value) in extra {
        headers.insert(ShortString::from(*name), value.clone());
    }
    if !headers.inner().contains_key(ORIGINAL_ROUTING_KEY_HEADER) {
        headers.insert(
            ORIGINAL_ROUTING_KEY_HEADER.into(),
            AMQPValue::LongString(delivery.routing_key.as_str().into()),
        );
    }
    delivery.properties.clone().with_headers(headers)
}

pub enum Rerouted {
    Retried(String),
    Parked(ParkReason),
}

/// Publish to the retry tier for this failure, or park when the tiers are exhausted.
pub async fn retry_or_park(
    publisher: &Publisher,
    names: &Names,
    delivery: &Delivery,
    detail: &str,
) -> Result<Rerouted, PublishError> {
    let failures = attempts(delivery) + 1;
    match names.retry_queue_for(failures) {
        Some(queue) => {
            let properties = copy_properties(
                delivery,
                &[(ATTEMPTS_HEADER, AMQPValue::LongLongInt(failures as i64))],
            );
            publisher
                .publish("", &queue, &delivery.data, properties, CONFIRM_DEADLINE)
                .await?;
            Ok(Rerouted::Retried(queue))
        }
        None => {
            park(
                publisher,
                names,
                delivery,
                ParkReason::RetriesExhausted,
                detail,
            )
            .await?;
            Ok(Rerouted::Parked(ParkReason::RetriesExhausted))
        }
    }
}

/// Publish to the parking lot with headers saying why, when and after how many attempts.
pub async fn park(
    publisher: &Publisher,
    names: &Names,
    delivery: &Delivery,
    reason: ParkReason,
    detail: &str,
) -> Result<(), PublishError> {
    let detail: String = detail.chars().take(512).collect();
    let properties = copy_properties(
        delivery,
        &[
            (
                PARK_REASON_HEADER,
                AMQPValue::LongString(reason.as_str().into()),
            ),
            (
                PARK_DETAIL_HEADER,
                AMQPValue::LongString(detail.as_str().into()),
            ),
            (
                PARKED_AT_HEADER,
                AMQPValue::LongString(
                    Utc::now()
                        .to_rfc3339_opts(SecondsFormat::Millis, true)
                        .as_str()
                        .into(),
                ),
            ),
            (
                ATTEMPTS_HEADER,
                AMQPValue::LongLongInt(attempts(delivery) as i64 + 1),
            ),
        ],
    );
    publisher
        .publish(
            "",
            &names.parked_queue,
            &delivery.data,
            properties,
            CONFIRM_DEADLINE,
        )
        .await
}
