//! Dependency restarts for real, under a steady `send` load: RabbitMQ (`rabbitmqctl stop_app` /
//! `start_app`), PostgreSQL (`pg_ctlcluster .. restart`) and a relay SIGKILLed with requests in
//! flight. Every event that got a 202 must end applied exactly once; events refused with a 503
//! are the ones the sender retried, as Catena does.
//!
//! These restart shared servers, so they are `#[ignore]`d in the parallel suite and run alone:
//! `cargo test --test restarts -- --ignored --test-threads 1` (a step of `.ci/run`).

mod common;

use std::collections::HashSet;
use std::time::Duration;

use catena_ingest::scenario::{Event, in_order};
use catena_ingest::send::{Outgoing, SendOptions, SendReport};
use catena_ingest::topology::Names;
use common::*;

fn secrets() -> String {
    format!("{WEBHOOK_ID}={SECRET}")
}

fn run(cmd: &str, args: &[&str]) {
    let status = std::process::Command::new(cmd).args(args).status().unwrap();
    assert!(status.success(), "{cmd} {args:?} failed");
}

async fn blocking(cmd: &'static str, args: Vec<String>) {
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run(cmd, &args)
    })
    .await
    .unwrap();
}

/// Steady load: `rate` requests a second, Catena's retry policy (3 retries within ~2 s).
fn steady_load(url: &str, events: &[Event], rate: f64) -> tokio::task::JoinHandle<SendReport> {
    let mut options = SendOptions::new(url, SECRET);
    options.rate = rate;
    options.concurrency = 32;
    let outgoing: Vec<_> = in_order(events)
        .iter()
        .map(|d| Outgoing::from_delivery(events, d))
        .collect();
    tokio::spawn(async move { catena_ingest::send::send_all(&options, outgoing).await })
}

/// Every accepted event is in `webhook_events`, once (the key is the primary key, and the count
/// of matching rows equals the number of accepted events).
async fn assert_accepted_applied_once(db: &str, events: &[Event], report: &SendReport) {
    let accepted: HashSet<String> = report
        .accepted_deliveries
        .iter()
        .map(|&i| events[i].id.to_string())
        .collect();
    assert!(!accepted.is_empty());
    let keys: Vec<String> = accepted.iter().cloned().collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let mut found = 0;
    while tokio::time::Instant::now() < deadline {
        if let Ok((client, conn)) = tokio_postgres::connect(db, tokio_postgres::NoTls).await {
            tokio::spawn(conn);
            if let Ok(row) = client
                .query_one(
                    "SELECT count(*) FROM webhook_events WHERE event_key = ANY($1)",
                    &[&keys],
                )
                .await
            {
                found = row.get::<_, i64>(0);
                if found as usize == accepted.len() {
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(found as usize, accepted.len(), "every 202 applied, once");
    eprintln!(
        "sent={} accepted={} failed_after_retries={} retries={} applied_of_accepted={found}",
        report.deliveries, report.accepted, report.failed, report.retries
    );
}

#[tokio::test]
#[ignore = "restarts the shared RabbitMQ; run alone with --ignored --test-threads 1"]
async fn rabbitmq_restart_under_load() {
    let names = Names::new(&unique("mqrestart"));
    let db = fresh_db("mqrestart").await;
    let relay = spawn_relay(names.clone(), AMQP_URL, &secrets()).await;
    let (worker, stop) = spawn_worker(names.clone(), &db, AMQP_URL).await;
    let events = scenario(300, 301);
    let load = steady_load(&relay.url, &events, 400.0);
    tokio::time::sleep(Duration::from_secs(2)).await;
    blocking("rabbitmqctl", vec!["stop_app".into()]).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    blocking("rabbitmqctl", vec!["start_app".into()]).await;
    blocking("rabbitmqctl", vec!["await_startup".into()]).await;
    let report = load.await.unwrap();
    assert!(report.retries > 0, "the restart was felt: {report:?}");
    assert_accepted_applied_once(&db, &events, &report).await;
    // Relay and worker recovered without a restart.
    let client = reqwest::Client::new();
    let mut recovered = false;
    for _ in 0..50 {
        if Post::new(&fixture("events/05-connection.created.json"))
            .send(&client, &relay.url)
            .await
            == 202
        {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(recovered);
    assert_eq!(queue_len(&names.parked_queue).await, 0);
    stop.trigger();
    worker.handle.await.unwrap();
    relay.stop().await;
    delete_topology(&names).await;
    drop_db(&db).await;
}

#[tokio::test]
#[ignore = "restarts the shared PostgreSQL; run alone with --ignored --test-threads 1"]
async fn postgres_restart_under_load() {
    let names = Names::new(&unique("pgrestart"));
    let db = fresh_db("pgrestart").await;
    let relay = spawn_relay(names.clone(), AMQP_URL, &secrets()).await;
    let (worker, stop) = spawn_worker(names.clone(), &db, AMQP_URL).await;
    let events = scenario(300, 302);
    let load = steady_load(&relay.url, &events, 400.0);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let version = std::fs::read_dir("/etc/postgresql")
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .max()
        .unwrap();
    blocking(
        "pg_ctlcluster",
        vec![
            "--skip-systemctl-redirect".into(),
            version,
            "main".into(),
            "restart".into(),
        ],
    )
    .await;
    let report = load.await.unwrap();
    assert_eq!(
        report.failed, 0,
        "the relay never touches PostgreSQL: {report:?}"
    );
    assert_accepted_applied_once(&db, &events, &report).await;
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
}

#[tokio::test]
#[ignore = "kills a relay process; run with the restart group"]
async fn relay_sigkilled_with_requests_in_flight() {
    let prefix = unique("relaykill");
    let names = Names::new(&prefix);
    let db = fresh_db("relaykill").await;
    let dir = TempDir::new("relaykill");
    let listen = format!("127.0.0.1:{}", free_port());
    let mut relay = relay_process(&prefix, &listen, &secrets(), &dir.path.join("relay1.log"));
    assert!(wait_http_ok(&format!("http://{listen}/readyz"), Duration::from_secs(20)).await);
    let (worker, stop) = spawn_worker(names.clone(), &db, AMQP_URL).await;
    let events = scenario(300, 303);
    let load = steady_load(&format!("http://{listen}/webhooks/catena"), &events, 500.0);
    tokio::time::sleep(Duration::from_secs(2)).await;
    signal(&relay, "KILL");
    relay.wait().unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut relay = relay_process(&prefix, &listen, &secrets(), &dir.path.join("relay2.log"));
    let report = load.await.unwrap();
    assert!(report.retries > 0, "requests were cut: {report:?}");
    assert_accepted_applied_once(&db, &events, &report).await;
    signal(&relay, "TERM");
    assert!(relay.wait().unwrap().success());
    stop.trigger();
    worker.handle.await.unwrap();
    delete_topology(&names).await;
    drop_db(&db).await;
}
