//! The worker pool: consume, deduplicate, apply to fleet state, retry, park.
//!
//! Each consumer owns one AMQP connection and channel with a prefetch window and runs a simple
//! loop: gather a batch (up to `batch_size`, waiting at most `batch_wait` after the first
//! message), apply it in one transaction, then settle it with one multiple-ack. The ack is sent
//! only after the commit; a crash anywhere redelivers and the dedup key makes the redelivery a
//! no-op, which is exactly-once effect on at-least-once delivery.

mod batch;
mod consumer;
mod reroute;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus::Registry;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::broker::Publisher;
pub use crate::config::WorkerConfig;
use crate::metrics::{self, RetentionMetrics, WorkerMetrics};
use crate::retry::{next_wait, reconnect_backoff};
use crate::shutdown::Shutdown;
use crate::store::{self, DbError, Failure};
use batch::Context;

/// The `outcome` label of `catena_worker_events_total`: what became of one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    Duplicate,
    Retried,
    Parked,
    Ignored,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Applied => "applied",
            Outcome::Duplicate => "duplicate",
            Outcome::Retried => "retried",
            Outcome::Parked => "parked",
            Outcome::Ignored => "ignored",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("{0}")]
    Db(#[from] DbError),
    #[error("binding the metrics listener: {0}")]
    Bind(#[from] std::io::Error),
    #[error("{0}")]
    Config(String),
}

/// A worker serving in the background.
pub struct RunningWorker {
    pub metrics_addr: SocketAddr,
    pub handle: JoinHandle<()>,
    pub registry: Registry,
}

pub(crate) struct Health {
    ctx: Arc<Context>,
    pub(crate) consuming: AtomicUsize,
    consumers: usize,
    registry: Registry,
    /// The database answered the last probe of [`probe_database`].
    db_reachable: AtomicBool,
}

impl Health {
    fn ready(&self) -> bool {
        self.consuming.load(Ordering::Relaxed) == self.consumers
            && self.ctx.db_ok.load(Ordering::Relaxed)
            && self.db_reachable.load(Ordering::Relaxed)
            && self.ctx.publisher.is_ready()
    }
}

/// How often the database is probed on its own, and how long a probe may take.
const DB_PROBE_INTERVAL: Duration = Duration::from_secs(2);

/// Probe the database every [`DB_PROBE_INTERVAL`], traffic or not: batches only notice a lost
/// database when they run, so an idle worker would stay ready for as long as nothing arrives.
fn probe_database(health: Arc<Health>, shutdown: Shutdown) {
    tokio::spawn(async move {
        loop {
            let reachable = store::probe(&health.ctx.database_url, DB_PROBE_INTERVAL).await;
            if health.db_reachable.swap(reachable, Ordering::Relaxed) != reachable {
                match reachable {
                    true => tracing::info!("database reachable again"),
                    false => tracing::warn!("database probe failed: not ready"),
                }
            }
            health.ctx.metrics.ready.set(health.ready() as i64);
            tokio::select! {
                _ = shutdown.wait() => return,
                _ = tokio::time::sleep(DB_PROBE_INTERVAL) => {}
            }
        }
    });
}

/// Check the retention settings, migrate (unless disabled), then consume until `shutdown`, with
/// the alert notifier and the retention sweeper (unless disabled) beside the consumers; on
/// shutdown, in-flight batches get `drain_timeout` to commit and ack.
pub async fn start(config: WorkerConfig, shutdown: Shutdown) -> Result<RunningWorker, WorkerError> {
    let settings = &config.worker;
    if !settings.retention.disabled {
        settings
            .retention
            .validate(&settings.rules)
            .map_err(WorkerError::Config)?;
    }
    let registry = Registry::new();
    let metrics = WorkerMetrics::new(&registry);
    let listener = TcpListener::bind(&settings.metrics_listen).await?;
    let metrics_addr = listener.local_addr()?;
    if !settings.no_migrate {
        migrate_with_retry(&config.database.database_url, &shutdown).await?;
    }
    let pool = store::pool(&config.database.database_url, config.database.db_pool_size)?;
    metrics.pool_max.set(config.database.db_pool_size as i64);
    let names = config.broker.names();
    let broker_shutdown = Shutdown::new();
    let publisher = Publisher::start(
        &config.broker.amqp_url,
        "catena-ingest worker (reroute)",
        names.clone(),
        2,
        broker_shutdown.clone(),
    );
    let ctx = Arc::new(Context {
        pool,
        publisher,
        names: names.clone(),
        metrics,
        shutdown: shutdown.clone(),
        db_ok: AtomicBool::new(true),
        rules: settings.rules,
        database_url: config.database.database_url.clone(),
        batch_deadline: settings.batch_deadline,
        transactions_per_batch: settings.transactions_per_batch,
    });
    let health = Arc::new(Health {
        ctx: ctx.clone(),
        consuming: AtomicUsize::new(0),
        consumers: settings.consumers.max(1),
        registry: registry.clone(),
        db_reachable: AtomicBool::new(true),
    });
    probe_database(health.clone(), shutdown.clone());
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
        names,
        ctx.metrics.clone(),
        settings.notifier.clone(),
        shutdown.clone(),
    );

    let retention = (!settings.retention.disabled).then(|| {
        crate::retention::spawn(
            config.database.database_url.clone(),
            settings.retention,
            RetentionMetrics::new(&registry),
            shutdown.clone(),
        )
    });

    let mut consumers = Vec::new();
    for index in 0..settings.consumers.max(1) {
        consumers.push(tokio::spawn(consumer::consume(
            index,
            config.clone(),
            ctx.clone(),
            health.clone(),
        )));
    }
    let drain = settings.drain_timeout;
    let handle = tokio::spawn(async move {
        shutdown.wait().await;
        tracing::info!(deadline = ?drain, "worker draining");
        let all = futures::future::join_all(consumers);
        if tokio::time::timeout(drain, all).await.is_err() {
            tracing::warn!("drain deadline passed; unacked messages will be redelivered");
        }
        broker_shutdown.trigger();
        let _ = notifier.await;
        if let Some(retention) = retention {
            let _ = retention.await;
        }
        let _ = server.await;
        tracing::info!("worker stopped");
    });
    tracing::info!(%metrics_addr, consumers = config.worker.consumers, "worker started");
    Ok(RunningWorker {
        metrics_addr,
        handle,
        registry,
    })
}

async fn migrate_with_retry(database_url: &str, shutdown: &Shutdown) -> Result<(), DbError> {
    let mut backoff = reconnect_backoff();
    loop {
        match store::migrate(database_url).await {
            Ok(_) => return Ok(()),
            Err(error) if error.classify() == Failure::Unavailable && !shutdown.is_triggered() => {
                let wait = next_wait(&mut backoff);
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
