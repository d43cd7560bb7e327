//! The whole pipeline (relay -> RabbitMQ -> worker -> PostgreSQL), real servers, no mocks.

mod common;

use std::time::{Duration, Instant};

use catena_ingest::scenario::{duplicated_and_shuffled, in_order};
use catena_ingest::topology::Names;
use common::*;

const EVENTS: &str = "SELECT count(*) FROM webhook_events";

fn secrets() -> String {
    format!("{WEBHOOK_ID}={SECRET}")
}

#[tokio::test]
async fn duplicated_shuffled_stream_through_the_relay_converges() {
    let names = Names::new(&unique("conv"));
    let (db, reference) = (fresh_db("conv").await, fresh_db("conv_ref").await);
    let events = scenario(200, 42);
    let expected = {
        apply_in_order(&reference, &events).await;
        snapshot(&reference).await
    };
    let relay = spawn_relay(names.clone(), AMQP_URL, &secrets()).await;
    let (worker, stop_worker) = spawn_worker(names.clone(), &db, AMQP_URL).await;

    let deliveries = duplicated_and_shuffled(&events, 0.3, 7);
    assert!(
        deliveries.len() > events.len() + 500,
        "the stream really carries duplicates"
    );
    let report = send_deliveries(&relay.url, &events, &deliveries, 32).await;
    assert_eq!(report.accepted as usize, deliveries.len(), "{report:?}");

    let got = wait_for_count(&db, EVENTS, events.len() as i64, Duration::from_secs(120)).await;
    assert_eq!(got, events.len() as i64);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_same_state(&expected, &snapshot(&db).await);
    assert_eq!(
        queue_len(&names.parked_queue).await,
        0,
        "no valid message parked"
    );

    // The worker's own accounting: every event applied or ignored once, the rest duplicates.
    let metrics = catena_ingest::metrics::render(&worker.registry);
    let sum = |outcome: &str| -> u64 {
        metrics
            .lines()
            .filter(|l| {
                l.starts_with("catena_worker_events_total")
                    && l.contains(&format!("outcome=\"{outcome}\""))
            })
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum()
    };
    assert_eq!(sum("applied") + sum("ignored"), events.len() as u64);
    assert_eq!(sum("duplicate"), (deliveries.len() - events.len()) as u64);

    stop_worker.trigger();
    worker.handle.await.unwrap();
    relay.stop().await;
    delete_topology(&names).await;
    drop_db(&db).await;
    drop_db(&reference).await;
}

#[tokio::test]
async fn poison_messages_are_parked_with_a_reason_and_the_worker_goes_on() {
    let names = Names::new(&unique("poison"));
    let db = fresh_db("poison").await;
    let relay = spawn_relay(names.clone(), AMQP_URL, &secrets()).await;
    let (worker, stop_worker) = spawn_worker(names.clone(), &db, AMQP_URL).await;
    let client = reqwest::Client::new();

    // Authentic (signed) but broken bodies: the relay accepts them, the worker parks them.
    assert_eq!(Post::new(b"{not json").send(&client, &relay.url).await, 202);
    let missing_id = br#"{"version":"1.0","event_name":"connection.staled","webhook_id":"w","id":"019abf9d-c820-71e2-8a6a-63ec24ede6a4","data":[{"source_name":"samsara","status":"stale"}]}"#;
    assert_eq!(Post::new(missing_id).send(&client, &relay.url).await, 202);
    let future_major =
        br#"{"version":"9.0","event_name":"connection.staled","webhook_id":"w","data":[]}"#;
    assert_eq!(Post::new(future_major).send(&client, &relay.url).await, 202);
    // And a good one after them.
    let good = fixture("events/05-connection.created.json");
    assert_eq!(Post::new(&good).send(&client, &relay.url).await, 202);

    assert_eq!(
        wait_for_count(&db, EVENTS, 1, Duration::from_secs(30)).await,
        1
    );
    let parked = drain(&names.parked_queue, Duration::from_secs(2)).await;
    let mut reasons: Vec<_> = parked
        .iter()
        .map(|m| m.headers["x-park-reason"].clone())
        .collect();
    reasons.sort();
    assert_eq!(
        reasons,
        ["invalid_record", "malformed", "unsupported_version"]
    );
    for message in &parked {
        assert!(message.headers.contains_key("x-parked-at"));
        assert_eq!(message.headers["x-catena-ingest-attempts"], "1");
        assert!(!message.headers["x-park-detail"].is_empty());
    }
    stop_worker.trigger();
    worker.handle.await.unwrap();
    relay.stop().await;
    delete_topology(&names).await;
    drop_db(&db).await;
}

#[tokio::test]
async fn three_competing_worker_processes_apply_each_event_once() {
    let prefix = unique("compete");
    let names = Names::new(&prefix);
    let (db, reference) = (fresh_db("compete").await, fresh_db("compete_ref").await);
    let events = scenario(150, 3);
    apply_in_order(&reference, &events).await;
    let relay = spawn_relay(names.clone(), AMQP_URL, &secrets()).await;
    let mut workers: Vec<_> = (0..3)
        .map(|_| worker_process(&prefix, &db, AMQP_URL, &[("WORKER_BATCH_SIZE", "50")]))
        .collect();

    let deliveries = duplicated_and_shuffled(&events, 0.25, 11);
    let report = send_deliveries(&relay.url, &events, &deliveries, 32).await;
    assert_eq!(report.accepted as usize, deliveries.len());
    let got = wait_for_count(&db, EVENTS, events.len() as i64, Duration::from_secs(120)).await;
    assert_eq!(got, events.len() as i64);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_same_state(&snapshot(&reference).await, &snapshot(&db).await);
    assert_eq!(queue_len(&names.parked_queue).await, 0);
    assert_eq!(queue_len(&names.events_queue).await, 0);

    for worker in &mut workers {
        signal(worker, "TERM");
    }
    for mut worker in workers {
        assert!(worker.wait().unwrap().success());
    }
    relay.stop().await;
    delete_topology(&names).await;
    drop_db(&db).await;
    drop_db(&reference).await;
}

#[tokio::test]
async fn sigterm_under_load_exits_cleanly_and_loses_nothing() {
    let prefix = unique("term");
    let names = Names::new(&prefix);
    let (db, reference) = (fresh_db("term").await, fresh_db("term_ref").await);
    let events = scenario(150, 5);
    apply_in_order(&reference, &events).await;
    let relay = spawn_relay(names.clone(), AMQP_URL, &secrets()).await;
    let mut worker = worker_process(
        &prefix,
        &db,
        AMQP_URL,
        &[("WORKER_BATCH_SIZE", "20"), ("WORKER_DRAIN_SECONDS", "10s")],
    );

    let deliveries = in_order(&events);
    let send = {
        let (url, events) = (relay.url.clone(), events.clone());
        tokio::spawn(async move { send_deliveries(&url, &events, &deliveries, 8).await })
    };
    // Stop the worker mid-stream, once it has applied some but not all.
    wait_for_count(&db, EVENTS, 200, Duration::from_secs(60)).await;
    let stopped = Instant::now();
    signal(&worker, "TERM");
    let status = tokio::task::spawn_blocking(move || worker.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "worker exits 0 on SIGTERM: {status:?}");
    assert!(
        stopped.elapsed() < Duration::from_secs(12),
        "within the drain deadline"
    );
    let applied_at_stop = count(&db, EVENTS).await;
    assert!(applied_at_stop < events.len() as i64, "stopped mid-stream");

    let report = send.await.unwrap();
    assert_eq!(report.accepted as usize, events.len());
    // A fresh worker finishes the rest; nothing was lost, nothing applied twice.
    let mut worker = worker_process(&prefix, &db, AMQP_URL, &[]);
    let got = wait_for_count(&db, EVENTS, events.len() as i64, Duration::from_secs(120)).await;
    assert_eq!(got, events.len() as i64);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_same_state(&snapshot(&reference).await, &snapshot(&db).await);
    signal(&worker, "TERM");
    assert!(
        tokio::task::spawn_blocking(move || worker.wait().unwrap())
            .await
            .unwrap()
            .success()
    );
    relay.stop().await;
    delete_topology(&names).await;
    drop_db(&db).await;
    drop_db(&reference).await;
}

#[tokio::test]
async fn a_message_that_panics_the_handler_is_parked_and_the_pool_goes_on() {
    let names = Names::new(&unique("panic"));
    let db = fresh_db("panic").await;
    let relay = spawn_relay(names.clone(), AMQP_URL, &secrets()).await;
    let (worker, stop_worker) = spawn_worker(names.clone(), &db, AMQP_URL).await;
    let client = reqwest::Client::new();
    let poison = format!(
        r#"{{"version":"1.0","event_name":"{}","webhook_id":"{WEBHOOK_ID}","id":"019abf9d-0000-7000-8000-00000000dead","data":[]}}"#,
        catena_ingest::state::TEST_PANIC_EVENT
    );
    for body in [
        fixture("events/01-invitation.created.json"),
        poison.into_bytes(),
        fixture("events/05-connection.created.json"),
    ] {
        assert_eq!(Post::new(&body).send(&client, &relay.url).await, 202);
    }
    assert_eq!(
        wait_for_count(&db, EVENTS, 2, Duration::from_secs(30)).await,
        2
    );
    let parked = drain(&names.parked_queue, Duration::from_secs(2)).await;
    assert_eq!(parked.len(), 1);
    assert_eq!(parked[0].headers["x-park-reason"], "handler_panic");
    // The pool keeps working after the panic.
    assert_eq!(
        Post::new(&fixture("events/06-fleet_connection.created.json"))
            .send(&client, &relay.url)
            .await,
        202
    );
    assert_eq!(
        wait_for_count(&db, EVENTS, 3, Duration::from_secs(30)).await,
        3
    );
    stop_worker.trigger();
    worker.handle.await.unwrap();
    relay.stop().await;
    delete_topology(&names).await;
    drop_db(&db).await;
}
