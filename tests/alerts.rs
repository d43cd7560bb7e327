//! Alerts reaching people: a real Alertmanager, a recording webhook sink, the outbox under
//! sink outages and competing notifiers, the state gauges, and log hygiene.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use catena_ingest::alerts::NotifierConfig;
use catena_ingest::scenario::in_order;
use catena_ingest::topology::Names;
use catena_ingest::worker::WorkerConfig;
use common::*;

const EVENTS: &str = "SELECT count(*) FROM webhook_events";
const PENDING: &str = "SELECT count(*) FROM alert_outbox WHERE delivered_at IS NULL";

fn secrets() -> String {
    format!("{WEBHOOK_ID}={SECRET}")
}

fn fast_notifier(alertmanager: Option<&str>, webhook: Option<&str>) -> NotifierConfig {
    NotifierConfig {
        alertmanager_url: alertmanager.map(str::to_owned),
        webhook_url: webhook.map(str::to_owned),
        poll_interval: Duration::from_millis(100),
        gauge_interval: Duration::from_millis(200),
        ..Default::default()
    }
}

async fn wait_until<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

fn recovery_of(staled: &[u8]) -> Vec<u8> {
    let mut envelope: serde_json::Value = serde_json::from_slice(staled).unwrap();
    envelope["event_name"] = "connection.created".into();
    envelope["data"][0]["status"] = "active".into();
    envelope["id"] = "01a00000-0000-7000-8000-00000000abcd".into(); // newer than the staled event
    serde_json::to_vec(&envelope).unwrap()
}

#[tokio::test]
async fn stale_connection_fires_once_in_alertmanager_and_recovery_resolves_it() {
    let names = Names::new(&unique("am"));
    let db = fresh_db("am").await;
    let am = Alertmanager::start(free_port()).await;
    let relay = spawn_relay(names.clone(), AMQP_URL, &secrets()).await;
    let mut config = WorkerConfig::new(AMQP_URL, names.clone(), &db);
    config.notifier = fast_notifier(Some(&am.url), None);
    let (worker, stop) = spawn_worker_with(config).await;
    let client = reqwest::Client::new();

    for f in [
        "01-invitation.created",
        "03-invitation.accepted",
        "04-share_agreement.created",
        "05-connection.created",
        "06-fleet_connection.created",
        "09-connection.staled",
    ] {
        assert_eq!(
            Post::new(&fixture(&format!("events/{f}.json")))
                .send(&client, &relay.url)
                .await,
            202
        );
    }
    // Catena redelivers the staled event twice more.
    let staled = fixture("events/09-connection.staled.json");
    for _ in 0..2 {
        assert_eq!(Post::new(&staled).send(&client, &relay.url).await, 202);
    }
    assert!(
        wait_until(Duration::from_secs(20), || async {
            am.active("CatenaConnectionStale").await.len() == 1
        })
        .await
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let firing = am.active("CatenaConnectionStale").await;
    assert_eq!(firing.len(), 1, "duplicates must not create a second alert");
    let labels = &firing[0]["labels"];
    assert_eq!(labels["fleet_ref"], "FLEET-42");
    assert_eq!(labels["fleet_id"], "d23f0824-128b-4f33-8c5c-7fd0a6a3a450");
    assert_eq!(
        labels["connection_id"],
        "6b0d549b-6f03-475a-9600-a35a099950d8"
    );
    assert_eq!(labels["source_name"], "samsara");
    assert_eq!(labels["severity"], "warning");
    let annotations = &firing[0]["annotations"];
    assert!(
        annotations["description"]
            .as_str()
            .unwrap()
            .contains("re-authenticate")
    );
    assert!(
        annotations["reauth_link"]
            .as_str()
            .unwrap()
            .starts_with("https://connect.catenatelematics.com/")
    );

    assert_eq!(
        Post::new(&recovery_of(&staled))
            .send(&client, &relay.url)
            .await,
        202
    );
    assert!(
        wait_until(Duration::from_secs(20), || async {
            am.active("CatenaConnectionStale").await.is_empty()
        })
        .await,
        "the recovery resolves the alert in Alertmanager"
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM alerts WHERE state = 'resolved'").await,
        1
    );
    stop.trigger();
    worker.handle.await.unwrap();
    relay.stop().await;
    am.stop();
    delete_topology(&names).await;
    drop_db(&db).await;
}

#[tokio::test]
async fn sinks_down_queue_in_the_outbox_and_deliver_once_when_back() {
    let names = Names::new(&unique("amdown"));
    let db = fresh_db("amdown").await;
    let am_port = free_port();
    let sink = RecordingSink::start().await;
    sink.up.store(false, std::sync::atomic::Ordering::SeqCst);
    let relay = spawn_relay(names.clone(), AMQP_URL, &secrets()).await;
    let mut config = WorkerConfig::new(AMQP_URL, names.clone(), &db);
    config.notifier = fast_notifier(
        Some(&format!("http://127.0.0.1:{am_port}")),
        Some(&sink.url),
    );
    let (worker, stop) = spawn_worker_with(config).await;

    // Ingestion is unaffected while both sinks are down.
    let events = scenario(120, 77);
    let report = send_deliveries(&relay.url, &events, &in_order(&events), 16).await;
    assert_eq!(report.accepted as usize, events.len());
    assert_eq!(
        wait_for_count(&db, EVENTS, events.len() as i64, Duration::from_secs(60)).await,
        events.len() as i64
    );
    let outbox = count(&db, "SELECT count(*) FROM alert_outbox").await;
    assert!(outbox > 5, "the scenario raised alerts ({outbox})");
    assert!(
        count(&db, PENDING).await > 0,
        "nothing delivered while the sinks are down"
    );

    // Back up: everything is delivered, each outbox row exactly once per sink.
    let am = Alertmanager::start(am_port).await;
    sink.up.store(true, std::sync::atomic::Ordering::SeqCst);
    // Failed rows wait out their backoff (1-2 s for the first retries).
    assert!(
        wait_until(Duration::from_secs(60), || async {
            count(&db, PENDING).await == 0
        })
        .await
    );
    let mut per_row: HashMap<i64, usize> = HashMap::new();
    for body in sink.bodies() {
        *per_row
            .entry(body["outbox_id"].as_i64().unwrap())
            .or_default() += 1;
    }
    assert_eq!(
        per_row.len() as i64,
        outbox,
        "every outbox row reached the webhook sink"
    );
    assert!(per_row.values().all(|n| *n == 1), "and each exactly once");
    let open_stale = count(
        &db,
        "SELECT count(*) FROM alerts WHERE state = 'open' AND kind = 'connection_stale'",
    )
    .await;
    assert!(
        wait_until(Duration::from_secs(10), || async {
            am.active("CatenaConnectionStale").await.len() as i64 == open_stale
        })
        .await
    );
    let open_deactivated = count(
        &db,
        "SELECT count(*) FROM alerts WHERE state = 'open' AND kind = 'schedule_deactivated'",
    )
    .await;
    assert_eq!(
        am.active("CatenaScheduleDeactivated").await.len() as i64,
        open_deactivated
    );

    stop.trigger();
    worker.handle.await.unwrap();
    relay.stop().await;
    am.stop();
    delete_topology(&names).await;
    drop_db(&db).await;
}

#[tokio::test]
async fn two_worker_processes_deliver_each_outbox_row_once() {
    let prefix = unique("notify2");
    let names = Names::new(&prefix);
    let db = fresh_db("notify2").await;
    let sink = RecordingSink::start().await;
    let relay = spawn_relay(names.clone(), AMQP_URL, &secrets()).await;
    let env = [
        ("ALERT_WEBHOOK_URL", sink.url.as_str()),
        ("WORKER_BATCH_SIZE", "20"),
    ];
    let mut workers = vec![
        worker_process(&prefix, &db, AMQP_URL, &env),
        worker_process(&prefix, &db, AMQP_URL, &env),
    ];
    let events = scenario(150, 78);
    let report = send_deliveries(&relay.url, &events, &in_order(&events), 16).await;
    assert_eq!(report.accepted as usize, events.len());
    assert_eq!(
        wait_for_count(&db, EVENTS, events.len() as i64, Duration::from_secs(60)).await,
        events.len() as i64
    );
    assert!(
        wait_until(Duration::from_secs(30), || async {
            count(&db, PENDING).await == 0
        })
        .await
    );
    let outbox = count(&db, "SELECT count(*) FROM alert_outbox").await;
    let bodies = sink.bodies();
    let mut per_row: HashMap<i64, usize> = HashMap::new();
    for body in &bodies {
        *per_row
            .entry(body["outbox_id"].as_i64().unwrap())
            .or_default() += 1;
    }
    assert!(outbox > 5);
    assert_eq!(per_row.len() as i64, outbox);
    assert_eq!(bodies.len() as i64, outbox, "no row delivered twice");
    for worker in &mut workers {
        signal(worker, "TERM");
    }
    for mut worker in workers {
        assert!(worker.wait().unwrap().success());
    }
    relay.stop().await;
    delete_topology(&names).await;
    drop_db(&db).await;
}

#[tokio::test]
async fn gauges_match_the_tables_after_a_scenario() {
    let names = Names::new(&unique("gauges"));
    let db = fresh_db("gauges").await;
    let relay = spawn_relay(names.clone(), AMQP_URL, &secrets()).await;
    let mut config = WorkerConfig::new(AMQP_URL, names.clone(), &db);
    config.notifier = fast_notifier(None, None);
    let (worker, stop) = spawn_worker_with(config).await;
    let events = scenario(100, 79);
    send_deliveries(&relay.url, &events, &in_order(&events), 16).await;
    assert_eq!(
        wait_for_count(&db, EVENTS, events.len() as i64, Duration::from_secs(60)).await,
        events.len() as i64
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    let metrics = reqwest::get(format!("http://{}/metrics", worker.metrics_addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let checks = [
        (
            "catena_alerts_open{kind=\"connection_stale\"}",
            "SELECT count(*) FROM alerts WHERE state='open' AND kind='connection_stale'",
        ),
        (
            "catena_alerts_open{kind=\"schedule_deactivated\"}",
            "SELECT count(*) FROM alerts WHERE state='open' AND kind='schedule_deactivated'",
        ),
        (
            "catena_connections{status=\"active\"}",
            "SELECT count(*) FROM connections WHERE status='active'",
        ),
        (
            "catena_connections{status=\"stale\"}",
            "SELECT count(*) FROM connections WHERE status='stale'",
        ),
        (
            "catena_schedules{status=\"active\"}",
            "SELECT count(*) FROM schedules WHERE status='active'",
        ),
        (
            "catena_schedules{status=\"deactivated\"}",
            "SELECT count(*) FROM schedules WHERE status='deactivated'",
        ),
        ("catena_parked_messages", "SELECT 0::bigint"),
    ];
    for (series, sql) in checks {
        let want = count(&db, sql).await as f64;
        assert_eq!(metric_value(&metrics, series), Some(want), "{series}");
    }
    assert!(metric_value(&metrics, "catena_connections{status=\"active\"}").unwrap() > 0.0);
    let raised: f64 = ["connection_stale", "schedule_deactivated"]
        .iter()
        .map(|k| {
            metric_value(
                &metrics,
                &format!("catena_alerts_raised_total{{kind=\"{k}\"}}"),
            )
            .unwrap()
        })
        .sum();
    assert_eq!(
        raised as i64,
        count(&db, "SELECT count(*) FROM alerts").await
    );
    stop.trigger();
    worker.handle.await.unwrap();
    relay.stop().await;
    delete_topology(&names).await;
    drop_db(&db).await;
}

#[tokio::test]
async fn no_secret_token_or_magic_link_in_any_log_line() {
    let prefix = unique("logs");
    let names = Names::new(&prefix);
    let db = fresh_db("logs").await;
    let dir = TempDir::new("logs");
    let (relay_log, worker_log) = (dir.path.join("relay.log"), dir.path.join("worker.log"));
    let listen = format!("127.0.0.1:{}", free_port());
    let mut relay = relay_process(&prefix, &listen, &secrets(), &relay_log);
    let sink = RecordingSink::start().await;
    let mut worker = std::process::Command::new(env!("CARGO_BIN_EXE_catena-ingest"))
        .arg("worker")
        .env("CATENA_NAME_PREFIX", &prefix)
        .env("DATABASE_URL", &db)
        .env("METRICS_LISTEN", "127.0.0.1:0")
        .env("ALERT_WEBHOOK_URL", &sink.url)
        .env(
            "ALERTMANAGER_URL",
            format!("http://127.0.0.1:{}", free_port()),
        )
        .env("RUST_LOG", "debug")
        .env("LOG_FORMAT", "json")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&worker_log).unwrap())
        .spawn()
        .unwrap();
    assert!(wait_http_ok(&format!("http://{listen}/readyz"), Duration::from_secs(20)).await);
    let url = format!("http://{listen}/webhooks/catena");
    let events = scenario(60, 80);
    send_deliveries(&url, &events, &in_order(&events), 8).await;
    // Refusals are logged too: make some.
    let client = reqwest::Client::new();
    let mut wrong = Post::new(&fixture("events/03-invitation.accepted.json"));
    wrong.secret = "not-the-secret";
    assert_eq!(wrong.send(&client, &url).await, 401);
    assert_eq!(Post::new(b"{broken").send(&client, &url).await, 202);
    assert_eq!(
        wait_for_count(&db, EVENTS, events.len() as i64, Duration::from_secs(60)).await,
        events.len() as i64
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    signal(&relay, "TERM");
    signal(&worker, "TERM");
    relay.wait().unwrap();
    worker.wait().unwrap();

    let logs = std::fs::read_to_string(&relay_log).unwrap()
        + &std::fs::read_to_string(&worker_log).unwrap();
    assert!(logs.lines().count() > 20, "debug logs were captured");
    for needle in [
        SECRET,
        "secret-token-do-not-log",
        "connect.catenatelematics.com/?invite=",
        "magic_link\":\"https",
    ] {
        assert!(!logs.contains(needle), "`{needle}` leaked into the logs");
    }
    delete_topology(&names).await;
    drop_db(&db).await;
}
