//! Alerts that reach people: the transactional outbox, its notifier, the state gauges and the
//! `alerts` CLI.
//!
//! Alert rows and their outbox rows are written by the worker inside the state transaction
//! (`state.rs`), so a notification exists if and only if its state change committed. The
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
pub use notifier::{NotifierConfig, deliver_pending, spawn};

use crate::db::DbError;

/// One row of `alerts`, as the CLI and the sinks see it.
#[derive(Debug, Clone, Serialize)]
pub struct Alert {
    pub alert_id: Uuid,
    pub kind: String,
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
    fn from_row(row: &tokio_postgres::Row) -> Self {
        Self {
            alert_id: row.get("alert_id"),
            kind: row.get("kind"),
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

    /// Alertmanager's `alertname` for this kind.
    pub fn alertname(&self) -> &'static str {
        match self.kind.as_str() {
            "connection_stale" => "CatenaConnectionStale",
            _ => "CatenaScheduleDeactivated",
        }
    }

    /// Stale connections want the fleet contacted; a deactivated schedule means no data flows.
    pub fn severity(&self) -> &'static str {
        match self.kind.as_str() {
            "connection_stale" => "warning",
            _ => "page",
        }
    }

    pub fn summary(&self) -> String {
        let fleet = self.fleet_ref.as_deref().unwrap_or("unknown fleet");
        match self.kind.as_str() {
            "connection_stale" => format!(
                "TSP connection {} of {fleet} is stale: Catena stopped fetching its data",
                self.subject_id
            ),
            _ => format!(
                "Fetch schedule {} ({}) of {fleet} was deactivated after repeated failures",
                self.subject_id,
                self.details["resource"]
                    .as_str()
                    .unwrap_or("resource unknown")
            ),
        }
    }

    pub fn action(&self) -> &'static str {
        match self.kind.as_str() {
            "connection_stale" => {
                "The fleet must re-authenticate with its TSP through its invitation (magic) link; send it the link again. The alert resolves when Catena reports the connection active."
            }
            _ => {
                "No data flows for this resource. Check the TSP side of the connection with the fleet, then have the schedule reactivated in Catena; resolve the alert by hand with `catena-ingest alerts resolve`."
            }
        }
    }
}

const ALERT_COLUMNS: &str = "alert_id, kind, subject_id, fleet_id, fleet_ref, state, opened_at, resolved_at, resolution, details";

/// Filters for `alerts list`.
#[derive(Debug, Default, Clone)]
pub struct ListFilter {
    pub open_only: bool,
    pub kind: Option<String>,
    pub fleet_ref: Option<String>,
    pub limit: i64,
}

pub async fn list(
    client: &tokio_postgres::Client,
    filter: &ListFilter,
) -> Result<Vec<Alert>, DbError> {
    let sql = format!(
        "SELECT {ALERT_COLUMNS} FROM alerts
         WHERE ($1 = false OR state = 'open') AND ($2::text IS NULL OR kind = $2) AND ($3::text IS NULL OR fleet_ref = $3)
         ORDER BY opened_at DESC LIMIT $4"
    );
    let rows = client
        .query(
            &sql,
            &[
                &filter.open_only,
                &filter.kind,
                &filter.fleet_ref,
                &filter.limit.max(1),
            ],
        )
        .await?;
    Ok(rows.iter().map(Alert::from_row).collect())
}

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("no open alert with id {0}")]
    NotOpen(Uuid),
    #[error(transparent)]
    Db(#[from] DbError),
}

/// Resolve by hand; the outbox row (same transaction) makes the sinks hear about it too.
pub async fn resolve(
    client: &tokio_postgres::Client,
    alert_id: Uuid,
    note: &str,
) -> Result<(), ResolveError> {
    let rows = client
        .query(
            "WITH resolved AS (
                UPDATE alerts SET state = 'resolved', resolved_at = now(), resolution = 'manual',
                       resolution_note = $2
                WHERE alert_id = $1 AND state = 'open' RETURNING alert_id)
             INSERT INTO alert_outbox (alert_id, action) SELECT alert_id, 'resolve' FROM resolved
             RETURNING alert_id",
            &[&alert_id, &note],
        )
        .await
        .map_err(DbError::from)?;
    if rows.is_empty() {
        return Err(ResolveError::NotOpen(alert_id));
    }
    Ok(())
}

/// Print alerts as an aligned table.
pub fn print_table(alerts: &[Alert]) {
    println!(
        "{:<36}  {:<20}  {:<8}  {:<16}  {:<25}  SUBJECT",
        "ALERT_ID", "KIND", "STATE", "FLEET_REF", "OPENED_AT"
    );
    for a in alerts {
        println!(
            "{:<36}  {:<20}  {:<8}  {:<16}  {:<25}  {}",
            a.alert_id,
            a.kind,
            a.state,
            a.fleet_ref.as_deref().unwrap_or("-"),
            a.opened_at
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            a.subject_id
        );
    }
    println!("({} alerts)", alerts.len());
}

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
