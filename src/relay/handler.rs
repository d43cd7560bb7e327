//! One webhook request, steps 1 to 6 of the module doc of [`crate::relay`]: every refusal is a
//! [`Refusal`] with its status, its [`Outcome`] label and a reason safe to log and return.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use chrono::Utc;

use super::budget::{Buffer, Buffers, INLINE_BYTES, OffloadError};
use super::gunzip::{self, GunzipError};
use super::refusals::Kind as RefusalKind;
use super::secrets::SecretStore;
use super::signature::{self, Rejection, SignedHeaders};
use super::{AppState, MAX_HEADER_BYTES, RelayConfig};
use crate::broker::PublishError;
use crate::config::RefusalStatus;
use crate::message::{CatenaHeaders, EventMeta};
use crate::metrics::{self, RelayMetrics};

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

pub(super) async fn receive(State(state): State<Arc<AppState>>, request: Request) -> Response {
    // The request taken apart rather than through the `HeaderMap` and `Method` extractors,
    // which clone the header map per request (~3% of the relay's CPU under wrk).
    let (
        Parts {
            method, headers, ..
        },
        body,
    ) = request.into_parts();
    let started = Instant::now();
    let _inflight = InflightGuard::new(&state.metrics);
    let result = match state.permits.try_acquire() {
        Ok(_permit) => handle(&state, &method, &headers, body).await,
        Err(_) => Err(shed(&state, Shed::Concurrency)),
    };
    let (status, outcome) = match &result {
        Ok(()) => (StatusCode::ACCEPTED, Outcome::Accepted),
        Err(refusal) => (
            answered(refusal, state.config.relay.refusal_status),
            refusal.outcome,
        ),
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
            let kind = match outcome {
                Outcome::InvalidSignature => Some(RefusalKind::Signature),
                Outcome::StaleTimestamp => Some(RefusalKind::Timestamp),
                _ => None,
            };
            if let Some(kind) = kind {
                state.refusals.record(webhook_id, kind, Utc::now());
            }
            tracing::warn!(
                status = status.as_u16(),
                outcome = outcome.as_str(),
                reason = %refusal.reason,
                webhook_id,
                request_id,
                "webhook refused"
            );
            let mut response = (
                status,
                format!("{}: {}\n", outcome.as_str(), refusal.reason),
            )
                .into_response();
            if status == StatusCode::METHOD_NOT_ALLOWED {
                response
                    .headers_mut()
                    .insert(header::ALLOW, header::HeaderValue::from_static("POST"));
            }
            response
        }
    }
}

/// The status a refusal is answered with: its own under `conventional`; under `unavailable`
/// (the default) 503 for everything a retry or a fix on our side could turn into a 202, so
/// Catena keeps the event. A wrong method or path is not a delivery and keeps its 405/404.
fn answered(refusal: &Refusal, mode: RefusalStatus) -> StatusCode {
    match (mode, refusal.outcome) {
        (RefusalStatus::Conventional, _)
        | (_, Outcome::MethodNotAllowed | Outcome::NotFound | Outcome::Accepted) => refusal.status,
        (RefusalStatus::Unavailable, _) => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// Why a request was answered 503 before its turn: the `reason` of `catena_relay_shed_total`.
#[derive(Debug, Clone, Copy)]
enum Shed {
    Concurrency,
    Memory,
    Blocking,
}

fn shed(state: &AppState, why: Shed) -> Refusal {
    let (label, reason) = match why {
        Shed::Concurrency => (metrics::SHED_CONCURRENCY, "relay at capacity"),
        Shed::Memory => (metrics::SHED_MEMORY, "relay memory budget exhausted"),
        Shed::Blocking => (metrics::SHED_BLOCKING, "relay busy with large bodies"),
    };
    state.metrics.shed.with_label_values(&[label]).inc();
    Refusal::new(
        StatusCode::SERVICE_UNAVAILABLE,
        Outcome::Unavailable,
        reason,
    )
}

async fn handle(
    state: &Arc<AppState>,
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

    // 1. The compressed body, capped before it is read when the client announces its length;
    // past INLINE_BYTES it moves into a buffer of the pool.
    let max_body = config.relay.max_body_bytes;
    let announced = header_str(headers, "content-length").and_then(|v| v.parse::<usize>().ok());
    if announced.is_some_and(|len| len > max_body) {
        return Err(too_large(max_body));
    }
    let raw = match tokio::time::timeout(
        config.relay.body_timeout,
        read_body(body, announced, max_body, &state.buffers),
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
        Ok(Err(ReadError::TooLarge)) => return Err(too_large(max_body)),
        Ok(Err(ReadError::OverBudget)) => return Err(shed(state, Shed::Memory)),
        Ok(Err(ReadError::Broken)) => {
            return Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                Outcome::BadRequest,
                "body could not be read",
            ));
        }
        Ok(Ok(raw)) => raw,
    };

    // 2 to 4. Gunzip (by header or by magic bytes) capped, the timestamp window, the signature
    // (and then the routing key): on this thread when the body is small, else on a verify
    // thread. What decides is the most the output can be, not the input's size: a few KiB of
    // gzip may expand to the cap.
    let gzipped = header_str(headers, "content-encoding")
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("gzip"))
        || gunzip::looks_gzipped(&raw);
    let max_out = config.relay.max_decompressed_bytes;
    let claims = Claims::of(headers);
    let secrets = state.secrets.current();
    let small = raw.len() <= INLINE_BYTES
        && (!gzipped || gunzip::size_hint(&raw).is_some_and(|n| n <= INLINE_BYTES));
    let mut inline = None;
    if small {
        let cap = max_out.min(INLINE_BYTES);
        match open(config, &secrets.store, &raw, gzipped, &claims, cap, None) {
            // Larger than the hint said (a multi-member body, or a lie): start over off-thread.
            Err(Failure::Gunzip(GunzipError::TooLarge(_))) if cap < max_out => {}
            result => inline = Some(result),
        }
    }
    let (raw, opened) = match inline {
        Some(result) => (raw, result),
        None => {
            let job_state = state.clone();
            let claims = OwnedClaims::from(claims);
            state
                .offload
                .run(move |scratch| {
                    let scratch = Some((scratch, &job_state.buffers));
                    let opened = open(
                        &job_state.config,
                        &secrets.store,
                        &raw,
                        gzipped,
                        &claims.borrow(),
                        max_out,
                        scratch,
                    );
                    (raw, opened)
                })
                .await
                .map_err(|error| match error {
                    OffloadError::Busy => shed(state, Shed::Blocking),
                    OffloadError::Panicked => Refusal::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        Outcome::Unavailable,
                        "internal error",
                    ),
                })?
        }
    };
    let opened = opened.map_err(|failure| failure.refusal(state))?;

    // 5. Publish. Authentic but unparseable bodies are still published (and parked by the
    // worker) so nothing Catena sent is silently dropped. The compressed body is freed first;
    // the publisher copies a large body into its frames, and that copy holds a slot until the
    // confirm.
    let body = match opened.inflated {
        Some(inflated) => {
            drop(raw);
            inflated
        }
        None => raw,
    };
    let _copy = if body.len() > INLINE_BYTES {
        Some(
            state
                .buffers
                .hold()
                .map_err(|_| shed(state, Shed::Memory))?,
        )
    } else {
        None
    };
    let catena = CatenaHeaders::from_lookup(|name| header_str(headers, name));
    let meta = EventMeta::of_request(&catena, &opened.routing_key, Utc::now());
    let confirm_started = Instant::now();
    let published = state.events.publish(meta, Box::new(body)).await;
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

fn too_large(max: usize) -> Refusal {
    Refusal::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        Outcome::TooLarge,
        format!("body exceeds {max} bytes"),
    )
}

/// A body: small ones in a `Vec` of their own (the connection's allowance), large ones in a
/// [`Buffer`] of the pool.
enum BodyBytes {
    Small(Vec<u8>),
    Large(Buffer),
}

impl AsRef<[u8]> for BodyBytes {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl std::ops::Deref for BodyBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            BodyBytes::Small(vec) => vec,
            BodyBytes::Large(buffer) => buffer,
        }
    }
}

enum ReadError {
    TooLarge,
    OverBudget,
    Broken,
}

/// The body as it arrives: into a `Vec` of at most [`INLINE_BYTES`] (sized by the announced
/// length), then, if it grows past that, into a buffer of the pool. Frames are copied and
/// dropped as they come, so hyper's buffers are not kept alive by the body.
async fn read_body(
    mut body: Body,
    announced: Option<usize>,
    max: usize,
    buffers: &Arc<Buffers>,
) -> Result<BodyBytes, ReadError> {
    use http_body_util::BodyExt;
    let mut small = Vec::new();
    let mut large: Option<Buffer> = None;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.map_err(|_| ReadError::Broken)?.into_data() else {
            continue; // trailers
        };
        if let Some(buffer) = &mut large {
            if buffer.len() + data.len() > max {
                return Err(ReadError::TooLarge);
            }
            buffer.extend_from_slice(&data);
            continue;
        }
        let needed = small.len() + data.len();
        if needed > max {
            return Err(ReadError::TooLarge);
        }
        if needed <= INLINE_BYTES {
            if small.capacity() < needed {
                // The announced length at once (it is under INLINE_BYTES here), else doubling.
                let capacity = announced
                    .unwrap_or(0)
                    .max(small.capacity() * 2)
                    .max(needed)
                    .min(INLINE_BYTES);
                small.reserve_exact(capacity - small.len());
            }
            small.extend_from_slice(&data);
        } else {
            let mut buffer = buffers.take().map_err(|_| ReadError::OverBudget)?;
            buffer.extend_from_slice(&small);
            buffer.extend_from_slice(&data);
            small = Vec::new();
            large = Some(buffer);
        }
    }
    Ok(match large {
        Some(buffer) => BodyBytes::Large(buffer),
        None => BodyBytes::Small(small),
    })
}

/// What steps 3 and 4 check a body against: the signed headers, and the `X-Event-Type` the
/// routing key falls back to.
struct Claims<'a> {
    signed: SignedHeaders<'a>,
    event_type: Option<&'a str>,
}

impl<'a> Claims<'a> {
    fn of(headers: &'a HeaderMap) -> Self {
        Self {
            signed: SignedHeaders {
                timestamp: header_str(headers, "x-catena-timestamp"),
                signature: header_str(headers, "x-catena-signature"),
                webhook_id: header_str(headers, "x-webhook-id"),
            },
            event_type: header_str(headers, "x-event-type"),
        }
    }
}

/// [`Claims`], owned, for a verify thread.
struct OwnedClaims([Option<String>; 4]);

impl From<Claims<'_>> for OwnedClaims {
    fn from(claims: Claims<'_>) -> Self {
        let SignedHeaders {
            timestamp,
            signature,
            webhook_id,
        } = claims.signed;
        Self([timestamp, signature, webhook_id, claims.event_type].map(|v| v.map(str::to_owned)))
    }
}

impl OwnedClaims {
    fn borrow(&self) -> Claims<'_> {
        let [timestamp, signature, webhook_id, event_type] =
            self.0.each_ref().map(Option::as_deref);
        Claims {
            signed: SignedHeaders {
                timestamp,
                signature,
                webhook_id,
            },
            event_type,
        }
    }
}

/// A verified body: decompressed (`None` when it came uncompressed: it is `raw`) and its
/// routing key.
struct Opened {
    inflated: Option<BodyBytes>,
    routing_key: String,
}

enum Failure {
    Gunzip(GunzipError),
    Rejected(Rejection),
    /// Verified, but no buffer was free to keep the decompressed body in.
    OverBudget,
}

impl Failure {
    fn refusal(self, state: &AppState) -> Refusal {
        match self {
            Failure::OverBudget => shed(state, Shed::Memory),
            Failure::Gunzip(error @ GunzipError::TooLarge(_)) => Refusal::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                Outcome::TooLarge,
                error.to_string(),
            ),
            Failure::Gunzip(error @ GunzipError::Corrupt) => Refusal::new(
                StatusCode::BAD_REQUEST,
                Outcome::BadRequest,
                error.to_string(),
            ),
            Failure::Rejected(rejection) => Refusal::new(
                StatusCode::UNAUTHORIZED,
                rejection.into(),
                rejection.to_string(),
            ),
        }
    }
}

/// Steps 2 to 4, synchronous: gunzip within `max_out`, the timestamp window, the HMAC; then
/// the routing key from the verified body. Inline, the output goes to a `Vec` of its own; on
/// a verify thread, into the thread's scratch buffer, which a verified body of more than
/// [`INLINE_BYTES`] then trades for an empty buffer of the pool (a bomb or a bad signature
/// never takes one).
fn open(
    config: &RelayConfig,
    secrets: &SecretStore,
    raw: &[u8],
    gzipped: bool,
    claims: &Claims<'_>,
    max_out: usize,
    scratch: Option<(&mut Vec<u8>, &Arc<Buffers>)>,
) -> Result<Opened, Failure> {
    if !gzipped {
        if raw.len() > max_out {
            return Err(Failure::Gunzip(GunzipError::TooLarge(max_out)));
        }
        return Ok(Opened {
            routing_key: verify(config, secrets, claims, raw)?,
            inflated: None,
        });
    }
    let Some((scratch, buffers)) = scratch else {
        let inflated = gunzip::gunzip_capped(raw, max_out).map_err(Failure::Gunzip)?;
        return Ok(Opened {
            routing_key: verify(config, secrets, claims, &inflated)?,
            inflated: Some(BodyBytes::Small(inflated)),
        });
    };
    gunzip::gunzip_into(raw, scratch, max_out).map_err(Failure::Gunzip)?;
    let routing_key = verify(config, secrets, claims, scratch)?;
    let inflated = if scratch.len() <= INLINE_BYTES {
        BodyBytes::Small(scratch.as_slice().to_vec())
    } else {
        let mut buffer = buffers.take().map_err(|_| Failure::OverBudget)?;
        std::mem::swap(&mut *buffer, scratch);
        BodyBytes::Large(buffer)
    };
    Ok(Opened {
        inflated: Some(inflated),
        routing_key,
    })
}

/// Steps 3 and 4 on the uncompressed body, then its routing key.
fn verify(
    config: &RelayConfig,
    secrets: &SecretStore,
    claims: &Claims<'_>,
    body: &[u8],
) -> Result<String, Failure> {
    signature::verify(
        secrets,
        claims.signed,
        body,
        Utc::now(),
        config.relay.window,
    )
    .map_err(Failure::Rejected)?;
    Ok(routing_key(body, claims.event_type))
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// The routing key: the body's `event_name` (authoritative once verified), else the
/// `X-Event-Type` header, else `unknown`. Bounded to AMQP's 255 bytes.
fn routing_key(body: &[u8], event_type: Option<&str>) -> String {
    #[derive(serde::Deserialize)]
    struct Peek<'a> {
        #[serde(borrow, default)]
        event_name: Option<Cow<'a, str>>,
    }
    let from_body = serde_json::from_slice::<Peek<'_>>(body)
        .ok()
        .and_then(|p| p.event_name);
    let name = from_body.as_deref().or(event_type).unwrap_or("unknown");
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
