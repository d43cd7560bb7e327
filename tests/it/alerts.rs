//! Alerts reaching people: a real Alertmanager, a recording webhook sink, the outbox under
//! sink outages and competing notifiers, the state gauges, and log hygiene.

use std::collections::HashMap;
use std::time::Duration;

use catena_ingest::config::NotifierSettings;

use crate::helpers::alerting::{Alertmanager, RecordingSink};
use crate::helpers::http::{metric_value, wait_http_ok};
use crate::helpers::load::send_deliveries;
use crate::helpers::*;

const PENDING: &str = "SELECT count(*) FROM alert_outbox WHERE delivered_at IS NULL";

fn fast_notifier(alertmanager: Option<&str>, webhook: Option<&str>) -> NotifierSettings {
    NotifierSettings {
        alertmanager_url: alertmanager.map(str::to_owned),
        webhook_url: webhook.map(str::to_owned),
        poll_interval: Duration::from_millis(100),
        gauge_interval: Duration::from_millis(200),
        onboarding_interval: Duration::from_millis(100),
        ..Default::default()
    }
}

fn recovery_of(staled: &[u8]) -> Vec<u8> {
    let mut envelope: serde_json::Value = serde_json::from_slice(staled).unwrap();
    envelope["event_name"] = "connection.created".into();
    envelope["data"][0]["status"] = "active".into();
    envelope["id"] = "01a00000-0000-7000-8000-00000000abcd".into(); // newer than the staled event
    serde_json::to_vec(&envelope).unwrap()
}

/// How many times each outbox row reached the sink.
fn deliveries_per_row(bodies: &[serde_json::Value]) -> HashMap<i64, usize> {
    let mut per_row: HashMap<i64, usize> = HashMap::new();
    for body in bodies {
        *per_row
            .entry(body["outbox_id"].as_i64().unwrap())
            .or_default() += 1;
    }
    per_row
}

#[tokio::test]
async fn stale_connection_fires_once_in_alertmanager_and_recovery_resolves_it() {
    let am = Alertmanager::start(free_port()).await;
    let p = TestPipeline::builder("am")
        .relay()
        .worker_config(|config| config.worker.notifier = fast_notifier(Some(&am.url), None))
        .start()
        .await;

    for f in [
        "01-invitation.created",
        "03-invitation.accepted",
        "04-share_agreement.created",
        "05-connection.created",
        "06-fleet_connection.created",
        "09-connection.staled",
    ] {
        assert_eq!(p.send(&fixture(&format!("events/{f}.json"))).await, 202);
    }
    // Catena redelivers the staled event twice more.
    let staled = fixture("events/09-connection.staled.json");
    for _ in 0..2 {
        assert_eq!(p.send(&staled).await, 202);
    }
    assert!(
        am.wait_for_active("CatenaConnectionStale", 1, Duration::from_secs(20))
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

    assert_eq!(p.send(&recovery_of(&staled)).await, 202);
    assert!(
        am.wait_for_active("CatenaConnectionStale", 0, Duration::from_secs(20))
            .await,
        "the recovery resolves the alert in Alertmanager"
    );
    assert_eq!(
        p.count("SELECT count(*) FROM alerts WHERE state = 'resolved'")
            .await,
        1
    );
    p.stop().await;
}

#[tokio::test]
async fn sinks_down_queue_in_the_outbox_and_deliver_once_when_back() {
    let am_port = free_port();
    let sink = RecordingSink::start().await;
    sink.set_up(false);
    let p = TestPipeline::builder("amdown")
        .relay()
        .worker_config(|config| {
            config.worker.notifier = fast_notifier(
                Some(&format!("http://127.0.0.1:{am_port}")),
                Some(&sink.url),
            )
        })
        .start()
        .await;

    // Ingestion is unaffected while both sinks are down.
    let events = scenario(120, 77);
    let report = p.send_deliveries(&events, &in_order(&events), 16).await;
    assert_eq!(report.accepted as usize, events.len());
    assert_eq!(
        p.wait_for_applied(events.len(), Duration::from_secs(60))
            .await,
        events.len()
    );
    let outbox = p.count("SELECT count(*) FROM alert_outbox").await;
    assert!(outbox > 5, "the scenario raised alerts ({outbox})");
    assert!(
        p.count(PENDING).await > 0,
        "nothing delivered while the sinks are down"
    );

    // Back up: everything is delivered, each outbox row exactly once per sink.
    let am = Alertmanager::start(am_port).await;
    sink.set_up(true);
    // Failed rows wait out their backoff (1-2 s for the first retries).
    assert!(
        wait_until(Duration::from_secs(60), || async {
            p.count(PENDING).await == 0
        })
        .await
    );
    let per_row = deliveries_per_row(&sink.bodies());
    assert_eq!(
        per_row.len() as i64,
        outbox,
        "every outbox row reached the webhook sink"
    );
    assert!(per_row.values().all(|n| *n == 1), "and each exactly once");
    let open_stale = p
        .count("SELECT count(*) FROM alerts WHERE state = 'open' AND kind = 'connection_stale'")
        .await;
    assert!(
        am.wait_for_active(
            "CatenaConnectionStale",
            open_stale as usize,
            Duration::from_secs(10)
        )
        .await
    );
    let open_deactivated = p
        .count("SELECT count(*) FROM alerts WHERE state = 'open' AND kind = 'schedule_deactivated'")
        .await;
    assert_eq!(
        am.active("CatenaScheduleDeactivated").await.len() as i64,
        open_deactivated
    );
    p.stop().await;
}

#[tokio::test]
async fn two_worker_processes_deliver_each_outbox_row_once() {
    let sink = RecordingSink::start().await;
    let p = TestPipeline::builder("notify2").relay().start().await;
    let env = [
        ("ALERT_WEBHOOK_URL", sink.url.as_str()),
        ("WORKER_BATCH_SIZE", "20"),
    ];
    let workers = [
        p.worker_process().envs(&env).spawn(),
        p.worker_process().envs(&env).spawn(),
    ];
    let events = scenario(150, 78);
    let report = p.send_deliveries(&events, &in_order(&events), 16).await;
    assert_eq!(report.accepted as usize, events.len());
    assert_eq!(
        p.wait_for_applied(events.len(), Duration::from_secs(60))
            .await,
        events.len()
    );
    assert!(
        wait_until(Duration::from_secs(30), || async {
            p.count(PENDING).await == 0
        })
        .await
    );
    let outbox = p.count("SELECT count(*) FROM alert_outbox").await;
    let bodies = sink.bodies();
    let per_row = deliveries_per_row(&bodies);
    assert!(outbox > 5);
    assert_eq!(per_row.len() as i64, outbox);
    assert_eq!(bodies.len() as i64, outbox, "no row delivered twice");
    terminate_all(workers).await;
    p.stop().await;
}

#[tokio::test]
async fn gauges_match_the_tables_after_a_scenario() {
    let p = TestPipeline::builder("gauges")
        .relay()
        .worker_config(|config| config.worker.notifier = fast_notifier(None, None))
        .start()
        .await;
    let events = scenario(100, 79);
    p.send_deliveries(&events, &in_order(&events), 16).await;
    assert_eq!(
        p.wait_for_applied(events.len(), Duration::from_secs(60))
            .await,
        events.len()
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    let metrics = http::get_text(&p.worker_endpoint("/metrics")).await;
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
        (
            "catena_fleets{onboarding_status=\"connected\"}",
            "SELECT count(*) FROM fleets WHERE onboarding_status='connected'",
        ),
        (
            "catena_fleets{onboarding_status=\"declined\"}",
            "SELECT count(*) FROM fleets WHERE onboarding_status='declined'",
        ),
        (
            "catena_invitations{status=\"accepted\"}",
            "SELECT count(*) FROM invitations WHERE status='accepted'",
        ),
        (
            "catena_invitations_stuck",
            "SELECT count(*) FROM invitations WHERE status='viewed' AND status_at < now() - interval '1 day'",
        ),
        (
            "catena_fleets_without_active_connection",
            "SELECT count(*) FROM fleets f WHERE onboarding_status='connected' AND NOT EXISTS (SELECT 1 FROM connections c WHERE c.fleet_id = f.fleet_id AND c.status='active')",
        ),
    ];
    for (series, sql) in checks {
        let want = p.count(sql).await as f64;
        assert_eq!(metric_value(&metrics, series), Some(want), "{series}");
    }
    assert!(metric_value(&metrics, "catena_connections{status=\"active\"}").unwrap() > 0.0);
    assert!(
        metric_value(&metrics, "catena_fleets{onboarding_status=\"connected\"}").unwrap() > 0.0,
        "the onboarding counts were refreshed"
    );
    // Every fleet that reached connected was measured once (or, connected before its invitation
    // was known, counted as unmeasured).
    let connected = p
        .count("SELECT count(*) FROM fleets WHERE onboarding_status = 'connected'")
        .await as f64;
    let measured = metric_value(&metrics, "catena_onboarding_duration_seconds_count").unwrap();
    let unmeasured = metric_value(&metrics, "catena_onboarding_unmeasured_total").unwrap();
    assert_eq!(measured + unmeasured, connected);
    assert!(measured > 0.0);
    assert!(metric_value(&metrics, "catena_onboarding_duration_seconds_sum").unwrap() > 0.0);
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
    // Every alert row that paged was raised; rows of periods first seen over do not page.
    assert_eq!(
        raised as i64,
        p.count("SELECT count(*) FROM alerts WHERE paged").await
    );
    p.stop().await;
}

#[tokio::test]
async fn no_secret_token_or_magic_link_in_any_log_line() {
    let p = TestPipeline::builder("logs").start().await;
    let dir = TempDir::new("logs");
    let (relay_log, worker_log) = (dir.path.join("relay.log"), dir.path.join("worker.log"));
    let listen = format!("127.0.0.1:{}", free_port());
    let relay = p.relay_process(&listen).log_to(&relay_log).spawn();
    let sink = RecordingSink::start().await;
    let worker = p
        .worker_process()
        .env("ALERT_WEBHOOK_URL", &sink.url)
        .env(
            "ALERTMANAGER_URL",
            format!("http://127.0.0.1:{}", free_port()),
        )
        .env("RUST_LOG", "debug")
        .env("LOG_FORMAT", "json")
        .log_to(&worker_log)
        .spawn();
    assert!(wait_http_ok(&format!("http://{listen}/readyz"), Duration::from_secs(20)).await);
    let url = format!("http://{listen}/webhooks/catena");
    let events = scenario(60, 80);
    send_deliveries(&url, &events, &in_order(&events), 8).await;
    // Refusals are logged too: make some.
    let mut wrong = Post::new(&fixture("events/03-invitation.accepted.json"));
    wrong.secret = "not-the-secret";
    assert_eq!(wrong.send(&p.client, &url).await, 503);
    assert_eq!(Post::new(b"{broken").send(&p.client, &url).await, 202);
    assert_eq!(
        p.wait_for_applied(events.len(), Duration::from_secs(60))
            .await,
        events.len()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    relay.signal("TERM");
    worker.signal("TERM");
    relay.wait().await;
    worker.wait().await;

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
    p.stop().await;
}

/// Open alerts are re-sent to Alertmanager in one request, not one per alert.
#[tokio::test]
async fn open_alerts_are_refired_in_one_request() {
    let am = RecordingSink::alertmanager().await;
    let p = TestPipeline::builder("refire")
        .relay()
        .worker_config(|config| {
            config.worker.notifier = fast_notifier(Some(&am.url), None);
            config.worker.notifier.refire_interval = Duration::from_millis(300);
        })
        .start()
        .await;
    let staled = fixture("events/09-connection.staled.json");
    for n in 0..3 {
        let mut envelope: serde_json::Value = serde_json::from_slice(&staled).unwrap();
        envelope["id"] = format!("01a00000-0000-7000-8000-00000000000{n}").into();
        envelope["data"][0]["id"] = format!("6b0d549b-6f03-475a-9600-a35a0999500{n}").into();
        assert_eq!(p.send(&serde_json::to_vec(&envelope).unwrap()).await, 202);
    }
    let refired = wait_until(Duration::from_secs(20), || async {
        am.bodies()
            .iter()
            .any(|b| b.as_array().is_some_and(|alerts| alerts.len() == 3))
    })
    .await;
    assert!(
        refired,
        "one request carries the 3 open alerts: {:#?}",
        am.bodies()
    );
    p.stop().await;
}
