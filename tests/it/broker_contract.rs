//! The broker contract (README, "Broker contract"): the relay publishes into `<prefix>.events`
//! through the default exchange, concurrent requests share a message (a group) and each still
//! gets its own answer, the worker unpacks a group into events that each keep their own dedup
//! key and their own way to the parking lot, messages of the shape before are still consumed,
//! and routing by event name is an opt-in. Real RabbitMQ (3.10 here, 4.x in `.ci/run`'s
//! broker group), real PostgreSQL.

use std::time::Duration;

use catena_ingest::broker::{self, EventRouting, Publisher};
use catena_ingest::message::{self, EventMeta, Producer};
use catena_ingest::shutdown::Shutdown;
use lapin::options::{QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable};

use crate::helpers::http::metric_value;
use crate::helpers::load::send_once;
use crate::helpers::*;

/// Requests carried per broker message, from the relay's `catena_relay_group_events`:
/// (messages, requests).
async fn grouping(p: &TestPipeline) -> (f64, f64) {
    let metrics = p.relay_metrics().await;
    (
        metric_value(&metrics, "catena_relay_group_events_count").unwrap_or(0.0),
        metric_value(&metrics, "catena_relay_group_events_sum").unwrap_or(0.0),
    )
}

async fn test_publisher(names: &broker::Names) -> (Publisher, Shutdown) {
    let shutdown = Shutdown::new();
    let publisher = Publisher::start(
        amqp_url(),
        "test publisher",
        names.clone(),
        1,
        shutdown.clone(),
    );
    assert!(publisher.wait_ready(Duration::from_secs(10)).await);
    (publisher, shutdown)
}

/// One confirm channel and many concurrent requests: requests that arrive while a confirm is
/// outstanding share the next message. Every request is answered 202, the queue holds fewer
/// messages than requests, and the worker applies each event exactly once.
#[tokio::test]
async fn concurrent_requests_share_messages_and_each_event_is_applied_once() {
    let events = scenario(60, 151);
    let mut p = TestPipeline::builder("group")
        .reference(&events)
        .relay_config(|c| c.relay.publish_channels = 1)
        .start()
        .await;
    let report = p.send_deliveries(&events, &in_order(&events), 64).await;
    assert_eq!(report.accepted as usize, events.len(), "{report:?}");

    let (messages, requests) = grouping(&p).await;
    assert_eq!(requests as usize, events.len(), "every request was carried");
    let queued = p.events_queue_len().await as usize;
    assert_eq!(
        queued, messages as usize,
        "one queued message per broker message"
    );
    assert!(
        queued < events.len() / 2,
        "concurrent requests shared messages: {queued} messages for {} events",
        events.len()
    );

    p.start_worker().await;
    p.assert_converged(events.len(), Duration::from_secs(90))
        .await;
    assert_eq!(p.parked_len().await, 0, "nothing valid parked");
    assert_eq!(
        p.count("SELECT count(*) FROM webhook_events WHERE received_at IS NULL")
            .await,
        0,
        "each event kept its own receive time"
    );
    p.stop().await;
}

/// A group with a poison event, a duplicate and good events: the good ones are applied, the
/// duplicate once, the poison one parked alone as a single message with its own metadata
/// (before the group is acked); `parked` shows it under its event name and replays it alone.
#[tokio::test]
async fn a_poison_event_inside_a_group_is_parked_alone_and_replayed_alone() {
    let events = scenario(1, 152);
    let good: Vec<&crate::helpers::load::Event> = events.iter().take(3).collect();
    let mut p = TestPipeline::builder("grouppoison").start().await;
    let (publisher, shutdown) = test_publisher(&p.names).await;

    let now = chrono::Utc::now();
    let meta = |request: &str, event_name: &str| {
        let catena = message::CatenaHeaders {
            webhook_id: Some(WEBHOOK_ID),
            request_id: Some(request),
            delivery_attempt: Some("1"),
            ..Default::default()
        };
        EventMeta::of_request(&catena, event_name, now)
    };
    let poison_body = b"{not json, but signed".to_vec();
    let mut entries: Vec<(EventMeta<'static>, Vec<u8>)> = good
        .iter()
        .enumerate()
        .map(|(i, e)| (meta(&format!("req-{i}"), &e.event_name), e.body(1)))
        .collect();
    entries.insert(
        1,
        (meta("req-poison", "connection.staled"), poison_body.clone()),
    );
    entries.push((meta("req-dup", &good[0].event_name), good[0].body(2)));
    let body = message::encode_group(entries.iter().map(|(m, b)| (m, b.as_slice())));
    publisher
        .publish(
            "",
            &p.names.events_queue,
            &body,
            message::group_properties(now, Producer::Relay),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    shutdown.trigger();

    p.start_worker().await;
    assert_eq!(p.wait_for_applied(3, Duration::from_secs(30)).await, 3);
    assert!(
        wait_until(Duration::from_secs(10), || async {
            p.parked_len().await == 1 && p.events_queue_len().await == 0
        })
        .await,
        "the poison event parked, the group acked"
    );
    let metrics = p.worker_registry_text();
    let outcome = |o: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| {
                l.starts_with("catena_worker_events_total")
                    && l.contains(&format!("outcome=\"{o}\""))
            })
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
            .sum()
    };
    assert_eq!(outcome("duplicate"), 1.0, "the duplicate entry, once");
    assert_eq!(outcome("parked"), 1.0, "the poison entry alone");

    let listed = catena_ingest::ops::parked::list(amqp_url(), &p.names, &Default::default(), 10)
        .await
        .unwrap();
    assert_eq!(listed.len(), 1);
    let parked = &listed[0];
    assert_eq!(parked.event_name, "connection.staled");
    assert_eq!(parked.reason, "malformed");
    assert_eq!(parked.bytes, poison_body.len(), "the poison body alone");
    assert_eq!(parked.headers["x-request-id"], "req-poison");
    assert_eq!(parked.headers["x-webhook-id"], WEBHOOK_ID);
    assert!(parked.received_at.is_some());

    // Replayed alone, it comes back and (still poison) is parked again, marked as replayed.
    let options = catena_ingest::ops::parked::ReplayOptions {
        force: true,
        ..catena_ingest::ops::parked::ReplayOptions::new(&Default::default())
    };
    let report =
        catena_ingest::ops::parked::replay(amqp_url(), &p.names, &Default::default(), &options)
            .await
            .unwrap();
    assert_eq!(report.replayed, 1);
    let again = eventually_parked(&p).await;
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].body, poison_body);
    assert!(again[0].headers.contains_key(message::REPLAYED_AT));
    assert!(!message::is_group(&again[0].properties));
    assert_eq!(p.applied().await, 3, "the replay applied nothing twice");
    p.stop().await;
}

async fn eventually_parked(p: &TestPipeline) -> Vec<crate::helpers::broker::Taken> {
    eventually(
        Duration::from_secs(20),
        || p.drain_parked(Duration::from_millis(200)),
        |parked| !parked.is_empty(),
    )
    .await
}

/// A grouped message the broker returns (its queue is gone) answers 503 to every request it
/// carried, fast; once the queue is back, the same requests are accepted.
#[tokio::test]
async fn a_returned_group_answers_503_to_every_request_it_carries() {
    let events = scenario(20, 153);
    let p = TestPipeline::builder("groupret")
        .relay_config(|c| c.relay.publish_channels = 1)
        .start()
        .await;
    let connection = broker::connect(amqp_url(), "test queue remover")
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel
        .queue_delete(
            p.names.events_queue.as_str().into(),
            QueueDeleteOptions::default(),
        )
        .await
        .unwrap();

    let started = std::time::Instant::now();
    let report = send_once(&p.relay_url(), &events, 64).await;
    let elapsed = started.elapsed();
    assert_eq!(report.accepted, 0, "{report:?}");
    assert_eq!(
        report.statuses.get("503").copied().unwrap_or(0) as usize,
        events.len(),
        "every request of every returned message: 503: {report:?}"
    );
    let (messages, requests) = grouping(&p).await;
    assert_eq!(requests as usize, events.len());
    assert!(
        messages < requests,
        "the 503s came from grouped messages ({messages} for {requests})"
    );
    assert!(
        elapsed < Duration::from_secs(10),
        "answered without waiting for a deadline: {elapsed:?}"
    );

    broker::topology::declare(&connection, &p.names)
        .await
        .unwrap();
    let _ = connection.close(200, "done".into()).await;
    let report = p.send_deliveries(&events, &in_order(&events), 64).await;
    assert_eq!(report.accepted as usize, events.len(), "{report:?}");
    assert_eq!(p.events_queue_len().await as usize, {
        let (m, _) = grouping(&p).await;
        m as usize - messages as usize
    });
    p.stop().await;
}

/// A black-holed broker: every request of every message in flight answers 503 within the
/// confirm deadline (not Catena's 3 s), and the relay recovers when the broker is back.
#[tokio::test]
async fn a_group_without_a_confirm_answers_503_within_the_deadline() {
    let events = scenario(10, 154);
    let p = TestPipeline::builder("groupto")
        .relay_config(|c| {
            c.relay.publish_channels = 1;
            c.relay.confirm_timeout = Duration::from_millis(800);
        })
        .relay_via_broker_proxy()
        .start()
        .await;
    assert_eq!(
        p.send(&fixture("events/05-connection.created.json")).await,
        202
    );
    p.broker_proxy().black_hole();
    let started = std::time::Instant::now();
    let report = send_once(&p.relay_url(), &events, 32).await;
    let elapsed = started.elapsed();
    assert_eq!(report.accepted, 0, "{report:?}");
    assert_eq!(
        report.statuses.get("503").copied().unwrap_or(0) as usize,
        events.len(),
        "{report:?}"
    );
    assert!(
        report.latency_ms_max < 2_500.0,
        "each 503 inside Catena's 3 s: max {} ms",
        report.latency_ms_max
    );
    assert!(elapsed < Duration::from_secs(10));
    p.broker_proxy().restore();
    assert!(
        wait_until(Duration::from_secs(30), || async {
            p.send(&fixture("events/05-connection.created.json")).await == 202
        })
        .await,
        "accepted again once the broker answers"
    );
    p.stop().await;
}

/// Properties as the relay wrote them before the one-header shape.
fn old_shape(
    event_name: &str,
    received_at: chrono::DateTime<chrono::Utc>,
) -> lapin::BasicProperties {
    let mut headers = FieldTable::default();
    let text = |v: &str| AMQPValue::LongString(v.into());
    let request_id = uuid::Uuid::new_v4().to_string();
    for (name, value) in [
        (message::WEBHOOK_ID, WEBHOOK_ID),
        (message::REQUEST_ID, request_id.as_str()),
        (message::EVENT_TYPE, event_name),
        (message::SCHEMA_VERSION, "1.0"),
        (message::SOURCE, "catena-notifications"),
        (message::DELIVERY_ATTEMPT, "1"),
        (message::CATENA_TIMESTAMP, "2026-11-30T10:00:00+00:00"),
    ] {
        headers.insert(name.into(), text(value));
    }
    headers.insert(
        message::RECEIVED_AT.into(),
        text(&received_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)),
    );
    lapin::BasicProperties::default()
        .with_content_type("application/json".into())
        .with_message_id(request_id.as_str().into())
        .with_timestamp(received_at.timestamp() as u64)
        .with_app_id("catena-ingest-relay".into())
        .with_headers(headers)
}

/// An upgrade: the queues hold messages of the shape before (published to the topic exchange
/// by event name, one header per Catena header), one of them in a retry tier declared the old
/// way (dead-lettering through the topic exchange). A new worker declares around the old tier
/// and applies every event once, with its receive time.
#[tokio::test]
async fn messages_of_the_shape_before_are_consumed_after_the_upgrade() {
    let events = scenario(10, 155);
    let mut p = TestPipeline::builder("oldshape")
        .reference(&events)
        .start()
        .await;
    let connection = broker::connect(amqp_url(), "test old relay").await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    // The first retry tier as the version before declared it.
    let (tier, delay) = p.names.retry_tiers().next().unwrap();
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    args.insert(
        "x-message-ttl".into(),
        AMQPValue::LongLongInt(delay.as_millis() as i64),
    );
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(p.names.events_exchange.as_str().into()),
    );
    args.insert(
        "x-dead-letter-strategy".into(),
        AMQPValue::LongString("at-least-once".into()),
    );
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    channel
        .queue_declare(
            tier.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await
        .unwrap();
    let _ = connection.close(200, "done".into()).await;

    // The topology of the new version around it (what the old relay's exchange also was).
    let (publisher, shutdown) = test_publisher(&p.names).await;
    let received_at = chrono::Utc::now() - chrono::Duration::seconds(3);
    for (i, event) in events.iter().enumerate() {
        let properties = old_shape(&event.event_name, received_at);
        let (exchange, routing_key) = if i == 0 {
            ("", tier.as_str()) // waiting out its retry delay
        } else {
            (p.names.events_exchange.as_str(), event.event_name.as_str())
        };
        publisher
            .publish(
                exchange,
                routing_key,
                &event.body(1),
                properties,
                Duration::from_secs(5),
            )
            .await
            .unwrap();
    }
    shutdown.trigger();

    p.start_worker().await;
    p.assert_converged(events.len(), Duration::from_secs(60))
        .await;
    assert_eq!(p.parked_len().await, 0);
    let late = p
        .count(&format!(
            "SELECT count(*) FROM webhook_events WHERE received_at < '{}'::timestamptz + interval '1 second'",
            received_at.to_rfc3339()
        ))
        .await;
    assert_eq!(
        late as usize,
        events.len(),
        "the old receive time header was read"
    );
    p.stop().await;
}

/// `CATENA_EVENT_ROUTING=topic`: one message per request, through the topic exchange keyed by
/// event name, so another consumer can bind by event name; the worker applies them as usual.
#[tokio::test]
async fn topic_routing_is_an_opt_in_with_one_event_per_message() {
    let events = scenario(10, 156);
    let mut p = TestPipeline::builder("topic")
        .reference(&events)
        .relay_config(|c| {
            c.broker.event_routing = EventRouting::Topic;
            c.relay.publish_channels = 1;
        })
        .start()
        .await;
    let side = format!("{}.side", p.names.prefix);
    let connection = broker::connect(amqp_url(), "test side consumer")
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel
        .queue_declare(
            side.as_str().into(),
            QueueDeclareOptions {
                auto_delete: false,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .queue_bind(
            side.as_str().into(),
            p.names.events_exchange.as_str().into(),
            "connection.*".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();

    let report = p.send_deliveries(&events, &in_order(&events), 32).await;
    assert_eq!(report.accepted as usize, events.len(), "{report:?}");
    assert_eq!(
        p.events_queue_len().await as usize,
        events.len(),
        "one message per request"
    );
    let connection_events = events
        .iter()
        .filter(|e| e.event_name.starts_with("connection."))
        .count();
    assert!(connection_events > 0);
    let side_messages = crate::helpers::broker::drain(&side, Duration::from_millis(300)).await;
    assert_eq!(side_messages.len(), connection_events);
    assert!(
        side_messages
            .iter()
            .all(|m| m.routing_key.starts_with("connection.") && m.routing_key == m.event_name)
    );
    channel
        .queue_delete(side.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    let _ = connection.close(200, "done".into()).await;

    p.start_worker().await;
    p.assert_converged(events.len(), Duration::from_secs(60))
        .await;
    p.stop().await;
}
