//! Faults done for real: a worker SIGKILLed mid-batch, PostgreSQL and RabbitMQ cut off behind
//! TCP proxies the tests own. After recovery every event is applied exactly once and no valid
//! message is parked.

mod common;

use std::time::Duration;

use catena_ingest::scenario::{duplicated_and_shuffled, in_order};
use catena_ingest::topology::Names;
use catena_ingest::worker::WorkerConfig;
use common::*;

const EVENTS: &str = "SELECT count(*) FROM webhook_events";

fn secrets() -> String {
    format!("{WEBHOOK_ID}={SECRET}")
}

async fn http_status(url: &str) -> u16 {
    reqwest::get(url)
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

#[tokio::test]
async fn worker_sigkilled_mid_batch_loses_and_doubles_nothing() {
    let prefix = unique("kill");
    let names = Names::new(&prefix);
    let (db, reference) = (fresh_db("kill").await, fresh_db("kill_ref").await);
    let events = scenario(200, 21);
    apply_in_order(&reference, &events).await;
    let relay = spawn_relay(names.clone(), AMQP_URL, &secrets()).await;
    let deliveries = duplicated_and_shuffled(&events, 0.2, 21);
    let report = send_deliveries(&relay.url, &events, &deliveries, 32).await;
    assert_eq!(report.accepted as usize, deliveries.len());

    // Small batches so the kill lands inside a transaction or between commit and ack.
    let mut worker = worker_process(&prefix, &db, AMQP_URL, &[("WORKER_BATCH_SIZE", "25")]);
    let at_kill = wait_for_count(&db, EVENTS, 300, Duration::from_secs(60)).await;
    signal(&worker, "KILL");
    let killed = tokio::task::spawn_blocking(move || worker.wait().unwrap())
        .await
        .unwrap();
    assert!(!killed.success(), "SIGKILL ends the process abruptly");
    assert!(
        at_kill < events.len() as i64,
        "killed mid-stream ({at_kill})"
    );

    let mut second = worker_process(&prefix, &db, AMQP_URL, &[]);
    let got = wait_for_count(&db, EVENTS, events.len() as i64, Duration::from_secs(120)).await;
    assert_eq!(got, events.len() as i64);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_same_state(&snapshot(&reference).await, &snapshot(&db).await);
    assert_eq!(
        queue_len(&names.parked_queue).await,
        0,
        "no valid message parked"
    );
    signal(&second, "TERM");
    assert!(
        tokio::task::spawn_blocking(move || second.wait().unwrap())
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
async fn database_cut_holds_the_work_and_resumes() {
    let names = Names::new(&unique("pgcut"));
    let (db, reference) = (fresh_db("pgcut").await, fresh_db("pgcut_ref").await);
    let events = scenario(150, 8);
    apply_in_order(&reference, &events).await;
    let proxy = TcpProxy::start("127.0.0.1:5432").await;
    let proxied_db = db.replace("127.0.0.1:5432", &proxy.addr.to_string());
    let relay = spawn_relay(names.clone(), AMQP_URL, &secrets()).await;
    let mut config = WorkerConfig::new(AMQP_URL, names.clone(), &proxied_db);
    config.batch_size = 50;
    let (worker, stop) = spawn_worker_with(config).await;
    let ready = format!("http://{}/readyz", worker.metrics_addr);

    let deliveries = in_order(&events);
    let send = {
        let (url, events) = (relay.url.clone(), events.clone());
        tokio::spawn(async move { send_deliveries(&url, &events, &deliveries, 8).await })
    };
    wait_for_count(&db, EVENTS, 300, Duration::from_secs(60)).await;
    proxy.cut();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let during = count(&db, EVENTS).await;
    assert_eq!(
        http_status(&ready).await,
        503,
        "not ready while the database is gone"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        count(&db, EVENTS).await,
        during,
        "nothing applied while cut"
    );
    proxy.restore();

    assert_eq!(send.await.unwrap().accepted as usize, events.len());
    let got = wait_for_count(&db, EVENTS, events.len() as i64, Duration::from_secs(120)).await;
    assert_eq!(got, events.len() as i64);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_same_state(&snapshot(&reference).await, &snapshot(&db).await);
    assert_eq!(
        queue_len(&names.parked_queue).await,
        0,
        "no valid message parked"
    );
    assert_eq!(http_status(&ready).await, 200);
    stop.trigger();
    worker.handle.await.unwrap();
    relay.stop().await;
    delete_topology(&names).await;
    drop_db(&db).await;
    drop_db(&reference).await;
}

#[tokio::test]
async fn broker_cut_under_the_worker_recovers_without_loss() {
    let names = Names::new(&unique("mqcut"));
    let (db, reference) = (fresh_db("mqcut").await, fresh_db("mqcut_ref").await);
    let events = scenario(150, 9);
    apply_in_order(&reference, &events).await;
    let proxy = TcpProxy::start("127.0.0.1:5672").await;
    let relay = spawn_relay(names.clone(), AMQP_URL, &secrets()).await;
    let mut config = WorkerConfig::new(&proxy.amqp_url(), names.clone(), &db);
    config.batch_size = 50;
    let (worker, stop) = spawn_worker_with(config).await;
    let ready = format!("http://{}/readyz", worker.metrics_addr);

    let deliveries = duplicated_and_shuffled(&events, 0.2, 9);
    let send = {
        let (url, events, deliveries) = (relay.url.clone(), events.clone(), deliveries.clone());
        tokio::spawn(async move { send_deliveries(&url, &events, &deliveries, 8).await })
    };
    wait_for_count(&db, EVENTS, 300, Duration::from_secs(60)).await;
    proxy.cut();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        http_status(&ready).await,
        503,
        "not ready while the broker is gone"
    );
    proxy.restore();

    assert_eq!(send.await.unwrap().accepted as usize, deliveries.len());
    let got = wait_for_count(&db, EVENTS, events.len() as i64, Duration::from_secs(120)).await;
    assert_eq!(got, events.len() as i64);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_same_state(&snapshot(&reference).await, &snapshot(&db).await);
    assert_eq!(
        queue_len(&names.parked_queue).await,
        0,
        "no valid message parked"
    );
    stop.trigger();
    worker.handle.await.unwrap();
    relay.stop().await;
    delete_topology(&names).await;
    drop_db(&db).await;
    drop_db(&reference).await;
}
