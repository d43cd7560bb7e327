//! The worker pool: consume, deduplicate, apply to fleet state, retry, park.
//!
//! Each consumer owns one AMQP connection and channel with a prefetch window and runs a simple
//! loop: gather a batch (up to `batch_size`, waiting at most `batch_wait` after the first
//! message), apply it in one transaction, then settle it with one multiple-ack. The ack is sent
//! only after the commit; a crash anywhere redelivers and the dedup key makes the redelivery a
//! no-op, which is exactly-once effect on at-least-once delivery.

mod batch;
pub mod reroute;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use backoff::backoff::Backoff;
use futures::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};
use prometheus::Registry;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub use batch::{Context, Disposition, event_label};

use crate::broker::{self, Publisher};
use crate::db;
use crate::metrics::{self, WorkerMetrics};
use crate::shutdown::Shutdown;
use crate::topology::Names;

#[derive(Clone, Debug)]
pub struct WorkerConfig {
    pub amqp_url: String,
    pub names: Names,
    pub database_url: String,
    pub db_pool_size: usize,
    pub metrics_listen: String,
    pub consumers: usize,
    pub prefetch: u16,
    pub batch_size: usize,
    pub batch_wait: Duration,
    pub drain_timeout: Duration,
    pub migrate: bool,
    pub rules: crate::state::Rules,
    pub notifier: crate::alerts::NotifierConfig,
}

impl WorkerConfig {
    pub fn new(amqp_url: &str, names: Names, database_url: &str) -> Self {
        Self {
            amqp_url: amqp_url.to_owned(),
            names,
            database_url: database_url.to_owned(),
            db_pool_size: 8,
            metrics_listen: "127.0.0.1:0".into(),
            consumers: 1,
            prefetch: 1000,
            batch_size: 500,
            batch_wait: Duration::from_millis(2),
            drain_timeout: Duration::from_secs(20),
            migrate: true,
            rules: crate::state::Rules::default(),
            notifier: crate::alerts::NotifierConfig::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("{0}")]
    Db(#[from] db::DbError),
    #[error("binding the metrics listener: {0}")]
    Bind(#[from] std::io::Error),
}

/// A worker serving in the background.
pub struct RunningWorker {
    pub metrics_addr: SocketAddr,
    pub handle: JoinHandle<()>,
    pub registry: Registry,
}

struct Health {
    ctx: Arc<Context>,
    consuming: AtomicUsize,
    consumers: usize,
    registry: Registry,
}

impl Health {
    fn ready(&self) -> bool {
        self.consuming.load(Ordering::Relaxed) == self.consumers
            && self.ctx.db_ok.load(Ordering::Relaxed)
            && self.ctx.publisher.is_ready()
    }
}

/// Migrate (unless disabled), then consume until `shutdown`; on shutdown, in-flight batches get
/// `drain_timeout` to commit and ack.
pub async fn start(config: WorkerConfig, shutdown: Shutdown) -> Result<RunningWorker, WorkerError> {
    let registry = Registry::new();
    let metrics = WorkerMetrics::new(&registry);
    let listener = TcpListener::bind(&config.metrics_listen).await?;
    let metrics_addr = listener.local_addr()?;
    if config.migrate {
        migrate_with_retry(&config.database_url, &shutdown).await?;
    }
    let pool = db::pool(&config.database_url, config.db_pool_size)?;
    metrics.pool_max.set(config.db_pool_size as i64);
    let broker_shutdown = Shutdown::new();
    let publisher = Publisher::start(
        &config.amqp_url,
        "catena-ingest worker (reroute)",
        config.names.clone(),
        2,
        broker_shutdown.clone(),
    );
    let ctx = Arc::new(Context {
        pool,
        publisher,
        names: config.names.clone(),
        metrics,
        shutdown: shutdown.clone(),
        db_ok: AtomicBool::new(true),
        rules: config.rules,
    });
    let health = Arc::new(Health {
        ctx: ctx.clone(),
        consuming: AtomicUsize::new(0),
        consumers: config.consumers.max(1),
        registry: registry.clone(),
    });
    let server = {
        let app = Router::new()
            .route("/healthz", get(|| async { "ok" }))
            .route("/readyz", get(readyz))
            .route("/metrics", get(metrics_text))
            .with_state(health.clone());
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { shutdown.wait().await })
                .await;
        })
    };

    let notifier = crate::alerts::spawn(
        ctx.pool.clone(),
        ctx.publisher.clone(),
        config.names.clone(),
        ctx.metrics.clone(),
        config.notifier.clone(),
        shutdown.clone(),
    );

    let mut consumers = Vec::new();
    for index in 0..config.consumers.max(1) {
        consumers.push(tokio::spawn(consume(
            index,
            config.clone(),
            ctx.clone(),
            health.clone(),
        )));
    }
    let drain = config.drain_timeout;
    let handle = tokio::spawn(async move {
        shutdown.wait().await;
        tracing::info!(deadline = ?drain, "worker draining");
        let all = futures::future::join_all(consumers);
        if tokio::time::timeout(drain, all).await.is_err() {
            tracing::warn!("drain deadline passed; unacked messages will be redelivered");
        }
        broker_shutdown.trigger();
        let _ = notifier.await;
        let _ = server.await;
        tracing::info!("worker stopped");
    });
    tracing::info!(%metrics_addr, consumers = config.consumers, "worker started");
    Ok(RunningWorker {
        metrics_addr,
        handle,
        registry,
    })
}

async fn migrate_with_retry(database_url: &str, shutdown: &Shutdown) -> Result<(), db::DbError> {
    let mut backoff = broker::reconnect_backoff();
    loop {
        match db::migrate(database_url).await {
            Ok(_) => return Ok(()),
            Err(error)
                if error.classify() == db::Failure::Unavailable && !shutdown.is_triggered() =>
            {
                let wait = backoff.next_backoff().unwrap_or(Duration::from_secs(5));
                tracing::warn!(%error, retry_in = ?wait, "database not reachable for migrations");
                tokio::time::sleep(wait).await;
            }
            Err(error) => return Err(error),
        }
    }
}

async fn readyz(State(health): State<Arc<Health>>) -> impl IntoResponse {
    if health.ready() {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

async fn metrics_text(State(health): State<Arc<Health>>) -> impl IntoResponse {
    let m = &health.ctx.metrics;
    m.ready.set(health.ready() as i64);
    let status = health.ctx.pool.status();
    m.pool_connections
        .with_label_values(&["in_use"])
        .set((status.size - status.available) as i64);
    m.pool_connections
        .with_label_values(&["idle"])
        .set(status.available as i64);
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        metrics::render(&health.registry),
    )
}

async fn open_consumer(
    config: &WorkerConfig,
    index: usize,
) -> lapin::Result<(Connection, Channel, Consumer)> {
    let connection = broker::connect(
        &config.amqp_url,
        &format!("catena-ingest worker consumer {index}"),
    )
    .await?;
    let channel = connection.create_channel().await?;
    crate::topology::declare(&channel, &config.names).await?;
    channel
        .basic_qos(config.prefetch, BasicQosOptions::default())
        .await?;
    let consumer = channel
        .basic_consume(
            config.names.events_queue.as_str().into(),
            format!("catena-ingest-{}-{index}", std::process::id())
                .as_str()
                .into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok((connection, channel, consumer))
}

enum Gathered {
    Batch(Vec<Delivery>),
    Shutdown,
    Broken,
}

async fn gather(consumer: &mut Consumer, config: &WorkerConfig, shutdown: &Shutdown) -> Gathered {
    let first = tokio::select! {
        _ = shutdown.wait() => return Gathered::Shutdown,
        next = consumer.next() => match next {
            Some(Ok(delivery)) => delivery,
            Some(Err(error)) => {
                tracing::warn!(%error, "consumer error");
                return Gathered::Broken;
            }
            None => return Gathered::Broken,
        },
    };
    let mut batch = Vec::with_capacity(config.batch_size.min(1024));
    batch.push(first);
    let deadline = tokio::time::Instant::now() + config.batch_wait;
    while batch.len() < config.batch_size {
        // Take what is already buffered without waiting; then wait up to the deadline.
        let next = match consumer.next().now_or_never() {
            Some(next) => next,
            None if config.batch_wait.is_zero() => break,
            None => match tokio::time::timeout_at(deadline, consumer.next()).await {
                Ok(next) => next,
                Err(_) => break,
            },
        };
        match next {
            Some(Ok(delivery)) => batch.push(delivery),
            _ => break,
        }
    }
    Gathered::Batch(batch)
}

/// Ack everything with one multiple-ack when the whole batch is done; otherwise settle each.
async fn settle(
    channel: &Channel,
    batch: &[Delivery],
    dispositions: &[Disposition],
) -> lapin::Result<()> {
    if dispositions.iter().all(|d| *d == Disposition::Ack) {
        let last = batch.last().expect("batches are never empty").delivery_tag;
        return channel
            .basic_ack(last, BasicAckOptions { multiple: true })
            .await;
    }
    for (delivery, disposition) in batch.iter().zip(dispositions) {
        match disposition {
            Disposition::Ack => {
                channel
                    .basic_ack(delivery.delivery_tag, BasicAckOptions::default())
                    .await?
            }
            Disposition::Requeue => {
                channel
                    .basic_nack(
                        delivery.delivery_tag,
                        BasicNackOptions {
                            multiple: false,
                            requeue: true,
                        },
                    )
                    .await?
            }
        }
    }
    Ok(())
}

async fn consume(index: usize, config: WorkerConfig, ctx: Arc<Context>, health: Arc<Health>) {
    let mut backoff = broker::reconnect_backoff();
    while !ctx.shutdown.is_triggered() {
        let (connection, channel, mut consumer) = match open_consumer(&config, index).await {
            Ok(opened) => opened,
            Err(error) => {
                let wait = backoff.next_backoff().unwrap_or(Duration::from_secs(5));
                tracing::warn!(consumer = index, %error, retry_in = ?wait, "cannot consume, retrying");
                tokio::select! {
                    _ = ctx.shutdown.wait() => break,
                    _ = tokio::time::sleep(wait) => continue,
                }
            }
        };
        backoff.reset();
        health.consuming.fetch_add(1, Ordering::Relaxed);
        tracing::info!(consumer = index, queue = %config.names.events_queue, "consuming");
        loop {
            let batch = match gather(&mut consumer, &config, &ctx.shutdown).await {
                Gathered::Batch(batch) => batch,
                Gathered::Shutdown | Gathered::Broken => break,
            };
            ctx.metrics.inflight.add(batch.len() as i64);
            let dispositions = batch::process(&ctx, &batch).await;
            let settled = settle(&channel, &batch, &dispositions).await;
            ctx.metrics.inflight.sub(batch.len() as i64);
            if let Err(error) = settled {
                // Committed but not acked: the broker redelivers and dedup makes it a no-op.
                tracing::warn!(consumer = index, %error, "ack failed, reconnecting");
                break;
            }
        }
        health.consuming.fetch_sub(1, Ordering::Relaxed);
        // Unacked prefetched messages return to the queue when the channel closes.
        let _ = connection.close(200, "consumer stopping".into()).await;
    }
    tracing::info!(consumer = index, "consumer stopped");
}
