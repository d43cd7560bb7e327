//! Sending an event elsewhere: the next retry tier, or the parking lot.
//!
//! Both are confirmed publishes: the original is acked only after the broker holds the copy,
//! so a crash in between yields a duplicate (harmless, deduplicated), never a loss. An event
//! always goes as a single message, also when it arrived inside a group, so a poison event
//! travels (and is parked, shown and replayed) alone.

use std::borrow::Cow;
use std::time::Duration;

use chrono::Utc;
use lapin::BasicProperties;

use crate::broker::{Names, PublishError, Publisher};
use crate::message::{self, ParkReason};

const CONFIRM_DEADLINE: Duration = Duration::from_secs(5);

/// One event as a message of its own.
pub struct Outgoing<'a> {
    pub properties: Cow<'a, BasicProperties>,
    pub data: &'a [u8],
    pub event_name: &'a str,
}

pub enum Rerouted {
    Retried(String),
    Parked(ParkReason),
}

/// Publish to the retry tier for this failure, or park when the tiers are exhausted.
pub async fn retry_or_park(
    publisher: &Publisher,
    names: &Names,
    event: &Outgoing<'_>,
    detail: &str,
) -> Result<Rerouted, PublishError> {
    let failures = message::attempts(&event.properties) + 1;
    match names.retry_queue_for(failures) {
        Some(queue) => {
            let properties =
                message::retry_properties(&event.properties, event.event_name, failures);
            publisher
                .publish("", &queue, event.data, properties, CONFIRM_DEADLINE)
                .await?;
            Ok(Rerouted::Retried(queue))
        }
        None => {
            park(
                publisher,
                names,
                event,
                ParkReason::RetriesExhausted,
                detail,
            )
            .await?;
            Ok(Rerouted::Parked(ParkReason::RetriesExhausted))
        }
    }
}

/// Publish to the first retry tier unchanged (attempts included): a requeue that comes back
/// after the tier's delay as a new message, so it neither spins nor raises the delivery count.
pub async fn defer(
    publisher: &Publisher,
    names: &Names,
    event: &Outgoing<'_>,
) -> Result<(), PublishError> {
    let Some(queue) = names.retry_queue_for(1) else {
        return Err(PublishError::Unavailable);
    };
    let properties = message::retry_properties(
        &event.properties,
        event.event_name,
        message::attempts(&event.properties),
    );
    publisher
        .publish("", &queue, event.data, properties, CONFIRM_DEADLINE)
        .await
}

/// Publish to the parking lot with headers saying why, when and after how many attempts.
pub async fn park(
    publisher: &Publisher,
    names: &Names,
    event: &Outgoing<'_>,
    reason: ParkReason,
    detail: &str,
) -> Result<(), PublishError> {
    let properties = message::park_properties(
        &event.properties,
        event.event_name,
        reason,
        detail,
        Utc::now(),
    );
    publisher
        .publish(
            "",
            &names.parked_queue,
            event.data,
            properties,
            CONFIRM_DEADLINE,
        )
        .await
}
