//! The state rules against a real PostgreSQL, without the broker: every event kind alone, the
//! fixture lifecycle in order and reversed, back-filling, and a property test of convergence.

mod common;

use catena_ingest::envelope::decode;
use catena_ingest::state::{Applied, Incoming, apply_batch};
use common::*;
use proptest::prelude::*;

async fn apply(url: &str, bodies: &[Vec<u8>]) -> Vec<Applied> {
    let pool = catena_ingest::db::pool(url, 1).unwrap();
    let mut client = pool.get().await.unwrap();
    let events: Vec<_> = bodies
        .iter()
        .map(|b| decode(b, chrono::Utc::now()).unwrap())
        .collect();
    let incoming: Vec<_> = events
        .iter()
        .map(|event| Incoming {
            event,
            received_at: None,
        })
        .collect();
    let tx = client.transaction().await.unwrap();
    let result = apply_batch(&tx, &incoming, &Default::default())
        .await
        .unwrap();
    tx.commit().await.unwrap();
    result.applied
}

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

async fn row(url: &str, sql: &str) -> Vec<String> {
    let client = pg(url).await;
    let row = client.query_one(sql, &[]).await.unwrap();
    (0..row.len())
        .map(|i| {
            row.get::<_, Option<String>>(i)
                .unwrap_or_else(|| "NULL".into())
        })
        .collect()
}

const FLEET: &str = "d23f0824-128b-4f33-8c5c-7fd0a6a3a450";
const CONNECTION: &str = "6b0d549b-6f03-475a-9600-a35a099950d8";

#[tokio::test]
async fn fixture_lifecycle_in_order_gives_the_documented_rows() {
    let url = fresh_db("state_order").await;
    let applied = apply(&url, &fixtures()).await;
    assert!(applied.iter().all(|a| *a == Applied::Applied));

    assert_eq!(
        row(
            &url,
            "SELECT status, fleet_ref, fleet_id::text FROM invitations"
        )
        .await,
        ["accepted", "FLEET-42", FLEET]
    );
    assert_eq!(
        row(
            &url,
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
        row(&url, "SELECT status, source_name, fleet_id::text, (staled_at IS NOT NULL)::text FROM connections").await,
        ["stale", "samsara", FLEET, "true"]
    );
    assert_eq!(
        row(
            &url,
            "SELECT connection_id::text, fleet_id::text FROM fleet_connections"
        )
        .await,
        [CONNECTION, FLEET]
    );
    assert_eq!(
        row(&url, "SELECT status, failed_executions::text, consecutive_error_threshold::text, (last_failed_at IS NOT NULL)::text FROM schedules").await,
        ["deactivated", "1", "6", "true"]
    );
    let alerts = pg(&url)
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
        count(
            &url,
            "SELECT count(*) FROM alert_outbox WHERE action = 'open'"
        )
        .await,
        2
    );

    // Every delivery again: all duplicates, nothing changes.
    let before = snapshot(&url).await;
    let again = apply(&url, &fixtures()).await;
    assert!(again.iter().all(|a| *a == Applied::Duplicate));
    assert_eq!(snapshot(&url).await, before);
    drop_db(&url).await;
}

#[tokio::test]
async fn reversed_lifecycle_converges_and_backfills_fleet_ref() {
    let ordered = fresh_db("state_fwd").await;
    let reversed = fresh_db("state_rev").await;
    let mut bodies = fixtures();
    for body in &bodies {
        apply(&ordered, std::slice::from_ref(body)).await;
    }
    bodies.reverse();
    for body in &bodies {
        apply(&reversed, std::slice::from_ref(body)).await;
    }
    assert_same_state(&snapshot(&ordered).await, &snapshot(&reversed).await);
    // The stale alert was raised before any mapping existed, and got its fleet_ref later.
    assert_eq!(
        row(
            &reversed,
            "SELECT fleet_ref FROM alerts WHERE kind = 'connection_stale'"
        )
        .await,
        ["FLEET-42"]
    );
    // A late invitation.accepted does not move a connected fleet backwards.
    assert_eq!(
        row(&reversed, "SELECT onboarding_status FROM fleets").await,
        ["connected"]
    );
    drop_db(&ordered).await;
    drop_db(&reversed).await;
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
        let url = fresh_db(&format!("state_alone{index}")).await;
        apply(&url, std::slice::from_ref(&f[index])).await;
        assert_eq!(row(&url, sql).await, want, "fixture {index}");
        drop_db(&url).await;
    }
}

#[tokio::test]
async fn recovery_resolves_the_stale_alert_only_when_newer() {
    let url = fresh_db("state_recover").await;
    let staled = fixture("events/09-connection.staled.json");
    let mut envelope: serde_json::Value = serde_json::from_slice(&staled).unwrap();
    // An *older* active record (id time before the staled one) must not resolve it.
    envelope["event_name"] = "connection.created".into();
    envelope["data"][0]["status"] = "active".into();
    envelope["id"] = "019abf00-0000-7000-8000-000000000001".into();
    let older_active = serde_json::to_vec(&envelope).unwrap();
    envelope["id"] = "01a00000-0000-7000-8000-000000000002".into();
    let newer_active = serde_json::to_vec(&envelope).unwrap();

    apply(&url, std::slice::from_ref(&staled)).await;
    apply(&url, &[older_active]).await;
    assert_eq!(row(&url, "SELECT state FROM alerts").await, ["open"]);
    apply(&url, &[newer_active]).await;
    assert_eq!(
        row(
            &url,
            "SELECT state, (resolved_at IS NOT NULL)::text FROM alerts"
        )
        .await,
        ["resolved", "true"]
    );
    assert_eq!(
        row(&url, "SELECT status FROM connections").await,
        ["active"]
    );
    assert_eq!(
        count(
            &url,
            "SELECT count(*) FROM alert_outbox WHERE action = 'resolve'"
        )
        .await,
        1
    );
    drop_db(&url).await;
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, .. ProptestConfig::default() })]

    /// Any permutation of a small generated stream, with duplicates, applied in random batch
    /// sizes, ends in the state of the same events applied once in order.
    #[test]
    fn any_order_with_duplicates_converges(seed in 0u64..1_000_000, dup in 0.0f64..0.6, batch in 1usize..40) {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let events = scenario(6, seed);
            let reference = fresh_db("prop_ref").await;
            apply_in_order(&reference, &events).await;
            let shuffled = fresh_db("prop_mix").await;
            let deliveries = catena_ingest::scenario::duplicated_and_shuffled(&events, dup, seed ^ 0x5eed);
            let bodies: Vec<Vec<u8>> = deliveries.iter().map(|d| events[d.event].body(d.attempt)).collect();
            for chunk in bodies.chunks(batch) {
                apply(&shuffled, chunk).await;
            }
            let (a, b) = (snapshot(&reference).await, snapshot(&shuffled).await);
            drop_db(&reference).await;
            drop_db(&shuffled).await;
            assert_same_state(&a, &b);
        });
    }
}
