//! Broker topology: names and idempotent declarations.
//!
//! ```text
//! relay --default exchange, key <p>.events--> <p>.events (quorum, delivery-limit, DLX -> <p>.parked)
//! relay --<p>.events (topic), key = event name, `#`--> <p>.events   (opt-in: CATENA_EVENT_ROUTING=topic)
//! worker --> <p>.retry.<tier> (quorum, message TTL, DLX -> default exchange, key <p>.events)
//! worker --> <p>.parked (quorum)
//! ```
//! The default exchange is the cheapest route RabbitMQ has (on 3.10 its only routing
//! shortcut); the topic exchange is still declared and bound on every start, for deployments
//! where other consumers bind by event name, and because retry tiers declared by an older
//! version dead-letter through it.
//! Retry tiers are plain TTL queues (no delayed-message plugin: it is not replicated). Every
//! queue is a quorum queue so messages survive a broker node loss; dead-lettering is
//! `at-least-once` so nothing is dropped on the way to a tier or the parking lot.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, Connection, ExchangeKind};
use std::time::Duration;

/// Retry delays, in order; a message that failed `attempt` times goes to tier `attempt - 1`.
pub const RETRY_TIERS: [Duration; 4] = [
    Duration::from_secs(5),
    Duration::from_secs(30),
    Duration::from_secs(300),
    Duration::from_secs(1800),
];

/// Deliveries of one message before the broker parks it: a guard against a message that
/// crashes workers in a loop. Every return to the queue counts, a lost consumer connection's
/// whole prefetch window included, so the limit must outlast realistic broker or network flaps
/// (at 10, ten reconnects during an outage parked innocent messages). Our own requeues go
/// through the first retry tier instead, which starts the count afresh.
pub const DELIVERY_LIMIT: i64 = 50;

/// Effectively unlimited redeliveries for the parking lot (see [`declare`]).
pub const PARKED_DELIVERY_LIMIT: i64 = 1_000_000_000;

/// Retry tier delays (`CATENA_RETRY_DELAYS`): parsed from and shown as `5s,30s,5m,30m`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryDelays(pub Vec<Duration>);

impl Default for RetryDelays {
    fn default() -> Self {
        Self(RETRY_TIERS.to_vec())
    }
}

impl std::fmt::Display for RetryDelays {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text: Vec<String> = self.0.iter().map(|d| human(*d)).collect();
        f.write_str(&text.join(","))
    }
}

impl std::str::FromStr for RetryDelays {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let delays = text
            .split(',')
            .filter(|s| !s.trim().is_empty())
            .map(crate::config::parse_duration)
            .collect::<Result<Vec<_>, _>>()?;
        if delays.is_empty() {
            return Err("at least one retry delay is required".into());
        }
        Ok(Self(delays))
    }
}

/// How new event messages reach `<prefix>.events` (`CATENA_EVENT_ROUTING`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum EventRouting {
    /// Straight into the queue through the default exchange; concurrent requests may share a
    /// message (a group).
    #[default]
    Queue,
    /// Through the topic exchange with the event name as routing key, one message per request,
    /// so other consumers can bind by event name (README, "Broker contract", for its cost).
    Topic,
}

/// Every exchange and queue name, derived from `CATENA_NAME_PREFIX`.
#[derive(Clone, Debug)]
pub struct Names {
    pub prefix: String,
    pub events_exchange: String,
    pub events_queue: String,
    pub parked_queue: String,
    pub routing: EventRouting,
    retry_delays: Vec<Duration>,
}

impl Names {
    pub fn new(prefix: &str) -> Self {
        Self::with_retry_delays(prefix, RetryDelays::default())
    }

    pub fn with_retry_delays(prefix: &str, retry_delays: RetryDelays) -> Self {
        Self {
            prefix: prefix.to_owned(),
            events_exchange: format!("{prefix}.events"),
            events_queue: format!("{prefix}.events"),
            parked_queue: format!("{prefix}.parked"),
            routing: EventRouting::default(),
            retry_delays: retry_delays.0,
        }
    }

    pub fn with_routing(self, routing: EventRouting) -> Self {
        Self { routing, ..self }
    }

    /// Exchange and routing key for a new message of `event_name` (a group: any name).
    pub fn route<'a>(&'a self, event_name: &'a str) -> (&'a str, &'a str) {
        match self.routing {
            EventRouting::Queue => ("", &self.events_queue),
            EventRouting::Topic => (&self.events_exchange, event_name),
        }
    }

    pub fn retry_tiers(&self) -> impl Iterator<Item = (String, Duration)> + '_ {
        self.retry_delays
            .iter()
            .map(|d| (format!("{}.retry.{}", self.prefix, human(*d)), *d))
    }

    /// The tier queue for a message that has now failed `attempts` times, or `None` when the
    /// tiers are exhausted and it belongs in the parking lot.
    pub fn retry_queue_for(&self, attempts: u32) -> Option<String> {
        self.retry_tiers()
            .nth(attempts.saturating_sub(1) as usize)
            .map(|(name, _)| name)
    }

    pub fn retry_tier_count(&self) -> usize {
        self.retry_delays.len()
    }
}

fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0 => format!("{}ms", d.as_millis()),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

fn s(v: &str) -> AMQPValue {
    AMQPValue::LongString(v.into())
}

fn quorum_args() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), s("quorum"));
    args
}

/// Declare everything. Idempotent and safe to run from many processes at once: the broker
/// treats an identical re-declaration as a no-op.
///
/// RabbitMQ cannot change a queue's arguments in place, so a queue declared by an older
/// version with other ones (an older delivery limit, a retry tier that dead-letters through the
/// topic exchange) is used as it is, passively, with a warning that says what to do, rather
/// than refusing to run. Such tiers still work: the exchange they dead-letter to is declared
/// and bound below.
pub async fn declare(connection: &Connection, names: &Names) -> lapin::Result<()> {
    let mut channel = connection.create_channel().await?;
    channel
        .exchange_declare(
            names.events_exchange.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;

    // The parking lot is browsed with get + requeue (`catena-ingest parked list`); each
    // requeue counts as a delivery, and RabbitMQ 4.x drops quorum messages past the default
    // limit of 20. A huge explicit limit means browsing can never drop a parked message.
    let mut parked = quorum_args();
    parked.insert(
        "x-delivery-limit".into(),
        AMQPValue::LongLongInt(PARKED_DELIVERY_LIMIT),
    );
    declare_queue(connection, &mut channel, &names.parked_queue, parked).await?;

    let mut main = quorum_args();
    main.insert(
        "x-delivery-limit".into(),
        AMQPValue::LongLongInt(DELIVERY_LIMIT),
    );
    main.insert("x-dead-letter-exchange".into(), s(""));
    main.insert("x-dead-letter-routing-key".into(), s(&names.parked_queue));
    main.insert("x-dead-letter-strategy".into(), s("at-least-once"));
    main.insert("x-overflow".into(), s("reject-publish"));
    declare_queue(connection, &mut channel, &names.events_queue, main).await?;
    channel
        .queue_bind(
            names.events_queue.as_str().into(),
            names.events_exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;

    for (queue, delay) in names.retry_tiers() {
        let mut args = quorum_args();
        args.insert(
            "x-message-ttl".into(),
            AMQPValue::LongLongInt(delay.as_millis() as i64),
        );
        args.insert("x-dead-letter-exchange".into(), s(""));
        args.insert("x-dead-letter-routing-key".into(), s(&names.events_queue));
        args.insert("x-dead-letter-strategy".into(), s("at-least-once"));
        args.insert("x-overflow".into(), s("reject-publish"));
        declare_queue(connection, &mut channel, &queue, args).await?;
    }
    let _ = channel.close(200, "topology declared".into()).await;
    Ok(())
}

/// Declare one durable queue; if it exists with other arguments, use it as it is (the failed
/// declaration closed the channel: continue on a new one).
async fn declare_queue(
    connection: &Connection,
    channel: &mut Channel,
    queue: &str,
    args: FieldTable,
) -> lapin::Result<()> {
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let name: ShortString = queue.into();
    match channel.queue_declare(name.clone(), durable, args).await {
        Err(error) if error.to_string().contains("PRECONDITION_FAILED") => {
            tracing::warn!(
                queue,
                %error,
                "the queue exists with other arguments (declared by an older version); using it \
                 as it is. To take the new ones, drain and delete it while nothing publishes to \
                 it, then restart a worker"
            );
            *channel = connection.create_channel().await?;
            let passive = QueueDeclareOptions {
                passive: true,
                ..durable
            };
            channel
                .queue_declare(name, passive, FieldTable::default())
                .await
                .map(drop)
        }
        other => other.map(drop),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_tiers() {
        let n = Names::new("t1");
        assert_eq!(n.events_queue, "t1.events");
        let tiers: Vec<_> = n.retry_tiers().map(|(q, _)| q).collect();
        assert_eq!(
            tiers,
            ["t1.retry.5s", "t1.retry.30s", "t1.retry.5m", "t1.retry.30m"]
        );
        assert_eq!(n.retry_queue_for(1).as_deref(), Some("t1.retry.5s"));
        assert_eq!(n.retry_queue_for(4).as_deref(), Some("t1.retry.30m"));
        assert_eq!(n.retry_queue_for(5), None);
        let fast = Names::with_retry_delays("t", "200ms".parse().unwrap());
        assert_eq!(fast.retry_queue_for(1).as_deref(), Some("t.retry.200ms"));
    }

    #[test]
    fn retry_delays_round_trip_through_their_text() {
        let default = RetryDelays::default();
        assert_eq!(default.to_string(), "5s,30s,5m,30m");
        assert_eq!(default.to_string().parse::<RetryDelays>(), Ok(default));
        assert_eq!("1s, 2s".parse::<RetryDelays>().unwrap().0.len(), 2);
        assert!("".parse::<RetryDelays>().is_err());
    }
}
