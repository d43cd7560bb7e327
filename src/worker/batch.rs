//! One batch: decode, apply in one transaction, and decide each message's fate.
//!
//! A delivery is one event, or a group of events the relay published together; each event is
//! an [`Item`] with its own dedup key, its own outcome and, when it fails, its own way to a
//! retry tier or the parking lot (as a single message: a poison event travels alone). A
//! delivery is acked once every event it carries is done.
//!
//! The happy path is one transaction for the whole batch. When it fails, the failure is
//! classified: database unreachable -> hold the batch and retry with backoff (no message is at
//! fault, none is retried or parked); transient -> retry the batch, then isolate; permanent or a
//! panic -> apply one message per transaction so only the culprit is retried or parked.

use std::borrow::Cow;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use futures::FutureExt;
use lapin::message::Delivery;

use super::Outcome;
use super::reroute::{self, Outgoing, Rerouted};
use crate::broker::{Names, Publisher};
use crate::envelope::{self, DecodeError, Event};
use crate::message::{self, EventMeta, ParkReason, Producer};
use crate::metrics::{Stage, WorkerMetrics};
use crate::retry::{next_wait, reconnect_backoff};
use crate::shutdown::Shutdown;
use crate::state::{self, Applied, Backfill, BatchResult, Incoming};
use crate::store::{self, DbError, Failure};

/// What to do with a delivery once the batch is through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Done (applied, duplicate, ignored, or safely rerouted): ack.
    Ack,
    /// Could not be handled or rerouted now (shutdown, broker trouble): give it back.
    Requeue,
}

/// Shared by every consumer of a worker process.
pub struct Context {
    pub pool: Pool,
    pub publisher: Publisher,
    pub names: Names,
    pub metrics: WorkerMetrics,
    pub shutdown: Shutdown,
    /// False while the database is unreachable (drives /readyz).
    pub db_ok: std::sync::atomic::AtomicBool,
    pub rules: crate::state::Rules,
    /// For the probe that tells a database outage from a failing batch.
    pub database_url: String,
    /// The longest one batch attempt may take.
    pub batch_deadline: Duration,
    /// How many concurrent transactions one batch may be split into.
    pub transactions_per_batch: usize,
}

/// One event of a delivery.
struct Message<'a> {
    delivery: usize,
    source: Source<'a>,
    body: &'a [u8],
    received_at: Option<DateTime<Utc>>,
    decoded: Result<Event, DecodeError>,
}

/// Where an event came from, and so how it is rerouted on its own.
enum Source<'a> {
    /// A single message (or a group that cannot be unpacked): rerouted as the message it is.
    Whole(&'a Delivery),
    /// One entry of a group: rerouted as a single message of its own.
    Entry(EventMeta<'a>),
}

/// The events of a batch of deliveries, in order.
fn unpack(deliveries: &[Delivery]) -> Vec<Message<'_>> {
    let now = Utc::now();
    let mut messages = Vec::with_capacity(deliveries.len());
    for (index, delivery) in deliveries.iter().enumerate() {
        if !message::is_group(&delivery.properties) {
            let received_at = message::received_at(&delivery.properties);
            messages.push(Message {
                delivery: index,
                source: Source::Whole(delivery),
                body: &delivery.data,
                received_at,
                decoded: envelope::decode(&delivery.data, received_at.unwrap_or(now)),
            });
            continue;
        }
        match message::decode_group(&delivery.data) {
            Ok(entries) => {
                for entry in entries {
                    let received_at = entry.meta.received_at;
                    messages.push(Message {
                        delivery: index,
                        body: entry.body,
                        received_at,
                        decoded: envelope::decode(entry.body, received_at.unwrap_or(now)),
                        source: Source::Entry(entry.meta),
                    });
                }
            }
            Err(error) => messages.push(Message {
                delivery: index,
                source: Source::Whole(delivery),
                body: &delivery.data,
                received_at: message::received_at(&delivery.properties),
                decoded: Err(DecodeError::Group(error.to_string())),
            }),
        }
    }
    messages
}

impl Message<'_> {
    /// The event as a message of its own, for a retry tier or the parking lot.
    fn outgoing(&self) -> Outgoing<'_> {
        match &self.source {
            Source::Whole(delivery) => Outgoing {
                properties: Cow::Borrowed(&delivery.properties),
                data: &delivery.data,
                event_name: event_name(self),
            },
            Source::Entry(meta) => Outgoing {
                properties: Cow::Owned(message::event_properties(meta, Producer::Relay)),
                data: self.body,
                event_name: event_name(self),
            },
        }
    }
}

/// Handle a batch of deliveries; returns one disposition per delivery, in order.
pub async fn process(ctx: &Arc<Context>, deliveries: &[Delivery]) -> Vec<Disposition> {
    let started = Instant::now();
    let messages = unpack(deliveries);
    ctx.metrics.stage(Stage::Decode, started.elapsed());
    let mut dispositions = vec![Disposition::Ack; messages.len()];
    let mut valid = Vec::with_capacity(messages.len());
    for (i, message) in messages.iter().enumerate() {
        match &message.decoded {
            Ok(event) => {
                ctx.metrics
                    .dedup_keys
                    .with_label_values(&[event.key_source.as_str()])
                    .inc();
                valid.push(i);
            }
            Err(error) => {
                let reason = match error {
                    DecodeError::UnsupportedVersion(_) => ParkReason::UnsupportedVersion,
                    DecodeError::InvalidRecord { .. } => ParkReason::InvalidRecord,
                    _ => ParkReason::Malformed,
                };
                tracing::warn!(
                    reason = reason.as_str(),
                    %error,
                    event_name = event_name(message),
                    "parking a message that can never apply"
                );
                dispositions[i] = park(ctx, message, reason, &error.to_string()).await;
            }
        }
    }

    if !valid.is_empty() {
        apply_valid(ctx, &messages, &valid, &mut dispositions).await;
    }
    ctx.metrics
        .batch_seconds
        .observe(started.elapsed().as_secs_f64());
    ctx.metrics.batch_size.observe(messages.len() as f64);
    // A delivery is done when all its events are; one given back takes the others along
    // (they come back as duplicates, no-ops).
    let mut per_delivery = vec![Disposition::Ack; deliveries.len()];
    for (message, disposition) in messages.iter().zip(dispositions) {
        if disposition == Disposition::Requeue {
            per_delivery[message.delivery] = Disposition::Requeue;
        }
    }
    per_delivery
}

fn event_of<'a>(message: &'a Message<'_>) -> &'a Event {
    message
        .decoded
        .as_ref()
        .expect("only valid messages are applied")
}

/// The event name to count a message under: its own, else the one it travelled under.
fn event_name<'a>(message: &'a Message<'_>) -> &'a str {
    if let Ok(event) = &message.decoded {
        return &event.event_name;
    }
    match &message.source {
        Source::Entry(meta) => meta.event_type.as_deref().unwrap_or("unknown"),
        Source::Whole(delivery) => {
            message::event_name_of(&delivery.properties, delivery.routing_key.as_str())
        }
    }
}

async fn park(
    ctx: &Context,
    message: &Message<'_>,
    reason: ParkReason,
    detail: &str,
) -> Disposition {
    match reroute::park(
        &ctx.publisher,
        &ctx.names,
        &message.outgoing(),
        reason,
        detail,
    )
    .await
    {
        Ok(()) => {
            ctx.metrics
                .count_event(event_name(message), Outcome::Parked);
            Disposition::Ack
        }
        Err(error) => {
            tracing::warn!(%error, "could not park a message; deferring it");
            defer(ctx, message).await
        }
    }
}

/// Give a message back for later without raising its delivery count: a copy through the first
/// retry tier (its attempt counter unchanged), then ack. Only if that fails too is it requeued,
/// after a pause, so a broken publish path cannot spin the consumer.
async fn defer(ctx: &Context, message: &Message<'_>) -> Disposition {
    match reroute::defer(&ctx.publisher, &ctx.names, &message.outgoing()).await {
        Ok(()) => Disposition::Ack,
        Err(error) => {
            tracing::warn!(%error, "could not defer a message either; it goes back to the queue");
            tokio::time::sleep(REQUEUE_PAUSE).await;
            Disposition::Requeue
        }
    }
}

const REQUEUE_PAUSE: Duration = Duration::from_secs(1);

async fn retry(ctx: &Context, message: &Message<'_>, detail: &str) -> Disposition {
    match reroute::retry_or_park(&ctx.publisher, &ctx.names, &message.outgoing(), detail).await {
        Ok(Rerouted::Retried(queue)) => {
            tracing::info!(queue, detail, "message sent to a retry tier");
            ctx.metrics
                .count_event(event_name(message), Outcome::Retried);
            Disposition::Ack
        }
        Ok(Rerouted::Parked(reason)) => {
            tracing::warn!(
                reason = reason.as_str(),
                detail,
                "retries exhausted, message parked"
            );
            ctx.metrics
                .count_event(event_name(message), Outcome::Parked);
            Disposition::Ack
        }
        Err(error) => {
            tracing::warn!(%error, "could not reroute a message; deferring it");
            defer(ctx, message).await
        }
    }
}

enum Attempt {
    Done(BatchResult),
    Failed(DbError),
    Panicked,
}

/// What one transaction of [`attempt`] does.
#[derive(Clone, Copy)]
enum Work<'a> {
    /// Apply these events (indexes into the batch's messages).
    Apply {
        indexes: &'a [usize],
        backfill: Backfill,
    },
    /// Only the global back-fills a split batch deferred ([`state::backfill`]).
    Backfill,
}

/// One transaction doing `work`, with panics caught so a poison message cannot kill the loop,
/// bounded by the batch deadline: on expiry the connection is taken out of the pool and
/// dropped (a query stuck on a black-holed server would block whoever used it next).
async fn attempt(ctx: &Context, messages: &[Message<'_>], work: Work<'_>) -> Attempt {
    let clock = Instant::now();
    let mut client = match ctx.pool.get().await {
        Ok(client) => client,
        Err(error) => return Attempt::Failed(error.into()),
    };
    ctx.metrics.stage(Stage::Connect, clock.elapsed());
    let transaction = async {
        let clock = Instant::now();
        let tx = client.transaction().await?;
        ctx.metrics.stage(Stage::Begin, clock.elapsed());
        let result = match work {
            Work::Apply { indexes, backfill } => {
                let incoming: Vec<Incoming<'_>> = indexes
                    .iter()
                    .map(|&i| Incoming {
                        event: event_of(&messages[i]),
                        received_at: messages[i].received_at,
                        body: messages[i].body,
                    })
                    .collect();
                state::apply(&tx, &incoming, &ctx.rules, backfill).await?
            }
            Work::Backfill => {
                let clock = Instant::now();
                state::backfill(&tx).await?;
                ctx.metrics.stage(Stage::Backfill, clock.elapsed());
                BatchResult::default()
            }
        };
        let clock = Instant::now();
        tx.commit().await?;
        ctx.metrics.stage(Stage::Commit, clock.elapsed());
        Ok::<_, DbError>(result)
    };
    let outcome = tokio::time::timeout(
        ctx.batch_deadline,
        AssertUnwindSafe(transaction).catch_unwind(),
    )
    .await;
    match outcome {
        Ok(Ok(Ok(result))) => Attempt::Done(result),
        Ok(Ok(Err(error))) => Attempt::Failed(error),
        Ok(Err(_)) => Attempt::Panicked,
        Err(_) => {
            drop(deadpool_postgres::Object::take(client));
            Attempt::Failed(DbError::Deadline(ctx.batch_deadline))
        }
    }
}

/// How often work may fail as "database unavailable" while the database itself answers before
/// it counts as the work's own fault (and goes the transient way: isolate, retry tier).
const UNAVAILABLE_WITH_DATABASE_UP: u32 = 3;

/// A failure classified `Unavailable` is only the database's fault if the database is really
/// away: a batch whose statement kills its connection would otherwise be re-run forever.
/// Returns the failure to act on, counting `strikes` when the database answered.
async fn confirm_unavailable(ctx: &Context, strikes: &mut u32) -> Failure {
    if !store::probe(&ctx.database_url, PROBE_TIMEOUT).await {
        return Failure::Unavailable;
    }
    *strikes += 1;
    if *strikes >= UNAVAILABLE_WITH_DATABASE_UP {
        Failure::Transient
    } else {
        Failure::Unavailable
    }
}

const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

fn record_success(
    ctx: &Context,
    messages: &[Message<'_>],
    indexes: &[usize],
    result: &BatchResult,
) {
    for &(stage, elapsed) in &result.stages {
        ctx.metrics.stage(stage, elapsed);
    }
    let now = Utc::now();
    for (&i, applied) in indexes.iter().zip(&result.applied) {
        let message = &messages[i];
        ctx.metrics
            .count_event(event_name(message), (*applied).into());
        if *applied == Applied::Applied
            && let Some(received) = message.received_at
        {
            let lag = (now - received).num_microseconds().unwrap_or(0).max(0) as f64 / 1e6;
            ctx.metrics.event_lag.observe(lag);
        }
    }
    for kind in &result.alerts_opened {
        ctx.metrics.count_alert_raised(*kind);
    }
    for seconds in &result.onboarded {
        match seconds {
            Some(seconds) => ctx.metrics.onboarding_duration.observe(seconds.max(0.0)),
            None => ctx.metrics.onboarding_unmeasured.inc(),
        }
    }
}

const TRANSIENT_BATCH_RETRIES: u32 = 2;

/// The failure's class, with "unavailable" checked against the database itself.
async fn classify(ctx: &Context, error: &DbError, strikes: &mut u32) -> Failure {
    match error.classify() {
        Failure::Unavailable => confirm_unavailable(ctx, strikes).await,
        other => other,
    }
}

/// A batch part below this many events is not worth its own transaction (and commit).
const MIN_PART_EVENTS: usize = 32;

/// Apply the decodable events: in one transaction, or split into parts that share no entity
/// (see [`state::partition`]), each in its own transaction, concurrently, so PostgreSQL works on
/// them on as many backends without one waiting for the other's locks; then the global
/// back-fills the parts left out (see [`Backfill`]).
async fn apply_valid(
    ctx: &Arc<Context>,
    messages: &[Message<'_>],
    valid: &[usize],
    dispositions: &mut [Disposition],
) {
    let parts = ctx
        .transactions_per_batch
        .min(valid.len() / MIN_PART_EVENTS)
        .max(1);
    let split: Vec<Vec<usize>> = if parts == 1 {
        vec![valid.to_vec()]
    } else {
        let events: Vec<&Event> = valid.iter().map(|&i| event_of(&messages[i])).collect();
        state::partition(&events, parts)
            .into_iter()
            .map(|part| part.into_iter().map(|k| valid[k]).collect())
            .collect()
    };
    let backfill = match split.len() {
        1 => Backfill::InBatch,
        _ => Backfill::Deferred,
    };
    let changed = futures::future::join_all(
        split
            .iter()
            .map(|part| apply_part(ctx, messages, part, backfill)),
    )
    .await;
    for (i, disposition) in changed.into_iter().flatten() {
        dispositions[i] = disposition;
    }
    if backfill == Backfill::Deferred {
        run_backfill(ctx).await;
    }
}

/// The global back-fills of a split batch, once its parts are through. They are idempotent and
/// every batch with something to apply runs them (inside its own transaction when it is not
/// split), so a failure other than the database being away is left to the next batch.
async fn run_backfill(ctx: &Context) {
    let mut unavailable = reconnect_backoff();
    let mut strikes = 0;
    loop {
        let error = match attempt(ctx, &[], Work::Backfill).await {
            Attempt::Done(_) => return,
            Attempt::Panicked => {
                tracing::error!("back-fill panicked; the next batch runs it again");
                return;
            }
            Attempt::Failed(error) => error,
        };
        if classify(ctx, &error, &mut strikes).await != Failure::Unavailable
            || ctx.shutdown.is_triggered()
        {
            tracing::warn!(%error, "back-fill failed; the next batch runs it again");
            return;
        }
        let wait = next_wait(&mut unavailable);
        tracing::warn!(%error, retry_in = ?wait, "database unavailable for the back-fill");
        tokio::select! {
            _ = ctx.shutdown.wait() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// One part in one transaction, with the failure handling of the module docs. Returns the
/// events whose disposition is not a plain ack.
async fn apply_part(
    ctx: &Arc<Context>,
    messages: &[Message<'_>],
    valid: &[usize],
    backfill: Backfill,
) -> Vec<(usize, Disposition)> {
    let mut unavailable = reconnect_backoff();
    let mut transient_failures = 0;
    let mut strikes = 0;
    loop {
        match attempt(
            ctx,
            messages,
            Work::Apply {
                indexes: valid,
                backfill,
            },
        )
        .await
        {
            Attempt::Done(result) => {
                ctx.db_ok.store(true, std::sync::atomic::Ordering::Relaxed);
                record_success(ctx, messages, valid, &result);
                return Vec::new();
            }
            Attempt::Failed(error) => match classify(ctx, &error, &mut strikes).await {
                Failure::Unavailable => {
                    ctx.db_ok.store(false, std::sync::atomic::Ordering::Relaxed);
                    let wait = next_wait(&mut unavailable);
                    tracing::warn!(%error, retry_in = ?wait, batch = valid.len(), "database unavailable, holding the batch");
                    tokio::select! {
                        _ = ctx.shutdown.wait() => {
                            return valid.iter().map(|&i| (i, Disposition::Requeue)).collect();
                        }
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
                Failure::Transient
                    if transient_failures < TRANSIENT_BATCH_RETRIES && valid.len() > 1 =>
                {
                    transient_failures += 1;
                    tracing::info!(%error, "transient database error, retrying the batch");
                    tokio::time::sleep(Duration::from_millis(20 * transient_failures as u64)).await;
                }
                _ => {
                    tracing::warn!(%error, batch = valid.len(), "batch failed, applying one by one");
                    return one_by_one(ctx, messages, valid, backfill).await;
                }
            },
            Attempt::Panicked => {
                tracing::error!(
                    batch = valid.len(),
                    "handler panicked, isolating the culprit"
                );
                return one_by_one(ctx, messages, valid, backfill).await;
            }
        }
    }
}

/// Each message in its own transaction, so one bad message fails alone.
async fn one_by_one(
    ctx: &Arc<Context>,
    messages: &[Message<'_>],
    valid: &[usize],
    backfill: Backfill,
) -> Vec<(usize, Disposition)> {
    let mut changed = Vec::new();
    let mut settle = |i: usize, disposition: Disposition| {
        if disposition != Disposition::Ack {
            changed.push((i, disposition));
        }
    };
    for &i in valid {
        let mut unavailable = reconnect_backoff();
        let mut strikes = 0;
        loop {
            match attempt(
                ctx,
                messages,
                Work::Apply {
                    indexes: &[i],
                    backfill,
                },
            )
            .await
            {
                Attempt::Done(result) => {
                    ctx.db_ok.store(true, std::sync::atomic::Ordering::Relaxed);
                    record_success(ctx, messages, &[i], &result);
                }
                Attempt::Panicked => {
                    let parked = park(
                        ctx,
                        &messages[i],
                        ParkReason::HandlerPanic,
                        "handler panicked",
                    )
                    .await;
                    settle(i, parked);
                }
                Attempt::Failed(error) => match classify(ctx, &error, &mut strikes).await {
                    Failure::Unavailable => {
                        ctx.db_ok.store(false, std::sync::atomic::Ordering::Relaxed);
                        let wait = next_wait(&mut unavailable);
                        tokio::select! {
                            _ = ctx.shutdown.wait() => settle(i, Disposition::Requeue),
                            _ = tokio::time::sleep(wait) => continue,
                        }
                    }
                    Failure::Transient => {
                        settle(i, retry(ctx, &messages[i], &error.to_string()).await);
                    }
                    Failure::Permanent => {
                        tracing::warn!(%error, "database rejected a message, parking it");
                        settle(
                            i,
                            park(ctx, &messages[i], ParkReason::Rejected, &error.to_string()).await,
                        );
                    }
                },
            }
            break;
        }
    }
    changed
}
