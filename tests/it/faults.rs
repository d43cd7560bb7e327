//! Faults done for real: a worker SIGKILLed mid-batch, PostgreSQL and RabbitMQ cut off behind
//! TCP proxies the tests own. After recovery every event is applied exactly once and no valid
//! message is parked.

use std::time::Duration;

use crate::helpers::http::http_status;
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
