//! The fake's shared state and the [`Fake`] handle over it: subscriptions with their secrets,
//! queues, DLQs and health; issued tokens; and what the tests look at afterwards (the ledger of
//! emitted events, every API call, every delivery attempt).
//!
//! One `std` mutex guards it all. It is never held across an `.await`: handlers and delivery
//! tasks take it, change what they must (including sending to a queue, which never blocks) and
//! let go.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use chrono::{DateTime, Utc};
use rand::Rng;
use rand::distr::Alphanumeric;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::mpsc::UnboundedSender;
use uuid::Uuid;

use super::config::FakeConfig;
use super::delivery::{self, Message};
use super::health::Health;
use crate::catena::model::{DeliveryLog, Filters, MASKED_SECRET, Webhook, WebhookStatus, mask_url};
use crate::loadgen::scenario::Event;
use crate::shutdown::Shutdown;

/// Every subscription belongs to this partner.
const PARTNER_ID: &str = "9531985d-5d9d-49f8-9818-e811892f902b";

/// A cheap handle to the running fake, for its handlers, its delivery tasks and the tests.
#[derive(Clone)]
pub struct Fake {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<State>,
    /// One client for every delivery, so connections to the receiver are reused.
    client: reqwest::Client,
    shutdown: Shutdown,
}

/// An emitted event that matched a subscription: what the receiver must end up with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerEntry {
    pub id: Uuid,
    pub event_name: String,
    pub webhook_id: String,
}

/// One call to the fake's HTTP API (subscriptions, token and hooks alike).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Call {
    pub at: DateTime<Utc>,
    pub method: String,
    pub path: String,
    pub status: u16,
}

pub(super) struct State {
    pub config: FakeConfig,
    /// In creation order, which is also the order of list pages. Deleted ones are removed.
    pub subscriptions: Vec<Subscription>,
    next_subscription: u64,
    next_message: u64,
    /// Issued bearer tokens and when each expires.
    pub tokens: HashMap<String, DateTime<Utc>>,
    /// The rate limit's bucket: tokens left and when it was last filled.
    pub bucket: Option<(f64, std::time::Instant)>,
    pub ledger: Vec<LedgerEntry>,
    pub calls: Vec<Call>,
    pub attempts: Vec<DeliveryLog>,
}

pub(super) struct Subscription {
    /// Creation order, the position a list cursor points at.
    pub seq: u64,
    pub id: String,
    /// Unmasked: where deliveries go.
    pub url: String,
    pub event_name: String,
    pub filters: Option<Filters>,
    pub status: WebhookStatus,
    pub secret: String,
    /// The secret before the last PATCH, still signing until the given time
    /// (`secret_switch_delay`).
    pub retiring_secret: Option<(String, DateTime<Utc>)>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// The breaker is not evaluated before this.
    pub grace_until: DateTime<Utc>,
    pub queue: UnboundedSender<Message>,
    /// Oldest first.
    pub dlq: VecDeque<Message>,
    pub health: Health,
}

impl Subscription {
    /// As the API returns it: URL and secret masked.
    pub fn view(&self) -> Webhook {
        Webhook {
            id: self.id.clone(),
            url: mask_url(&self.url),
            event_name: self.event_name.clone(),
            filters: self.filters.clone(),
            secret: Some(MASKED_SECRET.to_owned()),
            status: self.status,
            partner_id: Some(PARTNER_ID.to_owned()),
            created_at: Some(self.created_at),
            updated_at: Some(self.updated_at),
            deleted_at: None,
        }
    }

    /// The subject of a `webhook.*` event about this subscription (G1 `WebhookStaled`).
    pub fn event_data(&self) -> Value {
        json!({
            "id": self.id,
            "url": mask_url(&self.url),
            "event_name": self.event_name,
            "filters": self.filters,
            "status": self.status,
        })
    }

    pub fn is_active(&self) -> bool {
        self.status == WebhookStatus::Active
    }

    /// The secret Catena signs with at `now`.
    pub fn signing_secret(&self, now: DateTime<Utc>) -> &str {
        match &self.retiring_secret {
            Some((old, until)) if now < *until => old,
            _ => &self.secret,
        }
    }

    pub fn same_target(&self, event_name: &str, url: &str, filters: &Option<Filters>) -> bool {
        self.event_name == event_name
            && self.url == url
            && normalised(&self.filters) == normalised(filters)
    }

    /// Whether the filters let an event with this `data` through: `fleet_ids` and `fleet_refs`
    /// are checked against the data's `fleet_id` and `fleet_ref` when given.
    fn accepts(&self, data: &Value) -> bool {
        let Some(filters) = &self.filters else {
            return true;
        };
        let allowed = |list: &Option<Vec<String>>, key: &str| match list {
            Some(list) => data
                .get(key)
                .and_then(Value::as_str)
                .is_some_and(|value| list.iter().any(|l| l == value)),
            None => true,
        };
        allowed(&filters.fleet_ids, "fleet_id") && allowed(&filters.fleet_refs, "fleet_ref")
    }

    /// Queue a message, or dead-letter it at once while the subscription is stale or paused (S4:
    /// "queued but not delivered").
    pub fn enqueue(&mut self, mut message: Message) {
        if self.is_active() {
            // Only fails once the fake shuts down, when nothing is delivered any more.
            let _ = self.queue.send(message);
        } else {
            message.dead_lettered_at = Some(Utc::now());
            self.dlq.push_back(message);
        }
    }

    /// Forget dead letters older than `dlq_ttl`.
    pub fn expire_dlq(&mut self, now: DateTime<Utc>, ttl: std::time::Duration) {
        let ttl = chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::MAX);
        self.dlq
            .retain(|m| m.dead_lettered_at.is_none_or(|at| now - at <= ttl));
    }
}

/// `null` and `{}` filters are the same target.
fn normalised(filters: &Option<Filters>) -> Option<&Filters> {
    filters.as_ref().filter(|f| **f != Filters::default())
}

pub(super) fn random_alphanumeric(length: usize) -> String {
    rand::rng()
        .sample_iter(Alphanumeric)
        .take(length)
        .map(char::from)
        .collect()
}

impl State {
    pub fn subscription(&self, id: &str) -> Option<&Subscription> {
        self.subscriptions.iter().find(|s| s.id == id)
    }

    pub fn subscription_mut(&mut self, id: &str) -> Option<&mut Subscription> {
        self.subscriptions.iter_mut().find(|s| s.id == id)
    }

    /// Send an event to every subscription of that name whose filters let it through; the
    /// event's id is `id` or a fresh UUIDv7. `None` when no subscription took it.
    pub fn emit(&mut self, event_name: &str, data: Value, id: Option<Uuid>) -> Option<Uuid> {
        let now = Utc::now();
        let targets: Vec<usize> = (0..self.subscriptions.len())
            .filter(|&i| {
                let s = &self.subscriptions[i];
                s.event_name == event_name && s.accepts(&data)
            })
            .collect();
        if targets.is_empty() {
            return None;
        }
        let id = id.unwrap_or_else(Uuid::now_v7);
        for i in targets {
            self.next_message += 1;
            let message = Message::new(self.next_message, id, event_name, data.clone(), now);
            let subscription = &mut self.subscriptions[i];
            self.ledger.push(LedgerEntry {
                id,
                event_name: event_name.to_owned(),
                webhook_id: subscription.id.clone(),
            });
            subscription.enqueue(message);
        }
        Some(id)
    }

    /// Tell the `webhook.<action>` subscriptions, if any, about a change to `subject`.
    pub fn emit_webhook_event(&mut self, action: &str, subject: Value) {
        self.emit(&format!("webhook.{action}"), json!([subject]), None);
    }
}

/// A new subscription's fields, validated by the caller.
pub(super) struct NewSubscription {
    pub url: String,
    pub event_name: String,
    pub filters: Option<Filters>,
    pub secret: String,
}

impl Fake {
    pub(super) fn new(config: FakeConfig, shutdown: Shutdown) -> Self {
        Self {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    config,
                    subscriptions: Vec::new(),
                    next_subscription: 0,
                    next_message: 0,
                    tokens: HashMap::new(),
                    bucket: None,
                    ledger: Vec::new(),
                    calls: Vec::new(),
                    attempts: Vec::new(),
                }),
                client: reqwest::Client::new(),
                shutdown,
            }),
        }
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        // A panic in a handler must not take the whole fake down with it.
        self.inner
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(super) fn client(&self) -> &reqwest::Client {
        &self.inner.client
    }

    pub(super) fn shutdown(&self) -> &Shutdown {
        &self.inner.shutdown
    }

    /// Add a subscription with its own delivery queue, and announce it (`webhook.created`).
    /// Returns it as a create answers: URL masked, the secret in plain text.
    pub(super) fn insert_subscription(&self, state: &mut State, new: NewSubscription) -> Webhook {
        let now = Utc::now();
        let id = Uuid::new_v4().to_string();
        state.next_subscription += 1;
        let grace = chrono::Duration::from_std(state.config.grace).unwrap_or(chrono::Duration::MAX);
        let subscription = Subscription {
            seq: state.next_subscription,
            queue: delivery::spawn_queue(self.clone(), id.clone(), state.config.max_in_flight),
            id,
            url: new.url,
            event_name: new.event_name,
            filters: new.filters,
            status: WebhookStatus::Active,
            secret: new.secret,
            retiring_secret: None,
            created_at: now,
            updated_at: now,
            grace_until: now
                .checked_add_signed(grace)
                .unwrap_or(DateTime::<Utc>::MAX_UTC),
            dlq: VecDeque::new(),
            health: Health::default(),
        };
        let mut created = subscription.view();
        created.secret = Some(subscription.secret.clone());
        let subject = subscription.event_data();
        tracing::info!(webhook_id = %created.id, event_name = %created.event_name, "fake-catena: subscription created");
        state.subscriptions.push(subscription);
        state.emit_webhook_event("created", subject);
        created
    }

    /// Change the config while running (the same as `PUT /_fake/config`).
    pub fn set_config(&self, f: impl FnOnce(&mut FakeConfig)) {
        f(&mut self.lock().config);
    }

    /// The config in force (after every `set_config` and `PUT /_fake/config`).
    pub fn config(&self) -> FakeConfig {
        self.lock().config.clone()
    }

    /// Emit an event as Catena would on a change in its world; `None` when no subscription has
    /// that name.
    pub fn emit(&self, event_name: &str, data: Value, id: Option<Uuid>) -> Option<Uuid> {
        self.lock().emit(event_name, data, id)
    }

    /// Emit a generated event with its own id and data (its `webhook_id` is replaced by each
    /// subscription's).
    pub fn emit_scenario_event(&self, event: &Event) -> Option<Uuid> {
        self.emit(
            &event.event_name,
            event.envelope.get("data").cloned().unwrap_or(Value::Null),
            Some(event.id),
        )
    }

    pub fn ledger(&self) -> Vec<LedgerEntry> {
        self.lock().ledger.clone()
    }

    /// Every subscription as `GET` returns it (masked), in creation order.
    pub fn subscriptions(&self) -> Vec<Webhook> {
        self.lock()
            .subscriptions
            .iter()
            .map(Subscription::view)
            .collect()
    }

    pub fn dlq_len(&self, webhook_id: &str) -> usize {
        let mut state = self.lock();
        let ttl = state.config.dlq_ttl;
        state.subscription_mut(webhook_id).map_or(0, |s| {
            s.expire_dlq(Utc::now(), ttl);
            s.dlq.len()
        })
    }

    pub fn dlq_total(&self) -> usize {
        let mut state = self.lock();
        let ttl = state.config.dlq_ttl;
        let now = Utc::now();
        state
            .subscriptions
            .iter_mut()
            .map(|s| {
                s.expire_dlq(now, ttl);
                s.dlq.len()
            })
            .sum()
    }

    pub fn calls(&self) -> Vec<Call> {
        self.lock().calls.clone()
    }

    pub fn attempts(&self) -> Vec<DeliveryLog> {
        self.lock().attempts.clone()
    }

    /// A subscription made by an operator in Catena's UI: no API call, a generated secret (not
    /// in the answer, which is masked as a `GET` would be; see [`Fake::secret_of`]).
    pub fn create_by_hand(&self, event_name: &str, url: &str) -> Webhook {
        let mut state = self.lock();
        let mut created = self.insert_subscription(
            &mut state,
            NewSubscription {
                url: url.to_owned(),
                event_name: event_name.to_owned(),
                filters: None,
                secret: random_alphanumeric(16),
            },
        );
        created.secret = Some(MASKED_SECRET.to_owned());
        created
    }

    /// Test-only: the current secret (the one deliveries sign with once any
    /// `secret_switch_delay` is over). The API never shows it after the create.
    pub fn secret_of(&self, webhook_id: &str) -> Option<String> {
        self.lock()
            .subscription(webhook_id)
            .map(|s| s.secret.clone())
    }

    /// Every issued token becomes invalid: the next API call with one gets 401.
    pub fn expire_tokens(&self) {
        self.lock().tokens.clear();
    }
}
