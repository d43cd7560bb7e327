//! Retention: prune what grows per event, in small batches, one worker at a time.
//!
//! [`TABLES`] says what is pruned: each table with its time column, how long its rows are kept,
//! what else a row must satisfy to go (an alert must be resolved, an outbox row delivered), and
//! how its old rows are found. Adding a table is one entry there (and an index in a migration).
//!
//! A sweep, every `RETENTION_INTERVAL` in every worker process:
//! - takes a session advisory lock ([`RETENTION_LOCK`]) with `pg_try_advisory_lock`, so one
//!   worker sweeps at a time and the others skip; it is released at the end (or with the
//!   connection);
//! - runs on a connection of its own, never one of the pool's, with a short `lock_timeout`:
//!   pruning waits for ingestion, never the other way round, and only ever touches rows older
//!   than any event being applied;
//! - deletes each table's expired rows `RETENTION_BATCH_SIZE` at a time, each batch one
//!   statement (its own short transaction), pausing `RETENTION_BATCH_PAUSE` between batches;
//! - re-summarizes the BRIN ranges it emptied (see `migrations/0005_retention.sql` for why):
//!   those it has passed, after each batch, so the next batches do not read them again, and all
//!   of them once more at the start of the next sweep (`retention_brin_pending`), when no
//!   snapshot can still see the deleted rows.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::task::JoinHandle;
use tokio_postgres::Client;

use crate::config::{RetentionSettings, human_duration};
use crate::metrics::RetentionMetrics;
use crate::shutdown::Shutdown;
use crate::store::{self, DbError, Failure};

/// Serialises sweeps across worker processes (session-level advisory lock; any 64-bit constant
/// unique to this app, next to the migration and re-fire locks).
pub const RETENTION_LOCK: i64 = 0x6361_7465_6e61_0003;

/// How a table's expired rows are found.
#[derive(Debug, Clone, Copy)]
pub enum Find {
    /// Through a BRIN index on the time column, in physical order. For the tables written per
    /// event, appended to in time order; the sweep keeps the index's summaries tight.
    Brin { index: &'static str },
    /// Oldest first through a b-tree index on the time column (partial where `extra` is).
    Btree,
}

/// Rows of another table that reference the pruned rows and go with them, first.
#[derive(Debug, Clone, Copy)]
pub struct Children {
    pub table: &'static str,
    /// The referencing column in `table`.
    pub column: &'static str,
    /// The referenced column in the pruned table.
    pub key: &'static str,
    /// What a child row must satisfy to go. One that does not keeps its parent: the foreign key
    /// refuses the whole batch, loudly, rather than lose it.
    pub only: &'static str,
}

/// One pruned table.
#[derive(Debug, Clone, Copy)]
pub struct Table {
    pub name: &'static str,
    /// Rows whose `time_column` is older than the retention go.
    pub time_column: &'static str,
    /// What else a row must satisfy to go (SQL on the table's own columns; `$1` is the cutoff).
    pub extra: Option<&'static str>,
    pub find: Find,
    /// Lock the rows before deleting them, skipping rows someone else holds (tables whose old
    /// rows are still updated: alerts are back-filled and resolved in place).
    pub skip_locked: bool,
    pub children: Option<Children>,
    pub retention: fn(&RetentionSettings) -> Duration,
}

impl Table {
    /// A table written per event, found through a BRIN index on `time_column`.
    pub const fn brin(
        name: &'static str,
        time_column: &'static str,
        index: &'static str,
        retention: fn(&RetentionSettings) -> Duration,
    ) -> Self {
        Self {
            name,
            time_column,
            extra: None,
            find: Find::Brin { index },
            skip_locked: false,
            children: None,
            retention,
        }
    }
}

/// Everything pruned, in the order swept.
///
/// Not here: `alerts` and `status_observations`. Alert rows are the episodes of the status
/// timelines (`state::episodes`), rebuilt for a subject whenever an event touches it: a resolved
/// alert pruned without its observations comes back with the next event, and observations pruned
/// inside an episode make it look new (and page). They can only go together, per subject, cut
/// at an episode boundary (README, "Retention").
pub const TABLES: &[Table] = &[
    Table {
        name: "alert_outbox",
        time_column: "delivered_at",
        // An alert's notifications go together, once it is resolved and the last of them was
        // delivered before the cutoff (`$1`); warnings (no alert) one by one. Never an
        // undelivered row.
        extra: Some(
            "delivered_at IS NOT NULL AND (alert_id IS NULL OR (
                NOT EXISTS (SELECT 1 FROM alerts a
                            WHERE a.alert_id = alert_outbox.alert_id AND a.state <> 'resolved')
                AND NOT EXISTS (SELECT 1 FROM alert_outbox later
                                WHERE later.alert_id = alert_outbox.alert_id
                                  AND (later.delivered_at IS NULL OR later.delivered_at >= $1))))",
        ),
        find: Find::Btree,
        // The notifier claims rows with FOR UPDATE SKIP LOCKED: skip its rows likewise.
        skip_locked: true,
        children: None,
        retention: |r| r.delivered_outbox,
    },
    Table {
        name: "failure_warnings",
        time_column: "window_start",
        extra: None,
        find: Find::Btree,
        // A late failure raises a window's count in place.
        skip_locked: true,
        children: None,
        retention: |r| r.failure_warnings,
    },
    Table::brin(
        "failed_executions",
        "failed_at",
        "failed_executions_failed_at",
        |r| r.failed_executions,
    ),
    Table {
        // The bodies of ignored events go with their keys (the foreign key cascades too; said
        // here, they are counted).
        children: Some(Children {
            table: "ignored_events",
            column: "event_key",
            key: "event_key",
            only: "true",
        }),
        ..Table::brin(
            "webhook_events",
            "processed_at",
            "webhook_events_processed_at",
            |r| r.dedup.keys,
        )
    },
];

/// Every table a prune can delete from (the `table` label of the metrics).
pub fn pruned_table_names() -> BTreeSet<&'static str> {
    TABLES
        .iter()
        .flat_map(|t| std::iter::once(t.name).chain(t.children.map(|c| c.table)))
        .collect()
}

/// The one statement of a batch: delete up to `$2` rows older than `$1`. Returns the rows
/// deleted, the first block of every BRIN range they were in (`$3` blocks per range), and the
/// children deleted with them. For a BRIN table the same transaction records those ranges in
/// `retention_brin_pending` under the index `$4`, so no deletion goes without its re-summary.
fn batch_sql(table: &Table) -> String {
    let Table {
        name, time_column, ..
    } = table;
    let extra = table
        .extra
        .map(|e| format!(" AND ({e})"))
        .unwrap_or_default();
    let order = match table.find {
        Find::Btree => format!(" ORDER BY {time_column}"),
        Find::Brin { .. } => String::new(),
    };
    let lock = if table.skip_locked {
        " FOR UPDATE SKIP LOCKED"
    } else {
        ""
    };
    let (key, children, children_count) = match table.children {
        Some(c) => (
            format!(", {}", c.key),
            format!(
                ", children AS (DELETE FROM {} WHERE {} IN (SELECT {} FROM doomed) AND ({}) RETURNING 1)",
                c.table, c.column, c.key, c.only
            ),
            "(SELECT count(*) FROM children)",
        ),
        None => (String::new(), String::new(), "0::int8"),
    };
    let pending = match table.find {
        Find::Brin { .. } => {
            ", pending AS (INSERT INTO retention_brin_pending (index_name, range_start)
                SELECT DISTINCT $4::text, range_start FROM gone ON CONFLICT DO NOTHING)"
        }
        Find::Btree => "",
    };
    // `ctid = ANY(ARRAY(..))` is a TID scan; `ctid IN (..)` would be a join over the table.
    format!(
        "WITH doomed AS (
            SELECT ctid{key} FROM {name}
            WHERE {time_column} < $1{extra}{order}
            LIMIT $2{lock}
        ){children}, gone AS (
            DELETE FROM {name} WHERE ctid = ANY(ARRAY(SELECT ctid FROM doomed))
            RETURNING (ctid::text::point)[0]::int8 / $3 * $3 AS range_start
        ){pending}
        SELECT count(*)::int8, coalesce(array_agg(DISTINCT range_start), '{{}}')::int8[],
               {children_count}
        FROM gone"
    )
}

/// What one table's part of a sweep did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableSwept {
    pub table: &'static str,
    pub rows: u64,
    /// Rows of the children table ([`Table::children`]) deleted with them.
    pub children: u64,
    pub batches: u64,
    /// The most rows one batch deleted (never more than the batch size).
    pub largest_batch: u64,
    pub ranges_resummarized: u64,
}

/// What a sweep did.
#[derive(Debug, Clone, Default)]
pub struct Swept {
    pub tables: Vec<TableSwept>,
    pub elapsed: Duration,
    /// Every table was swept to its end (no shutdown, no error on the way).
    pub complete: bool,
}

impl Swept {
    pub fn table(&self, name: &str) -> Option<&TableSwept> {
        self.tables.iter().find(|t| t.table == name)
    }

    /// Rows deleted from `name`, as itself or as the children of another table.
    pub fn rows(&self, name: &str) -> u64 {
        self.tables
            .iter()
            .map(|t| {
                let as_children = TABLES
                    .iter()
                    .find(|x| x.name == t.table)
                    .and_then(|x| x.children)
                    .is_some_and(|c| c.table == name);
                (if t.table == name { t.rows } else { 0 })
                    + (if as_children { t.children } else { 0 })
            })
            .sum()
    }

    pub fn total_rows(&self) -> u64 {
        self.tables.iter().map(|t| t.rows + t.children).sum()
    }
}

#[derive(Debug)]
pub enum Sweep {
    Swept(Swept),
    /// Another worker holds [`RETENTION_LOCK`]: nothing was done.
    Locked,
}

/// Prepare a connection for sweeping: its own name in `pg_stat_activity`, a short lock wait,
/// and index access only (a sequential scan per batch would read the whole table each time).
pub async fn prepare_session(client: &Client, settings: &RetentionSettings) -> Result<(), DbError> {
    client
        .batch_execute(&format!(
            "SET application_name = 'catena-ingest retention';
             SET lock_timeout = '{}ms';
             SET statement_timeout = '60s';
             SET enable_seqscan = off;",
            settings.lock_timeout.as_millis().max(1)
        ))
        .await?;
    Ok(())
}

/// One sweep over [`TABLES`] on `client` (prepared with [`prepare_session`]), unless another
/// worker is sweeping. Stops early, with what it did so far, when `shutdown` triggers.
pub async fn sweep(
    client: &Client,
    settings: &RetentionSettings,
    metrics: Option<&RetentionMetrics>,
    shutdown: &Shutdown,
) -> Result<Sweep, DbError> {
    sweep_tables(client, TABLES, settings, metrics, shutdown).await
}

pub async fn sweep_tables(
    client: &Client,
    tables: &[Table],
    settings: &RetentionSettings,
    metrics: Option<&RetentionMetrics>,
    shutdown: &Shutdown,
) -> Result<Sweep, DbError> {
    let locked: bool = client
        .query_one("SELECT pg_try_advisory_lock($1)", &[&RETENTION_LOCK])
        .await?
        .get(0);
    if !locked {
        return Ok(Sweep::Locked);
    }
    let started = Instant::now();
    let mut swept = Swept {
        complete: true,
        ..Default::default()
    };
    let mut failure = None;
    for table in tables {
        if shutdown.is_triggered() {
            swept.complete = false;
            break;
        }
        let mut done = TableSwept {
            table: table.name,
            ..Default::default()
        };
        let result = sweep_table(client, table, settings, metrics, shutdown, &mut done).await;
        swept.tables.push(done);
        match result {
            Ok(()) => {}
            // Busy (a lock we would wait for, a timeout): the next sweep tries again; the other
            // tables need not wait for this one.
            Err(error) if error.classify() != Failure::Unavailable => {
                tracing::warn!(table = table.name, %error, "retention: table not pruned this time");
                swept.complete = false;
            }
            Err(error) => {
                failure = Some(error);
                break;
            }
        }
    }
    let _ = client
        .execute("SELECT pg_advisory_unlock($1)", &[&RETENTION_LOCK])
        .await;
    swept.elapsed = started.elapsed();
    match failure {
        Some(error) => Err(error),
        None => Ok(Sweep::Swept(swept)),
    }
}

async fn sweep_table(
    client: &Client,
    table: &Table,
    settings: &RetentionSettings,
    metrics: Option<&RetentionMetrics>,
    shutdown: &Shutdown,
    done: &mut TableSwept,
) -> Result<(), DbError> {
    let retention = (table.retention)(settings);
    // The database's clock: it wrote processed_at and delivered_at.
    let cutoff: DateTime<Utc> = client
        .query_one(
            "SELECT now() - make_interval(secs => $1)",
            &[&retention.as_secs_f64()],
        )
        .await?
        .get(0);
    let pages_per_range: i64 = match table.find {
        Find::Brin { index } => client
            .query_one(
                "SELECT coalesce((SELECT option_value::int8 FROM pg_options_to_table(c.reloptions)
                                   WHERE option_name = 'pages_per_range'), 128)
                 FROM pg_class c WHERE c.oid = $1::text::regclass",
                &[&index],
            )
            .await?
            .get(0),
        Find::Btree => 1,
    };
    let index = match table.find {
        Find::Brin { index } => Some(index),
        Find::Btree => None,
    };
    if let Some(index) = index {
        // What earlier sweeps emptied: by now no snapshot sees those rows, so the summaries
        // come out tight.
        let pending: Vec<i64> = client
            .query(
                "SELECT range_start FROM retention_brin_pending WHERE index_name = $1
                 ORDER BY range_start",
                &[&index],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        for chunk in pending.chunks(RESUMMARIZE_CHUNK) {
            let summarized = resummarize(client, index, chunk).await;
            if summarized.is_some() {
                client
                    .execute(
                        "DELETE FROM retention_brin_pending
                         WHERE index_name = $1 AND range_start = ANY($2)",
                        &[&index, &chunk],
                    )
                    .await?;
            }
            done.ranges_resummarized += summarized.unwrap_or(0);
        }
    }
    let statement = client.prepare(&batch_sql(table)).await?;
    let index_param = index.unwrap_or("");
    // BRIN ranges this sweep deleted from, and those re-summarized on the way.
    let mut touched = BTreeSet::new();
    let mut resummarized = BTreeSet::new();
    loop {
        let row = if index.is_some() {
            client
                .query_one(
                    &statement,
                    &[
                        &cutoff,
                        &settings.batch_size,
                        &pages_per_range,
                        &index_param,
                    ],
                )
                .await?
        } else {
            client
                .query_one(
                    &statement,
                    &[&cutoff, &settings.batch_size, &pages_per_range],
                )
                .await?
        };
        let rows = row.get::<_, i64>(0) as u64;
        let ranges: Vec<i64> = row.get(1);
        let children = row.get::<_, i64>(2) as u64;
        done.batches += 1;
        done.rows += rows;
        done.children += children;
        done.largest_batch = done.largest_batch.max(rows);
        if let Some(m) = metrics {
            m.pruned.with_label_values(&[table.name]).inc_by(rows);
            if let Some(c) = table.children {
                m.pruned.with_label_values(&[c.table]).inc_by(children);
            }
        }
        touched.extend(ranges.iter().copied());
        if (rows as i64) < settings.batch_size {
            break;
        }
        if let Some(index) = index {
            // The scan is in physical order: ranges before this batch's first one were emptied
            // by earlier batches, committed a pause ago. Summarized afresh now, the next batches
            // do not read them again (the next sweep does it once more, for good).
            let first = ranges.iter().min().copied().unwrap_or(i64::MAX);
            let passed: Vec<i64> = touched
                .iter()
                .copied()
                .filter(|r| *r < first && !resummarized.contains(r))
                .collect();
            if !passed.is_empty() {
                done.ranges_resummarized += resummarize(client, index, &passed).await.unwrap_or(0);
                resummarized.extend(passed);
            }
        }
        if pause(settings.batch_pause, shutdown).await {
            break;
        }
    }
    Ok(())
}

/// Ranges re-summarized per call (each reads up to a range of heap pages under the table's
/// SHARE UPDATE EXCLUSIVE lock, which vacuum also takes: keep it short).
const RESUMMARIZE_CHUNK: usize = 64;

/// Re-summarize BRIN ranges: how many were summarized, or `None` if it could not be done now
/// (it waits for no lock, and vacuum or analyze may hold the table). A summary left wide costs
/// reads, never correctness; the pending list keeps the range for the next sweep.
async fn resummarize(client: &Client, index: &str, ranges: &[i64]) -> Option<u64> {
    match client
        .query_one(
            "SELECT retention_resummarize($1::text::regclass, $2)",
            &[&index, &ranges],
        )
        .await
    {
        Ok(row) => Some(row.get::<_, i32>(0) as u64),
        Err(error) => {
            tracing::debug!(index, %error, "retention: BRIN ranges not re-summarized this time");
            None
        }
    }
}

/// Sleep, or return true at once when shutdown triggers.
async fn pause(duration: Duration, shutdown: &Shutdown) -> bool {
    tokio::select! {
        _ = shutdown.wait() => true,
        _ = tokio::time::sleep(duration) => shutdown.is_triggered(),
    }
}

/// Sweep every `settings.interval` until shutdown, on a connection of its own per sweep. The
/// first sweep runs one interval (at most a minute) after start.
pub fn spawn(
    database_url: String,
    settings: RetentionSettings,
    metrics: RetentionMetrics,
    shutdown: Shutdown,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut wait = settings.interval.min(Duration::from_secs(60));
        loop {
            if pause(wait, &shutdown).await {
                break;
            }
            wait = settings.interval;
            let started = Instant::now();
            let outcome = match connect(&database_url, &settings).await {
                Ok((client, driver)) => {
                    let outcome = sweep(&client, &settings, Some(&metrics), &shutdown).await;
                    drop(client);
                    let _ = driver.await;
                    outcome
                }
                Err(error) => Err(error),
            };
            match outcome {
                Ok(Sweep::Swept(swept)) => {
                    metrics
                        .sweep_seconds
                        .observe(started.elapsed().as_secs_f64());
                    let rows = swept.total_rows();
                    if swept.complete {
                        metrics.sweeps.with_label_values(&["completed"]).inc();
                        metrics.last_success.set(Utc::now().timestamp());
                    } else {
                        metrics.sweeps.with_label_values(&["failed"]).inc();
                    }
                    if rows > 0 {
                        tracing::info!(
                            rows,
                            elapsed = ?swept.elapsed,
                            tables = ?swept.tables.iter().filter(|t| t.rows + t.children > 0)
                                .map(|t| (t.table, t.rows + t.children)).collect::<Vec<_>>(),
                            "retention sweep pruned expired rows"
                        );
                    }
                }
                Ok(Sweep::Locked) => {
                    metrics.sweeps.with_label_values(&["locked"]).inc();
                }
                Err(error) => {
                    metrics.sweeps.with_label_values(&["failed"]).inc();
                    tracing::warn!(%error, retry_in = %human_duration(settings.interval), "retention sweep failed");
                }
            }
        }
    })
}

async fn connect(
    database_url: &str,
    settings: &RetentionSettings,
) -> Result<(Client, JoinHandle<()>), DbError> {
    let mut target = store::target(database_url)?;
    target.config.connect_timeout(Duration::from_secs(5));
    let (client, driver) = store::connect(target).await?;
    prepare_session(&client, settings).await?;
    Ok((client, driver))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alerts_and_their_timelines_are_not_pruned_and_undelivered_rows_never() {
        assert!(
            TABLES
                .iter()
                .all(|t| t.name != "alerts" && t.name != "status_observations")
        );
        let outbox = TABLES.iter().find(|t| t.name == "alert_outbox").unwrap();
        assert!(
            outbox
                .extra
                .unwrap()
                .starts_with("delivered_at IS NOT NULL")
        );
        assert!(outbox.skip_locked);
    }

    #[test]
    fn every_table_is_labelled() {
        assert_eq!(
            pruned_table_names().into_iter().collect::<Vec<_>>(),
            [
                "alert_outbox",
                "failed_executions",
                "failure_warnings",
                "ignored_events",
                "webhook_events"
            ]
        );
    }

    #[test]
    fn a_batch_is_one_bounded_tid_delete() {
        let outbox = batch_sql(&TABLES[0]);
        assert!(
            outbox.contains("LIMIT $2 FOR UPDATE SKIP LOCKED"),
            "{outbox}"
        );
        assert!(outbox.contains("ORDER BY delivered_at"), "{outbox}");
        assert!(
            outbox.contains("ctid = ANY(ARRAY(SELECT ctid FROM doomed))"),
            "{outbox}"
        );
        let events = batch_sql(TABLES.last().unwrap());
        assert!(
            !events.contains("ORDER BY") && !events.contains("FOR UPDATE"),
            "{events}"
        );
        assert!(
            events.contains(
                "DELETE FROM ignored_events WHERE event_key IN (SELECT event_key FROM doomed)"
            ),
            "{events}"
        );
        assert!(
            events.contains("INSERT INTO retention_brin_pending"),
            "{events}"
        );
    }
}
