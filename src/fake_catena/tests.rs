//! The fake against a tiny receiver in the test: the API's shapes, delivery, the breaker and
//! replay. No broker, no database.

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use chrono::Utc;
use serde_json::{Value, json};
use uuid::Uuid;

use super::config::ReplayId;
use super::*;
use crate::catena::model::{
    ErrorBody, MASKED_SECRET, Page, Webhook, WebhookMetrics, WebhookStatus,
};
use crate::relay::gunzip::gunzip_capped;
use crate::relay::secrets::SecretStore;
use crate::relay::signature::{SignedHeaders, Window, verify};

const SECRET: &str = "a-test-secret-0123";

/// A fake on an ephemeral port, an HTTP client and a bearer token for it.
struct Harness {
    running: RunningFake,
    http: reqwest::Client,
    token: String,
    _shutdown: StopOnDrop,
}

struct StopOnDrop(crate::shutdown::Shutdown);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.trigger();
    }
}

impl Harness {
    async fn start(config: FakeConfig) -> Self {
        let shutdown = crate::shutdown::Shutdown::new();
        let running = start("127.0.0.1:0", config, shutdown.clone())
            .await
            .unwrap();
        let http = reqwest::Client::new();
        let token = fetch_token(&http, &running.auth_url(), "fake-catena-dev-secret")
            .await
            .expect("the default credentials get a token");
        Self {
            running,
            http,
            token,
            _shutdown: StopOnDrop(shutdown),
        }
    }

    fn fake(&self) -> &Fake {
        &self.running.fake
    }

    fn url(&self, path: &str) -> String {
        format!("{}{WEBHOOKS_PATH}{path}", self.running.api_url())
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut request = self
            .http
            .request(method, self.url(path))
            .bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    async fn create(&self, event_name: &str, url: &str, secret: Option<&str>) -> Webhook {
        let (status, body) = self
            .call(
                reqwest::Method::POST,
                "",
                Some(json!({"url": url, "event_name": event_name, "secret": secret})),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        serde_json::from_value(body).unwrap()
    }

    async fn post(&self, path: &str) -> u16 {
        self.call(reqwest::Method::POST, path, None).await.0
    }
}

async fn fetch_token(http: &reqwest::Client, auth_url: &str, secret: &str) -> Option<String> {
    let form = format!(
        "grant_type=client_credentials&client_id=catena-ingest-dev&client_secret={secret}&scope=organization"
    );
    let response = http
        .post(auth_url)
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(form)
        .send()
        .await
        .unwrap();
    if !response.status().is_success() {
        return None;
    }
    let token: crate::catena::model::TokenResponse = response.json().await.unwrap();
    assert_eq!(token.expires_in, 300);
    assert!(token.scope.unwrap().contains("webhook:create"));
    Some(token.access_token)
}

/// What the test's receiver got.
#[derive(Clone)]
struct Received {
    headers: HeaderMap,
    body: Bytes,
}

impl Received {
    fn header(&self, name: &str) -> &str {
        self.headers.get(name).unwrap().to_str().unwrap()
    }

    fn envelope(&self) -> Value {
        serde_json::from_slice(&gunzip_capped(&self.body, 1 << 20).unwrap()).unwrap()
    }
}

/// An endpoint answering a status the test can change, recording every request.
#[derive(Clone)]
struct Receiver {
    url: String,
    status: Arc<AtomicU16>,
    received: Arc<Mutex<Vec<Received>>>,
}

impl Receiver {
    async fn start(status: u16) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let receiver = Self {
            url: format!("http://{}/webhooks/catena", listener.local_addr().unwrap()),
            status: Arc::new(AtomicU16::new(status)),
            received: Arc::default(),
        };
        let app = Router::new()
            .route("/webhooks/catena", post(receive))
            .with_state(receiver.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        receiver
    }

    fn answer(&self, status: u16) {
        self.status.store(status, Ordering::SeqCst);
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }
}

async fn receive(State(receiver): State<Receiver>, headers: HeaderMap, body: Bytes) -> StatusCode {
    receiver
        .received
        .lock()
        .unwrap()
        .push(Received { headers, body });
    StatusCode::from_u16(receiver.status.load(Ordering::SeqCst)).unwrap()
}

async fn eventually(what: &str, condition: impl Fn() -> bool) {
    for _ in 0..500 {
        if condition() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

fn quick_retries() -> FakeConfig {
    FakeConfig {
        retry_delays_ms: vec![10, 10, 10],
        ..FakeConfig::default()
    }
}

#[tokio::test]
async fn urls_are_masked_and_the_secret_is_shown_once() {
    let h = Harness::start(FakeConfig::default()).await;
    let created = h
        .create(
            "invitation.created",
            "https://ingest.example.com/webhooks/catena",
            Some(SECRET),
        )
        .await;
    assert_eq!(created.secret.as_deref(), Some(SECRET));
    assert_eq!(created.url, "https://ingest.example.com/webhooks/*****");
    assert_eq!(created.status, WebhookStatus::Active);

    let (status, got) = h
        .call(reqwest::Method::GET, &format!("/{}", created.id), None)
        .await;
    assert_eq!(status, 200);
    let got: Webhook = serde_json::from_value(got).unwrap();
    assert_eq!(got.secret.as_deref(), Some(MASKED_SECRET));
    assert_eq!(got.url, created.url);
    let listed = h.fake().subscriptions();
    assert_eq!(listed[0].secret.as_deref(), Some(MASKED_SECRET));

    let generated = h
        .create(
            "invitation.sent",
            "https://ingest.example.com/webhooks/catena",
            None,
        )
        .await;
    let secret = generated.secret.unwrap();
    assert_eq!(secret.len(), 16);
    assert!(secret.chars().all(|c| c.is_ascii_alphanumeric()));
    assert_eq!(h.fake().secret_of(&generated.id), Some(secret));
}

#[tokio::test]
async fn duplicates_get_409_and_bad_input_a_fastapi_422() {
    let h = Harness::start(FakeConfig::default()).await;
    let url = "https://ingest.example.com/webhooks/catena";
    h.create("webhook.staled", url, Some(SECRET)).await;
    let body = json!({"url": url, "event_name": "webhook.staled"});
    let (status, conflict) = h.call(reqwest::Method::POST, "", Some(body)).await;
    assert_eq!(status, 409);
    assert_eq!(conflict["code"], "Conflict");
    assert!(conflict.get("detail").is_some_and(Value::is_null));

    let (status, wildcard) = h
        .call(
            reqwest::Method::POST,
            "",
            Some(json!({"url": url, "event_name": "webhook.*"})),
        )
        .await;
    assert_eq!(
        status, 409,
        "a catch-all clashes if any member exists: {wildcard}"
    );
    let (status, wildcard) = h
        .call(
            reqwest::Method::POST,
            "",
            Some(json!({"url": "https://other.example.com/hook", "event_name": "webhook.*"})),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(wildcard.as_array().unwrap().len(), 6);

    let short = json!({"url": url, "event_name": "invitation.sent", "secret": "too-short"});
    let (status, invalid) = h.call(reqwest::Method::POST, "", Some(short)).await;
    assert_eq!(status, 422);
    assert_eq!(invalid["detail"][0]["loc"], json!(["body", "secret"]));
    assert!(invalid.get("code").is_none(), "FastAPI's shape: {invalid}");
    let parsed: ErrorBody = serde_json::from_value(invalid).unwrap();
    assert!(!parsed.summary().is_empty());

    let unknown = json!({"url": url, "event_name": "vehicle.crashed"});
    let (status, invalid) = h.call(reqwest::Method::POST, "", Some(unknown)).await;
    assert_eq!(status, 422);
    assert_eq!(invalid["detail"][0]["type"], "enum");

    h.fake()
        .set_config(|c| c.event_enum = config::EventEnum::Old);
    let newer = json!({"url": url, "event_name": "webhook.activated"});
    assert_eq!(h.call(reqwest::Method::POST, "", Some(newer)).await.0, 422);
}

#[tokio::test]
async fn pagination_at_size_two_walks_every_subscription() {
    let h = Harness::start(FakeConfig::default()).await;
    let names = [
        "invitation.created",
        "invitation.sent",
        "invitation.viewed",
        "invitation.accepted",
        "invitation.declined",
    ];
    for name in names {
        h.create(name, "https://ingest.example.com/webhooks/catena", None)
            .await;
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let query = match &cursor {
            Some(cursor) => format!("?size=2&cursor={cursor}"),
            None => "?size=2".to_owned(),
        };
        let (status, page) = h.call(reqwest::Method::GET, &query, None).await;
        assert_eq!(status, 200);
        let page: Page<Webhook> = serde_json::from_value(page).unwrap();
        assert!(page.items.len() <= 2);
        seen.extend(page.items.into_iter().map(|w| w.event_name));
        match page.next_page {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    assert_eq!(seen, names);
    assert_eq!(h.call(reqwest::Method::GET, "?size=0", None).await.0, 422);
    assert_eq!(
        h.call(reqwest::Method::GET, "?cursor=bogus", None).await.0,
        400
    );
}

#[tokio::test]
async fn bad_credentials_and_expired_tokens_get_401() {
    let h = Harness::start(FakeConfig::default()).await;
    assert_eq!(
        fetch_token(&h.http, &h.running.auth_url(), "wrong").await,
        None
    );
    assert_eq!(h.call(reqwest::Method::GET, "", None).await.0, 200);
    h.fake().expire_tokens();
    let (status, body) = h.call(reqwest::Method::GET, "", None).await;
    assert_eq!(status, 401);
    assert_eq!(body["code"], "Unauthorized");
    let unauthenticated = h.http.get(h.url("")).send().await.unwrap();
    assert_eq!(unauthenticated.status(), 401);
    let calls = h.fake().calls();
    assert!(
        calls
            .iter()
            .any(|c| c.path == TOKEN_PATH && c.status == 401)
    );
    assert!(
        calls
            .iter()
            .any(|c| c.path == WEBHOOKS_PATH && c.status == 401)
    );
}

#[tokio::test]
async fn deliveries_are_gzipped_and_signed_verifiably() {
    let h = Harness::start(FakeConfig::default()).await;
    let receiver = Receiver::start(202).await;
    let subscription = h
        .create("connection.created", &receiver.url, Some(SECRET))
        .await;
    let data = json!({"id": "c1", "fleet_id": "f1"});
    let id = h
        .fake()
        .emit("connection.created", data.clone(), None)
        .unwrap();
    assert_eq!(
        h.fake().emit("connection.staled", json!({}), None),
        None,
        "nobody subscribed"
    );
    eventually("the delivery", || receiver.received().len() == 1).await;

    let got = &receiver.received()[0];
    assert_eq!(got.header("content-encoding"), "gzip");
    assert_eq!(got.header("x-webhook-id"), subscription.id);
    assert_eq!(got.header("x-event-type"), "connection.created");
    assert_eq!(got.header("x-source"), "catena-notifications");
    assert_eq!(got.header("x-delivery-attempt"), "1");
    assert!(got.header("x-catena-timestamp").ends_with("+00:00"));
    let json = gunzip_capped(&got.body, 1 << 20).unwrap();
    let secrets = SecretStore::parse(&format!("{}={SECRET}", subscription.id)).unwrap();
    let headers = SignedHeaders {
        timestamp: Some(got.header("x-catena-timestamp")),
        signature: Some(got.header("x-catena-signature")),
        webhook_id: Some(got.header("x-webhook-id")),
    };
    verify(&secrets, headers, &json, Utc::now(), Window::default()).expect("a valid signature");

    let envelope = got.envelope();
    assert_eq!(envelope["version"], "1.0");
    assert_eq!(envelope["id"], id.to_string());
    assert_eq!(envelope["webhook_id"], subscription.id);
    assert_eq!(envelope["delivery_attempt"], 1);
    assert_eq!(envelope["data"], data);
    assert_eq!(h.fake().ledger().len(), 1);
    eventually("the logged attempt", || h.fake().attempts().len() == 1).await;
    assert_eq!(h.fake().attempts()[0].status_code, 202);
}

#[tokio::test]
async fn a_503_is_tried_four_times_then_dead_lettered() {
    let h = Harness::start(quick_retries()).await;
    let receiver = Receiver::start(503).await;
    let subscription = h
        .create("execution.failed", &receiver.url, Some(SECRET))
        .await;
    h.fake().emit("execution.failed", json!({}), None).unwrap();
    eventually("the dead letter", || {
        h.fake().dlq_len(&subscription.id) == 1
    })
    .await;

    let received = receiver.received();
    let attempts: Vec<&str> = received
        .iter()
        .map(|r| r.header("x-delivery-attempt"))
        .collect();
    assert_eq!(attempts, ["1", "2", "3", "4"]);
    let request_ids: std::collections::HashSet<&str> =
        received.iter().map(|r| r.header("x-request-id")).collect();
    assert_eq!(request_ids.len(), 4, "a fresh X-Request-ID per attempt");
    assert_eq!(h.fake().attempts().len(), 4);
    assert!(h.fake().attempts().iter().all(|a| a.status_code == 503));

    let (_, metrics) = h
        .call(
            reqwest::Method::GET,
            &format!("/{}/metrics", subscription.id),
            None,
        )
        .await;
    let metrics: WebhookMetrics = serde_json::from_value(metrics).unwrap();
    assert_eq!(metrics.dlq_count, 1);
    let h6 = metrics.h6.unwrap();
    assert_eq!((h6.http_attempts, h6.http_failure_attempts), (4, 4));
    assert_eq!((h6.message_count, h6.message_success_count), (1, 0));
    assert_eq!(h.fake().dlq_total(), 1);
}

#[tokio::test]
async fn ten_failures_in_a_row_after_grace_stale_the_subscription() {
    let config = FakeConfig {
        retry_delays_ms: vec![],
        grace: Duration::from_millis(300),
        ..FakeConfig::default()
    };
    let h = Harness::start(config).await;
    let failing = Receiver::start(503).await;
    let watcher = Receiver::start(202).await;
    let subscription = h
        .create("invitation.viewed", &failing.url, Some(SECRET))
        .await;
    h.create("webhook.staled", &watcher.url, Some(SECRET)).await;

    for _ in 0..10 {
        h.fake().emit("invitation.viewed", json!({}), None);
    }
    eventually("ten failed messages", || {
        h.fake().dlq_len(&subscription.id) == 10
    })
    .await;
    assert_eq!(
        h.fake().subscriptions()[0].status,
        WebhookStatus::Active,
        "still in grace"
    );

    tokio::time::sleep(Duration::from_millis(300)).await;
    h.fake().emit("invitation.viewed", json!({}), None);
    eventually("the trip", || {
        h.fake().subscriptions()[0].status == WebhookStatus::Stale
    })
    .await;
    eventually("webhook.staled", || watcher.received().len() == 1).await;
    let staled = watcher.received()[0].envelope();
    assert_eq!(staled["event_name"], "webhook.staled");
    assert_eq!(staled["data"][0]["id"], subscription.id);
    assert_eq!(staled["data"][0]["status"], "stale");

    let tried = failing.received().len();
    h.fake().emit("invitation.viewed", json!({}), None);
    assert_eq!(
        h.fake().dlq_len(&subscription.id),
        12,
        "straight to the DLQ while stale"
    );
    assert_eq!(failing.received().len(), tried);
}

#[tokio::test]
async fn a_replay_after_activation_empties_the_dlq() {
    let config = FakeConfig {
        retry_delays_ms: vec![],
        ..FakeConfig::default()
    };
    let h = Harness::start(config).await;
    let receiver = Receiver::start(503).await;
    let subscription = h
        .create("share_agreement.created", &receiver.url, Some(SECRET))
        .await;
    for _ in 0..3 {
        h.fake().emit("share_agreement.created", json!({}), None);
    }
    eventually("three dead letters", || {
        h.fake().dlq_len(&subscription.id) == 3
    })
    .await;

    let id = &subscription.id;
    assert_eq!(h.post(&format!("/{id}/pause")).await, 200);
    assert_eq!(
        h.post(&format!("/{id}/replay")).await,
        409,
        "not while paused"
    );
    receiver.answer(202);
    assert_eq!(h.post(&format!("/{id}/activate")).await, 200);
    assert_eq!(h.post(&format!("/{id}/replay")).await, 202);
    eventually("the empty DLQ", || {
        h.fake().dlq_len(id) == 0 && receiver.received().len() == 6
    })
    .await;

    let replayed: Vec<Value> = receiver.received()[3..]
        .iter()
        .map(Received::envelope)
        .collect();
    let ledger: Vec<String> = h.fake().ledger().iter().map(|e| e.id.to_string()).collect();
    let replayed_ids: Vec<String> = replayed
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect();
    let mut sorted = replayed_ids.clone();
    sorted.sort();
    let mut expected = ledger.clone();
    expected.sort();
    assert_eq!(sorted, expected, "the same ids, by default");
    assert!(
        replayed.iter().all(|e| e["delivery_attempt"] == 2),
        "attempts continue"
    );

    eventually("the logged successes", || h.fake().attempts().len() == 6).await;
    let (_, metrics) = h
        .call(reqwest::Method::GET, &format!("/{id}/metrics"), None)
        .await;
    let metrics: WebhookMetrics = serde_json::from_value(metrics).unwrap();
    let h6 = metrics.h6.unwrap();
    assert_eq!(
        (h6.message_count, h6.message_success_count),
        (3, 3),
        "latest outcome wins"
    );
    assert_eq!(metrics.dlq_count, 0);
}

#[tokio::test]
async fn remint_gives_a_replayed_message_a_new_id() {
    let config = FakeConfig {
        retry_delays_ms: vec![],
        replay_id: ReplayId::Remint,
        ..FakeConfig::default()
    };
    let h = Harness::start(config).await;
    let receiver = Receiver::start(500).await;
    let subscription = h
        .create("schedule.deactivated", &receiver.url, Some(SECRET))
        .await;
    let original = h
        .fake()
        .emit("schedule.deactivated", json!({}), None)
        .unwrap();
    eventually("the dead letter", || {
        h.fake().dlq_len(&subscription.id) == 1
    })
    .await;
    receiver.answer(200);
    assert_eq!(h.post(&format!("/{}/replay", subscription.id)).await, 202);
    eventually("the replay", || receiver.received().len() == 2).await;
    let replayed: Uuid = receiver.received()[1].envelope()["id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_ne!(replayed, original);
    assert_eq!(replayed.get_version_num(), 7);
}

#[tokio::test]
async fn the_rate_limit_answers_429_with_retry_after_when_asked() {
    let h = Harness::start(FakeConfig::default()).await;
    for retry_after in [true, false] {
        h.fake().set_config(|c| {
            c.rate_limit = Some(config::RateLimit {
                per_second: 4.0,
                burst: 1,
                retry_after,
            })
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(h.call(reqwest::Method::GET, "", None).await.0, 200);
        let response = h
            .http
            .get(h.url(""))
            .bearer_auth(&h.token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 429);
        assert_eq!(response.headers().get("retry-after").is_some(), retry_after);
    }
    h.fake().set_config(|c| {
        c.rate_limit = None;
        c.fail_next = vec![config::FailRule {
            path_contains: "/webhooks".into(),
            method: None,
            status: 503,
            count: 1,
        }]
    });
    assert_eq!(h.call(reqwest::Method::GET, "", None).await.0, 503);
    assert_eq!(
        h.call(reqwest::Method::GET, "", None).await.0,
        200,
        "used up"
    );
}

#[tokio::test]
async fn a_patched_secret_signs_after_the_switch_delay_and_logs_list_every_attempt() {
    let config = FakeConfig {
        secret_switch_delay: Duration::from_millis(300),
        ..FakeConfig::default()
    };
    let h = Harness::start(config).await;
    let receiver = Receiver::start(202).await;
    let subscription = h
        .create("invitation.expired", &receiver.url, Some(SECRET))
        .await;
    let rotated = "the-rotated-secret-456";
    let (status, _) = h
        .call(
            reqwest::Method::PATCH,
            &format!("/{}", subscription.id),
            Some(json!({"secret": rotated})),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        h.fake().secret_of(&subscription.id).as_deref(),
        Some(rotated)
    );
    let verifies_with = |received: &Received, secret: &str| {
        let secrets = SecretStore::parse(&format!("{}={secret}", subscription.id)).unwrap();
        let headers = SignedHeaders {
            timestamp: Some(received.header("x-catena-timestamp")),
            signature: Some(received.header("x-catena-signature")),
            webhook_id: Some(received.header("x-webhook-id")),
        };
        let json = gunzip_capped(&received.body, 1 << 20).unwrap();
        verify(&secrets, headers, &json, Utc::now(), Window::default()).is_ok()
    };

    h.fake().emit("invitation.expired", json!({}), None);
    eventually("the first delivery", || receiver.received().len() == 1).await;
    assert!(
        verifies_with(&receiver.received()[0], SECRET),
        "the old secret still signs"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    h.fake().emit("invitation.expired", json!({}), None);
    eventually("the second delivery", || receiver.received().len() == 2).await;
    assert!(verifies_with(&receiver.received()[1], rotated));

    eventually("both attempts logged", || h.fake().attempts().len() == 2).await;
    let (status, logs) = h
        .call(
            reqwest::Method::GET,
            &format!("/{}/logs?status=success&size=1", subscription.id),
            None,
        )
        .await;
    assert_eq!(status, 200);
    let logs: Page<crate::catena::model::DeliveryLog> = serde_json::from_value(logs).unwrap();
    assert_eq!(logs.items.len(), 1);
    assert!(logs.next_page.is_some());
}
