//! Webhook delivery as Catena does it (catena-webhooks.md §1, §2): one queue per subscription,
//! a few messages in flight, each POSTed gzipped and signed with the S1 headers, retried on 5xx,
//! timeouts and connection errors, then dead-lettered; and the replay of a DLQ.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio::sync::mpsc::{self, UnboundedReceiver, UnboundedSender};
use uuid::Uuid;

use super::config::{FourXx, ReplayAttempt, ReplayId, ReplayWhenInactive, SignRetriesWith};
use super::health::Breaker;
use super::state::{Fake, State};
use crate::catena::model::{DeliveryLog, DeliveryStatus, WebhookStatus};
use crate::loadgen::send::catena_headers;
use crate::relay::gunzip::gzip;
use crate::relay::signature::sign;

/// One event on its way to one subscription.
#[derive(Debug, Clone)]
pub(super) struct Message {
    /// The fake's own number: health keys outcomes on it, so a replay with a re-minted id is
    /// still the same message.
    pub number: u64,
    /// The envelope `id` (a UUIDv7 at event time).
    pub id: Uuid,
    pub event_name: String,
    pub data: Value,
    /// The envelope `timestamp`: when the event was dispatched to the subscription.
    pub dispatched_at: DateTime<Utc>,
    /// The last `delivery_attempt` sent.
    pub attempts: u32,
    /// What signed the first attempt of this round, for `sign_retries_with: first`.
    pub first_secret: Option<String>,
    /// A replay of a stale or paused subscription with `replay_when_inactive: deliver`.
    pub deliver_while_inactive: bool,
    pub dead_lettered_at: Option<DateTime<Utc>>,
}

impl Message {
    pub fn new(
        number: u64,
        id: Uuid,
        event_name: &str,
        data: Value,
        dispatched_at: DateTime<Utc>,
    ) -> Self {
        Self {
            number,
            id,
            event_name: event_name.to_owned(),
            data,
            dispatched_at,
            attempts: 0,
            first_secret: None,
            deliver_while_inactive: false,
            dead_lettered_at: None,
        }
    }
}

/// Start a subscription's queue: messages leave it in order, at most `max_in_flight` at a time,
/// until the fake shuts down or the subscription is deleted (its sender dropped).
pub(super) fn spawn_queue(
    fake: Fake,
    webhook_id: String,
    max_in_flight: usize,
) -> UnboundedSender<Message> {
    let (sender, receiver) = mpsc::unbounded_channel();
    tokio::spawn(run_queue(fake, webhook_id, receiver, max_in_flight.max(1)));
    sender
}

async fn run_queue(
    fake: Fake,
    webhook_id: String,
    mut queue: UnboundedReceiver<Message>,
    max_in_flight: usize,
) {
    let in_flight = Arc::new(Semaphore::new(max_in_flight));
    let shutdown = fake.shutdown().clone();
    loop {
        let message = tokio::select! {
            _ = shutdown.wait() => return,
            message = queue.recv() => match message {
                Some(message) => message,
                None => return,
            },
        };
        let permit = tokio::select! {
            _ = shutdown.wait() => return,
            permit = in_flight.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
        };
        let (fake, webhook_id, shutdown) = (fake.clone(), webhook_id.clone(), shutdown.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = shutdown.wait() => {}
                _ = deliver(&fake, &webhook_id, message) => {}
            }
            drop(permit);
        });
    }
}

/// One prepared attempt.
struct Request {
    url: String,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
    timeout: Duration,
}

enum Next {
    Send(Request),
    /// The subscription went stale or was paused meanwhile.
    DeadLetter,
    /// The subscription was deleted: its messages go with it.
    Gone,
}

/// How a message's delivery ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Delivered,
    DeadLettered,
    /// A 4xx with `four_xx: drop`.
    Dropped,
}

/// What an attempt got back.
enum Answer {
    Status(u16),
    /// No HTTP answer: refused, reset, or no answer within `timeout`.
    NoAnswer(String),
}

/// Deliver one message: the first attempt and its retries, then its fate.
async fn deliver(fake: &Fake, webhook_id: &str, mut message: Message) {
    let mut attempted = false;
    let mut retries = 0;
    loop {
        let request = match fake.prepare_attempt(webhook_id, &mut message) {
            Next::Send(request) => request,
            Next::DeadLetter if attempted => {
                return fake.finish(webhook_id, message, Fate::DeadLettered);
            }
            Next::DeadLetter => return fake.park(webhook_id, message),
            Next::Gone => return,
        };
        attempted = true;
        let started = Instant::now();
        let answer = post(fake.client(), request).await;
        let response_time_ms = started.elapsed().as_millis() as u64;
        let retry_delays = fake.log_attempt(webhook_id, &message, &answer, response_time_ms);
        let retryable = match answer {
            Answer::Status(code) if (200..300).contains(&code) => {
                return fake.finish(webhook_id, message, Fate::Delivered);
            }
            Answer::Status(code) => code >= 500,
            Answer::NoAnswer(_) => true,
        };
        if !retryable {
            let fate = match fake.config().four_xx {
                FourXx::Dlq => Fate::DeadLettered,
                FourXx::Drop => Fate::Dropped,
            };
            return fake.finish(webhook_id, message, fate);
        }
        let Some(&delay_ms) = retry_delays.get(retries) else {
            return fake.finish(webhook_id, message, Fate::DeadLettered);
        };
        retries += 1;
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
    }
}

async fn post(client: &reqwest::Client, request: Request) -> Answer {
    let mut builder = client
        .post(&request.url)
        .timeout(request.timeout)
        .body(request.body);
    for (name, value) in request.headers {
        builder = builder.header(name, value);
    }
    match builder.send().await {
        Ok(response) => Answer::Status(response.status().as_u16()),
        Err(error) if error.is_timeout() => {
            Answer::NoAnswer(format!("no answer within {:?}", request.timeout))
        }
        Err(error) => Answer::NoAnswer(error.without_url().to_string()),
    }
}

impl Fake {
    /// Sign and compress the next attempt with the secret in force now (or, for a retry under
    /// `sign_retries_with: first`, the one that signed the first attempt).
    fn prepare_attempt(&self, webhook_id: &str, message: &mut Message) -> Next {
        let mut state = self.lock();
        let (timeout, sign_retries_with) = (state.config.timeout, state.config.sign_retries_with);
        let Some(subscription) = state.subscription_mut(webhook_id) else {
            return Next::Gone;
        };
        if !subscription.is_active() && !message.deliver_while_inactive {
            return Next::DeadLetter;
        }
        let now = Utc::now();
        let secret = match (&message.first_secret, sign_retries_with) {
            (Some(first), SignRetriesWith::First) => first.clone(),
            _ => subscription.signing_secret(now).to_owned(),
        };
        message.first_secret.get_or_insert_with(|| secret.clone());
        message.attempts += 1;
        let envelope = json!({
            "version": "1.0",
            "event_name": message.event_name,
            "data": message.data,
            "webhook_id": webhook_id,
            "timestamp": message.dispatched_at.to_rfc3339_opts(SecondsFormat::Millis, false),
            "id": message.id,
            "delivery_attempt": message.attempts,
        });
        let json = serde_json::to_vec(&envelope).expect("serialising a Value cannot fail");
        let timestamp = now.to_rfc3339_opts(SecondsFormat::Secs, false);
        let signature = sign(secret.as_bytes(), &timestamp, &json);
        Next::Send(Request {
            url: subscription.url.clone(),
            headers: catena_headers(
                &message.event_name,
                webhook_id,
                &timestamp,
                &signature,
                message.attempts,
                true,
            ),
            body: gzip(&json),
            timeout,
        })
    }

    /// Log an attempt; returns the retry schedule in force.
    fn log_attempt(
        &self,
        webhook_id: &str,
        message: &Message,
        answer: &Answer,
        response_time_ms: u64,
    ) -> Vec<u64> {
        let (status, status_code, error_message) = match answer {
            Answer::Status(code) if (200..300).contains(code) => {
                (DeliveryStatus::Success, *code, None)
            }
            Answer::Status(code) => (DeliveryStatus::Failed, *code, Some(format!("HTTP {code}"))),
            Answer::NoAnswer(why) => (DeliveryStatus::Failed, 0, Some(why.clone())),
        };
        tracing::debug!(webhook_id, message_id = %message.id, attempt = message.attempts, status_code, "fake-catena: delivery attempt");
        let mut state = self.lock();
        state.attempts.push(DeliveryLog {
            created_at: Utc::now(),
            webhook_id: webhook_id.to_owned(),
            message_id: message.id.to_string(),
            event_name: message.event_name.clone(),
            status,
            status_code,
            error_message,
            response_time_ms: Some(response_time_ms),
        });
        state.config.retry_delays_ms.clone()
    }

    /// Record the message's outcome, dead-letter it if it failed so, and run the breaker.
    fn finish(&self, webhook_id: &str, mut message: Message, fate: Fate) {
        let mut state = self.lock();
        let now = Utc::now();
        let alpha = state.config.ewma_alpha;
        let breaker = Breaker {
            window: chrono::Duration::from_std(state.config.breaker_window)
                .unwrap_or(chrono::Duration::MAX),
        };
        let Some(subscription) = state.subscription_mut(webhook_id) else {
            return;
        };
        let delivered = fate == Fate::Delivered;
        subscription
            .health
            .record(message.number, delivered, now, alpha);
        if fate == Fate::DeadLettered {
            message.dead_lettered_at = Some(now);
            subscription.dlq.push_back(message);
        }
        // Only a failure can make things worse, so only a failure is evaluated: a success
        // after an activation never re-trips a breaker whose EWMA is still recovering.
        let trips = !delivered
            && subscription.is_active()
            && now >= subscription.grace_until
            && subscription.health.should_trip(now, breaker);
        if trips {
            subscription.status = WebhookStatus::Stale;
            let subject = subscription.event_data();
            tracing::warn!(
                webhook_id,
                "fake-catena: breaker tripped, subscription stale"
            );
            state.emit_webhook_event("staled", subject);
        }
    }

    /// Dead-letter a message that was never tried (its subscription is stale or paused).
    fn park(&self, webhook_id: &str, mut message: Message) {
        if let Some(subscription) = self.lock().subscription_mut(webhook_id) {
            message.dead_lettered_at = Some(Utc::now());
            subscription.dlq.push_back(message);
        }
    }
}

/// Why a replay was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ReplayRefused {
    NotFound,
    /// Stale or paused, with `replay_when_inactive: reject`.
    Inactive(WebhookStatus),
}

impl State {
    /// Put a subscription's whole DLQ back on its queue, oldest first: each message gets a full
    /// retry schedule and is signed afresh. Returns how many went.
    pub fn replay(&mut self, webhook_id: &str) -> Result<usize, ReplayRefused> {
        let config = self.config.clone();
        let subscription = self
            .subscription_mut(webhook_id)
            .ok_or(ReplayRefused::NotFound)?;
        subscription.expire_dlq(Utc::now(), config.dlq_ttl);
        let inactive = !subscription.is_active();
        if inactive && config.replay_when_inactive == ReplayWhenInactive::Reject {
            return Err(ReplayRefused::Inactive(subscription.status));
        }
        let messages: Vec<Message> = subscription.dlq.drain(..).collect();
        let count = messages.len();
        for mut message in messages {
            if config.replay_id == ReplayId::Remint {
                message.id = Uuid::now_v7();
            }
            if config.attempt == ReplayAttempt::Reset {
                message.attempts = 0;
            }
            message.first_secret = None;
            message.deliver_while_inactive = inactive;
            message.dead_lettered_at = None;
            let _ = subscription.queue.send(message);
        }
        tracing::info!(webhook_id, count, "fake-catena: replaying the DLQ");
        Ok(count)
    }
}
