//! Applying events to the fleet state: exactly-once effect, in any order, set-based.
//!
//! A batch is one transaction: one multi-row insert of the dedup keys (`RETURNING` says which
//! are new), then the state changes of every new event, then commit. The changes are gathered
//! per statement kind into column arrays and applied with one `INSERT .. SELECT FROM unnest(..)
//! ON CONFLICT ..` per kind, all pipelined in a single network flight, so a 500-event batch
//! costs a few dozen statements rather than thousands.
//!
//! Every statement is an upsert guarded by event time (ties broken by the event key) or by
//! lifecycle rank, so applying any permutation of the same events, with any duplicates, in any
//! batch sizes, converges on the same state. One `INSERT .. ON CONFLICT DO UPDATE` may not
//! touch a row twice, so rows sharing a key within a batch are split into rounds (one
//! statement each); since the upserts commute, round order does not matter.
//!
//! [`plan`] is the pure half (what each event changes, as rows and statements, unit-tested),
//! [`sql`] the statements, [`locks`] the entity locks; this module runs a batch.

mod alerts;
pub mod episodes;
mod locks;
mod plan;
mod sql;

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use deadpool_postgres::Transaction;
use futures::future::try_join_all;
use tokio_postgres::types::ToSql;

use crate::alerts::AlertKind;
pub use crate::config::Rules;
use crate::envelope::{Change, Event};
use crate::metrics::Stage;
use crate::store::DbError;
use crate::worker::Outcome;
use locks::entity_locks;
pub use locks::partition;
use plan::{Op, Plan, p};
use sql::{
    ALERT_ROWS, ALERT_TIMELINES, ALERTS_REFRESH, BACKFILL_FLEET_REFS, DEDUP_INSERT, ENTITY_LOCKS,
    IGNORED_EVENTS, KEYED_PLANS, ONBOARDING_MEASURED,
};

/// In debug builds, an event with this name panics the handler (see [`apply_batch`]).
pub const TEST_PANIC_EVENT: &str = "catena-ingest.test-panic";

/// What happened to one event of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Applied,
    Duplicate,
    Ignored,
}

impl From<Applied> for Outcome {
    fn from(applied: Applied) -> Self {
        match applied {
            Applied::Applied => Outcome::Applied,
            Applied::Duplicate => Outcome::Duplicate,
            Applied::Ignored => Outcome::Ignored,
        }
    }
}

/// An event ready to apply, with the relay's receive time and the body it came in.
pub struct Incoming<'a> {
    pub event: &'a Event,
    pub received_at: Option<DateTime<Utc>>,
    /// Kept for events this version ignores (see `ignored_events`).
    pub body: &'a [u8],
}

#[derive(Debug, Default)]
pub struct BatchResult {
    pub applied: Vec<Applied>,
    /// Kinds of alerts opened in this batch (for `catena_alerts_raised_total`).
    pub alerts_opened: Vec<AlertKind>,
    /// Fleets that reached `connected` in this batch: seconds from their invitation (event
    /// times), `None` when the invitation is not known yet.
    pub onboarded: Vec<Option<f64>>,
    /// Wall time of each database stage of the batch, for `catena_worker_stage_seconds_total`.
    pub stages: Vec<(Stage, std::time::Duration)>,
}

/// Where a batch's global back-fills run: the fleets still missing their reference and the
/// alerts still missing their fleet or details, whatever entity they belong to. They are the
/// only statements of a batch that read and write rows outside the batch's own entities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backfill {
    /// In the batch's own transaction (one batch, one transaction).
    InBatch,
    /// Left to [`backfill`], run once the batch's parts (see [`partition`]) have committed:
    /// concurrent parts that each ran them would lock each other's alerts in turn and deadlock.
    Deferred,
}

/// Apply a batch inside `tx` (the caller commits). Duplicates, both against earlier batches and
/// inside this one, are recorded as such and change nothing.
pub async fn apply_batch(
    tx: &Transaction<'_>,
    batch: &[Incoming<'_>],
    rules: &Rules,
) -> Result<BatchResult, DbError> {
    apply(tx, batch, rules, Backfill::InBatch).await
}

/// The global back-fills of [`Backfill`] on their own, inside `tx` (the caller commits).
pub async fn backfill(tx: &Transaction<'_>) -> Result<(), DbError> {
    tx.batch_execute(KEYED_PLANS).await?;
    let ops = [
        Op {
            sql: BACKFILL_FLEET_REFS,
            params: Vec::new(),
        },
        refresh(Vec::new(), true),
    ];
    run(tx, &ops).await?;
    Ok(())
}

/// [`apply_batch`], with the global back-fills where `backfill` says.
pub async fn apply(
    tx: &Transaction<'_>,
    batch: &[Incoming<'_>],
    rules: &Rules,
    backfill: Backfill,
) -> Result<BatchResult, DbError> {
    let in_batch = backfill == Backfill::InBatch;
    // Debug builds only: a way for tests to make the handler panic on one message, to prove a
    // poison message is isolated and parked instead of crash-looping the pool.
    #[cfg(debug_assertions)]
    if batch.iter().any(|i| i.event.event_name == TEST_PANIC_EVENT) {
        panic!("test panic requested by a `{TEST_PANIC_EVENT}` event");
    }
    let mut result = BatchResult {
        applied: vec![Applied::Duplicate; batch.len()],
        alerts_opened: Vec::new(),
        onboarded: Vec::new(),
        stages: Vec::with_capacity(4),
    };
    // First occurrence of each key inside the batch; later ones are duplicates.
    let mut first: HashMap<&str, usize> = HashMap::with_capacity(batch.len());
    for (i, incoming) in batch.iter().enumerate() {
        first.entry(incoming.event.key.as_str()).or_insert(i);
    }
    let mut unique: Vec<usize> = first.values().copied().collect();
    unique.sort_unstable();

    let n = unique.len();
    let (mut keys, mut ids, mut names, mut webhooks) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut times, mut outcomes, mut received, mut fleets) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for &i in &unique {
        let e = batch[i].event;
        keys.push(e.key.as_str());
        ids.push(e.event_id);
        names.push(e.event_name.as_str());
        webhooks.push(e.webhook_id.as_deref());
        times.push(e.event_time);
        outcomes.push(if e.change == Change::Ignored {
            "ignored"
        } else {
            "applied"
        });
        received.push(batch[i].received_at);
        fleets.push(e.fleet_id());
    }
    // Lock every entity the batch may touch, in one sorted sweep, before writing anything.
    // Concurrent batches (other consumers, other replicas) then queue on these locks in a
    // single global order instead of taking row locks in different orders and deadlocking,
    // which PostgreSQL only breaks after deadlock_timeout (1 s) and which cost a retry.
    let mut locks: Vec<i64> = unique
        .iter()
        .flat_map(|&i| entity_locks(batch[i].event))
        .collect();
    locks.sort_unstable();
    locks.dedup();
    // The stages from here on are the database's: the lock stage is waits for other batches.
    let mut clock = std::time::Instant::now();
    let mut lap = |result: &mut BatchResult, stage: Stage| {
        let now = std::time::Instant::now();
        result.stages.push((stage, now - clock));
        clock = now;
    };
    let lock = tx.prepare_cached(ENTITY_LOCKS).await?;
    futures::try_join!(tx.batch_execute(KEYED_PLANS), async {
        match locks.is_empty() {
            true => Ok(0),
            false => tx.execute(&lock, &[&locks]).await,
        }
    })?;
    lap(&mut result, Stage::Lock);
    let dedup = tx.prepare_cached(DEDUP_INSERT).await?;
    let fresh: HashSet<String> = tx
        .query(
            &dedup,
            &[
                &keys, &ids, &names, &webhooks, &times, &outcomes, &received, &fleets,
            ],
        )
        .await?
        .into_iter()
        .map(|row| row.get::<_, String>(0))
        .collect();
    lap(&mut result, Stage::Dedup);

    let mut plan = Plan::default();
    let mut ignored: Vec<usize> = Vec::new();
    for &i in &unique {
        let event = batch[i].event;
        if !fresh.contains(&event.key) {
            continue;
        }
        if event.change == Change::Ignored {
            result.applied[i] = Applied::Ignored;
            ignored.push(i);
            continue;
        }
        result.applied[i] = Applied::Applied;
        plan.add(event);
    }
    if !ignored.is_empty() {
        let keep = tx.prepare_cached(IGNORED_EVENTS).await?;
        let keys: Vec<&str> = ignored
            .iter()
            .map(|&i| batch[i].event.key.as_str())
            .collect();
        let names: Vec<&str> = ignored
            .iter()
            .map(|&i| batch[i].event.event_name.as_str())
            .collect();
        let bodies: Vec<&[u8]> = ignored.iter().map(|&i| batch[i].body).collect();
        tx.execute(&keep, &[&keys, &names, &bodies]).await?;
    }
    if plan.is_empty() {
        return Ok(result);
    }
    let subjects = plan.alert_subjects();
    let mut ops = plan.ops(rules);
    if !in_batch {
        ops.retain(|op| op.sql != BACKFILL_FLEET_REFS);
    }
    // The alert episodes of the subjects whose timelines grew are reconciled in a second
    // flight, from their timelines and rows as this flight leaves them; without such subjects
    // the back-fill of incomplete alerts rides along in this one.
    let reconciling = !subjects.is_empty();
    if reconciling {
        ops.extend([
            Op {
                sql: ALERT_TIMELINES,
                params: vec![p(subjects.kinds()), p(subjects.ids())],
            },
            Op {
                sql: ALERT_ROWS,
                params: vec![p(subjects.ids())],
            },
        ]);
    } else if in_batch {
        ops.push(refresh(Vec::new(), true));
    }
    let measured = ops.iter().position(|op| op.sql == ONBOARDING_MEASURED);
    let mut rows = run(tx, &ops).await?;
    lap(&mut result, Stage::Write);
    if let Some(index) = measured {
        result.onboarded = rows[index].iter().map(|row| row.get(0)).collect();
    }
    if reconciling {
        let existing = rows.pop().expect("the alert rows query ran");
        let timelines = rows.pop().expect("the timelines query ran");
        let writes = alerts::reconcile(&subjects, &timelines, &existing);
        result.alerts_opened = writes.paged_kinds();
        let mut ops = writes.ops();
        // Every alert of these subjects: the rows read above (the entity locks keep other
        // batches from adding any) and the ones this batch adds.
        let alert_ids = existing
            .iter()
            .map(|row| row.get::<_, uuid::Uuid>("alert_id"))
            .chain(writes.inserted())
            .collect();
        ops.push(refresh(alert_ids, in_batch));
        run(tx, &ops).await?;
        lap(&mut result, Stage::Alerts);
    }
    Ok(result)
}

/// The fleet and details of these alerts, and (`incomplete`) of every alert still missing them.
fn refresh(alert_ids: Vec<uuid::Uuid>, incomplete: bool) -> Op {
    Op {
        sql: ALERTS_REFRESH,
        params: vec![p(alert_ids), p(incomplete)],
    }
}

/// Prepare (cached per connection), then send every statement in one pipelined flight; the
/// server runs them in order, so each sees what the ones before it wrote.
async fn run(tx: &Transaction<'_>, ops: &[Op]) -> Result<Vec<Vec<tokio_postgres::Row>>, DbError> {
    let mut statements = Vec::with_capacity(ops.len());
    for op in ops {
        statements.push(tx.prepare_cached(op.sql).await?);
    }
    let params: Vec<Vec<&(dyn ToSql + Sync)>> = ops
        .iter()
        .map(|op| {
            op.params
                .iter()
                .map(|b| b.as_ref() as &(dyn ToSql + Sync))
                .collect()
        })
        .collect();
    Ok(try_join_all(
        statements
            .iter()
            .zip(&params)
            .map(|(statement, params)| tx.query(statement, params)),
    )
    .await?)
}

/// A `std::time::Duration` sent as a PostgreSQL `interval` (microseconds, no days or months).
#[derive(Debug, Clone, Copy)]
pub struct PgInterval(pub std::time::Duration);

impl ToSql for PgInterval {
    fn to_sql(
        &self,
        _ty: &tokio_postgres::types::Type,
        out: &mut bytes::BytesMut,
    ) -> Result<tokio_postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        use bytes::BufMut;
        out.put_i64(self.0.as_micros() as i64);
        out.put_i32(0); // days
        out.put_i32(0); // months
        Ok(tokio_postgres::types::IsNull::No)
    }

    tokio_postgres::types::accepts!(INTERVAL);
    tokio_postgres::types::to_sql_checked!();
}
