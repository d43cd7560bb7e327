//! Catena's side of the loop against the real broker and database, with fake-catena standing in
//! for Catena only: `subscriptions sync` and `rotate`, the relay's secret reloads, and the
//! reconciler bringing back everything Catena could not deliver during an outage.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use catena_ingest::catena::model::{CreateWebhook, DESIRED_EVENTS, WebhookStatus, mask_url};
use catena_ingest::control::rotate::Targets;
use catena_ingest::control::secrets_file::{Entry, SecretsFile, generate_secret};
use catena_ingest::fake_catena::FakeConfig;
use catena_ingest::fake_catena::config::{FailRule, FourXx, RateLimit, ReplayId, SignRetriesWith};
use catena_ingest::relay::live_secrets::version_of;

use crate::helpers::control::{ControlPlane, test_fake_config};
use crate::helpers::http::{get_text, metric_value};
use crate::helpers::*;

fn file_of(cp: &ControlPlane) -> SecretsFile {
    SecretsFile::parse(&std::fs::read_to_string(&cp.secrets_file).unwrap()).unwrap()
}

/// Ours: the subscriptions at our (masked) URL.
fn ours(cp: &ControlPlane) -> Vec<catena_ingest::catena::model::Webhook> {
    let masked = mask_url(&cp.public_url());
    cp.fake
        .fake
        .subscriptions()
        .into_iter()
        .filter(|w| w.url == masked)
        .collect()
}

async fn relay_version(cp: &ControlPlane) -> String {
    let text = get_text(&cp.pipeline.relay_endpoint("/secrets/version")).await;
    serde_json::from_str::<serde_json::Value>(&text).unwrap()["version"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn sync_creates_the_set_adopts_a_hand_made_one_and_then_changes_nothing() {
    let cp = ControlPlane::start(TestPipeline::builder("cp_sync"), test_fake_config()).await;
    // An operator made one by hand at our URL (the 409 path); another environment has its own.
    let hand = cp
        .fake
        .fake
        .create_by_hand("invitation.created", &cp.public_url());
    let other = cp.fake.fake.create_by_hand(
        "invitation.created",
        "https://staging.example.com/webhooks/catena",
    );
    let other_secret = cp.fake.fake.secret_of(&other.id).unwrap();

    let report = cp.sync().await;
    assert_eq!(report.exit_code(), 0, "{report:?}");
    assert_eq!(report.created.len(), 21);
    assert_eq!(report.adopted.len(), 1);
    assert_eq!(report.adopted[0].webhook_id.as_deref(), Some(&*hand.id));

    let subscriptions = ours(&cp);
    assert_eq!(
        subscriptions.len(),
        22,
        "one per desired name, no duplicate"
    );
    let file = file_of(&cp);
    assert!(
        file.entries.iter().all(|e| !e.is_pending()),
        "every entry re-keyed"
    );
    for subscription in &subscriptions {
        let secret = cp.fake.fake.secret_of(&subscription.id).unwrap();
        assert!(
            file.of_id(&subscription.id).any(|e| e.secret == secret),
            "the file holds the secret Catena signs {} with",
            subscription.event_name
        );
    }
    assert_eq!(
        cp.fake.fake.secret_of(&other.id).unwrap(),
        other_secret,
        "another environment's subscription is never touched"
    );
    let written = std::fs::read(&cp.secrets_file).unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || async {
            relay_version(&cp).await == version_of(&written)
        })
        .await,
        "the relay loaded what sync wrote"
    );
    assert_eq!(
        cp.pipeline
            .count("SELECT count(*) FROM catena_subscriptions")
            .await,
        22
    );

    // A second sync against an unchanged Catena: no POST, PATCH or DELETE.
    let before = cp.mutating_calls();
    let again = cp.sync().await;
    assert_eq!(cp.mutating_calls(), before, "{again:?}");
    assert_eq!(again.unchanged.len(), 22);
    assert_eq!(again.mutating_calls, 0);
    assert_eq!(again.exit_code(), 0);
    let dry = cp
        .sync_with(&catena_ingest::control::sync::SyncPlan {
            dry_run: true,
            ..cp.plan()
        })
        .await
        .unwrap();
    assert_eq!(dry.exit_code(), 0, "nothing to do: {dry:?}");

    // Deliveries verify: every event of a few fleets is applied.
    let events: Vec<_> = scenario(3, 11)
        .into_iter()
        .filter(|e| DESIRED_EVENTS.contains(&e.event_name.as_str()))
        .collect();
    let emitted = events
        .iter()
        .filter(|e| cp.fake.fake.emit_scenario_event(e).is_some())
        .count();
    assert_eq!(emitted, events.len(), "every name we need is subscribed");
    assert!(
        cp.pipeline
            .wait_for_applied(events.len(), Duration::from_secs(30))
            .await
            >= events.len()
    );
    let metrics = cp.pipeline.relay_metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "catena_relay_requests_total{outcome=\"invalid_signature\"}"
        ),
        Some(0.0),
        "no delivery was refused at any moment of the sync"
    );
    cp.stop().await;
}

/// The client as documented: cursors until `next_page` is null, a renewed token after a 401,
/// 429 with and without `Retry-After`, 5xx retried for reads only.
#[tokio::test]
async fn the_client_follows_pagination_token_expiry_429_and_retries_only_reads() {
    let config = FakeConfig {
        max_page_size: Some(2),
        ..test_fake_config()
    };
    let cp = ControlPlane::start(TestPipeline::builder("cp_client"), config).await;
    for n in 0..7 {
        cp.fake.fake.create_by_hand(
            "invitation.created",
            &format!("https://e{n}.example.com/webhooks/catena"),
        );
    }
    let client = cp.client();
    assert_eq!(client.list_all().await.unwrap().len(), 7, "4 pages of 2");
    let lists = |cp: &ControlPlane| {
        cp.fake
            .fake
            .calls()
            .iter()
            .filter(|c| c.method == "GET" && c.path.trim_end_matches('/').ends_with("/webhooks"))
            .count()
    };
    assert!(lists(&cp) >= 4, "followed the cursors");

    let tokens = |cp: &ControlPlane| {
        cp.fake
            .fake
            .calls()
            .iter()
            .filter(|c| c.path.contains("openid-connect/token"))
            .count()
    };
    let before = tokens(&cp);
    cp.fake.fake.expire_tokens();
    assert_eq!(
        client.list_all().await.unwrap().len(),
        7,
        "a 401 renews the token once"
    );
    assert_eq!(tokens(&cp), before + 1);

    for retry_after in [true, false] {
        cp.fake.fake.set_config(|c| {
            c.rate_limit = Some(RateLimit {
                per_second: 1.0,
                burst: 1,
                retry_after,
            })
        });
        let limited = |cp: &ControlPlane| {
            cp.fake
                .fake
                .calls()
                .iter()
                .filter(|c| c.status == 429)
                .count()
        };
        let before = limited(&cp);
        assert_eq!(client.list_all().await.unwrap().len(), 7);
        assert!(
            limited(&cp) > before,
            "429s were met (Retry-After: {retry_after}) and waited out"
        );
    }
    cp.fake.fake.set_config(|c| c.rate_limit = None);

    // A 503 on a read is retried; on a create it is not (the caller re-lists instead).
    cp.fake.fake.set_config(|c| {
        c.fail_next = vec![FailRule {
            path_contains: "/webhooks".into(),
            method: Some("GET".into()),
            status: 503,
            count: 1,
        }]
    });
    assert_eq!(client.list_all().await.unwrap().len(), 7);
    cp.fake.fake.set_config(|c| {
        c.fail_next = vec![FailRule {
            path_contains: "/webhooks".into(),
            method: Some("POST".into()),
            status: 503,
            count: 1,
        }]
    });
    let created = client
        .create(&CreateWebhook {
            url: "https://x.example.com/webhooks/catena".into(),
            event_name: "invitation.sent".into(),
            filters: None,
            secret: Some(generate_secret()),
        })
        .await;
    assert!(created.is_err(), "a create is never retried blindly");
    cp.stop().await;
}

/// Catena created the subscription with our pending secret, and the process died before it
/// recorded the id: the next sync adopts that one (409), re-keys the secret, and leaves neither
/// an orphan nor a second subscription.
#[tokio::test]
async fn a_crash_between_create_and_rekey_leaves_no_orphan_and_no_duplicate() {
    let cp = ControlPlane::start(TestPipeline::builder("cp_crash"), test_fake_config()).await;
    let secret = generate_secret();
    let mut file = SecretsFile::default();
    file.add(Entry {
        id: "*".into(),
        secret: secret.clone(),
        event_name: "connection.staled".into(),
        retire_after: None,
    });
    std::fs::write(&cp.secrets_file, file.render()).unwrap();
    let created = cp
        .client()
        .create(&CreateWebhook {
            url: cp.public_url(),
            event_name: "connection.staled".into(),
            filters: None,
            secret: Some(secret.clone()),
        })
        .await
        .unwrap();
    // The pending `*` entry already verifies the new subscription's deliveries.
    assert!(
        wait_until(Duration::from_secs(5), || async {
            relay_version(&cp).await == version_of(file.render().as_bytes())
        })
        .await
    );

    let report = cp.sync().await;
    assert_eq!(report.exit_code(), 0, "{report:?}");
    assert_eq!(report.adopted.len(), 1);
    assert_eq!(report.adopted[0].webhook_id.as_deref(), Some(&*created.id));
    let staled: Vec<_> = ours(&cp)
        .into_iter()
        .filter(|w| w.event_name == "connection.staled")
        .collect();
    assert_eq!(staled.len(), 1, "no duplicate");
    assert_eq!(
        cp.fake.fake.secret_of(&created.id).unwrap(),
        secret,
        "kept our secret"
    );
    let file = file_of(&cp);
    assert!(
        file.pending("connection.staled").is_none(),
        "re-keyed: no orphaned secret"
    );
    assert_eq!(file.of_id(&created.id).count(), 1);
    assert_eq!(ours(&cp).len(), 22);
    cp.stop().await;
}

#[derive(Clone, Copy, Debug)]
enum Outage {
    Refused,
    BlackHole,
}

#[tokio::test]
async fn an_outage_with_connections_refused_loses_nothing() {
    outage(Outage::Refused, "cp_out_refused", 21).await;
}

#[tokio::test]
async fn an_outage_in_a_black_hole_loses_nothing() {
    outage(Outage::BlackHole, "cp_out_blackhole", 22).await;
}

/// The relay unreachable for 30 s while Catena has traffic: its DLQs fill, subscriptions go
/// stale, nothing is reactivated meanwhile and an alert opens; afterwards every subscription is
/// active, every DLQ empty, every emitted event applied exactly once, the read model equal to a
/// control run of the same events, and the alert resolved.
async fn outage(mode: Outage, tag: &str, seed: u64) {
    // What Catena would deliver to us: the names we subscribe to (the scenario also has a name
    // from the future, which nobody subscribes to).
    let events: Vec<_> = scenario(20, seed)
        .into_iter()
        .filter(|e| DESIRED_EVENTS.contains(&e.event_name.as_str()))
        .collect();
    assert!(events.len() > 150, "{} events", events.len());
    let cp = ControlPlane::start(
        TestPipeline::builder(tag).reference(&events),
        test_fake_config(),
    )
    .await;
    let sync = cp.sync().await;
    assert_eq!(sync.created.len(), 22);
    // Past the breaker's grace period of the fresh subscriptions.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let reconciler = cp.start_reconciler(cp.reconcile_settings()).await;

    let (before, during) = events.split_at(events.len() - 150);
    for event in before {
        assert!(cp.fake.fake.emit_scenario_event(event).is_some());
    }
    cp.pipeline
        .wait_for_applied(before.len(), Duration::from_secs(60))
        .await;

    match mode {
        Outage::Refused => cp.proxy.cut(),
        Outage::BlackHole => cp.proxy.black_hole(),
    }
    let cut_at = Instant::now();
    let mut dlq_peak = 0;
    let mut stale_seen = false;
    for event in during {
        assert!(cp.fake.fake.emit_scenario_event(event).is_some());
        tokio::time::sleep(Duration::from_millis(200)).await;
        dlq_peak = dlq_peak.max(cp.fake.fake.dlq_total());
        stale_seen |= ours(&cp).iter().any(|w| w.status == WebhookStatus::Stale);
    }
    while cut_at.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        dlq_peak = dlq_peak.max(cp.fake.fake.dlq_total());
    }
    assert!(
        dlq_peak > 0,
        "Catena dead-lettered what it could not deliver"
    );
    let staled_sub = ours(&cp)
        .into_iter()
        .find(|w| w.event_name == "webhook.staled")
        .unwrap();
    // In a black hole each attempt waits out Catena's 3 s timeout, so a message reaches the DLQ
    // 15.5 s after it was sent: the cut lasts until webhook.staled got there too.
    assert!(
        wait_until(Duration::from_secs(25), || async {
            cp.fake.fake.dlq_len(&staled_sub.id) > 0
        })
        .await,
        "webhook.staled itself could not be delivered"
    );
    let cut_for = cut_at.elapsed();
    // (webhook.staled is only emitted by a trip, so by now the breaker has tripped.)
    stale_seen |= ours(&cp).iter().any(|w| w.status == WebhookStatus::Stale);
    assert!(stale_seen, "the busy subscriptions went stale");
    let stale: Vec<String> = ours(&cp)
        .into_iter()
        .filter(|w| w.status == WebhookStatus::Stale)
        .map(|w| w.id)
        .collect();
    assert_eq!(
        cp.activations(),
        0,
        "no reactivation while our relay is unreachable"
    );
    assert!(
        cp.pipeline
            .count("SELECT count(*) FROM alerts WHERE kind = 'webhook_stale' AND state = 'open'")
            .await
            > 0,
        "a webhook_stale alert is open"
    );

    cp.proxy.restore();
    let restored_at = Instant::now();
    let ids: HashSet<String> = ours(&cp).into_iter().map(|w| w.id).collect();
    let recovered = wait_until(Duration::from_secs(90), || async {
        let all_active = ours(&cp).iter().all(|w| w.status == WebhookStatus::Active);
        all_active && cp.fake.fake.dlq_total() == 0
    })
    .await;
    let dlq_empty_after = restored_at.elapsed();
    assert!(
        recovered,
        "every subscription active with an empty DLQ: {:?}",
        ours(&cp)
    );
    let ledger: Vec<_> = cp
        .fake
        .fake
        .ledger()
        .into_iter()
        .filter(|entry| ids.contains(&entry.webhook_id))
        .collect();
    let want = ledger.len();
    assert_eq!(
        cp.pipeline
            .wait_for_applied(want, Duration::from_secs(60))
            .await,
        want,
        "one webhook_events row per emitted event"
    );
    let client = cp.pipeline.db().client().await;
    let rows = client
        .query("SELECT event_id::text, outcome, count(*) OVER (PARTITION BY event_id) FROM webhook_events", &[])
        .await
        .unwrap();
    let applied: HashMap<String, (String, i64)> = rows
        .iter()
        .map(|r| {
            (
                r.get::<_, String>(0),
                (r.get::<_, String>(1), r.get::<_, i64>(2)),
            )
        })
        .collect();
    let doubled = applied.values().filter(|(_, n)| *n > 1).count();
    for entry in &ledger {
        let (outcome, n) = applied
            .get(&entry.id.to_string())
            .unwrap_or_else(|| panic!("{} ({}) was never applied", entry.id, entry.event_name));
        assert_eq!(
            (outcome.as_str(), *n),
            ("applied", 1),
            "{}",
            entry.event_name
        );
    }
    assert_eq!(doubled, 0);
    assert_same_state(
        &cp.pipeline.reference().fleet_snapshot().await,
        &cp.pipeline.db().fleet_snapshot().await,
    );
    assert!(
        wait_until(Duration::from_secs(10), || async {
            cp.pipeline
                .count(
                    "SELECT count(*) FROM alerts WHERE kind = 'webhook_stale' AND state = 'open'",
                )
                .await
                == 0
        })
        .await,
        "the alert is resolved"
    );
    println!(
        "outage ({mode:?}): {} events emitted ({} during the {:.0} s cut), {} subscriptions stale, DLQ peak {dlq_peak}, relay back to every DLQ empty in {:.1} s, applied twice: {doubled}",
        ledger.len(),
        during.len(),
        cut_for.as_secs_f64(),
        stale.len(),
        dlq_empty_after.as_secs_f64()
    );
    reconciler.handle.abort();
    cp.stop().await;
}

/// `rotate --all` while Catena delivers, with a Catena that keeps signing with the old secret
/// for 2 s after the switch and signs retries with the secret of the first attempt: the relay
/// refuses nothing and nothing is lost.
#[tokio::test]
async fn rotation_under_load_refuses_no_delivery() {
    let config = FakeConfig {
        four_xx: FourXx::Drop,
        secret_switch_delay: Duration::from_secs(2),
        sign_retries_with: SignRetriesWith::First,
        ..test_fake_config()
    };
    let cp = ControlPlane::start(TestPipeline::builder("cp_rotate"), config).await;
    cp.sync().await;
    let events: Vec<_> = scenario(8, 31)
        .into_iter()
        .filter(|e| DESIRED_EVENTS.contains(&e.event_name.as_str()))
        .collect();
    let fake = cp.fake.fake.clone();
    let sender = {
        let events = events.clone();
        tokio::spawn(async move {
            for event in &events {
                fake.emit_scenario_event(event);
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = file_of(&cp).entries.len();
    let report = cp.rotate(Targets::All, Duration::from_secs(3600)).await;
    assert_eq!(report.rotated.len(), 22);
    sender.await.unwrap();
    assert_eq!(
        file_of(&cp).entries.len(),
        before + 22,
        "old and new side by side"
    );
    let ids: HashSet<String> = ours(&cp).into_iter().map(|w| w.id).collect();
    let want = cp
        .fake
        .fake
        .ledger()
        .iter()
        .filter(|e| ids.contains(&e.webhook_id))
        .count();
    assert!(
        cp.pipeline
            .wait_for_applied(want, Duration::from_secs(60))
            .await
            >= want
    );
    let metrics = cp.pipeline.relay_metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "catena_relay_requests_total{outcome=\"invalid_signature\"}"
        ),
        Some(0.0),
        "no delivery refused during the rotation"
    );
    assert_eq!(cp.fake.fake.dlq_total(), 0);
    // The new secret is what Catena signs with now, and the registry says so.
    for w in ours(&cp) {
        let secret = cp.fake.fake.secret_of(&w.id).unwrap();
        assert!(file_of(&cp).of_id(&w.id).any(|e| e.secret == secret));
    }
    // Once the overlap has passed, sync retires the old secrets (and only those).
    let mut file = file_of(&cp);
    for entry in &mut file.entries {
        if entry.retire_after.is_some() {
            entry.retire_after = Some(chrono::Utc::now() - chrono::Duration::seconds(1));
        }
    }
    std::fs::write(&cp.secrets_file, file.render()).unwrap();
    let retired = cp.sync().await;
    assert_eq!(retired.retired_secrets, 22);
    assert_eq!(file_of(&cp).entries.len(), 22);
    cp.stop().await;
}

/// A secret changed behind our back (by hand at Catena): the relay refuses those deliveries,
/// Catena dead-letters them and stales the subscription, and the reconciler does not reactivate
/// it (it would only trip again) but says "rotate"; after a rotation it reactivates, replays, and
/// every event arrives.
#[tokio::test]
async fn a_secret_mismatch_is_not_reactivated_until_a_rotation() {
    let cp = ControlPlane::start(TestPipeline::builder("cp_mismatch"), test_fake_config()).await;
    cp.sync().await;
    let staled = ours(&cp)
        .into_iter()
        .find(|w| w.event_name == "connection.staled")
        .unwrap();
    cp.client()
        .patch(
            &staled.id,
            &catena_ingest::catena::model::PatchWebhook {
                secret: Some(generate_secret()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let reconciler = cp.start_reconciler(cp.reconcile_settings()).await;
    // Past the grace period the PATCH started, then enough failed messages to trip the breaker.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let data = serde_json::json!([{"id": uuid::Uuid::new_v4(), "fleet_id": uuid::Uuid::new_v4(), "status": "stale", "source_name": "samsara"}]);
    let mut emitted = Vec::new();
    for _ in 0..14 {
        emitted.push(
            cp.fake
                .fake
                .emit("connection.staled", data.clone(), None)
                .unwrap(),
        );
    }
    assert!(
        wait_until(Duration::from_secs(40), || async {
            ours(&cp)
                .iter()
                .any(|w| w.id == staled.id && w.status == WebhookStatus::Stale)
        })
        .await,
        "refused deliveries trip Catena's breaker"
    );
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(cp.activations(), 0, "a secret mismatch is not reactivated");
    let details = cp
        .pipeline
        .db()
        .row("SELECT details->>'cause' FROM alerts WHERE kind = 'webhook_stale' AND state = 'open'")
        .await;
    assert_eq!(details, vec!["secret_mismatch".to_owned()]);
    let metrics = get_text(&format!("http://{}/metrics", reconciler.metrics_addr)).await;
    assert_eq!(
        metric_value(&metrics, "catena_control_secret_refusals"),
        Some(1.0)
    );

    cp.rotate(
        Targets::Ids(vec![staled.id.clone()]),
        Duration::from_secs(3600),
    )
    .await;
    assert!(
        wait_until(Duration::from_secs(40), || async {
            ours(&cp).iter().all(|w| w.status == WebhookStatus::Active)
                && cp.fake.fake.dlq_total() == 0
        })
        .await,
        "reactivated and replayed after the rotation"
    );
    // An empty DLQ means replayed, not yet delivered: wait for the deliveries first.
    let client = cp.pipeline.db().client().await;
    eventually(
        Duration::from_secs(30),
        || async {
            client
                .query_one(
                    "SELECT count(DISTINCT event_id) FROM webhook_events WHERE event_id = ANY($1)",
                    &[&emitted],
                )
                .await
                .unwrap()
                .get::<_, i64>(0)
        },
        |n| *n == emitted.len() as i64,
    )
    .await;
    for id in &emitted {
        let n: i64 = client
            .query_one(
                "SELECT count(*) FROM webhook_events WHERE event_id = $1",
                &[id],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 1, "every refused event came back once");
    }
    reconciler.handle.abort();
    cp.stop().await;
}

/// Characterisation of a behaviour Catena's docs leave open: a replay that gives each message a
/// fresh envelope id. Our dedup key is the id, so a re-minted replay of an event we had already
/// applied would be applied again, and its event time (the id's UUIDv7 time) would be the
/// replay's. This shows it happens with `replay_id=remint`, and that the default assumption
/// (ids kept, as with `stable`) gives exactly-once; README, "Does dedup survive a replay?".
#[tokio::test]
async fn a_replay_that_remints_ids_applies_the_event_under_a_new_key() {
    let cp = ControlPlane::start(
        TestPipeline::builder("cp_remint"),
        FakeConfig {
            replay_id: ReplayId::Remint,
            ..test_fake_config()
        },
    )
    .await;
    cp.sync().await;
    let sub = ours(&cp)
        .into_iter()
        .find(|w| w.event_name == "invitation.viewed")
        .unwrap();
    cp.proxy.cut();
    let data = serde_json::json!([{"id": uuid::Uuid::new_v4(), "fleet_ref": "REMINT-1", "status": "viewed"}]);
    let original = cp.fake.fake.emit("invitation.viewed", data, None).unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || async {
            cp.fake.fake.dlq_len(&sub.id) == 1
        })
        .await
    );
    cp.proxy.restore();
    cp.client().replay(&sub.id).await.unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || async {
            cp.pipeline
                .count("SELECT count(*) FROM webhook_events WHERE event_name = 'invitation.viewed'")
                .await
                == 1
        })
        .await
    );
    let client = cp.pipeline.db().client().await;
    let row = client
        .query_one(
            "SELECT event_id, event_time FROM webhook_events WHERE event_name = 'invitation.viewed'",
            &[],
        )
        .await
        .unwrap();
    let (applied_id, event_time): (uuid::Uuid, chrono::DateTime<chrono::Utc>) =
        (row.get(0), row.get(1));
    assert_ne!(
        applied_id, original,
        "applied under a re-minted id: a new dedup key"
    );
    let original_time = chrono::DateTime::<chrono::Utc>::from_timestamp_millis(
        original.get_timestamp().unwrap().to_unix().0 as i64 * 1000,
    )
    .unwrap();
    assert!(
        event_time > original_time,
        "and with the replay's time as its event time"
    );
    cp.stop().await;
}

/// The binary's `subscriptions` commands against the fake: `--dry-run` exits 2 while there is
/// something to do and 0 once in sync, `--json` reports, `list` shows ours, `rotate --id` of an
/// id that is not ours exits 2, and `reconcile --once` runs one cycle and exits 0.
#[tokio::test]
async fn the_cli_syncs_lists_rotates_and_reconciles_once_with_the_documented_exit_codes() {
    let cp = ControlPlane::start(TestPipeline::builder("cp_cli"), test_fake_config()).await;
    let settings = cp.catena_settings();
    let relay_admin = format!("http://{}", cp.pipeline.relay_addr());
    let secrets_file = cp.secrets_file.display().to_string();
    let public_url = cp.public_url();
    let cli = |args: &[&str]| {
        cp.pipeline
            .cli(args)
            .env("CATENA_API_URL", &settings.api_url)
            .env("CATENA_AUTH_URL", &settings.auth_url)
            .env("CATENA_CLIENT_ID", &settings.client_id)
            .env("CATENA_CLIENT_SECRET", &settings.client_secret)
            .env("CATENA_PUBLIC_URL", &public_url)
            .env("CATENA_WEBHOOK_SECRETS_FILE", &secrets_file)
            .env("CATENA_RELAY_ADMIN_URLS", &relay_admin)
    };
    let insecure = ["subscriptions", "sync", "--allow-insecure-url"];
    let dry = cli(&[&insecure[..], &["--dry-run", "--json"]].concat())
        .output()
        .await;
    assert_eq!(dry.status.code(), Some(2), "changes to make");
    let report: serde_json::Value = serde_json::from_slice(&dry.stdout).unwrap();
    assert_eq!(report["created"].as_array().unwrap().len(), 22);
    assert_eq!(cp.mutating_calls(), 0, "a dry run changes nothing");

    let refused = cli(&["subscriptions", "sync"]).output().await;
    assert_eq!(
        refused.status.code(),
        Some(1),
        "http:// needs --allow-insecure-url"
    );

    let synced = cli(&insecure).output().await;
    assert_eq!(
        synced.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&synced.stderr)
    );
    let again = cli(&[&insecure[..], &["--dry-run"]].concat())
        .output()
        .await;
    assert_eq!(again.status.code(), Some(0), "in sync");

    let listed = cli(&["subscriptions", "list", "--json"]).output().await;
    assert_eq!(listed.status.code(), Some(0));
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(rows.len(), 22);
    assert!(rows.iter().all(|r| r["status"] == "active"));

    let unknown = cli(&[
        "subscriptions",
        "rotate",
        "--id",
        "00000000-0000-0000-0000-000000000000",
    ])
    .output()
    .await;
    assert_eq!(unknown.status.code(), Some(2));

    let once = cli(&[
        "reconcile",
        "--once",
        "--reconcile-metrics-listen",
        "127.0.0.1:0",
    ])
    .env(
        "RELAY_READY_URL",
        format!("http://{}/readyz", cp.proxy.addr),
    )
    .output()
    .await;
    assert_eq!(
        once.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&once.stderr)
    );
    let observed = cp
        .pipeline
        .count(
            "SELECT count(*) FROM catena_subscriptions WHERE status = 'active' AND dlq_count = 0",
        )
        .await;
    assert_eq!(observed, 22, "one cycle observed every subscription");
    let logs = [dry.stderr, synced.stderr, once.stderr].concat();
    assert!(
        !String::from_utf8_lossy(&logs).contains(&settings.client_secret),
        "the client secret is never logged"
    );
    cp.stop().await;
}
