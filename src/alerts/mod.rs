//! Alerts that reach people: the alert kinds, the transactional outbox's notifier and sinks,
//! and the state gauges. (`catena-ingest alerts`, the operator's side, is [`crate::ops::alerts`].)
//!
//! Alert rows and their outbox rows are written by the worker inside the state transaction
//! ([`crate::state`]), so a notification exists if and only if its state change committed. The
//! notifier delivers outbox rows to the configured sinks, retrying with backoff, and never
//! blocks event processing.

mod gauges;
mod notifier;
mod sinks;

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

pub use gauges::refresh_gauges;
pub use notifier::{deliver_pending, spawn};

/// What an alert is about. The strings are the `alerts.kind` values (a CHECK constraint, last
/// set in `migrations/0008_control_plane.sql`) and the `kind` label of the alert metrics. The
/// first two are raised by the worker from fleet events; the `Webhook*` ones by the reconciler
/// about our own Catena subscriptions (their subject is the webhook id, and they have no fleet).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertKind {
    ConnectionStale,
    ScheduleDeactivated,
    WebhookStale,
    WebhookDlqBacklog,
    WebhookMissing,
}

impl AlertKind {
    pub const ALL: [AlertKind; 5] = [
        AlertKind::ConnectionStale,
        AlertKind::ScheduleDeactivated,
        AlertKind::WebhookStale,
        AlertKind::WebhookDlqBacklog,
        AlertKind::WebhookMissing,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AlertKind::ConnectionStale => "connection_stale",
            AlertKind::ScheduleDeactivated => "schedule_deactivated",
            AlertKind::WebhookStale => "webhook_stale",
            AlertKind::WebhookDlqBacklog => "webhook_dlq_backlog",
            AlertKind::WebhookMissing => "webhook_missing",
        }
    }

    /// About one of our Catena subscriptions rather than a fleet.
    pub fn is_webhook(self) -> bool {
        matches!(
            self,
            AlertKind::WebhookStale | AlertKind::WebhookDlqBacklog | AlertKind::WebhookMissing
        )
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == text)
    }

    /// Alertmanager's `alertname`.
    pub fn alertname(self) -> &'static str {
        match self {
            AlertKind::ConnectionStale => "CatenaConnectionStale",
            AlertKind::ScheduleDeactivated => "CatenaScheduleDeactivated",
            AlertKind::WebhookStale => "CatenaWebhookSubscriptionStale",
            AlertKind::WebhookDlqBacklog => "CatenaWebhookSubscriptionDlqBacklog",
            AlertKind::WebhookMissing => "CatenaWebhookSubscriptionMissing",
        }
    }

    /// Stale connections want the fleet contacted; a deactivated schedule means no data flows.
    /// Catena not delivering (stale, missing) loses nothing yet but will after 14 days: a page.
    /// A DLQ backlog is a warning until it is a week old (then the alert's details say `page`).
    pub fn severity(self) -> &'static str {
        match self {
            AlertKind::ConnectionStale | AlertKind::WebhookDlqBacklog => "warning",
            AlertKind::ScheduleDeactivated
            | AlertKind::WebhookStale
            | AlertKind::WebhookMissing => "page",
        }
    }
}

/// One row of `alerts`, as the CLI and the sinks see it.
#[derive(Debug, Clone, Serialize)]
pub struct Alert {
    pub alert_id: Uuid,
    pub kind: AlertKind,
    pub subject_id: Uuid,
    pub fleet_id: Option<Uuid>,
    pub fleet_ref: Option<String>,
    pub state: String,
    pub opened_at: DateTime<Utc>,
    pub resolved_at: Option<DateTime<Utc>>,
    pub resolution: Option<String>,
    pub details: serde_json::Value,
}

impl Alert {
    pub(crate) fn from_row(row: &tokio_postgres::Row) -> Self {
        Self {
            alert_id: row.get("alert_id"),
            kind: AlertKind::parse(row.get("kind")).expect("alerts.kind is checked by the schema"),
            subject_id: row.get("subject_id"),
            fleet_id: row.get("fleet_id"),
            fleet_ref: row.get("fleet_ref"),
            state: row.get("state"),
            opened_at: row.get("opened_at"),
            resolved_at: row.get("resolved_at"),
            resolution: row.get("resolution"),
            details: row.get("details"),
        }
    }

    /// The kind's severity, unless the alert's details raise it (a DLQ backlog past 7 days).
    pub fn severity(&self) -> &'static str {
        match self.details["severity"].as_str() {
            Some("page") => "page",
            _ => self.kind.severity(),
        }
    }

    pub fn summary(&self) -> String {
        let fleet = self.fleet_ref.as_deref().unwrap_or("unknown fleet");
        let event_name = self.details["event_name"].as_str().unwrap_or("?");
        match self.kind {
            AlertKind::ConnectionStale => format!(
                "TSP connection {} of {fleet} is stale: Catena stopped fetching its data",
                self.subject_id
            ),
            AlertKind::ScheduleDeactivated => format!(
                "Fetch schedule {} ({}) of {fleet} was deactivated after repeated failures",
                self.subject_id,
                self.details["resource"]
                    .as_str()
                    .unwrap_or("resource unknown")
            ),
            AlertKind::WebhookStale => match self.details["cause"].as_str() {
                Some("secret_mismatch") => format!(
                    "Catena subscription {} ({event_name}) is stale and our relays refuse its signatures: a secret mismatch",
                    self.subject_id
                ),
                _ => format!(
                    "Catena subscription {} ({event_name}) is {}: Catena is not delivering it",
                    self.subject_id,
                    self.details["status"].as_str().unwrap_or("stale")
                ),
            },
            AlertKind::WebhookDlqBacklog => format!(
                "Catena holds {} undelivered {event_name} events in the DLQ of subscription {}",
                self.details["dlq_count"].as_i64().unwrap_or(0),
                self.subject_id
            ),
            AlertKind::WebhookMissing => format!(
                "Catena subscription {} ({event_name}) is gone: nothing of it is delivered",
                self.subject_id
            ),
        }
    }

    pub fn action(&self) -> &'static str {
        match self.kind {
            AlertKind::ConnectionStale => {
                "The fleet must re-authenticate with its TSP through its invitation (magic) link; send it the link again. The alert resolves when Catena reports the connection active."
            }
            AlertKind::ScheduleDeactivated => {
                "No data flows for this resource. Check the TSP side of the connection with the fleet, then have the schedule reactivated in Catena; resolve the alert by hand with `catena-ingest alerts resolve`."
            }
            AlertKind::WebhookStale if self.details["cause"] == "secret_mismatch" => {
                "Our relays refuse this subscription's signatures, so it is not reactivated: run `catena-ingest subscriptions rotate --id <webhook_id>`. The reconciler reactivates it and replays its DLQ once deliveries verify."
            }
            AlertKind::WebhookStale => {
                "The reconciler reactivates it and replays its DLQ once our relay has been ready for a while; if this stays open, see the runbook (CatenaWebhookStale). Resolves when the subscription is active with an empty DLQ."
            }
            AlertKind::WebhookDlqBacklog => {
                "Catena keeps DLQ messages 14 days. Check `catena-ingest subscriptions list` and the reconciler's log; `catena-ingest reconcile --once` replays."
            }
            AlertKind::WebhookMissing => {
                "Run `catena-ingest subscriptions sync` to create it again (it writes the secret first)."
            }
        }
    }
}

pub(crate) const ALERT_COLUMNS: &str = "alert_id, kind, subject_id, fleet_id, fleet_ref, state, opened_at, resolved_at, resolution, details";

pub(crate) fn retry_delay(attempts: u32) -> Duration {
    use backoff::backoff::Backoff;
    let mut backoff = backoff::ExponentialBackoff {
        initial_interval: Duration::from_secs(1),
        max_interval: Duration::from_secs(300),
        randomization_factor: 0.5,
        multiplier: 2.0,
        max_elapsed_time: None,
        ..Default::default()
    };
    let mut delay = Duration::from_secs(1);
    for _ in 0..attempts.clamp(1, 20) {
        delay = backoff.next_backoff().unwrap_or(Duration::from_secs(300));
    }
    delay
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_the_schema_values() {
        let schema = include_str!("../../migrations/0008_control_plane.sql");
        for kind in AlertKind::ALL {
            assert_eq!(AlertKind::parse(kind.as_str()), Some(kind));
            assert!(schema.contains(&format!("'{}'", kind.as_str())));
        }
        assert_eq!(AlertKind::parse("other"), None);
    }
}
