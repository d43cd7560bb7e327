//! The broker side: take messages off a queue, count a queue, and a test prefix's topology
//! ([`TestTopology`]) deleted on drop.

use std::collections::BTreeMap;
use std::time::Duration;

use catena_ingest::{broker, message};
use lapin::options::{
    BasicAckOptions, BasicGetOptions, ExchangeDeleteOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::FieldTable;

use super::amqp_url;

/// The exchange and queue names a prefix (`CATENA_NAME_PREFIX`) derives.
pub use catena_ingest::broker::Names;

/// A message taken off a queue.
pub struct Taken {
    pub body: Vec<u8>,
    pub routing_key: String,
    /// The event name it travels under (`type`, else the shape before's routing key).
    pub event_name: String,
    /// Its headers, and its Catena metadata under Catena's header names whichever AMQP field
    /// carries it.
    pub headers: BTreeMap<String, String>,
    pub properties: lapin::BasicProperties,
}

/// Take every message currently in `queue`, waiting up to `settle` for stragglers.
pub async fn drain(queue: &str, settle: Duration) -> Vec<Taken> {
    let connection = broker::connect(amqp_url(), "test drain").await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + settle;
    loop {
        match channel
            .basic_get(queue.into(), BasicGetOptions::default())
            .await
            .unwrap()
        {
            Some(message) => {
                let delivery = message.delivery;
                let properties = &delivery.properties;
                let mut headers: BTreeMap<String, String> = properties
                    .headers()
                    .as_ref()
                    .map(|t| {
                        t.inner()
                            .keys()
                            .map(|k| {
                                let text = message::header_text(properties, k.as_str());
                                (k.to_string(), text.unwrap_or_default().into_owned())
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                for (name, value) in message::meta_of(properties).fields() {
                    headers.entry(name.to_owned()).or_insert(value);
                }
                out.push(Taken {
                    body: delivery.data.clone(),
                    routing_key: delivery.routing_key.to_string(),
                    event_name: message::event_name_of(properties, delivery.routing_key.as_str())
                        .to_owned(),
                    headers,
                    properties: properties.clone(),
                });
                delivery.ack(BasicAckOptions::default()).await.unwrap();
            }
            None if tokio::time::Instant::now() >= deadline => break,
            None => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let _ = connection.close(200, "done".into()).await;
    out
}

/// Count of messages ready in a queue (declared passively).
pub async fn queue_len(queue: &str) -> u32 {
    queue_len_at(amqp_url(), queue).await
}

/// [`queue_len`] on the broker (or cluster nodes) at `url`.
pub async fn queue_len_at(url: &str, queue: &str) -> u32 {
    let connection = broker::connect(url, "test count").await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    let q = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let _ = connection.close(200, "done".into()).await;
    q.message_count()
}

/// Every queue and the exchange of a test prefix, deleted on drop (also when the test panicked).
/// Whatever declared them (a relay, a worker, a child process) must be stopped first, or it may
/// declare them again: `TestPipeline` orders that.
pub struct TestTopology {
    pub names: Names,
}

impl Drop for TestTopology {
    fn drop(&mut self) {
        let names = self.names.clone();
        super::clean_up_on_own_thread(format!("topology {}", names.prefix), async move {
            delete_topology(&names).await
        });
    }
}

async fn delete_topology(names: &Names) -> Result<(), String> {
    let connection = broker::connect(amqp_url(), "test cleanup")
        .await
        .map_err(|e| e.to_string())?;
    let channel = connection
        .create_channel()
        .await
        .map_err(|e| e.to_string())?;
    let mut queues = vec![names.events_queue.clone(), names.parked_queue.clone()];
    queues.extend(names.retry_tiers().map(|(q, _)| q));
    let mut failed = Vec::new();
    for q in queues {
        if let Err(e) = channel
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await
        {
            failed.push(format!("queue {q}: {e}"));
        }
    }
    if let Err(e) = channel
        .exchange_delete(
            names.events_exchange.as_str().into(),
            ExchangeDeleteOptions::default(),
        )
        .await
    {
        failed.push(format!("exchange {}: {e}", names.events_exchange));
    }
    let _ = connection.close(200, "done".into()).await;
    if failed.is_empty() {
        Ok(())
    } else {
        Err(failed.join("; "))
    }
}

/// Put `body` straight into the parking lot, as the worker would have: with the headers the
/// worker writes (`catena_ingest::message`), received at `received_at`, parked 40 minutes
/// later, after `attempts` failed attempts.
pub async fn park_directly(
    publisher: &broker::Publisher,
    queue: &str,
    body: &[u8],
    event_name: &str,
    reason: message::ParkReason,
    received_at: chrono::DateTime<chrono::Utc>,
    attempts: u32,
) {
    let meta = message::EventMeta::of_request(&Default::default(), event_name, received_at);
    let received = message::event_properties(&meta, message::Producer::Relay);
    let failed = message::retry_properties(&received, event_name, attempts.saturating_sub(1));
    let parked = message::park_properties(
        &failed,
        event_name,
        reason,
        "parked by the test",
        received_at + chrono::Duration::minutes(40),
    );
    publisher
        .publish("", queue, body, parked, Duration::from_secs(5))
        .await
        .unwrap();
}

/// Put each `(event_name, body)` straight into `names`' events queue as the relay would have,
/// received at `received_at` (messages that waited in the queue since then), 64 at a time.
pub async fn publish_received_at(
    names: &Names,
    events: &[(String, Vec<u8>)],
    received_at: chrono::DateTime<chrono::Utc>,
) {
    let shutdown = catena_ingest::shutdown::Shutdown::new();
    let publisher = broker::Publisher::start(
        amqp_url(),
        "test late publisher",
        names.clone(),
        1,
        shutdown.clone(),
    );
    assert!(publisher.wait_ready(Duration::from_secs(10)).await);
    use futures::StreamExt;
    futures::stream::iter(events)
        .for_each_concurrent(64, |(event_name, body)| {
            let publisher = &publisher;
            async move {
                let request_id = uuid::Uuid::new_v4().to_string();
                let catena = message::CatenaHeaders {
                    request_id: Some(&request_id),
                    ..Default::default()
                };
                let meta = message::EventMeta::of_request(&catena, event_name, received_at);
                let properties = message::event_properties(&meta, message::Producer::Relay);
                publisher
                    .publish(
                        "",
                        &names.events_queue,
                        body,
                        properties,
                        Duration::from_secs(10),
                    )
                    .await
                    .unwrap();
            }
        })
        .await;
    shutdown.trigger();
}
