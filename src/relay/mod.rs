//! The edge relay: verify a Catena webhook, publish it with a confirm, then answer.
//!
//! Per request, in this order, with nothing parsed or trusted before the signature holds:
//! 1. POST `/webhooks/catena`, compressed body capped (too large); past 16 KiB it needs a
//!    buffer of the memory budget ([`budget`]; 503 at once when none is free);
//! 2. gunzip with a cap on the expansion (too large), corrupt gzip is a bad request;
//! 3. `X-Catena-Timestamp` inside the window (stale timestamp);
//! 4. HMAC over `timestamp + "." + body` with the secrets of `X-Webhook-ID` (invalid
//!    signature; [`live_secrets`] re-reads them while running);
//! 5. publish the uncompressed body, persistent and mandatory, routing key = event name;
//! 6. confirm -> 202; nack, return, timeout or no broker -> 503 so Catena retries.
//!
//! Every refusal in steps 1 to 4 is answered 503 by default (`RELAY_REFUSAL_STATUS`), so Catena
//! keeps the event in its dead-letter queue until our side is fixed and the reconciler replays
//! it; the `outcome` label says why. [`refusals`] remembers which subscriptions' signatures were
//! refused, for the reconciler.
//!
//! The relay never touches PostgreSQL; it is stateless and scales by replicas. This module
//! binds and serves (at most `RELAY_MAX_CONNECTIONS` connections); [`handler`] is the
//! per-request pipeline above, [`budget`], [`signature`], [`secrets`] and [`gunzip`] its pieces.
//! Steps 2 to 4 run on the async threads only when the decompressed body cannot exceed
//! [`budget::INLINE_BYTES`], else on a verify thread ([`budget::Offload`]).

pub mod budget;
pub mod gunzip;
mod handler;
pub mod live_secrets;
pub mod refusals;
pub mod secrets;
pub mod signature;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{any, get};
use prometheus::Registry;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use crate::broker::{EventPublisher, GroupSettings, Publisher};
pub use crate::config::RelayConfig;
use crate::config::RelayLimits;
use crate::metrics::{self, RelayMetrics};
use crate::shutdown::Shutdown;
use budget::{Buffers, Offload};
pub use handler::Outcome;
use live_secrets::LiveSecrets;
use refusals::RefusalLog;

pub const WEBHOOK_PATH: &str = "/webhooks/catena";

struct AppState {
    config: RelayConfig,
    publisher: Publisher,
    events: EventPublisher,
    metrics: RelayMetrics,
    registry: Registry,
    permits: Semaphore,
    buffers: Arc<Buffers>,
    offload: Offload,
    secrets: Arc<LiveSecrets>,
    refusals: RefusalLog,
}

/// A relay bound to its port and serving in the background.
pub struct RunningRelay {
    pub addr: SocketAddr,
    pub publisher: Publisher,
    pub handle: JoinHandle<()>,
}

/// Bind, connect to the broker in the background and serve until `shutdown`. In-flight requests
/// finish before the broker connection closes.
pub async fn start(config: RelayConfig, shutdown: Shutdown) -> std::io::Result<RunningRelay> {
    let secrets = LiveSecrets::load(config.secrets.clone(), config.secrets_file.clone())
        .map_err(|error| std::io::Error::new(std::io::ErrorKind::InvalidData, error))?;
    let listener = TcpListener::bind(&config.relay.listen).await?;
    let addr = listener.local_addr()?;
    let broker_shutdown = Shutdown::new();
    let names = config.broker.names();
    let publisher = Publisher::start(
        &config.broker.amqp_url,
        &format!("catena-ingest relay {addr}"),
        names.clone(),
        config.relay.publish_channels,
        broker_shutdown.clone(),
    );
    let registry = Registry::new();
    let metrics = RelayMetrics::new(&registry);
    let events = EventPublisher::start(
        publisher.clone(),
        names,
        GroupSettings {
            lanes: config.relay.publish_channels,
            max_events: config.relay.group_max_events,
            max_bytes: config.relay.group_max_bytes,
            deadline: config.relay.confirm_timeout,
            producer: crate::message::Producer::Relay,
        },
        Some(metrics.group_events.clone()),
    );
    let limits = config.relay.limits();
    log_limits(&config, limits);
    let secrets = Arc::new(secrets);
    secrets.spawn_reloader(
        config.relay.secrets_reload,
        metrics.secrets_reloads.clone(),
        metrics.secrets_entries.clone(),
        broker_shutdown.clone(),
    );
    let loaded = secrets.current();
    if loaded.entries == 0 {
        tracing::warn!("no secrets loaded: every delivery is refused until one appears");
    } else {
        tracing::info!(version = %loaded.version, entries = loaded.entries, "webhook secrets loaded");
    }
    let connections = Connections {
        slots: Arc::new(Semaphore::new(limits.connections)),
        metrics: metrics.clone(),
    };
    let state = Arc::new(AppState {
        buffers: Buffers::new(
            limits.inflight_bytes,
            buffer_size(&config),
            config.relay.blocking_threads,
            metrics.inflight_bytes.clone(),
        ),
        offload: Offload::new(config.relay.blocking_threads, buffer_size(&config)),
        metrics,
        secrets,
        refusals: RefusalLog::default(),
        permits: Semaphore::new(limits.concurrency),
        config,
        events,
        publisher: publisher.clone(),
        registry,
    });
    let header_timeout = state.config.relay.header_timeout;
    let app = router(state);
    let handle = tokio::spawn(async move {
        serve(listener, app, header_timeout, connections, shutdown).await;
        broker_shutdown.trigger();
        tracing::info!("relay stopped");
    });
    tracing::info!(%addr, path = WEBHOOK_PATH, "relay listening");
    Ok(RunningRelay {
        addr,
        publisher,
        handle,
    })
}

/// The capacity of a large-body buffer: either cap, plus the byte that proves an expansion past
/// the decompressed one.
fn buffer_size(config: &RelayConfig) -> usize {
    let relay = &config.relay;
    relay
        .max_body_bytes
        .max(relay.max_decompressed_bytes.saturating_add(1))
}

/// The limits in force, once at start, and a warning when the settings given overspend the
/// budget or leave too little for large bodies.
fn log_limits(config: &RelayConfig, limits: RelayLimits) {
    let relay = &config.relay;
    let buffer_bytes = buffer_size(config);
    let buffers = (limits.inflight_bytes / buffer_bytes).saturating_sub(relay.blocking_threads);
    tracing::info!(
        memory_budget_bytes = relay.memory_budget_bytes,
        max_inflight_bytes = limits.inflight_bytes,
        buffers,
        buffer_bytes,
        max_connections = limits.connections,
        max_concurrency = limits.concurrency,
        blocking_threads = relay.blocking_threads,
        "relay limits"
    );
    let committed = limits
        .connections
        .saturating_mul(budget::CONNECTION_ALLOWANCE)
        .saturating_add(limits.inflight_bytes);
    if committed > relay.memory_budget_bytes {
        tracing::warn!(
            committed,
            memory_budget_bytes = relay.memory_budget_bytes,
            "RELAY_MAX_CONNECTIONS x 128 KiB + RELAY_MAX_INFLIGHT_BYTES exceed RELAY_MEMORY_BUDGET_BYTES"
        );
    }
    if buffers < 2 {
        tracing::warn!(
            max_inflight_bytes = limits.inflight_bytes,
            buffer_bytes,
            "RELAY_MAX_INFLIGHT_BYTES leaves fewer than two buffers of the caps besides the verify threads' own: large bodies will be refused"
        );
    }
}

/// Headers larger than this are refused with 431 by the handler; hyper's read-buffer cap
/// (the same figure) bounds what a connection can make it buffer.
pub(crate) const MAX_HEADER_BYTES: usize = 64 * 1024;

/// The connection cap: a slot per open connection, and the gauge of them.
struct Connections {
    slots: Arc<Semaphore>,
    metrics: RelayMetrics,
}

/// A connection's slot and its place in `catena_relay_connections`, both given back on drop.
struct ConnectionGuard {
    _slot: OwnedSemaphorePermit,
    metrics: RelayMetrics,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.metrics.connections.dec();
    }
}

/// HTTP/1.1 with keep-alive, a header-read deadline (slowloris; also the idle deadline between
/// requests), a header size cap and at most `RELAY_MAX_CONNECTIONS` connections (one more is
/// closed at once); on shutdown stop accepting, let in-flight requests finish (up to 30 s),
/// then return.
async fn serve(
    listener: TcpListener,
    app: Router,
    header_timeout: Duration,
    connections: Connections,
    shutdown: Shutdown,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;

    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_buf_size(MAX_HEADER_BYTES)
        .keep_alive(true);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let (stream, _) = tokio::select! {
            _ = shutdown.wait() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = connections.slots.clone().try_acquire_owned() else {
            connections
                .metrics
                .shed
                .with_label_values(&[metrics::SHED_CONNECTIONS])
                .inc();
            drop(stream);
            continue;
        };
        connections.metrics.connections.inc();
        let guard = ConnectionGuard {
            _slot: slot,
            metrics: connections.metrics.clone(),
        };
        let _ = stream.set_nodelay(true);
        let connection =
            http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let watched = graceful.watch(connection);
        tokio::spawn(async move {
            let _guard = guard;
            if let Err(error) = watched.await {
                tracing::debug!(%error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(Duration::from_secs(30), graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("in-flight requests did not finish within 30 s");
    }
}

fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route(WEBHOOK_PATH, any(handler::receive))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .route("/secrets/version", get(secrets_version))
        .route("/secrets/refusals", get(secret_refusals))
        .fallback(handler::not_found)
        .with_state(state)
}

/// Ready means the broker is: a relay without secrets is ready (it must be, so the first sync
/// can pass its barrier), and says so.
async fn readyz(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    let no_secrets = state.secrets.current().entries == 0;
    match (state.publisher.is_ready(), no_secrets) {
        (true, false) => (StatusCode::OK, "ready"),
        (true, true) => (StatusCode::OK, "ready, no secrets loaded"),
        (false, _) => (StatusCode::SERVICE_UNAVAILABLE, "broker not ready"),
    }
}

/// `{"version","entries"}` of the secrets in force (no ids, no secrets), for the barrier of
/// `subscriptions sync` and `rotate`. Not exposed by the ingress, like `/metrics`.
async fn secrets_version(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    let loaded = state.secrets.current();
    axum::Json(serde_json::json!({
        "version": loaded.version,
        "entries": loaded.entries,
    }))
}

async fn secret_refusals(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    axum::Json(state.refusals.report())
}

async fn metrics_text(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    state
        .metrics
        .broker_ready
        .set(state.publisher.is_ready() as i64);
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        metrics::render(&state.registry),
    )
}
