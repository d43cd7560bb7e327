//! `catena-ingest ignored`: the events this version (or an older one) recorded without applying
//! them, because it did not know their names, and re-applying them once a version does.
//!
//! Re-applying runs in one transaction: the stored bodies are decoded with today's decoder;
//! those it now understands lose their `ignored` dedup row and go through the same
//! [`apply_batch`] as the worker's batches (so they take their dedup key anew and count as
//! applied); those it still does not understand stay. A crash rolls it all back.

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::config::Rules;
use crate::envelope::{self, Change};
use crate::state::{Applied, Incoming, apply_batch};
use crate::store::{DbError, pool};

/// One stored event, as `ignored list` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Ignored {
    pub event_key: String,
    pub event_name: String,
    pub bytes: i32,
    pub ignored_at: DateTime<Utc>,
}

/// Stored events, newest first, optionally of one name.
pub async fn list(
    client: &tokio_postgres::Client,
    event_name: Option<&str>,
    limit: i64,
) -> Result<Vec<Ignored>, DbError> {
    let rows = client
        .query(
            "SELECT event_key, event_name, octet_length(body) AS bytes, ignored_at FROM ignored_events
             WHERE $1::text IS NULL OR event_name = $1 ORDER BY ignored_at DESC LIMIT $2",
            &[&event_name, &limit.max(1)],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Ignored {
            event_key: r.get("event_key"),
            event_name: r.get("event_name"),
            bytes: r.get("bytes"),
            ignored_at: r.get("ignored_at"),
        })
        .collect())
}

/// What a re-apply did.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Reapplied {
    pub examined: usize,
    /// Understood now, and applied.
    pub applied: usize,
    /// Still unknown to this version: left as they were.
    pub still_ignored: usize,
    /// Bodies that no longer decode at all (kept; `ignored list` shows them).
    pub undecodable: usize,
}

/// Re-apply up to `limit` stored events (of `event_name`, if given), oldest first.
pub async fn reapply(
    database_url: &str,
    event_name: Option<&str>,
    limit: i64,
    rules: &Rules,
    dry_run: bool,
) -> Result<Reapplied, DbError> {
    let pool = pool(database_url, 1)?;
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let rows = tx
        .query(
            "SELECT i.event_key, i.body, w.received_at FROM ignored_events i
             JOIN webhook_events w ON w.event_key = i.event_key
             WHERE $1::text IS NULL OR i.event_name = $1
             ORDER BY i.ignored_at LIMIT $2 FOR UPDATE OF i SKIP LOCKED",
            &[&event_name, &limit.max(1)],
        )
        .await?;
    let mut report = Reapplied {
        examined: rows.len(),
        ..Default::default()
    };
    let mut understood = Vec::new();
    for row in &rows {
        let body: &[u8] = row.get("body");
        let received_at: Option<DateTime<Utc>> = row.get("received_at");
        match envelope::decode(body, received_at.unwrap_or_else(Utc::now)) {
            Ok(event) if event.change != Change::Ignored => {
                understood.push((event, received_at, body))
            }
            Ok(_) => report.still_ignored += 1,
            Err(_) => report.undecodable += 1,
        }
    }
    if dry_run || understood.is_empty() {
        report.applied = understood.len();
        tx.rollback().await?;
        return Ok(report);
    }
    // Free the keys (the stored bodies go with them), then apply as any batch would.
    let keys: Vec<&str> = understood.iter().map(|(e, ..)| e.key.as_str()).collect();
    tx.execute(
        "DELETE FROM webhook_events WHERE event_key = ANY($1) AND outcome = 'ignored'",
        &[&keys],
    )
    .await?;
    let incoming: Vec<Incoming<'_>> = understood
        .iter()
        .map(|(event, received_at, body)| Incoming {
            event,
            received_at: *received_at,
            body,
        })
        .collect();
    let result = apply_batch(&tx, &incoming, rules).await?;
    tx.commit().await?;
    report.applied = result
        .applied
        .iter()
        .filter(|a| **a == Applied::Applied)
        .count();
    Ok(report)
}
