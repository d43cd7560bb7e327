//! Dependency restarts for real, under a steady `send` load: RabbitMQ (`rabbitmqctl stop_app` /
//! `start_app`), PostgreSQL (`pg_ctlcluster .. restart`) and a relay SIGKILLed with requests in
//! flight. Every event that got a 202 must end applied exactly once; events refused with a 503
//! are the ones the sender retried, as Catena does.
//!
//! These restart shared servers, so they are `#[ignore]`d in the parallel suite and run alone:
//! `cargo test --test it -- --ignored --test-threads 1 restarts::` (a step of `.ci/run`).

use std::collections::HashSet;
use std::time::Duration;

use crate::helpers::http::wait_http_ok;
use crate::helpers::load::{Event, SendReport, steady_load};
use crate::helpers::*;

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

/// `pg_ctlcluster <newest version> main ACTION` on the machine's own PostgreSQL.
async fn pg_ctlcluster_main(action: &str) {
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
            action.into(),
        ],
    )
    .await;
}

/// Every accepted event is in `webhook_events`, once (the key is the primary key, and the count
/// of matching rows equals the number of accepted events). Tolerates the database being down
/// for a while.
async fn assert_accepted_applied_once(db: &TestDb, events: &[Event], report: &SendReport) {
    let accepted: HashSet<String> = report
        .accepted_deliveries
        .iter()
        .map(|&i| events[i].id.to_string())
        .collect();
    assert!(!accepted.is_empty());
    let keys: &Vec<String> = &accepted.iter().cloned().collect();
    let found = eventually(
        Duration::from_secs(120),
        || async move {
            let Ok((client, conn)) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls).await
            else {
                return 0;
            };
            tokio::spawn(conn);
            client
                .query_one(
                    "SELECT count(*) FROM webhook_events WHERE event_key = ANY($1)",
                    &[keys],
                )
                .await
                .map_or(0, |row| row.get::<_, i64>(0))
        },
        |found| *found as usize == accepted.len(),
    )
    .await;
    assert_eq!(found as usize, accepted.len(), "every 202 applied, once");
    eprintln!(
        "sent={} accepted={} failed_after_retries={} retries={} applied_of_accepted={found}",
        report.deliveries, report.accepted, report.failed, report.retries
    );
}

#[tokio::test]
#[ignore = "restarts the shared RabbitMQ; run alone with --ignored --test-threads 1"]
async fn rabbitmq_restart_under_load() {
    let p = TestPipeline::builder("mqrestart")
        .relay()
        .worker()
        .start()
        .await;
    let events = scenario(300, 301);
    let load = steady_load(&p.relay_url(), &events, 400.0);
    tokio::time::sleep(Duration::from_secs(2)).await;
    blocking("rabbitmqctl", vec!["stop_app".into()]).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    blocking("rabbitmqctl", vec!["start_app".into()]).await;
    blocking("rabbitmqctl", vec!["await_startup".into()]).await;
    let report = load.await.unwrap();
    assert!(report.retries > 0, "the restart was felt: {report:?}");
    assert_accepted_applied_once(p.db(), &events, &report).await;
    // Relay and worker recovered without a restart.
    let body = fixture("events/05-connection.created.json");
    let recovered = wait_until(Duration::from_secs(20), || async {
        p.send(&body).await == 202
    })
    .await;
    assert!(recovered);
    assert_eq!(p.parked_len().await, 0);
    p.stop().await;
}

#[tokio::test]
#[ignore = "restarts the shared PostgreSQL; run alone with --ignored --test-threads 1"]
async fn postgres_restart_under_load() {
    let p = TestPipeline::builder("pgrestart")
        .relay()
        .worker()
        .start()
        .await;
    let events = scenario(300, 302);
    let load = steady_load(&p.relay_url(), &events, 400.0);
    tokio::time::sleep(Duration::from_secs(2)).await;
    pg_ctlcluster_main("restart").await;
    let report = load.await.unwrap();
    assert_eq!(
        report.failed, 0,
        "the relay never touches PostgreSQL: {report:?}"
    );
    assert_accepted_applied_once(p.db(), &events, &report).await;
    assert_eq!(p.parked_len().await, 0, "no valid message parked");
    p.stop().await;
}

#[tokio::test]
#[ignore = "kills a relay process; run with the restart group"]
async fn relay_sigkilled_with_requests_in_flight() {
    let mut p = TestPipeline::builder("relaykill").start().await;
    let dir = TempDir::new("relaykill");
    let listen = format!("127.0.0.1:{}", free_port());
    let relay = p
        .relay_process(&listen)
        .log_to(&dir.path.join("relay1.log"))
        .spawn();
    assert!(wait_http_ok(&format!("http://{listen}/readyz"), Duration::from_secs(20)).await);
    p.start_worker().await;
    let events = scenario(300, 303);
    let load = steady_load(&format!("http://{listen}/webhooks/catena"), &events, 500.0);
    tokio::time::sleep(Duration::from_secs(2)).await;
    relay.signal("KILL");
    relay.wait().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let relay = p
        .relay_process(&listen)
        .log_to(&dir.path.join("relay2.log"))
        .spawn();
    let report = load.await.unwrap();
    assert!(report.retries > 0, "requests were cut: {report:?}");
    assert_accepted_applied_once(p.db(), &events, &report).await;
    assert!(relay.terminate().await.success());
    p.stop().await;
}

/// The front door: with PostgreSQL stopped and the RabbitMQ node down, what `dev` and the test
/// harness run first (`catena_ingest::local::ensure_services`, i.e. `scripts/services.sh`)
/// starts both again.
#[tokio::test]
#[ignore = "stops the shared PostgreSQL and RabbitMQ; run alone with --ignored --test-threads 1"]
async fn stopped_services_are_started_by_the_front_door() {
    pg_ctlcluster_main("stop").await;
    blocking("rabbitmqctl", vec!["stop".into()]).await;
    let addresses = [POSTGRES_ADDR.to_owned(), broker_addr().to_owned()];
    let started = std::time::Instant::now();
    let result =
        tokio::task::spawn_blocking(move || catena_ingest::local::ensure_services(&addresses))
            .await
            .unwrap();
    assert_eq!(result, Ok(()), "both answer again");
    println!(
        "services started in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let p = TestPipeline::builder("frontdoor")
        .relay()
        .worker()
        .start()
        .await;
    assert_eq!(
        p.send(&fixture("events/01-invitation.created.json")).await,
        202
    );
    assert_eq!(p.wait_for_applied(1, Duration::from_secs(30)).await, 1);
    p.stop().await;
}
