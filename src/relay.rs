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
//! The relay never touches PostgreSQL; it is stateless and scales by replicas.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use chrono::{SecondsFormat, Utc};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use prometheus::Registry;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use crate::broker::{PublishError, Publisher};
use crate::gunzip::{self, GunzipError};
use crate::metrics::{self, RelayMetrics};
use crate::secrets::SecretStore;
use crate::shutdown::Shutdown;
use crate::signature::{self, SignedHeaders, Window};
use crate::topology::Names;

pub const WEBHOOK_PATH: &str = "/webhooks/catena";

/// Catena's headers carried onto the AMQP message (lower-case, as the broker will store them).
pub const FORWARDED_HEADERS: [&str; 7] = [
    "x-webhook-id",
    "x-request-id",
    "x-event-type",
    "x-schema-version",
    "x-source",
    "x-delivery-attempt",
    "x-catena-timestamp",
];

/// AMQP header with the relay's receive time (RFC 3339, microseconds, UTC).
pub const RECEIVED_AT_HEADER: &str = "received_at";

/// Everything the relay needs, independent of how it was configured (CLI or a test).
#[derive(Clone, Debug)]
pub struct RelayConfig {
    pub listen: String,
    pub amqp_url: String,
    pub names: Names,
    pub secrets: SecretStore,
    pub max_body_bytes: usize,
    pub max_decompressed_bytes: usize,
    pub confirm_timeout: Duration,
    pub publish_channels: usize,
    pub max_concurrency: usize,
    pub body_timeout: Duration,
    /// A client must deliver its request headers within this (slowloris guard).
    pub header_timeout: Duration,
    pub window: Window,
}

impl RelayConfig {
    pub fn new(listen: &str, amqp_url: &str, names: Names, secrets: SecretStore) -> Self {
        Self {
            listen: listen.to_owned(),
            amqp_url: amqp_url.to_owned(),
            names,
            secrets,
            max_body_bytes: 1024 * 1024,
            max_decompressed_bytes: 10 * 1024 * 1024,
            confirm_timeout: Duration::from_secs(2),
            publish_channels: 4,
            max_concurrency: 4096,
            body_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(10),
            window: Window::default(),
        }
    }
}

struct AppState {
    config: RelayConfig,
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
    let listener = TcpListener::bind(&config.listen).await?;
    let addr = listener.local_addr()?;
    let broker_shutdown = Shutdown::new();
    let publisher = Publisher::start(
        &config.amqp_url,
        &format!("catena-ingest relay {addr}"),
        config.names.clone(),
        config.publish_channels,
        broker_shutdown.clone(),
    );
    let registry = Registry::new();
    let state = Arc::new(AppState {
        metrics: RelayMetrics::new(&registry),
        permits: Semaphore::new(config.max_concurrency),
        config,
        publisher: publisher.clone(),
        registry,
    });
    let header_timeout = state.config.header_timeout;
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
const MAX_HEADER_BYTES: usize = 64 * 1024;

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
        .route(WEBHOOK_PATH, any(receive))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .fallback(not_found)
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

async fn not_found(State(state): State<Arc<AppState>>, uri: Uri) -> impl IntoResponse {
    state
        .metrics
        .requests
        .with_label_values(&["not_found"])
        .inc();
    tracing::debug!(path = %uri.path(), "no such route");
    (StatusCode::NOT_FOUND, "not found\n")
}

/// A refused request: status, the metric outcome, and a short reason safe to log and return.
struct Refusal {
    status: StatusCode,
    outcome: &'static str,
    reason: Cow<'static, str>,
}

impl Refusal {
    fn new(
        status: StatusCode,
        outcome: &'static str,
        reason: impl Into<Cow<'static, str>>,
    ) -> Self {
        Self {
            status,
            outcome,
            reason: reason.into(),
        }
    }
}

async fn receive(
    State(state): State<Arc<AppState>>,
    method: Method,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let _inflight = InflightGuard::new(&state.metrics);
    let result = match state.permits.try_acquire() {
        Ok(_permit) => handle(&state, &method, &headers, body).await,
        Err(_) => Err(Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "relay at capacity",
        )),
    };
    let (status, outcome) = match &result {
        Ok(()) => (StatusCode::ACCEPTED, "accepted"),
        Err(refusal) => (refusal.status, refusal.outcome),
    };
    state.metrics.requests.with_label_values(&[outcome]).inc();
    state
        .metrics
        .request_duration
        .observe(started.elapsed().as_secs_f64());
    match result {
        Ok(()) => StatusCode::ACCEPTED.into_response(),
        Err(refusal) => {
            let webhook_id = header_str(&headers, "x-webhook-id").unwrap_or("-");
            let request_id = header_str(&headers, "x-request-id").unwrap_or("-");
            tracing::warn!(
                status = status.as_u16(),
                outcome,
                reason = %refusal.reason,
                webhook_id,
                request_id,
                "webhook refused"
            );
            let mut response = (status, format!("{}\n", refusal.reason)).into_response();
            if status == StatusCode::METHOD_NOT_ALLOWED {
                response
                    .headers_mut()
                    .insert(header::ALLOW, header::HeaderValue::from_static("POST"));
            }
            response
        }
    }
}

async fn handle(
    state: &AppState,
    method: &Method,
    headers: &HeaderMap,
    body: Body,
) -> Result<(), Refusal> {
    let config = &state.config;
    // hyper bounds what it buffers; this bounds what we accept (431, like hyper would).
    let header_bytes: usize = headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    if header_bytes > MAX_HEADER_BYTES {
        return Err(Refusal::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "bad_request",
            format!("request headers exceed {MAX_HEADER_BYTES} bytes"),
        ));
    }
    if method != Method::POST {
        return Err(Refusal::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "only POST is accepted",
        ));
    }

    // 1. The compressed body, capped before it is read when the client announces its length.
    let too_large = || {
        Refusal::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("body exceeds {} bytes", config.max_body_bytes),
        )
    };
    let announced = header_str(headers, "content-length").and_then(|v| v.parse::<usize>().ok());
    if announced.is_some_and(|len| len > config.max_body_bytes) {
        return Err(too_large());
    }
    let raw = match tokio::time::timeout(
        config.body_timeout,
        axum::body::to_bytes(body, config.max_body_bytes),
    )
    .await
    {
        Err(_) => {
            return Err(Refusal::new(
                StatusCode::REQUEST_TIMEOUT,
                "bad_request",
                "body not received in time",
            ));
        }
        Ok(Err(error)) if is_length_limit(&error) => return Err(too_large()),
        Ok(Err(_)) => {
            return Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "body could not be read",
            ));
        }
        Ok(Ok(raw)) => raw,
    };

    // 2. Gunzip (by header or by magic bytes), capped.
    let gzipped = header_str(headers, "content-encoding")
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("gzip"))
        || gunzip::looks_gzipped(&raw);
    let body: Cow<'_, [u8]> = if gzipped {
        Cow::Owned(decompress(raw.clone(), config.max_decompressed_bytes).await?)
    } else {
        if raw.len() > config.max_decompressed_bytes {
            return Err(too_large());
        }
        Cow::Borrowed(&raw)
    };

    // 3 and 4. Timestamp window, then the signature.
    let signed = SignedHeaders {
        timestamp: header_str(headers, "x-catena-timestamp"),
        signature: header_str(headers, "x-catena-signature"),
        webhook_id: header_str(headers, "x-webhook-id"),
    };
    signature::verify(&config.secrets, signed, &body, Utc::now(), config.window).map_err(
        |rejection| {
            Refusal::new(
                StatusCode::UNAUTHORIZED,
                rejection.outcome(),
                rejection.to_string(),
            )
        },
    )?;

    // 5. Publish. Authentic but unparseable bodies are still published (and parked by the
    // worker) so nothing Catena sent is silently dropped.
    let routing_key = routing_key(&body, headers);
    let properties = properties(headers);
    let confirm_started = Instant::now();
    let published = state
        .publisher
        .publish(
            &config.names.events_exchange,
            &routing_key,
            &body,
            properties,
            config.confirm_timeout,
        )
        .await;
    match published {
        Ok(()) => {
            state
                .metrics
                .publish_confirm
                .observe(confirm_started.elapsed().as_secs_f64());
            Ok(())
        }
        Err(error) => Err(Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            match error {
                PublishError::Unavailable => "broker unavailable".into(),
                other => other.to_string(),
            },
        )),
    }
}

async fn decompress(raw: bytes::Bytes, max: usize) -> Result<Vec<u8>, Refusal> {
    // Small bodies inflate in microseconds; large ones go to the blocking pool so a bomb cannot
    // stall the reactor threads.
    let result = if raw.len() <= 64 * 1024 {
        gunzip::gunzip_capped(&raw, max)
    } else {
        tokio::task::spawn_blocking(move || gunzip::gunzip_capped(&raw, max))
            .await
            .unwrap_or(Err(GunzipError::Corrupt))
    };
    result.map_err(|error| match error {
        GunzipError::TooLarge(_) => Refusal::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            error.to_string(),
        ),
        GunzipError::Corrupt => {
            Refusal::new(StatusCode::BAD_REQUEST, "bad_request", error.to_string())
        }
    })
}

fn is_length_limit(error: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if e.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = e.source();
    }
    false
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// The routing key: the body's `event_name` (authoritative once verified), else the
/// `X-Event-Type` header, else `unknown`. Bounded to AMQP's 255 bytes.
fn routing_key(body: &[u8], headers: &HeaderMap) -> String {
    #[derive(serde::Deserialize)]
    struct Peek<'a> {
        #[serde(borrow, default)]
        event_name: Option<Cow<'a, str>>,
    }
    let from_body = serde_json::from_slice::<Peek<'_>>(body)
        .ok()
        .and_then(|p| p.event_name);
    let name = from_body
        .as_deref()
        .or_else(|| header_str(headers, "x-event-type"))
        .unwrap_or("unknown");
    if name.is_empty() || name.len() > 255 {
        "unknown".to_owned()
    } else {
        name.to_owned()
    }
}

fn properties(headers: &HeaderMap) -> BasicProperties {
    let mut table = FieldTable::default();
    for name in FORWARDED_HEADERS {
        if let Some(value) = header_str(headers, name) {
            table.insert(name.into(), AMQPValue::LongString(value.into()));
        }
    }
    let now = Utc::now();
    table.insert(
        RECEIVED_AT_HEADER.into(),
        AMQPValue::LongString(now.to_rfc3339_opts(SecondsFormat::Micros, true).into()),
    );
    let mut properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_timestamp(now.timestamp() as u64)
        .with_app_id("catena-ingest-relay".into())
        .with_headers(table);
    if let Some(request_id) = header_str(headers, "x-request-id") {
        properties = properties.with_message_id(request_id.into());
    }
    properties
}

struct InflightGuard<'a>(&'a RelayMetrics);

impl<'a> InflightGuard<'a> {
    fn new(metrics: &'a RelayMetrics) -> Self {
        metrics.inflight.inc();
        Self(metrics)
    }
}

impl Drop for InflightGuard<'_> {
    fn drop(&mut self) {
        self.0.inflight.dec();
    }
}
