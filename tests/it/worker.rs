//! The whole pipeline (relay -> RabbitMQ -> worker -> PostgreSQL), real servers, no mocks.

use std::time::{Duration, Instant};

use crate::helpers::*;

#[tokio::test]
async fn duplicated_shuffled_stream_through_the_relay_converges() {
    let events = scenario(200, 42);
    let p = TestPipeline::builder("conv")
        .reference(&events)
        .relay()
        .worker()
        .start()
        .await;

    let deliveries = duplicated_and_shuffled(&events, 0.3, 7);
    assert!(
        deliveries.len() > events.len() + 500,
        "the stream really carries duplicates"
    );
    let report = p.send_deliveries(&events, &deliveries, 32).await;
    assert_eq!(report.accepted as usize, deliveries.len(), "{report:?}");

    p.assert_converged(events.len(), Duration::from_secs(120))
        .await;
    assert_eq!(p.parked_len().await, 0, "no valid message parked");

    // The worker's own accounting: every event applied or ignored once, the rest duplicates.
    let metrics = p.worker_registry_text();
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
    p.stop().await;
}

#[tokio::test]
async fn poison_messages_are_parked_with_a_reason_and_the_worker_goes_on() {
    let p = TestPipeline::builder("poison")
        .relay()
        .worker()
        .start()
        .await;

    // Authentic (signed) but broken bodies: the relay accepts them, the worker parks them.
    assert_eq!(p.send(b"{not json").await, 202);
    let missing_id = br#"{"version":"1.0","event_name":"connection.staled","webhook_id":"w","id":"019abf9d-c820-71e2-8a6a-63ec24ede6a4","data":[{"source_name":"samsara","status":"stale"}]}"#;
    assert_eq!(p.send(missing_id).await, 202);
    let future_major =
        br#"{"version":"9.0","event_name":"connection.staled","webhook_id":"w","data":[]}"#;
    assert_eq!(p.send(future_major).await, 202);
    // And a good one after them.
    assert_eq!(
        p.send(&fixture("events/05-connection.created.json")).await,
        202
    );

    assert_eq!(p.wait_for_applied(1, Duration::from_secs(30)).await, 1);
    let parked = p.drain_parked(Duration::from_secs(2)).await;
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
    let ids: std::collections::BTreeSet<_> =
        parked.iter().map(|m| &m.headers["x-park-id"]).collect();
    assert_eq!(
        ids.len(),
        parked.len(),
        "each parked copy can be named alone"
    );
    p.stop().await;
}

#[tokio::test]
async fn three_competing_worker_processes_apply_each_event_once() {
    let events = scenario(150, 3);
    let p = TestPipeline::builder("compete")
        .reference(&events)
        .relay()
        .start()
        .await;
    let workers: Vec<_> = (0..3)
        .map(|_| p.worker_process().env("WORKER_BATCH_SIZE", "50").spawn())
        .collect();

    let deliveries = duplicated_and_shuffled(&events, 0.25, 11);
    let report = p.send_deliveries(&events, &deliveries, 32).await;
    assert_eq!(report.accepted as usize, deliveries.len());
    p.assert_converged(events.len(), Duration::from_secs(120))
        .await;
    assert_eq!(p.parked_len().await, 0);
    assert_eq!(p.events_queue_len().await, 0);

    terminate_all(workers).await;
    p.stop().await;
}

#[tokio::test]
async fn sigterm_under_load_exits_cleanly_and_loses_nothing() {
    let events = scenario(150, 5);
    let p = TestPipeline::builder("term")
        .reference(&events)
        .relay()
        .start()
        .await;
    let worker = p
        .worker_process()
        .envs(&[("WORKER_BATCH_SIZE", "20"), ("WORKER_DRAIN_SECONDS", "10s")])
        .spawn();

    let send = p.spawn_deliveries(&events, &in_order(&events), 8);
    // Stop the worker mid-stream, once it has applied some but not all.
    p.wait_for_applied(200, Duration::from_secs(60)).await;
    let stopped = Instant::now();
    worker.signal("TERM");
    let status = worker.wait().await;
    assert!(status.success(), "worker exits 0 on SIGTERM: {status:?}");
    assert!(
        stopped.elapsed() < Duration::from_secs(12),
        "within the drain deadline"
    );
    let applied_at_stop = p.applied().await;
    assert!(applied_at_stop < events.len(), "stopped mid-stream");

    let report = send.await.unwrap();
    assert_eq!(report.accepted as usize, events.len());
    // A fresh worker finishes the rest; nothing was lost, nothing applied twice.
    let worker = p.worker_process().spawn();
    p.assert_converged(events.len(), Duration::from_secs(120))
        .await;
    assert!(worker.terminate().await.success());
    p.stop().await;
}

#[tokio::test]
async fn a_message_that_panics_the_handler_is_parked_and_the_pool_goes_on() {
    let p = TestPipeline::builder("panic")
        .relay()
        .worker()
        .start()
        .await;
    let poison = format!(
        r#"{{"version":"1.0","event_name":"{}","webhook_id":"{WEBHOOK_ID}","id":"019abf9d-0000-7000-8000-00000000dead","data":[]}}"#,
        catena_ingest::state::TEST_PANIC_EVENT
    );
    for body in [
        fixture("events/01-invitation.created.json"),
        poison.into_bytes(),
        fixture("events/05-connection.created.json"),
    ] {
        assert_eq!(p.send(&body).await, 202);
    }
    assert_eq!(p.wait_for_applied(2, Duration::from_secs(30)).await, 2);
    let parked = p.drain_parked(Duration::from_secs(2)).await;
    assert_eq!(parked.len(), 1);
    assert_eq!(parked[0].headers["x-park-reason"], "handler_panic");
    // The pool keeps working after the panic.
    assert_eq!(
        p.send(&fixture("events/06-fleet_connection.created.json"))
            .await,
        202
    );
    assert_eq!(p.wait_for_applied(3, Duration::from_secs(30)).await, 3);
    p.stop().await;
}
