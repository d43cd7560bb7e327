//! A client of Catena's webhook-subscription API that follows the documented API, not the
//! quirks of one implementation (catena-control-plane.md §0, §1): OAuth client credentials with a
//! cached token renewed before expiry and once on a 401; cursor pagination until `next_page` is
//! null; at most [`MAX_IN_FLIGHT`] calls at once and [`MIN_SPACING`] between call starts; a 429
//! waits for `Retry-After`, else backs off with jitter; 5xx and timeouts are retried only for
//! idempotent calls. A create is never retried blindly: its caller re-lists, because a lost
//! answer may still have created the subscription.

use std::time::{Duration, Instant};

use prometheus::IntCounterVec;
use rand::Rng;
use reqwest::{Method, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{Mutex, Semaphore};

use super::model::{
    CreateWebhook, ErrorBody, Page, PatchWebhook, TokenResponse, WEBHOOKS_PATH, Webhook,
    WebhookMetrics,
};
use crate::config::CatenaSettings;

/// Calls in flight at once, and the least time between two call starts (≤ 5 req/s).
pub const MAX_IN_FLIGHT: usize = 2;
pub const MIN_SPACING: Duration = Duration::from_millis(200);
/// Attempts of an idempotent call on 5xx or a timeout, and of any call on 429.
const ATTEMPTS: u32 = 5;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Page size of list calls (Catena's maximum is 1000; the default 300).
pub const PAGE_SIZE: usize = 300;

/// The `endpoint` label of `catena_control_api_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Token,
    List,
    Get,
    Create,
    Patch,
    Delete,
    Activate,
    Replay,
    Metrics,
    Logs,
}

impl Endpoint {
    pub const ALL: [Endpoint; 10] = [
        Endpoint::Token,
        Endpoint::List,
        Endpoint::Get,
        Endpoint::Create,
        Endpoint::Patch,
        Endpoint::Delete,
        Endpoint::Activate,
        Endpoint::Replay,
        Endpoint::Metrics,
        Endpoint::Logs,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::Token => "token",
            Endpoint::List => "list",
            Endpoint::Get => "get",
            Endpoint::Create => "create",
            Endpoint::Patch => "patch",
            Endpoint::Delete => "delete",
            Endpoint::Activate => "activate",
            Endpoint::Replay => "replay",
            Endpoint::Metrics => "metrics",
            Endpoint::Logs => "logs",
        }
    }

    /// Safe to send again after a 5xx or a timeout: a repeat has the effect of one call.
    fn idempotent(self) -> bool {
        !matches!(self, Endpoint::Create | Endpoint::Replay)
    }
}

/// The `class` label: `2xx`, `4xx`, `429`, `5xx`, `error` (no answer).
pub const CLASSES: [&str; 5] = ["2xx", "4xx", "429", "5xx", "error"];

fn class_of(status: StatusCode) -> &'static str {
    match status.as_u16() {
        429 => "429",
        200..=299 => "2xx",
        500..=599 => "5xx",
        _ => "4xx",
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CatenaError {
    /// Catena answered with an error status; `message` is its error body's summary.
    #[error("{endpoint} answered {status}: {message}")]
    Status {
        endpoint: &'static str,
        status: StatusCode,
        message: String,
    },
    /// No answer (connection, timeout) or an unreadable one.
    #[error("{endpoint}: {message}")]
    Transport {
        endpoint: &'static str,
        message: String,
    },
}

impl CatenaError {
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            CatenaError::Status { status, .. } => Some(*status),
            CatenaError::Transport { .. } => None,
        }
    }

    pub fn is(&self, status: StatusCode) -> bool {
        self.status() == Some(status)
    }
}

struct Token {
    bearer: String,
    renew_at: Instant,
}

/// One client per process; cheap to share by reference.
pub struct CatenaClient {
    http: reqwest::Client,
    settings: CatenaSettings,
    token: Mutex<Option<Token>>,
    in_flight: Semaphore,
    next_start: Mutex<Instant>,
    requests: Option<IntCounterVec>,
    /// The scope of the last token (checked by `subscriptions sync`).
    scope: std::sync::Mutex<Option<String>>,
}

impl CatenaClient {
    pub fn new(settings: CatenaSettings, requests: Option<IntCounterVec>) -> Self {
        if let Some(requests) = &requests {
            for endpoint in Endpoint::ALL {
                for class in CLASSES {
                    requests.with_label_values(&[endpoint.as_str(), class]);
                }
            }
        }
        Self {
            http: reqwest::Client::builder()
                .timeout(REQUEST_TIMEOUT)
                .build()
                .expect("building an HTTP client"),
            settings,
            token: Mutex::new(None),
            in_flight: Semaphore::new(MAX_IN_FLIGHT),
            next_start: Mutex::new(Instant::now()),
            requests,
            scope: std::sync::Mutex::new(None),
        }
    }

    /// The scope Catena granted with the current token, once one was fetched.
    pub fn granted_scope(&self) -> Option<String> {
        self.scope.lock().expect("never poisoned").clone()
    }

    /// Fetch a token now (and so check the credentials and the scope).
    pub async fn authenticate(&self) -> Result<(), CatenaError> {
        self.bearer(true).await.map(drop)
    }

    async fn bearer(&self, fresh: bool) -> Result<String, CatenaError> {
        let mut token = self.token.lock().await;
        if !fresh && let Some(t) = token.as_ref().filter(|t| Instant::now() < t.renew_at) {
            return Ok(t.bearer.clone());
        }
        let form = [
            ("grant_type", "client_credentials"),
            ("client_id", self.settings.client_id.as_str()),
            ("client_secret", self.settings.client_secret.as_str()),
            ("scope", "organization"),
        ];
        let answer: TokenResponse = self
            .send(Endpoint::Token, || {
                self.http.post(&self.settings.auth_url).form(&form)
            })
            .await?;
        // Renew at 80% of the lifetime, so a token never expires mid-call.
        let lifetime = Duration::from_secs(answer.expires_in.max(1));
        *self.scope.lock().expect("never poisoned") = answer.scope.clone();
        *token = Some(Token {
            bearer: answer.access_token.clone(),
            renew_at: Instant::now() + lifetime.mul_f64(0.8),
        });
        Ok(answer.access_token)
    }

    fn url(&self, path: &str) -> String {
        format!(
            "{}{WEBHOOKS_PATH}{path}",
            self.settings.api_url.trim_end_matches('/')
        )
    }

    /// One authenticated call: a 401 renews the token once and tries again.
    async fn call<T: DeserializeOwned>(
        &self,
        endpoint: Endpoint,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&(dyn erased::Body + Sync)>,
    ) -> Result<T, CatenaError> {
        let url = self.url(path);
        let mut renewed = false;
        loop {
            let bearer = self.bearer(renewed).await?;
            let result = self
                .send(endpoint, || {
                    let mut request = self
                        .http
                        .request(method.clone(), &url)
                        .bearer_auth(&bearer)
                        .query(query);
                    if let Some(body) = body {
                        request = request.json(&body.to_json());
                    }
                    request
                })
                .await;
            match result {
                Err(error) if error.is(StatusCode::UNAUTHORIZED) && !renewed => renewed = true,
                other => return other,
            }
        }
    }

    /// Send with the rate limit, 429 handling and (for idempotent calls) retries.
    async fn send<T: DeserializeOwned>(
        &self,
        endpoint: Endpoint,
        request: impl Fn() -> reqwest::RequestBuilder,
    ) -> Result<T, CatenaError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let outcome = {
                let _slot = self.in_flight.acquire().await.expect("never closed");
                self.pace().await;
                request().send().await
            };
            let class = match &outcome {
                Ok(response) => class_of(response.status()),
                Err(_) => "error",
            };
            if let Some(requests) = &self.requests {
                requests
                    .with_label_values(&[endpoint.as_str(), class])
                    .inc();
            }
            let retry_in = match outcome {
                Ok(response) if response.status().is_success() => {
                    return decode(endpoint, response).await;
                }
                Ok(response) if response.status() == StatusCode::TOO_MANY_REQUESTS => {
                    let after = retry_after(&response).unwrap_or_else(|| jitter(attempt));
                    let error = error_of(endpoint, response).await;
                    if attempt >= ATTEMPTS {
                        return Err(error);
                    }
                    after
                }
                Ok(response) if response.status().is_server_error() && endpoint.idempotent() => {
                    let error = error_of(endpoint, response).await;
                    if attempt >= ATTEMPTS {
                        return Err(error);
                    }
                    jitter(attempt)
                }
                Ok(response) => return Err(error_of(endpoint, response).await),
                Err(error) => {
                    let error = CatenaError::Transport {
                        endpoint: endpoint.as_str(),
                        message: without_url(error),
                    };
                    if attempt >= ATTEMPTS || !endpoint.idempotent() {
                        return Err(error);
                    }
                    jitter(attempt)
                }
            };
            tracing::debug!(
                endpoint = endpoint.as_str(),
                attempt,
                ?retry_in,
                "Catena API call retried"
            );
            tokio::time::sleep(retry_in).await;
        }
    }

    /// Space call starts at least [`MIN_SPACING`] apart.
    async fn pace(&self) {
        let mut next = self.next_start.lock().await;
        let now = Instant::now();
        if *next > now {
            tokio::time::sleep(*next - now).await;
        }
        *next = Instant::now() + MIN_SPACING;
    }

    /// Every subscription Catena has for us, all pages.
    pub async fn list_all(&self) -> Result<Vec<Webhook>, CatenaError> {
        let mut all = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut query = vec![("size", PAGE_SIZE.to_string())];
            if let Some(cursor) = &cursor {
                query.push(("cursor", cursor.clone()));
            }
            let page: Page<Webhook> = self
                .call(Endpoint::List, Method::GET, "/", &query, None)
                .await?;
            all.extend(page.items);
            match page.next_page {
                // A cursor that repeats would loop for ever: stop there.
                Some(next) if Some(&next) != cursor.as_ref() => cursor = Some(next),
                _ => return Ok(all),
            }
        }
    }

    pub async fn get(&self, id: &str) -> Result<Webhook, CatenaError> {
        self.call(Endpoint::Get, Method::GET, &format!("/{id}"), &[], None)
            .await
    }

    /// Create one subscription (a concrete event name: one `Webhook` back).
    pub async fn create(&self, body: &CreateWebhook) -> Result<Webhook, CatenaError> {
        let value: serde_json::Value = self
            .call(Endpoint::Create, Method::POST, "/", &[], Some(&Json(body)))
            .await?;
        // An `x.*` create answers an array; we only create concrete names, but take the first.
        let single = match value {
            serde_json::Value::Array(mut items) if !items.is_empty() => items.remove(0),
            other => other,
        };
        serde_json::from_value(single).map_err(|error| CatenaError::Transport {
            endpoint: Endpoint::Create.as_str(),
            message: format!("unexpected answer: {error}"),
        })
    }

    pub async fn patch(&self, id: &str, body: &PatchWebhook) -> Result<Webhook, CatenaError> {
        self.call(
            Endpoint::Patch,
            Method::PATCH,
            &format!("/{id}"),
            &[],
            Some(&Json(body)),
        )
        .await
    }

    pub async fn delete(&self, id: &str) -> Result<(), CatenaError> {
        let _: serde_json::Value = self
            .call(
                Endpoint::Delete,
                Method::DELETE,
                &format!("/{id}"),
                &[],
                None,
            )
            .await?;
        Ok(())
    }

    /// `POST /{id}/activate`; where that endpoint does not exist (older API versions, S6), the
    /// documented fallback `PATCH {"status":"active"}`.
    pub async fn activate(&self, id: &str) -> Result<Webhook, CatenaError> {
        let activated = self
            .call(
                Endpoint::Activate,
                Method::POST,
                &format!("/{id}/activate"),
                &[],
                None,
            )
            .await;
        match activated {
            Err(error)
                if error.is(StatusCode::NOT_FOUND) || error.is(StatusCode::METHOD_NOT_ALLOWED) =>
            {
                let patch = PatchWebhook {
                    status: Some(super::model::WebhookStatus::Active),
                    ..PatchWebhook::default()
                };
                self.patch(id, &patch).await
            }
            other => other,
        }
    }

    pub async fn replay(&self, id: &str) -> Result<(), CatenaError> {
        let _: serde_json::Value = self
            .call(
                Endpoint::Replay,
                Method::POST,
                &format!("/{id}/replay"),
                &[],
                None,
            )
            .await?;
        Ok(())
    }

    pub async fn metrics(&self, id: &str) -> Result<WebhookMetrics, CatenaError> {
        self.call(
            Endpoint::Metrics,
            Method::GET,
            &format!("/{id}/metrics"),
            &[],
            None,
        )
        .await
    }
}

/// A 2xx body; an empty one (204) reads as JSON `null`.
async fn decode<T: DeserializeOwned>(
    endpoint: Endpoint,
    response: reqwest::Response,
) -> Result<T, CatenaError> {
    let bytes = response
        .bytes()
        .await
        .map_err(|error| CatenaError::Transport {
            endpoint: endpoint.as_str(),
            message: without_url(error),
        })?;
    let bytes: &[u8] = if bytes.is_empty() { b"null" } else { &bytes };
    serde_json::from_slice(bytes).map_err(|error| CatenaError::Transport {
        endpoint: endpoint.as_str(),
        message: format!("unexpected answer: {error}"),
    })
}

async fn error_of(endpoint: Endpoint, response: reqwest::Response) -> CatenaError {
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    let message = serde_json::from_str::<ErrorBody>(&text)
        .map(|body| body.summary())
        .unwrap_or_else(|_| text.chars().take(200).collect());
    CatenaError::Status {
        endpoint: endpoint.as_str(),
        status,
        message,
    }
}

/// `Retry-After` in seconds (the HTTP-date form is rare for APIs; it falls back to backoff).
fn retry_after(response: &reqwest::Response) -> Option<Duration> {
    let seconds: u64 = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(seconds.min(300)))
}

/// 1 s doubling to 60 s, with up to half of it again as jitter.
fn jitter(attempt: u32) -> Duration {
    let base =
        Duration::from_secs(1u64 << attempt.saturating_sub(1).min(6)).min(Duration::from_secs(60));
    base + base.mul_f64(rand::rng().random_range(0.0..0.5))
}

/// reqwest's error text carries the URL; the message never needs it (and a URL may one day carry
/// something that should not be logged).
fn without_url(error: reqwest::Error) -> String {
    let kind = if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "connection failed"
    } else {
        "request failed"
    };
    format!("{kind}: {}", error.without_url())
}

/// A JSON body behind a `dyn` so [`CatenaClient::call`] is not generic over it.
struct Json<'a, T: Serialize>(&'a T);

mod erased {
    pub trait Body {
        fn to_json(&self) -> serde_json::Value;
    }
}

impl<T: Serialize + Sync> erased::Body for Json<'_, T> {
    fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self.0).expect("our request bodies serialise")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_reads_and_updates_are_retried_blindly() {
        assert!(!Endpoint::Create.idempotent());
        assert!(!Endpoint::Replay.idempotent());
        assert!(Endpoint::List.idempotent() && Endpoint::Patch.idempotent());
        assert!(jitter(1) >= Duration::from_secs(1) && jitter(1) < Duration::from_millis(1500));
        assert!(jitter(30) <= Duration::from_secs(90));
    }
}
