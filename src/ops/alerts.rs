//! `catena-ingest alerts`: list alerts and resolve one by hand.

use uuid::Uuid;

use crate::alerts::{ALERT_COLUMNS, Alert, AlertKind};
use crate::store::DbError;

/// Filters for `alerts list`.
#[derive(Debug, Default, Clone)]
pub struct ListFilter {
    pub open_only: bool,
    pub kind: Option<AlertKind>,
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
                &filter.kind.map(AlertKind::as_str),
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
