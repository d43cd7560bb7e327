//! Sending a message elsewhere: the next retry tier, or the parking lot.
//!
//! Both are confirmed publishes: the original is acked only after the broker holds the copy,
//! so a crash in between yields a duplicate (harmless, deduplicated), never a loss.

use std::time::Duration;

use chrono::Utc;
use lapin::message::Delivery;

use crate::broker::{Names, PublishError, Publisher};
use crate::message::{self, ParkReason};

const CONFIRM_DEADLINE: Duration = Duration::from_secs(5);

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
    let failures = message::attempts(&delivery.properties) + 1;
    match names.retry_queue_for(failures) {
        Some(queue) => {
            let properties = message::retry_properties(
                &delivery.properties,
                delivery.routing_key.as_str(),
                failures,
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

/// Publish to the first retry tier unchanged (attempts included): a requeue that comes back
/// after the tier's delay as a new message, so it neither spins nor raises the delivery count.
pub async fn defer(
    publisher: &Publisher,
    names: &Names,
    delivery: &Delivery,
) -> Result<(), PublishError> {
    let Some(queue) = names.retry_queue_for(1) else {
        return Err(PublishError::Unavailable);
    };
    let properties = message::retry_properties(
        &delivery.properties,
        delivery.routing_key.as_str(),
        message::attempts(&delivery.properties),
    );
    publisher
        .publish("", &queue, &delivery.data, properties, CONFIRM_DEADLINE)
        .await
}

/// Publish to the parking lot with headers saying why, when and after how many attempts.
pub async fn park(
    publisher: &Publisher,
    names: &Names,
    delivery: &Delivery,
    reason: ParkReason,
    detail: &str,
) -> Result<(), PublishError> {
    let properties = message::park_properties(
        &delivery.properties,
        delivery.routing_key.as_str(),
        reason,
        detail,
        Utc::now(),
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
