//! The reconciler's alerts: rows in `alerts` with an `open`/`resolve` outbox row in the same
//! statement, so the worker's notifier announces them like any other (at most one open alert
//! per kind and subscription, by the `alerts_one_open` index).

use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::alerts::AlertKind;
use crate::store::DbError;

/// `alerts.subject_id` of a subscription: its id when it is a UUID (Catena's are), else a UUID
/// derived from it.
pub fn subject_of(webhook_id: &str) -> Uuid {
    Uuid::parse_str(webhook_id).unwrap_or_else(|_| {
        let digest = Sha256::digest(webhook_id.as_bytes());
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(&digest[..16]);
        uuid::Builder::from_random_bytes(bytes).into_uuid()
    })
}

/// Open (or refresh the details of) the alert; true when it was newly opened.
pub async fn open(
    db: &tokio_postgres::Client,
    kind: AlertKind,
    webhook_id: &str,
    details: serde_json::Value,
) -> Result<bool, DbError> {
    let rows = db
        .query(
            "WITH opened AS (
                INSERT INTO alerts (kind, subject_id, state, opened_at, details)
                VALUES ($1, $2, 'open', now(), $3)
                ON CONFLICT (kind, subject_id) WHERE state = 'open'
                DO UPDATE SET details = EXCLUDED.details
                    WHERE alerts.details IS DISTINCT FROM EXCLUDED.details
                RETURNING alert_id, (xmax = 0) AS inserted)
             INSERT INTO alert_outbox (alert_id, action)
             SELECT alert_id, 'open' FROM opened WHERE inserted
             RETURNING alert_id",
            &[&kind.as_str(), &subject_of(webhook_id), &details],
        )
        .await?;
    Ok(!rows.is_empty())
}

/// Resolve the open alert, if any; true when one was resolved.
pub async fn resolve(
    db: &tokio_postgres::Client,
    kind: AlertKind,
    webhook_id: &str,
    resolution: &str,
) -> Result<bool, DbError> {
    let rows = db
        .query(
            "WITH resolved AS (
                UPDATE alerts SET state = 'resolved', resolved_at = now(), resolution = $3
                WHERE kind = $1 AND subject_id = $2 AND state = 'open'
                RETURNING alert_id)
             INSERT INTO alert_outbox (alert_id, action)
             SELECT alert_id, 'resolve' FROM resolved
             RETURNING alert_id",
            &[&kind.as_str(), &subject_of(webhook_id), &resolution],
        )
        .await?;
    Ok(!rows.is_empty())
}

/// A one-off `warning` notification (no alert row), at most once an hour per subscription.
pub async fn warn_once_an_hour(
    db: &tokio_postgres::Client,
    webhook_id: &str,
    payload: serde_json::Value,
) -> Result<bool, DbError> {
    let rows = db
        .query(
            "WITH recent AS (
                SELECT 1 FROM catena_control_log
                WHERE webhook_id = $1 AND action = 'ewma_warning' AND at > now() - interval '1 hour'),
             logged AS (
                INSERT INTO catena_control_log (actor, action, webhook_id, outcome, detail)
                SELECT 'reconcile', 'ewma_warning', $1, 'ok', $2::jsonb::text
                WHERE NOT EXISTS (SELECT 1 FROM recent) RETURNING id)
             INSERT INTO alert_outbox (payload, action)
             SELECT $2, 'warning' FROM logged RETURNING id",
            &[&webhook_id, &payload],
        )
        .await?;
    Ok(!rows.is_empty())
}
