//! One webhook request, steps 1 to 6 of the module doc of [`crate::relay`]: every refusal is a
//! [`Refusal`] with its status, its [`Outcome`] label and a reason safe to log and return.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use chrono::Utc;

use super::gunzip::{self, GunzipError};
use super::signature::{self, Rejection, SignedHeaders};
use super::{AppState, MAX_HEADER_BYTES};
use crate::broker::PublishError;
use crate::message::{self, CatenaHeaders, Producer};
use crate::metrics::RelayMetrics;

/// The `outcome` label of `catena_relay_requests_total`: a fixed set, so every series exists
/// from the first scrape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Accepted,
    InvalidSignature,
    StaleTimestamp,
    BadRequest,
    TooLarge,
    Unavailable,
    MethodNotAllowed,
    NotFound,
}

impl Outcome {
    pub const ALL: [Outcome; 8] = [
        Outcome::Accepted,
        Outcome::InvalidSignature,
        Outcome::StaleTimestamp,
        Outcome::BadRequest,
        Outcome::TooLarge,
        Outcome::Unavailable,
        Outcome::MethodNotAllowed,
        Outcome::NotFound,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Accepted => "accepted",
            Outcome::InvalidSignature => "invalid_signature",
            Outcome::StaleTimestamp => "stale_timestamp",
            Outcome::BadRequest => "bad_request",
            Outcome::TooLarge => "too_large",
            Outcome::Unavailable => "unavailable",
            Outcome::MethodNotAllowed => "method_not_allowed",
            Outcome::NotFound => "not_found",
        }
    }
}

impl From<Rejection> for Outcome {
    fn from(rejection: Rejection) -> Self {
        match rejection {
            Rejection::MissingTimestamp
            | Rejection::MalformedTimestamp
            | Rejection::StaleTimestamp => Outcome::StaleTimestamp,
            Rejection::MissingSignature
            | Rejection::MalformedSignature
            | Rejection::UnknownWebhook
            | Rejection::BadSignature => Outcome::InvalidSignature,
        }
    }
}

pub(super) async fn not_found(State(state): State<Arc<AppState>>, uri: Uri) -> impl IntoResponse {
    state
        .metrics
        .requests
        .with_label_values(&[Outcome::NotFound.as_str()])
        .inc();
    tracing::debug!(path = %uri.path(), "no such route");
    (StatusCode::NOT_FOUND, "not found\n")
}

/// A refused request: status, the metric outcome, and a short reason safe to log and return.
struct Refusal {
    status: StatusCode,
    outcome: Outcome,
    reason: Cow<'static, str>,
}

impl Refusal {
    fn new(status: StatusCode, outcome: Outcome, reason: impl Into<Cow<'static, str>>) -> Self {
        Self {
            status,
            outcome,
            reason: reason.into(),
        }
    }
}

pub(super) async fn receive(
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
            Outcome::Unavailable,
            "relay at capacity",
        )),
    };
    let (status, outcome) = match &result {
        Ok(()) => (StatusCode::ACCEPTED, Outcome::Accepted),
        Err(refusal) => (refusal.status, refusal.outcome),
    };
    state
        .metrics
        .requests
        .with_label_values(&[outcome.as_str()])
        .inc();
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
                outcome = outcome.as_str(),
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
            Outcome::BadRequest,
            format!("request headers exceed {MAX_HEADER_BYTES} bytes"),
        ));
    }
    if method != Method::POST {
        return Err(Refusal::new(
            StatusCode::METHOD_NOT_ALLOWED,
            Outcome::MethodNotAllowed,
            "only POST is accepted",
        ));
    }

    // 1. The compressed body, capped before it is read when the client announces its length.
    let too_large = || {
        Refusal::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            Outcome::TooLarge,
            format!("body exceeds {} bytes", config.relay.max_body_bytes),
        )
    };
    let announced = header_str(headers, "content-length").and_then(|v| v.parse::<usize>().ok());
    if announced.is_some_and(|len| len > config.relay.max_body_bytes) {
        return Err(too_large());
    }
    let raw = match tokio::time::timeout(
        config.relay.body_timeout,
        axum::body::to_bytes(body, config.relay.max_body_bytes),
    )
    .await
    {
        Err(_) => {
            return Err(Refusal::new(
                StatusCode::REQUEST_TIMEOUT,
                Outcome::BadRequest,
                "body not received in time",
            ));
        }
        Ok(Err(error)) if is_length_limit(&error) => return Err(too_large()),
        Ok(Err(_)) => {
            return Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                Outcome::BadRequest,
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
        Cow::Owned(decompress(raw.clone(), config.relay.max_decompressed_bytes).await?)
    } else {
        if raw.len() > config.relay.max_decompressed_bytes {
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
    signature::verify(
        &config.secrets,
        signed,
        &body,
        Utc::now(),
        config.relay.window,
    )
    .map_err(|rejection| {
        Refusal::new(
            StatusCode::UNAUTHORIZED,
            rejection.into(),
            rejection.to_string(),
        )
    })?;

    // 5. Publish. Authentic but unparseable bodies are still published (and parked by the
    // worker) so nothing Catena sent is silently dropped.
    let routing_key = routing_key(&body, headers);
    let catena = CatenaHeaders::from_lookup(|name| header_str(headers, name));
    let properties = message::event_properties(&catena, Utc::now(), Producer::Relay);
    let confirm_started = Instant::now();
    let published = state
        .publisher
        .publish(
            &state.names.events_exchange,
            &routing_key,
            &body,
            properties,
            config.relay.confirm_timeout,
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
            Outcome::Unavailable,
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
            Outcome::TooLarge,
            error.to_string(),
        ),
        GunzipError::Corrupt => Refusal::new(
            StatusCode::BAD_REQUEST,
            Outcome::BadRequest,
            error.to_string(),
        ),
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
