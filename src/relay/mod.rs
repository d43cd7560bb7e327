//! The edge relay: verify a Catena webhook, publish it with a confirm, then answer.
//!
//! Per request, in this order, with nothing parsed or trusted before the signature holds:
//! 1. POST `/webhooks/catena`, compressed body capped (413);
//! 2. gunzip with a cap on the expansion (413), corrupt gzip is 400;
//! 3. `X-Catena-Timestamp` inside the window (401);
//! 4. HMAC over `timestamp + "." + body` with the secrets of `X-Webhook-ID` (401);
//! 5. publish the uncompressed body, persistent and mandatory, routing key = event name;
//! 6. confirm -> 202; nack, return, timeout or no broker -> 503 so Catena retries.
//!
//! The relay never touches PostgreSQL; it is stateless and scales by replicas. This module
//! binds and serves; [`handler`] is the per-request pipeline above, [`signature`], [`secrets`]
//! and [`gunzip`] its pieces.

pub mod gunzip;
mod handler;
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
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use crate::broker::Publisher;
pub use crate::config::RelayConfig;
use crate::metrics::{self, RelayMetrics};
use crate::shutdown::Shutdown;
pub use handler::Outcome;

pub const WEBHOOK_PATH: &str = "/webhooks/catena";

struct AppState {
    config: RelayConfig,
    names: crate::broker::Names,
    publisher: Publisher,
    metrics: RelayMetrics,
    registry: Registry,
    permits: Semaphore,
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
    let state = Arc::new(AppState {
        metrics: RelayMetrics::new(&registry),
        permits: Semaphore::new(config.relay.max_concurrency),
        config,
        names,
        publisher: publisher.clone(),
        registry,
    });
    let header_timeout = state.config.relay.header_timeout;
    let app = router(state);
    let handle = tokio::spawn(async move {
        serve(listener, app, header_timeout, shutdown).await;
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

/// Headers larger than this are refused with 431 by the handler; hyper's read-buffer cap
/// (the same figure) bounds what a connection can make it buffer.
pub(crate) const MAX_HEADER_BYTES: usize = 64 * 1024;

/// HTTP/1.1 with keep-alive, a header-read deadline (slowloris) and a header size cap; on
/// shutdown stop accepting, let in-flight requests finish (up to 30 s), then return.
async fn serve(listener: TcpListener, app: Router, header_timeout: Duration, shutdown: Shutdown) {
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
        let _ = stream.set_nodelay(true);
        let connection =
            http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let watched = graceful.watch(connection);
        tokio::spawn(async move {
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
        .fallback(handler::not_found)
        .with_state(state)
}

async fn readyz(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    if state.publisher.is_ready() {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "broker not ready")
    }
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
