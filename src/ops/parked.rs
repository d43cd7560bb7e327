//! `catena-ingest parked`: look into, replay and purge the parking lot, while workers run.
//!
//! Messages are taken with `basic.get` one at a time and held unacked while we decide, keeping
//! only their delivery tags (never the bodies), so memory stays flat whatever the queue holds.
//! A message is acked only after its replay copy is confirmed by the broker; everything held and
//! not acked goes back to the queue when the channel closes. A crash mid-replay therefore leaves
//! at worst a message both replayed and still parked, and the dedup key makes replaying it again
//! a no-op. Nothing is lost.
//!
//! That holds only while the dedup key exists: the worker prunes keys after
//! `RETENTION_DEDUP_KEYS` (README, "Retention"). So a replay leaves a message parked, counts it
//! in [`Report::too_old`] and names it in [`Report::refused`] when it was received longer ago
//! than [`DedupRetention::safe_replay_age`], unless forced.

use std::time::Duration;

use chrono::{DateTime, Utc};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicGetOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::broker::{self, Names, PublishError, Publisher};
use crate::config::DedupRetention;
use crate::message;
use crate::shutdown::Shutdown;

/// Which parked messages an operation applies to.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub event_name: Option<String>,
    pub reason: Option<String>,
    pub older_than: Option<Duration>,
    pub id: Option<String>,
}

/// A parked message as an operator sees it.
#[derive(Debug, Clone, Serialize)]
pub struct Parked {
    pub id: String,
    pub event_name: String,
    pub reason: String,
    pub detail: Option<String>,
    pub parked_at: Option<DateTime<Utc>>,
    /// When the relay received it (the `received_at` header, else the message timestamp).
    pub received_at: Option<DateTime<Utc>>,
    pub attempts: Option<i64>,
    pub bytes: usize,
    pub headers: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, thiserror::Error)]
pub enum ParkedError {
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
    #[error("replay publish failed: {0}")]
    Publish(#[from] PublishError),
    #[error("the broker connection for replays never became ready")]
    NotReady,
}

/// The message's headers, with the Catena metadata that travels in properties and the one
/// `x-catena` header shown under Catena's own header names (whatever the message's shape). A
/// group (parked whole by the broker's delivery limit) shows how many events it carries.
fn headers(delivery: &Delivery) -> serde_json::Map<String, serde_json::Value> {
    let mut headers = delivery
        .properties
        .headers()
        .as_ref()
        .map(message::headers_json)
        .unwrap_or_default();
    if message::is_group(&delivery.properties) {
        let events = message::decode_group(&delivery.data).map_or(0, |entries| entries.len());
        headers.insert(GROUP_EVENTS.into(), events.into());
        return headers;
    }
    for (name, value) in message::meta_of(&delivery.properties).fields() {
        headers.entry(name).or_insert(value.into());
    }
    headers
}

/// Shown for a parked group: the events it carries (`parked replay` puts them all back).
const GROUP_EVENTS: &str = "group_events";

/// What the broker's own dead-lettering recorded (messages parked by the delivery limit).
fn x_death_reason(headers: &serde_json::Map<String, serde_json::Value>) -> Option<String> {
    headers
        .get(message::X_DEATH)?
        .as_array()?
        .first()?
        .get("reason")?
        .as_str()
        .map(|r| format!("broker:{r}"))
}

pub fn describe(delivery: &Delivery) -> Parked {
    let headers = headers(delivery);
    let get = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.as_str())
            .map(str::to_owned)
    };
    let id = get(message::PARK_ID)
        .or_else(|| {
            delivery
                .properties
                .message_id()
                .as_ref()
                .map(|m| m.to_string())
        })
        .unwrap_or_else(|| {
            let digest = Sha256::digest(&delivery.data);
            digest[..8].iter().map(|b| format!("{b:02x}")).collect()
        });
    Parked {
        id,
        event_name: get(message::ORIGINAL_ROUTING_KEY).unwrap_or_else(|| {
            if message::is_group(&delivery.properties) {
                message::GROUP_TYPE.to_owned()
            } else {
                message::event_name_of(&delivery.properties, delivery.routing_key.as_str())
                    .to_owned()
            }
        }),
        reason: get(message::PARK_REASON)
            .or_else(|| x_death_reason(&headers))
            .unwrap_or_else(|| "unknown".into()),
        detail: get(message::PARK_DETAIL),
        parked_at: get(message::PARKED_AT)
            .and_then(|t| DateTime::parse_from_rfc3339(&t).ok())
            .map(|t| t.with_timezone(&Utc)),
        received_at: message::received_at(&delivery.properties).or_else(|| {
            delivery
                .properties
                .timestamp()
                .and_then(|t| DateTime::from_timestamp(t as i64, 0))
        }),
        attempts: headers.get(message::ATTEMPTS).and_then(|v| v.as_i64()),
        bytes: delivery.data.len(),
        headers,
    }
}

impl Parked {
    /// How long ago the event entered the pipeline: the relay's receive time, else the park
    /// time (the dedup key, if any, is younger than either).
    pub fn age(&self, now: DateTime<Utc>) -> Option<Duration> {
        let since = self.received_at.or(self.parked_at)?;
        Some((now - since).to_std().unwrap_or_default())
    }
}

impl Filter {
    pub fn matches(&self, parked: &Parked, now: DateTime<Utc>) -> bool {
        self.event_name
            .as_ref()
            .is_none_or(|e| *e == parked.event_name)
            && self.reason.as_ref().is_none_or(|r| *r == parked.reason)
            && self.id.as_ref().is_none_or(|i| *i == parked.id)
            && self.older_than.is_none_or(|age| {
                parked.parked_at.is_some_and(|t| {
                    now - t >= chrono::Duration::from_std(age).unwrap_or(chrono::Duration::MAX)
                })
            })
    }
}

/// Mask secrets in a body for display: tokens, magic links, secrets.
pub fn masked_body(body: &[u8]) -> String {
    fn mask(value: &mut serde_json::Value) {
        match value {
            serde_json::Value::Object(map) => {
                for (key, v) in map.iter_mut() {
                    let sensitive =
                        key.contains("token") || key.contains("secret") || key == "magic_link";
                    if sensitive && !v.is_null() {
                        *v = "***".into();
                    } else {
                        mask(v);
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(mask),
            _ => {}
        }
    }
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(mut value) => {
            mask(&mut value);
            serde_json::to_string_pretty(&value).unwrap_or_default()
        }
        Err(_) => format!("<{} bytes, not JSON; not shown>", body.len()),
    }
}

/// A browse session: messages taken with basic.get stay unacked until `finish`.
struct Session {
    connection: Connection,
    channel: Channel,
    remaining: u32,
}

impl Session {
    async fn open(url: &str, names: &Names) -> Result<Self, ParkedError> {
        let connection = broker::connect(url, "catena-ingest parked").await?;
        broker::topology::declare(&connection, names).await?;
        let channel = connection.create_channel().await?;
        let queue = channel
            .queue_declare(
                names.parked_queue.as_str().into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        Ok(Self {
            connection,
            channel,
            remaining: queue.message_count(),
        })
    }

    /// The next message present when the session opened (later arrivals are left alone).
    async fn next(&mut self, queue: &str) -> Result<Option<Delivery>, ParkedError> {
        if self.remaining == 0 {
            return Ok(None);
        }
        self.remaining -= 1;
        Ok(self
            .channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: false })
            .await?
            .map(|m| m.delivery))
    }

    /// Close: everything taken and not acked goes back to the queue.
    async fn finish(self) {
        let _ = self.channel.close(200, "done".into()).await;
        let _ = self.connection.close(200, "done".into()).await;
    }
}

/// List parked messages matching `filter` (nothing is changed).
pub async fn list(
    url: &str,
    names: &Names,
    filter: &Filter,
    limit: usize,
) -> Result<Vec<Parked>, ParkedError> {
    let mut session = Session::open(url, names).await?;
    let now = Utc::now();
    let mut out = Vec::new();
    while out.len() < limit {
        let Some(delivery) = session.next(&names.parked_queue).await? else {
            break;
        };
        let parked = describe(&delivery);
        if filter.matches(&parked, now) {
            out.push((parked, masked_body(&delivery.data)));
        }
    }
    session.finish().await;
    Ok(out
        .into_iter()
        .map(|(mut p, body)| {
            p.headers.insert("body".into(), body.into());
            p
        })
        .collect())
}

/// Outcome of a replay or purge.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Report {
    pub examined: u64,
    pub matched: u64,
    pub replayed: u64,
    pub purged: u64,
    /// Matched but left parked: older than the dedup keys that would catch a duplicate.
    pub too_old: u64,
    /// Replayed although too old (`force`).
    pub forced: u64,
    /// The first [`MAX_REFUSED_LISTED`] messages counted in `too_old` or `forced`.
    pub refused: Vec<TooOld>,
}

/// How many too-old messages a report names.
pub const MAX_REFUSED_LISTED: usize = 20;

/// A parked message older than the dedup horizon.
#[derive(Debug, Clone, Serialize)]
pub struct TooOld {
    pub id: String,
    pub event_name: String,
    pub received_at: Option<DateTime<Utc>>,
    pub age_seconds: u64,
}

/// How `replay` runs.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    /// Count what would be replayed (and what is too old); change nothing.
    pub dry_run: bool,
    /// Replays per second (0 = unlimited).
    pub rate: f64,
    /// Messages older than this ([`Parked::age`]) are left parked unless `force`.
    pub max_age: Duration,
    /// Replay messages older than `max_age` too (their duplicates may apply twice).
    pub force: bool,
}

impl ReplayOptions {
    pub fn new(dedup: &DedupRetention) -> Self {
        Self {
            dry_run: false,
            rate: 0.0,
            max_age: dedup.safe_replay_age(),
            force: false,
        }
    }
}

/// Republish matching messages to the events exchange (confirmed), then ack the parked copy,
/// except those too old to replay safely (see [`ReplayOptions`]).
pub async fn replay(
    url: &str,
    names: &Names,
    filter: &Filter,
    options: &ReplayOptions,
) -> Result<Report, ParkedError> {
    let dry_run = options.dry_run;
    let shutdown = Shutdown::new();
    let publisher = Publisher::start(
        url,
        "catena-ingest parked replay",
        names.clone(),
        1,
        shutdown.clone(),
    );
    if !publisher.wait_ready(Duration::from_secs(10)).await {
        shutdown.trigger();
        return Err(ParkedError::NotReady);
    }
    let result = walk(
        url,
        names,
        filter,
        dry_run,
        Some(options),
        |delivery| {
            let publisher = publisher.clone();
            let names = names.clone();
            async move {
                let parked = describe(&delivery);
                let properties = message::replay_properties(&delivery.properties, Utc::now());
                let (exchange, routing_key) = names.route(&parked.event_name);
                publisher
                    .publish(
                        exchange,
                        routing_key,
                        &delivery.data,
                        properties,
                        Duration::from_secs(5),
                    )
                    .await
            }
        },
        options.rate,
    )
    .await;
    shutdown.trigger();
    result.map(|mut r| {
        r.replayed = if dry_run { 0 } else { r.matched - r.too_old };
        r
    })
}

/// Drop matching messages for good.
pub async fn purge(url: &str, names: &Names, filter: &Filter) -> Result<Report, ParkedError> {
    walk(url, names, filter, false, None, |_| async { Ok(()) }, 0.0)
        .await
        .map(|mut r| {
            r.purged = r.matched;
            r
        })
}

async fn walk<F, Fut>(
    url: &str,
    names: &Names,
    filter: &Filter,
    dry_run: bool,
    age_limit: Option<&ReplayOptions>,
    mut act: F,
    rate: f64,
) -> Result<Report, ParkedError>
where
    F: FnMut(Delivery) -> Fut,
    Fut: std::future::Future<Output = Result<(), PublishError>>,
{
    let mut session = Session::open(url, names).await?;
    let now = Utc::now();
    let started = std::time::Instant::now();
    let mut report = Report::default();
    let mut acted = 0u64;
    while let Some(delivery) = session.next(&names.parked_queue).await? {
        report.examined += 1;
        let parked = describe(&delivery);
        if !filter.matches(&parked, now) {
            continue; // held unacked; back to the queue at finish
        }
        report.matched += 1;
        if let Some(limit) = age_limit {
            let age = parked.age(now);
            if age.is_some_and(|age| age > limit.max_age) {
                if report.refused.len() < MAX_REFUSED_LISTED {
                    report.refused.push(TooOld {
                        id: parked.id.clone(),
                        event_name: parked.event_name.clone(),
                        received_at: parked.received_at,
                        age_seconds: age.unwrap_or_default().as_secs(),
                    });
                }
                if limit.force {
                    report.forced += 1;
                } else {
                    report.too_old += 1;
                    continue; // held unacked; back to the queue at finish
                }
            }
        }
        if dry_run {
            continue;
        }
        acted += 1;
        if rate > 0.0 {
            let due = started + Duration::from_secs_f64(acted as f64 / rate);
            tokio::time::sleep_until(due.into()).await;
        }
        let tag = delivery.delivery_tag;
        if let Err(error) = act(delivery).await {
            session.finish().await;
            return Err(error.into());
        }
        session
            .channel
            .basic_ack(tag, BasicAckOptions::default())
            .await?;
    }
    session.finish().await;
    Ok(report)
}
