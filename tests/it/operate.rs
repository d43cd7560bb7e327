//! Operator tooling against the real broker and database: the parking lot CLI, `fleet show`,
//! and the contract between the shipped dashboard/rules and the metrics the binary exports.

use std::collections::BTreeSet;
use std::time::Duration;

use catena_ingest::broker::Publisher;
use catena_ingest::config::DedupRetention;
use catena_ingest::ops::parked::{self, Filter, ReplayOptions};
use catena_ingest::shutdown::Shutdown;

use catena_ingest::message::ParkReason;

use crate::helpers::broker::park_directly;
use crate::helpers::*;

#[tokio::test]
async fn parked_list_show_replay_purge_and_a_killed_replay_loses_nothing() {
    let mut p = TestPipeline::builder("parked").start().await;
    let names = p.names.clone();
    let shutdown = Shutdown::new();
    let publisher = Publisher::start(
        amqp_url(),
        "test parker",
        names.clone(),
        1,
        shutdown.clone(),
    );
    assert!(publisher.wait_ready(Duration::from_secs(10)).await);

    // 40 valid events that exhausted their retries (say, during a long outage), 3 malformed.
    let events = scenario(12, 90);
    let valid: Vec<_> = events.iter().take(40).collect();
    // 40 at --rate 20 take 2 s, so the kill at 1 s lands mid-replay on any machine speed.
    assert_eq!(valid.len(), 40, "the scenario has enough events");
    for event in &valid {
        park_directly(
            &publisher,
            &names.parked_queue,
            &event.body(1),
            &event.event_name,
            ParkReason::RetriesExhausted,
            chrono::Utc::now(),
            5,
        )
        .await;
    }
    for _ in 0..3 {
        park_directly(
            &publisher,
            &names.parked_queue,
            b"{broken",
            "connection.staled",
            ParkReason::Malformed,
            chrono::Utc::now(),
            5,
        )
        .await;
    }
    let total = valid.len() + 3;

    let all = parked::list(amqp_url(), &names, &Filter::default(), 1000)
        .await
        .unwrap();
    assert_eq!(all.len(), total);
    let malformed = Filter {
        reason: Some("malformed".into()),
        ..Default::default()
    };
    assert_eq!(
        parked::list(amqp_url(), &names, &malformed, 1000)
            .await
            .unwrap()
            .len(),
        3
    );
    // Browsed messages return to the quorum queue asynchronously after the channel closes.
    let settled = || {
        eventually(
            Duration::from_secs(5),
            || p.parked_len(),
            |n| *n as usize == total,
        )
    };
    assert_eq!(settled().await as usize, total, "listing changes nothing");

    // show: masked body, reason and attempts.
    let accepted = all
        .iter()
        .find(|p| p.event_name == "invitation.accepted")
        .expect("an accepted invitation is parked");
    let shown = p.cli(&["parked", "show", &accepted.id]).output().await;
    let out = String::from_utf8_lossy(&shown.stdout);
    assert!(
        shown.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&shown.stderr)
    );
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
    let options = ReplayOptions::new(&DedupRetention::default());
    let dry_run = ReplayOptions {
        dry_run: true,
        ..options.clone()
    };
    let dry = parked::replay(amqp_url(), &names, &exhausted, &dry_run)
        .await
        .unwrap();
    assert_eq!(
        (dry.examined, dry.matched, dry.replayed),
        (total as u64, valid.len() as u64, 0)
    );
    assert_eq!(settled().await as usize, total, "a dry run changes nothing");

    // A replay killed half-way, then a full one: every valid event applied, none twice.
    p.start_worker().await;
    let killed = p
        .cli(&[
            "parked",
            "replay",
            "--reason",
            "retries_exhausted",
            "--rate",
            "20",
        ])
        .spawn();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    killed.signal("KILL");
    killed.wait().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let applied = p.applied().await;
    let still_parked = p.parked_len().await as usize;
    assert!(
        applied > 0 && applied < valid.len(),
        "killed mid-replay ({applied})"
    );
    assert!(
        applied + still_parked >= total,
        "nothing lost: {applied} applied + {still_parked} parked"
    );

    let report = parked::replay(amqp_url(), &names, &exhausted, &options)
        .await
        .unwrap();
    assert_eq!(report.replayed, report.matched);
    assert_eq!(
        p.wait_for_applied(valid.len(), Duration::from_secs(30))
            .await,
        valid.len()
    );
    assert_eq!(p.parked_len().await, 3, "only the malformed ones remain");

    // Purge needs --yes, then removes exactly the filtered ones.
    let refused = p
        .cli(&["parked", "purge", "--reason", "malformed"])
        .output()
        .await;
    assert!(!refused.status.success());
    assert_eq!(p.parked_len().await, 3);
    let purged = parked::purge(amqp_url(), &names, &malformed).await.unwrap();
    assert_eq!(purged.purged, 3);
    assert_eq!(p.parked_len().await, 0);

    p.stop().await;
    shutdown.trigger();
}

#[tokio::test]
async fn fleet_show_prints_the_whole_fleet_without_secrets() {
    let p = TestPipeline::builder("fleetshow")
        .relay()
        .worker()
        .start()
        .await;
    let fixtures = fixture_events();
    for body in &fixtures {
        assert_eq!(p.send(body).await, 202);
    }
    assert_eq!(
        p.wait_for_applied(fixtures.len(), Duration::from_secs(30))
            .await,
        fixtures.len()
    );

    let output = p
        .cli(&["fleet", "show", "FLEET-42", "--json"])
        .output()
        .await;
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
    p.stop().await;
}

/// Every `catena_*` metric the dashboard and the alert rules query is exported by the binary.
#[tokio::test]
async fn dashboard_and_rules_query_only_exported_metrics() {
    let p = TestPipeline::builder("dash")
        .relay()
        .worker_config(|config| {
            config.worker.notifier.gauge_interval = Duration::from_millis(200);
            config.worker.retention.disabled = false; // its metrics are queried too
        })
        .start()
        .await;
    assert_eq!(
        p.send(&fixture("events/09-connection.staled.json")).await,
        202
    );
    assert_eq!(p.wait_for_applied(1, Duration::from_secs(20)).await, 1);
    tokio::time::sleep(Duration::from_millis(600)).await;

    // The reconciler's registry, as `reconcile` builds it (its API counter gets its label sets
    // from the client).
    let control = ::prometheus::Registry::new();
    let control_metrics = catena_ingest::metrics::ControlMetrics::new(&control);
    let _client = catena_ingest::catena::CatenaClient::new(
        Default::default(),
        Some(control_metrics.api_requests.clone()),
    );
    let mut exported = BTreeSet::new();
    for text in [
        p.relay_metrics().await,
        http::get_text(&p.worker_endpoint("/metrics")).await,
        catena_ingest::metrics::render(&control),
    ] {
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
    p.stop().await;
}
