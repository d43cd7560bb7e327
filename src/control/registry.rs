//! `catena_subscriptions`: the subscriptions we created or adopted (metadata only), and
//! `catena_control_log`, what sync, rotate and the reconciler did to them.

use chrono::{DateTime, Utc};
use tokio_postgres::Client;

use crate::store::DbError;

/// One live row.
#[derive(Debug, Clone, PartialEq)]
pub struct Registered {
    pub webhook_id: String,
    pub event_name: String,
    pub url: String,
    pub status: Option<String>,
    pub secret_fp: Option<String>,
    pub prev_secret_fp: Option<String>,
    pub rotation_started_at: Option<DateTime<Utc>>,
    pub dlq_count: Option<i64>,
    pub dlq_nonzero_since: Option<DateTime<Utc>>,
    pub dlq_last_fell_at: Option<DateTime<Utc>>,
    pub last_activate_at: Option<DateTime<Utc>>,
    pub activate_attempts: i32,
    pub last_replay_at: Option<DateTime<Utc>>,
    pub replay_attempts: i32,
    pub ewma_success_rate: Option<f64>,
    pub event_status: Option<String>,
    pub event_status_at: Option<DateTime<Utc>>,
}

const COLUMNS: &str = "webhook_id, event_name, url, status, secret_fp, prev_secret_fp, rotation_started_at, dlq_count, dlq_nonzero_since, dlq_last_fell_at, last_activate_at, activate_attempts, last_replay_at, replay_attempts, ewma_success_rate, event_status, event_status_at";

fn from_row(row: &tokio_postgres::Row) -> Registered {
    Registered {
        webhook_id: row.get("webhook_id"),
        event_name: row.get("event_name"),
        url: row.get("url"),
        status: row.get("status"),
        secret_fp: row.get("secret_fp"),
        prev_secret_fp: row.get("prev_secret_fp"),
        rotation_started_at: row.get("rotation_started_at"),
        dlq_count: row.get("dlq_count"),
        dlq_nonzero_since: row.get("dlq_nonzero_since"),
        dlq_last_fell_at: row.get("dlq_last_fell_at"),
        last_activate_at: row.get("last_activate_at"),
        activate_attempts: row.get("activate_attempts"),
        last_replay_at: row.get("last_replay_at"),
        replay_attempts: row.get("replay_attempts"),
        ewma_success_rate: row.get("ewma_success_rate"),
        event_status: row.get("event_status"),
        event_status_at: row.get("event_status_at"),
    }
}

pub async fn live(client: &Client) -> Result<Vec<Registered>, DbError> {
    let rows = client
        .query(
            &format!(
                "SELECT {COLUMNS} FROM catena_subscriptions WHERE deleted_at IS NULL ORDER BY event_name, webhook_id"
            ),
            &[],
        )
        .await?;
    Ok(rows.iter().map(from_row).collect())
}

/// Every id we ever registered, live or not (sync never adopts one of those by URL).
pub async fn all_ids(client: &Client) -> Result<Vec<String>, DbError> {
    let rows = client
        .query("SELECT webhook_id FROM catena_subscriptions", &[])
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// Ours from now on: created, adopted or created again.
pub async fn record(
    client: &Client,
    webhook_id: &str,
    event_name: &str,
    url: &str,
    secret_fp: &str,
) -> Result<(), DbError> {
    client
        .execute(
            "INSERT INTO catena_subscriptions (webhook_id, event_name, url, secret_fp, status, observed_at)
             VALUES ($1, $2, $3, $4, 'active', now())
             ON CONFLICT (webhook_id) DO UPDATE SET event_name = $2, url = $3, secret_fp = $4, deleted_at = NULL",
            &[&webhook_id, &event_name, &url, &secret_fp],
        )
        .await?;
    Ok(())
}

pub async fn mark_deleted(client: &Client, webhook_id: &str) -> Result<(), DbError> {
    client
        .execute(
            "UPDATE catena_subscriptions SET deleted_at = now(), status = 'deleted' WHERE webhook_id = $1",
            &[&webhook_id],
        )
        .await?;
    Ok(())
}

/// Catena signs with `new_fp` from now on; `prev_fp` is what it signed with before.
pub async fn set_secret(
    client: &Client,
    webhook_id: &str,
    new_fp: &str,
    prev_fp: Option<&str>,
) -> Result<(), DbError> {
    client
        .execute(
            "UPDATE catena_subscriptions SET secret_fp = $2, prev_secret_fp = $3, rotation_started_at = now()
             WHERE webhook_id = $1",
            &[&webhook_id, &new_fp, &prev_fp],
        )
        .await?;
    Ok(())
}

/// What a poll saw; written only when it differs from the row (`observed_at` is when a poll
/// saw it change), so a steady poll of unchanged subscriptions writes nothing.
pub async fn observe_status(
    client: &Client,
    row: &Registered,
    status: crate::catena::model::WebhookStatus,
) -> Result<(), DbError> {
    let (webhook_id, status) = (&row.webhook_id, status.as_str());
    if row.status.as_deref() == Some(status) {
        return Ok(());
    }
    client
        .execute(
            "UPDATE catena_subscriptions SET status = $2, observed_at = now() WHERE webhook_id = $1",
            &[&webhook_id, &status],
        )
        .await?;
    Ok(())
}

/// A subscription's health from its metrics: `dlq_nonzero_since` starts when the DLQ first has
/// messages and ends when it is empty; `dlq_last_fell_at` moves whenever the count falls.
pub async fn observe_health(
    client: &Client,
    webhook_id: &str,
    ewma: Option<f64>,
    dlq_count: i64,
) -> Result<(), DbError> {
    client
        .execute(
            "UPDATE catena_subscriptions SET
                ewma_success_rate = $2,
                dlq_nonzero_since = CASE WHEN $3::bigint = 0 THEN NULL ELSE COALESCE(dlq_nonzero_since, now()) END,
                dlq_last_fell_at = CASE WHEN $3::bigint < COALESCE(dlq_count, 0) THEN now() ELSE dlq_last_fell_at END,
                dlq_count = $3::bigint
             WHERE webhook_id = $1",
            &[&webhook_id, &ewma, &dlq_count],
        )
        .await?;
    Ok(())
}

pub async fn activated(client: &Client, webhook_id: &str) -> Result<(), DbError> {
    client
        .execute(
            "UPDATE catena_subscriptions SET last_activate_at = now(), activate_attempts = activate_attempts + 1, status = 'active'
             WHERE webhook_id = $1",
            &[&webhook_id],
        )
        .await?;
    Ok(())
}

/// An hour active resets the activation backoff.
pub async fn reset_activate_backoff(client: &Client, webhook_id: &str) -> Result<(), DbError> {
    client
        .execute(
            "UPDATE catena_subscriptions SET activate_attempts = 0
             WHERE webhook_id = $1 AND activate_attempts > 0 AND last_activate_at < now() - interval '1 hour'",
            &[&webhook_id],
        )
        .await?;
    Ok(())
}

pub async fn replayed(client: &Client, webhook_id: &str) -> Result<(), DbError> {
    client
        .execute(
            "UPDATE catena_subscriptions SET
                replay_attempts = CASE WHEN last_replay_at > now() - interval '1 hour' THEN replay_attempts + 1 ELSE 1 END,
                last_replay_at = now()
             WHERE webhook_id = $1",
            &[&webhook_id],
        )
        .await?;
    Ok(())
}

/// A `webhook.*` event about one of our subscriptions (guarded by event time: a late event
/// never overwrites a newer one). Returns whether it was one of ours.
pub async fn observe_event(
    client: &impl tokio_postgres::GenericClient,
    webhook_id: &str,
    status: &str,
    at: DateTime<Utc>,
) -> Result<bool, DbError> {
    let n = client
        .execute(
            "UPDATE catena_subscriptions SET event_status = $2, event_status_at = $3
             WHERE webhook_id = $1 AND (event_status_at IS NULL OR event_status_at < $3)",
            &[&webhook_id, &status, &at],
        )
        .await?;
    Ok(n > 0)
}

/// One line of the audit log.
pub async fn log(
    client: &Client,
    actor: &str,
    action: &str,
    webhook_id: Option<&str>,
    event_name: Option<&str>,
    outcome: &str,
    detail: &str,
) -> Result<(), DbError> {
    client
        .execute(
            "INSERT INTO catena_control_log (actor, action, webhook_id, event_name, outcome, detail)
             VALUES ($1, $2, $3, $4, $5, $6)",
            &[&actor, &action, &webhook_id, &event_name, &outcome, &detail],
        )
        .await?;
    Ok(())
}
