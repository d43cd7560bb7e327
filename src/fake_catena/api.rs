//! The token endpoint and the subscription API (catena-control-plane.md §1.1, §1.2), as Catena
//! documents them: bearer tokens with scopes, masked URLs and secrets, 409 on a duplicate, 422 in
//! FastAPI's shape, cursor pagination. Every mutation announces itself with its `webhook.*` event.
//!
//! Deleted subscriptions are gone: they leave the list (even with `status=deleted`) and `GET`
//! answers 404, as do every other call on them.

use std::collections::HashMap;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::delivery::ReplayRefused;
use super::errors::ApiError;
use super::names;
use super::pagination::{Cursor, paginate};
use super::state::{self, Fake, NewSubscription};
use crate::catena::model::{
    CreateWebhook, DeliveryLog, DeliveryStatus, PatchWebhook, TokenResponse, Webhook,
    WebhookMetrics, WebhookStatus,
};

const READ: &str = "webhook:read";
const CREATE: &str = "webhook:create";
const UPDATE: &str = "webhook:update";
const DELETE: &str = "webhook:delete";

/// Delivery logs are kept this long [S8].
const LOG_RETENTION_DAYS: i64 = 14;

type ApiResult<T> = Result<T, ApiError>;

// ---------------------------------------------------------------------------------------------
// Token

/// Keycloak's client-credentials grant: the credentials in the form or in HTTP Basic.
pub(super) async fn token(State(fake): State<Fake>, headers: HeaderMap, body: Bytes) -> Response {
    let form: HashMap<String, String> = form_urlencoded::parse(&body).into_owned().collect();
    if form.get("grant_type").map(String::as_str) != Some("client_credentials") {
        return keycloak_error(StatusCode::BAD_REQUEST, "unsupported_grant_type");
    }
    let (client_id, client_secret) = basic_credentials(&headers).unwrap_or_else(|| {
        (
            form.get("client_id").cloned().unwrap_or_default(),
            form.get("client_secret").cloned().unwrap_or_default(),
        )
    });
    let mut state = fake.lock();
    if client_id != state.config.client_id || client_secret != state.config.client_secret {
        tracing::info!(%client_id, "fake-catena: token refused, bad client credentials");
        return keycloak_error(StatusCode::UNAUTHORIZED, "invalid_client");
    }
    let now = Utc::now();
    let ttl = state.config.token_ttl;
    state.tokens.retain(|_, expires| *expires > now);
    let access_token = state::random_alphanumeric(40);
    state.tokens.insert(
        access_token.clone(),
        now + chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::MAX),
    );
    Json(TokenResponse {
        access_token,
        expires_in: ttl.as_secs(),
        token_type: Some("Bearer".into()),
        refresh_expires_in: Some(0),
        scope: Some(state.config.scopes.join(" ")),
    })
    .into_response()
}

fn keycloak_error(status: StatusCode, error: &str) -> Response {
    (status, Json(json!({"error": error}))).into_response()
}

fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = String::from_utf8(STANDARD.decode(encoded.trim()).ok()?).ok()?;
    let (id, secret) = decoded.split_once(':')?;
    Some((id.to_owned(), secret.to_owned()))
}

/// A live bearer token carrying `scope`, else 401 (or 403).
fn authorize(state: &state::State, headers: &HeaderMap, scope: &str) -> ApiResult<()> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
        .ok_or_else(|| ApiError::unauthorized("missing bearer token"))?;
    match state.tokens.get(token) {
        Some(expires) if *expires > Utc::now() => {}
        _ => return Err(ApiError::unauthorized("invalid or expired token")),
    }
    if !state.config.has_scope(scope) {
        return Err(ApiError::forbidden(scope));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Validation

fn parse_body<T: DeserializeOwned>(body: &[u8]) -> ApiResult<T> {
    serde_json::from_slice(body)
        .map_err(|error| ApiError::invalid(&["body"], error.to_string(), "json_invalid"))
}

fn check_url(url: &str) -> ApiResult<()> {
    let valid = (1..=2083).contains(&url.len())
        && (url.starts_with("https://") || url.starts_with("http://"));
    if valid {
        Ok(())
    } else {
        Err(ApiError::invalid(
            &["body", "url"],
            "Input should be a valid URL of 1 to 2083 characters",
            "url_parsing",
        ))
    }
}

fn check_secret(secret: Option<&str>) -> ApiResult<()> {
    match secret {
        Some(secret) if secret.chars().count() < 12 => Err(ApiError::invalid(
            &["body", "secret"],
            "String should have at least 12 characters",
            "string_too_short",
        )),
        _ => Ok(()),
    }
}

fn page_size(query: &HashMap<String, String>) -> ApiResult<usize> {
    let Some(raw) = query.get("size") else {
        return Ok(300);
    };
    let size: usize = raw.parse().map_err(|_| {
        ApiError::invalid(
            &["query", "size"],
            "Input should be a valid integer",
            "int_parsing",
        )
    })?;
    if !(1..=1000).contains(&size) {
        return Err(ApiError::invalid(
            &["query", "size"],
            "Input should be between 1 and 1000",
            "less_than_equal",
        ));
    }
    Ok(size)
}

fn cursor(query: &HashMap<String, String>) -> ApiResult<Option<Cursor>> {
    query
        .get("cursor")
        .map(|raw| Cursor::decode(raw).ok_or_else(|| ApiError::bad_request("invalid cursor")))
        .transpose()
}

fn status_filter(query: &HashMap<String, String>) -> ApiResult<Option<WebhookStatus>> {
    query
        .get("status")
        .map(|raw| {
            WebhookStatus::parse(raw).ok_or_else(|| {
                ApiError::invalid(
                    &["query", "status"],
                    "Input should be 'active', 'paused', 'stale' or 'deleted'",
                    "enum",
                )
            })
        })
        .transpose()
}

fn date_filter(query: &HashMap<String, String>, name: &str) -> ApiResult<Option<DateTime<Utc>>> {
    query
        .get(name)
        .map(|raw| {
            DateTime::parse_from_rfc3339(raw)
                .map(|t| t.with_timezone(&Utc))
                .map_err(|_| {
                    ApiError::invalid(
                        &["query", name],
                        "Input should be a valid datetime",
                        "datetime_parsing",
                    )
                })
        })
        .transpose()
}

fn duplicate() -> ApiError {
    ApiError::conflict("a webhook subscription for this event, URL and filters already exists")
}

fn grace_from(now: DateTime<Utc>, grace: std::time::Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(grace)
        .ok()
        .and_then(|grace| now.checked_add_signed(grace))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

// ---------------------------------------------------------------------------------------------
// Subscriptions

/// `POST /`: one subscription, or one per action of a catch-all `x.*` (then an array). The
/// secret is the request's or 16 generated alphanumerics per subscription, shown only here.
pub(super) async fn create(
    State(fake): State<Fake>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    let mut state = fake.lock();
    authorize(&state, &headers, CREATE)?;
    let request: CreateWebhook = parse_body(&body)?;
    check_url(&request.url)?;
    check_secret(request.secret.as_deref())?;
    let event_names =
        names::expand(&request.event_name, state.config.event_enum).ok_or_else(|| {
            ApiError::invalid(
                &["body", "event_name"],
                format!(
                    "Input should be a value of WebhookEventNameEnum, not `{}`",
                    request.event_name
                ),
                "enum",
            )
        })?;
    let exists = event_names.iter().any(|name| {
        state
            .subscriptions
            .iter()
            .any(|s| s.same_target(name, &request.url, &request.filters))
    });
    if exists {
        return Err(duplicate());
    }
    let created: Vec<Webhook> = event_names
        .iter()
        .map(|name| {
            let new = NewSubscription {
                url: request.url.clone(),
                event_name: (*name).to_owned(),
                filters: request.filters.clone(),
                secret: request
                    .secret
                    .clone()
                    .unwrap_or_else(|| state::random_alphanumeric(16)),
            };
            fake.insert_subscription(&mut state, new)
        })
        .collect();
    Ok(if request.event_name.ends_with(".*") {
        Json(created).into_response()
    } else {
        Json(created.into_iter().next()).into_response()
    })
}

/// `GET /?event_name&status&cursor&size`.
pub(super) async fn list(
    State(fake): State<Fake>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> ApiResult<Json<crate::catena::model::Page<Webhook>>> {
    let state = fake.lock();
    authorize(&state, &headers, READ)?;
    let size = page_size(&query)?.min(state.config.max_page_size.unwrap_or(usize::MAX).max(1));
    let status = status_filter(&query)?;
    let cursor = cursor(&query)?;
    let event_name = query.get("event_name");
    let matching: Vec<(u64, Webhook)> = state
        .subscriptions
        .iter()
        .filter(|s| event_name.is_none_or(|name| s.event_name == *name))
        .filter(|s| status.is_none_or(|status| s.status == status))
        .map(|s| (s.seq, s.view()))
        .collect();
    Ok(Json(paginate(&matching, cursor, size)))
}

pub(super) async fn get(
    State(fake): State<Fake>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Json<Webhook>> {
    let state = fake.lock();
    authorize(&state, &headers, READ)?;
    let subscription = state
        .subscription(&id)
        .ok_or_else(|| ApiError::not_found(&id))?;
    Ok(Json(subscription.view()))
}

/// `PATCH /{id}`: only the given fields change; a new grace period starts. With
/// `secret_switch_delay` the old secret goes on signing for a while.
pub(super) async fn patch(
    State(fake): State<Fake>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<Json<Webhook>> {
    let mut state = fake.lock();
    authorize(&state, &headers, UPDATE)?;
    let patch: PatchWebhook = parse_body(&body)?;
    if let Some(url) = &patch.url {
        check_url(url)?;
    }
    check_secret(patch.secret.as_deref())?;
    if patch.status == Some(WebhookStatus::Deleted) {
        return Err(ApiError::invalid(
            &["body", "status"],
            "use DELETE to delete a subscription",
            "enum",
        ));
    }
    let current = state
        .subscription(&id)
        .ok_or_else(|| ApiError::not_found(&id))?;
    let url = patch.url.clone().unwrap_or_else(|| current.url.clone());
    let filters = patch.filters.clone().or_else(|| current.filters.clone());
    let event_name = current.event_name.clone();
    let clashes = state
        .subscriptions
        .iter()
        .any(|s| s.id != id && s.same_target(&event_name, &url, &filters));
    if clashes {
        return Err(duplicate());
    }
    let now = Utc::now();
    let (grace, switch_delay) = (state.config.grace, state.config.secret_switch_delay);
    let subscription = state.subscription_mut(&id).expect("found above");
    subscription.url = url;
    subscription.filters = filters;
    if let Some(secret) = patch.secret {
        if !switch_delay.is_zero() && secret != subscription.secret {
            let old = std::mem::replace(&mut subscription.secret, secret);
            subscription.retiring_secret = Some((old, grace_from(now, switch_delay)));
        } else {
            subscription.secret = secret;
        }
        tracing::info!(webhook_id = %id, "fake-catena: secret rotated");
    }
    if let Some(status) = patch.status {
        subscription.status = status;
    }
    subscription.updated_at = now;
    subscription.grace_until = grace_from(now, grace);
    let (view, subject) = (subscription.view(), subscription.event_data());
    state.emit_webhook_event("updated", subject);
    Ok(Json(view))
}

/// `DELETE /{id}`: 204; its queue and DLQ go with it.
pub(super) async fn delete(
    State(fake): State<Fake>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let mut state = fake.lock();
    authorize(&state, &headers, DELETE)?;
    let index = state
        .subscriptions
        .iter()
        .position(|s| s.id == id)
        .ok_or_else(|| ApiError::not_found(&id))?;
    let removed = state.subscriptions.remove(index);
    let mut subject = removed.event_data();
    subject["status"] = json!(WebhookStatus::Deleted);
    tracing::info!(webhook_id = %id, "fake-catena: subscription deleted");
    state.emit_webhook_event("deleted", subject);
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /{id}/activate`: back to `active`, with a new grace period unless
/// `grace_on_activate` is off. The DLQ stays until a replay.
pub(super) async fn activate(
    State(fake): State<Fake>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Json<Webhook>> {
    set_status(&fake, &headers, &id, WebhookStatus::Active, "activated")
}

/// `POST /{id}/pause`: new events go to the DLQ until an activation.
pub(super) async fn pause(
    State(fake): State<Fake>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Json<Webhook>> {
    set_status(&fake, &headers, &id, WebhookStatus::Paused, "paused")
}

fn set_status(
    fake: &Fake,
    headers: &HeaderMap,
    id: &str,
    status: WebhookStatus,
    action: &str,
) -> ApiResult<Json<Webhook>> {
    let mut state = fake.lock();
    authorize(&state, headers, UPDATE)?;
    let restart_grace = status == WebhookStatus::Active && state.config.grace_on_activate;
    let grace = state.config.grace;
    let subscription = state
        .subscription_mut(id)
        .ok_or_else(|| ApiError::not_found(id))?;
    let now = Utc::now();
    subscription.status = status;
    subscription.updated_at = now;
    if restart_grace {
        subscription.grace_until = grace_from(now, grace);
    }
    tracing::info!(webhook_id = %id, status = status.as_str(), "fake-catena: status set");
    let (view, subject) = (subscription.view(), subscription.event_data());
    state.emit_webhook_event(action, subject);
    Ok(Json(view))
}

/// `POST /{id}/replay`: 202 `{}`; the DLQ is delivered in the background.
pub(super) async fn replay(
    State(fake): State<Fake>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let mut state = fake.lock();
    authorize(&state, &headers, CREATE)?;
    match state.replay(&id) {
        Ok(_) => Ok((StatusCode::ACCEPTED, Json(json!({})))),
        Err(ReplayRefused::NotFound) => Err(ApiError::not_found(&id)),
        Err(ReplayRefused::Inactive(status)) => Err(ApiError::conflict(format!(
            "webhook subscription {id} is {}; activate it before replaying",
            status.as_str()
        ))),
    }
}

pub(super) async fn metrics(
    State(fake): State<Fake>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Json<WebhookMetrics>> {
    let mut state = fake.lock();
    authorize(&state, &headers, READ)?;
    let now = Utc::now();
    let (ttl, min_messages) = (state.config.dlq_ttl, state.config.min_messages_for_rate);
    let state = &mut *state;
    let subscription = state
        .subscriptions
        .iter_mut()
        .find(|s| s.id == id)
        .ok_or_else(|| ApiError::not_found(&id))?;
    subscription.expire_dlq(now, ttl);
    let attempts = state.attempts.iter().filter(|a| a.webhook_id == id);
    let metrics = subscription
        .health
        .metrics(attempts, subscription.dlq.len(), now, min_messages);
    Ok(Json(metrics))
}

/// `GET /{id}/logs?start_date&end_date&status&cursor&size`: one entry per attempt, oldest first,
/// kept 14 days.
pub(super) async fn logs(
    State(fake): State<Fake>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> ApiResult<Json<crate::catena::model::Page<DeliveryLog>>> {
    let state = fake.lock();
    authorize(&state, &headers, READ)?;
    if state.subscription(&id).is_none() {
        return Err(ApiError::not_found(&id));
    }
    let size = page_size(&query)?;
    let cursor = cursor(&query)?;
    let status = query
        .get("status")
        .map(|raw| {
            serde_json::from_value::<DeliveryStatus>(json!(raw)).map_err(|_| {
                ApiError::invalid(
                    &["query", "status"],
                    "Input should be 'success' or 'failed'",
                    "enum",
                )
            })
        })
        .transpose()?;
    let kept_since = Utc::now() - chrono::Duration::days(LOG_RETENTION_DAYS);
    let start = date_filter(&query, "start_date")?.map_or(kept_since, |t| t.max(kept_since));
    let end = date_filter(&query, "end_date")?;
    let matching: Vec<(u64, DeliveryLog)> = state
        .attempts
        .iter()
        .enumerate()
        .filter(|(_, a)| a.webhook_id == id && a.created_at >= start)
        .filter(|(_, a)| end.is_none_or(|end| a.created_at <= end))
        .filter(|(_, a)| status.is_none_or(|status| a.status == status))
        .map(|(index, a)| (index as u64 + 1, a.clone()))
        .collect();
    Ok(Json(paginate(&matching, cursor, size)))
}
