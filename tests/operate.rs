//! Operator tooling against the real broker and database: the parking lot CLI, `fleet show`,
//! and the contract between the shipped dashboard/rules and the metrics the binary exports.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use catena_ingest::broker::Publisher;
use catena_ingest::parked::{self, Filter};
use catena_ingest::shutdown::Shutdown;
use catena_ingest::topology::Names;
use common::*;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};

const EVENTS: &str = "SELECT count(*) FROM webhook_events";

/// Put a message straight into the parking lot, as the worker would have.
async fn park_directly(
    publisher: &Publisher,
    names: &Names,
    body: &[u8],
    event: &str,
    reason: &str,
) {
    let mut headers = FieldTable::default();
    headers.insert("x-park-reason".into(), AMQPValue::LongString(reason.into()));
    headers.insert(
        "x-park-id".into(),
        AMQPValue::LongString(uuid::Uuid::new_v4().to_string().as_str().into()),
    );
    headers.insert(
        "x-parked-at".into(),
        AMQPValue::LongString(chrono::Utc::now().to_rfc3339().as_str().into()),
    );
    headers.insert(
        "x-original-routing-key".into(),
        AMQPValue::LongString(event.into()),
    );
    headers.insert("x-catena-ingest-attempts".into(), AMQPValue::LongLongInt(5));
    publisher
        .publish(
            "",
            &names.parked_queue,
            body,
            BasicProperties::default().with_headers(headers),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
}

fn cli(prefix: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_catena-ingest"))
        .args(args)
        .env("CATENA_NAME_PREFIX", prefix)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

#[tokio::test]
async fn parked_list_show_replay_purge_and_a_killed_replay_loses_nothing() {
    let prefix = unique("parked");
    let names = Names::new(&prefix);
    let db = fresh_db("parked").await;
    let shutdown = Shutdown::new();
    let publisher = Publisher::start(AMQP_URL, "test parker", names.clone(), 1, shutdown.clone());
    assert!(publisher.wait_ready(Duration::from_secs(10)).await);

    // 40 valid events that exhausted their retries (say, during a long outage), 3 malformed.
    let events = scenario(12, 90);
    let valid: Vec<_> = events.iter().take(40).collect();
    // 40 at --rate 20 take 2 s, so the kill at 1 s lands mid-replay on any machine speed.
    assert_eq!(valid.len(), 40, "the scenario has enough events");
    for event in &valid {
        park_directly(
            &publisher,
            &names,
            &event.body(1),
            &event.event_name,
            "retries_exhausted",
        )
        .await;
    }
    for _ in 0..3 {
        park_directly(
            &publisher,
            &names,
            b"{broken",
            "connection.staled",
            "malformed",
        )
        .await;
    }
    let total = valid.len() + 3;

    let all = parked::list(AMQP_URL, &names, &Filter::default(), 1000)
        .await
        .unwrap();
    assert_eq!(all.len(), total);
    let malformed = Filter {
        reason: Some("malformed".into()),
        ..Default::default()
    };
    assert_eq!(
        parked::list(AMQP_URL, &names, &malformed, 1000)
            .await
            .unwrap()
            .len(),
        3
    );
    assert_eq!(
        queue_len(&names.parked_queue).await as usize,
        total,
        "listing changes nothing"
    );

    // show: masked body, reason and attempts.
    let accepted = all
        .iter()
        .find(|p| p.event_name == "invitation.accepted")
        .expect("an accepted invitation is parked");
    let shown = cli(&prefix, &["parked", "show", &accepted.id]);
    let out = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.status.success(), "{out}");
    assert!(
        out.contains("retries_exhausted") && out.contains("attempts:  5"),
        "{out}"
    );
    assert!(
        !out.contains("secret-token-do-not-log") && !out.contains("?invite="),
        "secrets are masked:\n{out}"
    );

    // Dry run changes nothing.
    let exhausted = Filter {
        reason: Some("retries_exhausted".into()),
        ..Default::default()
    };
    let dry = parked::replay(AMQP_URL, &names, &exhausted, true, 0.0)
        .await
        .unwrap();
    assert_eq!(
        (dry.examined, dry.matched, dry.replayed),
        (total as u64, valid.len() as u64, 0)
    );
    assert_eq!(queue_len(&names.parked_queue).await as usize, total);

    // A replay killed half-way, then a full one: every valid event applied, none twice.
    let (worker, stop) = spawn_worker(names.clone(), &db, AMQP_URL).await;
    let mut killed = std::process::Command::new(env!("CARGO_BIN_EXE_catena-ingest"))
        .args([
            "parked",
            "replay",
            "--reason",
            "retries_exhausted",
            "--rate",
            "20",
        ])
        .env("CATENA_NAME_PREFIX", &prefix)
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    signal(&killed, "KILL");
    killed.wait().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let applied = count(&db, EVENTS).await;
    let still_parked = queue_len(&names.parked_queue).await as i64;
    assert!(
        applied > 0 && applied < valid.len() as i64,
        "killed mid-replay ({applied})"
    );
    assert!(
        applied + still_parked >= total as i64,
        "nothing lost: {applied} applied + {still_parked} parked"
    );

    let report = parked::replay(AMQP_URL, &names, &exhausted, false, 0.0)
        .await
        .unwrap();
    assert_eq!(report.replayed, report.matched);
    assert_eq!(
        wait_for_count(&db, EVENTS, valid.len() as i64, Duration::from_secs(30)).await,
        valid.len() as i64
    );
    assert_eq!(
        queue_len(&names.parked_queue).await,
        3,
        "only the malformed ones remain"
    );

    // Purge needs --yes, then removes exactly the filtered ones.
    let refused = cli(&prefix, &["parked", "purge", "--reason", "malformed"]);
    assert!(!refused.status.success());
    assert_eq!(queue_len(&names.parked_queue).await, 3);
    let purged = parked::purge(AMQP_URL, &names, &malformed).await.unwrap();
    assert_eq!(purged.purged, 3);
    assert_eq!(queue_len(&names.parked_queue).await, 0);

    stop.trigger();
    worker.handle.await.unwrap();
    shutdown.trigger();
    delete_topology(&names).await;
    drop_db(&db).await;
}

#[tokio::test]
async fn fleet_show_prints_the_whole_fleet_without_secrets() {
    let names = Names::new(&unique("fleetshow"));
    let db = fresh_db("fleetshow").await;
    let relay = spawn_relay(names.clone(), AMQP_URL, &format!("{WEBHOOK_ID}={SECRET}")).await;
    let (worker, stop) = spawn_worker(names.clone(), &db, AMQP_URL).await;
    let client = reqwest::Client::new();
    let mut files: Vec<_> = std::fs::read_dir(format!(
        "{}/tests/fixtures/events",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
    .map(|e| e.unwrap().path())
    .collect();
    files.sort();
    for path in &files {
        assert_eq!(
            Post::new(&std::fs::read(path).unwrap())
                .send(&client, &relay.url)
                .await,
            202
        );
    }
    assert_eq!(
        wait_for_count(&db, EVENTS, files.len() as i64, Duration::from_secs(30)).await,
        files.len() as i64
    );

    let output = std::process::Command::new(env!("CARGO_BIN_EXE_catena-ingest"))
        .args(["fleet", "show", "FLEET-42", "--json"])
        .env("DATABASE_URL", &db)
        .output()
        .unwrap();
    assert!(output.status.success());
    let text = String::from_utf8(output.stdout).unwrap();
    let view: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(view["fleet"]["onboarding_status"], "connected");
    assert_eq!(view["invitation"]["status"], "accepted");
    assert_eq!(view["share_agreement"]["status"], "active");
    assert_eq!(view["connections"][0]["status"], "stale");
    assert_eq!(view["schedules"][0]["status"], "deactivated");
    assert_eq!(view["open_alerts"].as_array().unwrap().len(), 2);
    assert!(view["last_events"].as_array().unwrap().len() >= 5);
    assert!(
        !text.contains("?invite=") && !text.contains("eyJ"),
        "no magic link or token"
    );
    stop.trigger();
    worker.handle.await.unwrap();
    relay.stop().await;
    delete_topology(&names).await;
    drop_db(&db).await;
}

/// Every `catena_*` metric the dashboard and the alert rules query is exported by the binary.
#[tokio::test]
async fn dashboard_and_rules_query_only_exported_metrics() {
    let names = Names::new(&unique("dash"));
    let db = fresh_db("dash").await;
    let relay = spawn_relay(names.clone(), AMQP_URL, &format!("{WEBHOOK_ID}={SECRET}")).await;
    let mut config = catena_ingest::worker::WorkerConfig::new(AMQP_URL, names.clone(), &db);
    config.notifier.gauge_interval = Duration::from_millis(200);
    let (worker, stop) = spawn_worker_with(config).await;
    let client = reqwest::Client::new();
    assert_eq!(
        Post::new(&fixture("events/09-connection.staled.json"))
            .send(&client, &relay.url)
            .await,
        202
    );
    assert_eq!(
        wait_for_count(&db, EVENTS, 1, Duration::from_secs(20)).await,
        1
    );
    tokio::time::sleep(Duration::from_millis(600)).await;

    let mut exported = BTreeSet::new();
    for url in [
        relay.url.replace("/webhooks/catena", "/metrics"),
        format!("http://{}/metrics", worker.metrics_addr),
    ] {
        let text = client.get(url).send().await.unwrap().text().await.unwrap();
        for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
            let mut parts = line.split_whitespace().skip(2);
            let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
            exported.insert(name.to_owned());
            if kind == "histogram" {
                for suffix in ["_bucket", "_sum", "_count"] {
                    exported.insert(format!("{name}{suffix}"));
                }
            }
        }
    }
    let root = env!("CARGO_MANIFEST_DIR");
    let dashboard = std::fs::read_to_string(format!(
        "{root}/deploy/grafana/dashboards/catena-ingest.json"
    ))
    .unwrap();
    let _: serde_json::Value = serde_json::from_str(&dashboard).expect("the dashboard is JSON");
    let rules: String =
        std::fs::read_to_string(format!("{root}/deploy/prometheus/rules/catena.yml"))
            .unwrap()
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n");
    let mut queried = BTreeSet::new();
    for source in [&dashboard, &rules] {
        let bytes = source.as_bytes();
        let mut i = 0;
        while let Some(pos) = source[i..].find("catena_") {
            let start = i + pos;
            let boundary = start == 0
                || !(bytes[start - 1].is_ascii_alphanumeric()
                    || bytes[start - 1] == b'_'
                    || bytes[start - 1] == b'-'
                    || bytes[start - 1] == b'.');
            let end = source[start..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .map_or(source.len(), |e| start + e);
            if boundary && end - start > "catena_".len() {
                queried.insert(source[start..end].to_owned());
            }
            i = end.max(start + 1);
        }
    }
    assert!(
        queried.len() >= 10,
        "found the queried metrics: {queried:?}"
    );
    let missing: Vec<_> = queried.iter().filter(|m| !exported.contains(*m)).collect();
    assert!(
        missing.is_empty(),
        "queried but not exported: {missing:?}\nexported: {exported:?}"
    );
    stop.trigger();
    worker.handle.await.unwrap();
    relay.stop().await;
    delete_topology(&names).await;
    drop_db(&db).await;
}
