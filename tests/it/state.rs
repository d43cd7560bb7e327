//! The state rules against a real PostgreSQL, without the broker: every event kind alone, the
//! fixture lifecycle in order and reversed, back-filling, and a property test of convergence.

use catena_ingest::state::Applied;
use proptest::prelude::*;

use crate::helpers::*;

/// The fixture lifecycle, in order: index `i` is fixture `0{i+1}-*`.
fn fixtures() -> Vec<Vec<u8>> {
    [
        "01-invitation.created.json",
        "02-invitation.viewed.json",
        "03-invitation.accepted.json",
        "04-share_agreement.created.json",
        "05-connection.created.json",
        "06-fleet_connection.created.json",
        "07-execution.failed.json",
        "08-schedule.deactivated.json",
        "09-connection.staled.json",
    ]
    .iter()
    .map(|f| fixture(&format!("events/{f}")))
    .collect()
}

const FLEET: &str = "d23f0824-128b-4f33-8c5c-7fd0a6a3a450";
const CONNECTION: &str = "6b0d549b-6f03-475a-9600-a35a099950d8";

#[tokio::test]
async fn fixture_lifecycle_in_order_gives_the_documented_rows() {
    let db = TestDb::fresh("state_order").await;
    let applied = db.apply(&fixtures()).await;
    assert!(applied.iter().all(|a| *a == Applied::Applied));

    assert_eq!(
        db.row("SELECT status, fleet_ref, fleet_id::text FROM invitations")
            .await,
        ["accepted", "FLEET-42", FLEET]
    );
    assert_eq!(
        db.row(
            "SELECT fleet_ref, onboarding_status, share_status, invitation_id::text FROM fleets"
        )
        .await,
        [
            "FLEET-42",
            "connected",
            "active",
            "6513270e-269e-4d37-b2a7-4de452e6b438"
        ]
    );
    assert_eq!(
        db.row("SELECT status, source_name, fleet_id::text, (staled_at IS NOT NULL)::text FROM connections").await,
        ["stale", "samsara", FLEET, "true"]
    );
    assert_eq!(
        db.row("SELECT connection_id::text, fleet_id::text FROM fleet_connections")
            .await,
        [CONNECTION, FLEET]
    );
    assert_eq!(
        db.row("SELECT status, failed_executions::text, consecutive_error_threshold::text, (last_failed_at IS NOT NULL)::text FROM schedules").await,
        ["deactivated", "1", "6", "true"]
    );
    let alerts = db
        .client()
        .await
        .query(
            "SELECT kind, state, fleet_ref, fleet_id::text FROM alerts ORDER BY kind",
            &[],
        )
        .await
        .unwrap();
    let alerts: Vec<(String, String, String, String)> = alerts
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    assert_eq!(
        alerts,
        [
            (
                "connection_stale".into(),
                "open".into(),
                "FLEET-42".into(),
                FLEET.into()
            ),
            (
                "schedule_deactivated".into(),
                "open".into(),
                "FLEET-42".into(),
                FLEET.into()
            ),
        ]
    );
    assert_eq!(
        db.count("SELECT count(*) FROM alert_outbox WHERE action = 'open'")
            .await,
        2
    );

    // Every delivery again: all duplicates, nothing changes.
    let before = db.snapshot().await;
    let again = db.apply(&fixtures()).await;
    assert!(again.iter().all(|a| *a == Applied::Duplicate));
    assert_eq!(db.snapshot().await, before);
}

#[tokio::test]
async fn reversed_lifecycle_converges_and_backfills_fleet_ref() {
    let ordered = TestDb::fresh("state_fwd").await;
    let reversed = TestDb::fresh("state_rev").await;
    let mut bodies = fixtures();
    ordered.apply_batches(bodies.chunks(1)).await;
    bodies.reverse();
    reversed.apply_batches(bodies.chunks(1)).await;
    assert_same_state(&ordered.snapshot().await, &reversed.snapshot().await);
    // The stale alert was raised before any mapping existed, and got its fleet_ref later.
    assert_eq!(
        reversed
            .row("SELECT fleet_ref FROM alerts WHERE kind = 'connection_stale'")
            .await,
        ["FLEET-42"]
    );
    // A late invitation.accepted does not move a connected fleet backwards.
    assert_eq!(
        reversed.row("SELECT onboarding_status FROM fleets").await,
        ["connected"]
    );
}

#[tokio::test]
async fn each_event_kind_alone() {
    let f = fixtures();
    let cases: Vec<(usize, &str, Vec<&str>)> = vec![
        (
            0,
            "SELECT status, fleet_ref, (fleet_id IS NULL)::text FROM invitations",
            vec!["created", "FLEET-42", "true"],
        ),
        (1, "SELECT status FROM invitations", vec!["viewed"]),
        (
            2,
            "SELECT i.status, f.onboarding_status, f.fleet_ref FROM invitations i JOIN fleets f USING (fleet_id)",
            vec!["accepted", "accepted", "FLEET-42"],
        ),
        (
            3,
            "SELECT onboarding_status, fleet_ref, share_status FROM fleets",
            vec!["share_agreed", "FLEET-42", "active"],
        ),
        (
            4,
            "SELECT status, source_name FROM connections",
            vec!["active", "samsara"],
        ),
        // Connection reuse: never saw connection.created, still recorded, fleet connected.
        (
            5,
            "SELECT f.onboarding_status, c.status, c.fleet_id::text FROM fleets f JOIN connections c USING (fleet_id)",
            vec!["connected", "active", FLEET],
        ),
        (
            6,
            "SELECT status, failed_executions::text FROM schedules",
            vec!["active", "1"],
        ),
        (
            7,
            "SELECT s.status, a.kind, a.state FROM schedules s JOIN alerts a ON a.subject_id = s.schedule_id",
            vec!["deactivated", "schedule_deactivated", "open"],
        ),
        (
            8,
            "SELECT c.status, a.state, a.fleet_id::text, coalesce(a.fleet_ref, 'NULL') FROM connections c JOIN alerts a ON a.subject_id = c.connection_id",
            vec!["stale", "open", FLEET, "NULL"],
        ),
    ];
    for (index, sql, want) in cases {
        let db = TestDb::fresh(&format!("state_alone{index}")).await;
        db.apply(std::slice::from_ref(&f[index])).await;
        assert_eq!(db.row(sql).await, want, "fixture {index}");
    }
}

#[tokio::test]
async fn recovery_resolves_the_stale_alert_only_when_newer() {
    let db = TestDb::fresh("state_recover").await;
    let staled = fixture("events/09-connection.staled.json");
    let mut envelope: serde_json::Value = serde_json::from_slice(&staled).unwrap();
    // An *older* active record (id time before the staled one) must not resolve it.
    envelope["event_name"] = "connection.created".into();
    envelope["data"][0]["status"] = "active".into();
    envelope["id"] = "019abf00-0000-7000-8000-000000000001".into();
    let older_active = serde_json::to_vec(&envelope).unwrap();
    envelope["id"] = "01a00000-0000-7000-8000-000000000002".into();
    let newer_active = serde_json::to_vec(&envelope).unwrap();

    db.apply(std::slice::from_ref(&staled)).await;
    db.apply(&[older_active]).await;
    assert_eq!(db.row("SELECT state FROM alerts").await, ["open"]);
    db.apply(&[newer_active]).await;
    assert_eq!(
        db.row("SELECT state, (resolved_at IS NOT NULL)::text FROM alerts")
            .await,
        ["resolved", "true"]
    );
    assert_eq!(db.row("SELECT status FROM connections").await, ["active"]);
    assert_eq!(
        db.count("SELECT count(*) FROM alert_outbox WHERE action = 'resolve'")
            .await,
        1
    );
}

/// Several stale episodes of one connection, their recoveries applied before the staling:
/// every period still leaves its own resolved row, none pages, and the open one pages once.
#[tokio::test]
async fn every_stale_period_leaves_its_row_whatever_the_order() {
    let staled = fixture("events/09-connection.staled.json");
    let at = |event_name: &str, status: &str, id: &str| {
        let mut envelope: serde_json::Value = serde_json::from_slice(&staled).unwrap();
        envelope["event_name"] = event_name.into();
        envelope["data"][0]["status"] = status.into();
        envelope["id"] = id.into();
        serde_json::to_vec(&envelope).unwrap()
    };
    let timeline = [
        at(
            "connection.staled",
            "stale",
            "01a00000-0001-7000-8000-000000000001",
        ),
        at(
            "connection.created",
            "active",
            "01a00000-0002-7000-8000-000000000002",
        ),
        at(
            "connection.staled",
            "stale",
            "01a00000-0003-7000-8000-000000000003",
        ),
        at(
            "connection.created",
            "inactive",
            "01a00000-0004-7000-8000-000000000004",
        ),
        at(
            "connection.created",
            "active",
            "01a00000-0005-7000-8000-000000000005",
        ),
        at(
            "connection.staled",
            "stale",
            "01a00000-0006-7000-8000-000000000006",
        ),
    ];
    let history = "SELECT state || ' ' || coalesce(resolution, '-') FROM alerts ORDER BY opened_at";
    let in_order = TestDb::fresh("episodes_in_order").await;
    in_order.apply_batches(timeline.chunks(1)).await;
    let reversed = TestDb::fresh("episodes_reversed").await;
    for body in timeline.iter().rev() {
        reversed.apply(std::slice::from_ref(body)).await;
    }
    for db in [&in_order, &reversed] {
        let states: Vec<String> = db
            .client()
            .await
            .query(history, &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(
            states,
            [
                "resolved connection active again",
                "resolved connection active again",
                "open -"
            ]
        );
        assert!(db.outbox_problems().await.is_empty());
    }
    assert_same_state(&in_order.snapshot().await, &reversed.snapshot().await);
    let pages = "SELECT count(*) FROM alert_outbox WHERE action = 'open'";
    assert_eq!(
        in_order.count(pages).await,
        3,
        "in order, each period paged when it began"
    );
    assert_eq!(
        reversed.count(pages).await,
        1,
        "reversed, only the period still going on"
    );
}

/// A churn scenario of `fleets` applied once in order (the reference), and its deliveries with
/// duplicates (share `dup`), shuffled.
async fn reference_and_deliveries(
    tag: &str,
    fleets: usize,
    seed: u64,
    dup: f64,
) -> (TestDb, Vec<Vec<u8>>) {
    let events = churn_scenario(fleets, seed);
    let reference = TestDb::fresh(&format!("{tag}_ref")).await;
    reference.apply_in_order(&events).await;
    let deliveries = duplicated_and_shuffled(&events, dup, seed ^ 0x5eed);
    let bodies = deliveries
        .iter()
        .map(|d| events[d.event].body(d.attempt))
        .collect();
    (reference, bodies)
}

/// Every column of every table as the reference has it, and the outbox agrees with the alerts.
async fn assert_converged(reference: &TestDb, db: &TestDb) {
    assert_same_state(&reference.snapshot().await, &db.snapshot().await);
    let problems = db.outbox_problems().await;
    assert!(problems.is_empty(), "{problems:#?}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    /// Any permutation of a generated stream that takes every branch many times (several
    /// stale episodes per connection, failure bursts over the warning threshold, settings that
    /// change, several share-agreement updates, invitations re-sent and declined twice), with
    /// duplicates, applied in random batch sizes, ends in the state of the same events applied
    /// once in order: every column of every table, the alert history and the warnings.
    #[test]
    fn any_order_with_duplicates_converges(seed in 0u64..1_000_000, dup in 0.0f64..0.6, batch in 1usize..60) {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let (reference, bodies) = reference_and_deliveries("prop", 6, seed, dup).await;
            let shuffled = TestDb::fresh("prop_mix").await;
            shuffled.apply_batches(bodies.chunks(batch)).await;
            assert_converged(&reference, &shuffled).await;
        });
    }

    /// The same, with each batch split as the worker splits it (parts that share no entity and
    /// no dedup key, committed concurrently, then the back-fills): the state must not depend
    /// on it, and no two parts may deadlock (a deadlock fails the apply).
    #[test]
    fn batches_split_into_concurrent_transactions_converge(seed in 0u64..1_000_000, dup in 0.0f64..0.6, batch in 8usize..120, parts in 2usize..5) {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let (reference, bodies) = reference_and_deliveries("split", 8, seed, dup).await;
            let split = TestDb::fresh("split_mix").await;
            let most = split.apply_batches_split(bodies.chunks(batch), parts).await;
            assert!(most > 1, "batches were split");
            assert_converged(&reference, &split).await;
        });
    }
}

/// Unknown event names are kept with their bodies, and a version that understands them can
/// apply them later, although their dedup keys were already taken.
#[tokio::test]
async fn ignored_events_keep_their_bodies_and_can_be_reapplied() {
    use catena_ingest::config::Rules;
    use catena_ingest::ops::ignored;
    let db = TestDb::fresh("ignored").await;
    let unknown = br#"{"version":"1.1","event_name":"vehicle.added","id":"01a00000-0000-7000-8000-0000000000aa","webhook_id":"w","data":[{"id":"x"}]}"#.to_vec();
    assert_eq!(
        db.apply(std::slice::from_ref(&unknown)).await,
        [Applied::Ignored]
    );
    let client = db.client().await;
    let kept: Vec<u8> = client
        .query_one("SELECT body FROM ignored_events", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(kept, unknown, "the body as it came");

    // What an older version, which did not know connection.created, left behind.
    let created = fixture("events/05-connection.created.json");
    let key: String = serde_json::from_slice::<serde_json::Value>(&created).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    client
        .execute(
            "INSERT INTO webhook_events (event_key, event_name, outcome) VALUES ($1, 'connection.created', 'ignored')",
            &[&key],
        )
        .await
        .unwrap();
    client
        .execute(
            "INSERT INTO ignored_events (event_key, event_name, body) VALUES ($1, 'connection.created', $2)",
            &[&key, &created],
        )
        .await
        .unwrap();
    assert_eq!(db.count("SELECT count(*) FROM connections").await, 0);
    assert_eq!(
        db.apply(std::slice::from_ref(&created)).await,
        [Applied::Duplicate],
        "its key is taken: a redelivery alone cannot apply it"
    );

    let rules = Rules::default();
    let dry = ignored::reapply(&db.url, None, 100, &rules, true)
        .await
        .unwrap();
    assert_eq!((dry.examined, dry.applied, dry.still_ignored), (2, 1, 1));
    assert_eq!(
        db.count("SELECT count(*) FROM connections").await,
        0,
        "dry run"
    );
    let done = ignored::reapply(&db.url, None, 100, &rules, false)
        .await
        .unwrap();
    assert_eq!((done.examined, done.applied, done.still_ignored), (2, 1, 1));
    assert_eq!(db.count("SELECT count(*) FROM connections").await, 1);
    assert_eq!(
        db.row(&format!(
            "SELECT outcome FROM webhook_events WHERE event_key = '{key}'"
        ))
        .await,
        ["applied"]
    );
    assert_eq!(
        db.row("SELECT event_name FROM ignored_events").await,
        ["vehicle.added"],
        "what is still unknown stays"
    );
    let again = ignored::reapply(&db.url, None, 100, &rules, false)
        .await
        .unwrap();
    assert_eq!(again.applied, 0, "nothing is applied twice");
    assert_eq!(
        db.apply(std::slice::from_ref(&created)).await,
        [Applied::Duplicate]
    );
}
