//! Faults done for real: a worker SIGKILLed mid-batch, PostgreSQL and RabbitMQ cut off behind
//! TCP proxies the tests own. After recovery every event is applied exactly once and no valid
//! message is parked.

use std::time::{Duration, Instant};

use crate::helpers::http::{self, http_status, metric_value, wait_http_ok};
use crate::helpers::*;

#[tokio::test]
async fn worker_sigkilled_mid_batch_loses_and_doubles_nothing() {
    let events = scenario(200, 21);
    let p = TestPipeline::builder("kill")
        .reference(&events)
        .relay()
        .start()
        .await;
    let deliveries = duplicated_and_shuffled(&events, 0.2, 21);
    let report = p.send_deliveries(&events, &deliveries, 32).await;
    assert_eq!(report.accepted as usize, deliveries.len());

    // Small batches so the kill lands inside a transaction or between commit and ack.
    let worker = p.worker_process().env("WORKER_BATCH_SIZE", "25").spawn();
    let at_kill = p.wait_for_applied(300, Duration::from_secs(60)).await;
    worker.signal("KILL");
    let killed = worker.wait().await;
    assert!(!killed.success(), "SIGKILL ends the process abruptly");
    assert!(at_kill < events.len(), "killed mid-stream ({at_kill})");

    let second = p.worker_process().spawn();
    p.assert_converged(events.len(), Duration::from_secs(120))
        .await;
    assert_eq!(p.parked_len().await, 0, "no valid message parked");
    assert!(second.terminate().await.success());
    p.stop().await;
}

#[tokio::test]
async fn database_cut_holds_the_work_and_resumes() {
    let events = scenario(150, 8);
    let p = TestPipeline::builder("pgcut")
        .reference(&events)
        .relay()
        .worker_via_db_proxy()
        .worker_config(|config| config.worker.batch_size = 50)
        .start()
        .await;
    let ready = p.worker_endpoint("/readyz");

    let send = p.spawn_deliveries(&events, &in_order(&events), 8);
    p.wait_for_applied(300, Duration::from_secs(60)).await;
    p.db_proxy().cut();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let during = p.applied().await;
    assert_eq!(
        http_status(&ready).await,
        503,
        "not ready while the database is gone"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(p.applied().await, during, "nothing applied while cut");
    p.db_proxy().restore();

    assert_eq!(send.await.unwrap().accepted as usize, events.len());
    p.assert_converged(events.len(), Duration::from_secs(120))
        .await;
    assert_eq!(p.parked_len().await, 0, "no valid message parked");
    assert_eq!(http_status(&ready).await, 200);
    p.stop().await;
}

#[tokio::test]
async fn broker_cut_under_the_worker_recovers_without_loss() {
    let events = scenario(150, 9);
    let p = TestPipeline::builder("mqcut")
        .reference(&events)
        .relay()
        .worker_via_broker_proxy()
        .worker_config(|config| config.worker.batch_size = 50)
        .start()
        .await;
    let ready = p.worker_endpoint("/readyz");

    let deliveries = duplicated_and_shuffled(&events, 0.2, 9);
    let send = p.spawn_deliveries(&events, &deliveries, 8);
    p.wait_for_applied(300, Duration::from_secs(60)).await;
    p.broker_proxy().cut();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        http_status(&ready).await,
        503,
        "not ready while the broker is gone"
    );
    p.broker_proxy().restore();

    assert_eq!(send.await.unwrap().accepted as usize, deliveries.len());
    p.assert_converged(events.len(), Duration::from_secs(120))
        .await;
    assert_eq!(p.parked_len().await, 0, "no valid message parked");
    p.stop().await;
}

/// Sum of `catena_worker_events_total` for one outcome.
fn events_with_outcome(metrics: &str, outcome: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| {
            l.starts_with("catena_worker_events_total")
                && l.contains(&format!("outcome=\"{outcome}\""))
        })
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum()
}

/// A statement cancelled by `statement_timeout` (SQLSTATE 57014) is the batch's trouble, not a
/// database outage: the batch is isolated and sent through a retry tier instead of being re-run
/// in place forever, and everything applies once the slow spell is over.
#[tokio::test]
async fn a_statement_timeout_sends_the_work_to_a_retry_tier() {
    let events = scenario(20, 31);
    let mut p = TestPipeline::builder("stmt_timeout")
        .reference(&events)
        .relay()
        .start()
        .await;
    let admin = p.db().client().await;
    admin
        .batch_execute(&format!(
            "ALTER DATABASE \"{}\" SET statement_timeout = '300ms'",
            p.db().name
        ))
        .await
        .unwrap();
    // Something slow holds a lock every upsert of a connection needs.
    let blocker = p.db().client().await;
    blocker
        .batch_execute(
            "SET statement_timeout = 0; BEGIN; LOCK TABLE connections IN ACCESS EXCLUSIVE MODE",
        )
        .await
        .unwrap();
    p.start_worker().await;
    let report = p.send_deliveries(&events, &in_order(&events), 8).await;
    assert_eq!(report.accepted as usize, events.len());
    let retried = wait_until(Duration::from_secs(20), || async {
        events_with_outcome(&p.worker_registry_text(), "retried") > 0
    })
    .await;
    assert!(retried, "cancelled statements go to a retry tier");
    blocker.batch_execute("COMMIT").await.unwrap();

    p.assert_converged(events.len(), Duration::from_secs(120))
        .await;
    assert_eq!(p.parked_len().await, 0, "no valid message parked");
    p.stop().await;
}

/// A black-holed PostgreSQL (connections open, nothing answered) is noticed within the batch
/// deadline: the connection is dropped, the probe fails, the worker reports not ready, and
/// once the database answers again everything applies exactly once.
#[tokio::test]
async fn a_black_holed_database_is_noticed_within_the_batch_deadline() {
    let events = scenario(150, 32);
    let p = TestPipeline::builder("pghole")
        .reference(&events)
        .relay()
        .worker_via_db_proxy()
        .worker_config(|config| {
            config.worker.batch_size = 50;
            config.worker.batch_deadline = Duration::from_secs(2);
        })
        .start()
        .await;
    let ready = p.worker_endpoint("/readyz");
    let send = p.spawn_deliveries(&events, &in_order(&events), 8);
    p.wait_for_applied(300, Duration::from_secs(60)).await;
    p.db_proxy().black_hole();
    let holed = Instant::now();
    let noticed = wait_until(Duration::from_secs(20), || async {
        http_status(&ready).await == 503
    })
    .await;
    let detection = holed.elapsed();
    assert!(noticed, "not ready within 20 s of the black hole");
    eprintln!("black-holed database noticed after {detection:?}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    p.db_proxy().restore();

    assert_eq!(send.await.unwrap().accepted as usize, events.len());
    p.assert_converged(events.len(), Duration::from_secs(120))
        .await;
    assert_eq!(p.parked_len().await, 0, "no valid message parked");
    assert!(
        wait_until(Duration::from_secs(10), || async {
            http_status(&ready).await == 200
        })
        .await
    );
    p.stop().await;
}

/// Every return of an unacked message to the queue counts against the delivery limit, a lost
/// consumer connection's whole prefetch window included. Twelve connection losses with every
/// message in flight (what a flapping broker or network does to a worker) park nothing.
#[tokio::test]
async fn repeated_connection_losses_park_no_valid_message() {
    use futures::StreamExt;
    use lapin::options::{BasicConsumeOptions, BasicQosOptions};
    let events = scenario(10, 33);
    let mut p = TestPipeline::builder("flaps")
        .reference(&events)
        .relay()
        .start()
        .await;
    let report = p.send_deliveries(&events, &in_order(&events), 8).await;
    assert_eq!(report.accepted as usize, events.len());
    // Concurrent requests may share a message: count messages, not events.
    let messages = p.events_queue_len().await;
    for flap in 0..12 {
        let connection = catena_ingest::broker::connect(amqp_url(), "test flapping consumer")
            .await
            .unwrap();
        let channel = connection.create_channel().await.unwrap();
        channel
            .basic_qos(1000, BasicQosOptions::default())
            .await
            .unwrap();
        let mut consumer = channel
            .basic_consume(
                p.names.events_queue.as_str().into(),
                format!("flap-{flap}").as_str().into(),
                BasicConsumeOptions::default(),
                lapin::types::FieldTable::default(),
            )
            .await
            .unwrap();
        for _ in 0..messages {
            let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next())
                .await
                .expect("every message is delivered again")
                .unwrap();
            assert!(delivery.is_ok());
        }
        // Gone without an ack: every message returns to the queue.
        drop(consumer);
        let _ = connection.close(320, "flap".into()).await;
    }
    p.start_worker().await;
    p.assert_converged(events.len(), Duration::from_secs(120))
        .await;
    assert_eq!(p.parked_len().await, 0, "no valid message parked");
    p.stop().await;
}

/// An events queue declared by an older version with other arguments (another delivery
/// limit) cannot be changed in place: the relay and worker use it as it is instead of
/// refusing to run.
#[tokio::test]
async fn an_events_queue_with_older_arguments_is_used_as_it_is() {
    use lapin::options::QueueDeclareOptions;
    use lapin::types::{AMQPValue, FieldTable};
    let events = scenario(3, 34);
    let mut p = TestPipeline::builder("old_queue")
        .reference(&events)
        .start()
        .await;
    let connection = catena_ingest::broker::connect(amqp_url(), "test old queue")
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    args.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(7));
    channel
        .queue_declare(
            p.names.events_queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await
        .unwrap();
    let _ = connection.close(200, "done".into()).await;

    // The publisher (as the relay's) declares the topology, falling back for this queue.
    let shutdown = catena_ingest::shutdown::Shutdown::new();
    let publisher = catena_ingest::broker::Publisher::start(
        amqp_url(),
        "test publisher",
        p.names.clone(),
        1,
        shutdown.clone(),
    );
    assert!(
        publisher.wait_ready(Duration::from_secs(10)).await,
        "ready despite the older queue"
    );
    let bodies: Vec<(String, Vec<u8>)> = events
        .iter()
        .map(|e| (e.event_name.clone(), e.body(1)))
        .collect();
    broker::publish_received_at(&p.names, &bodies, chrono::Utc::now()).await;
    shutdown.trigger();
    p.start_worker().await;
    p.assert_converged(events.len(), Duration::from_secs(60))
        .await;
    p.stop().await;
}

/// An idle worker whose database goes away reports not-ready within seconds (`/readyz` 503 and
/// `catena_worker_ready` 0), with no event to notice it by, and ready again once it is back.
#[tokio::test]
async fn an_idle_worker_reports_a_lost_database_within_seconds() {
    let p = TestPipeline::builder("pgidle")
        .worker()
        .worker_via_db_proxy()
        .start()
        .await;
    let ready = p.worker_endpoint("/readyz");
    let ready_gauge = || async {
        metric_value(
            &http::get_text(&p.worker_endpoint("/metrics")).await,
            "catena_worker_ready",
        )
    };
    assert!(wait_http_ok(&ready, Duration::from_secs(20)).await);
    p.db_proxy().cut();
    let cut = Instant::now();
    assert!(
        wait_until(Duration::from_secs(10), || async {
            http_status(&ready).await == 503
        })
        .await,
        "not ready within seconds of the loss, with no traffic"
    );
    println!(
        "idle worker not ready {:.1} s after the database cut",
        cut.elapsed().as_secs_f64()
    );
    assert_eq!(ready_gauge().await, Some(0.0));
    p.db_proxy().restore();
    assert!(
        wait_http_ok(&ready, Duration::from_secs(15)).await,
        "ready again"
    );
    assert_eq!(ready_gauge().await, Some(1.0));
    p.stop().await;
}
