//! A database of the test's own ([`TestDb`], dropped with `DROP DATABASE .. WITH (FORCE)` on
//! drop), the contract-state snapshot, and the state layer applied directly.

use std::time::Duration;

use catena_ingest::envelope::decode;
use catena_ingest::state::{Applied, Backfill, Incoming, apply, apply_batch, backfill, partition};

use super::load::Event;
use super::poll::eventually;

pub use catena_ingest::store::{migrate, pool};

pub const PG_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
/// Events applied (or ignored) once each: the count every pipeline test waits for.
pub const APPLIED_EVENTS: &str = "SELECT count(*) FROM webhook_events";

/// A connection to `url` (the driver runs on the caller's runtime).
pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect to PostgreSQL");
    tokio::spawn(conn);
    client
}

/// A connection to the `postgres` maintenance database.
pub async fn admin() -> tokio_postgres::Client {
    connect(PG_ADMIN_URL).await
}

/// A database only this test uses. Dropping it drops the database, also when the test panicked.
pub struct TestDb {
    pub name: String,
    /// Plain text, over 127.0.0.1.
    pub url: String,
}

impl TestDb {
    /// Reserve a unique name; nothing is created until someone migrates it.
    pub fn reserve(name: String) -> Self {
        let url = format!("postgres://postgres@{}/{name}", super::POSTGRES_ADDR);
        Self { name, url }
    }

    /// A fresh, migrated database named after `tag`.
    pub async fn fresh(tag: &str) -> Self {
        Self::reserve(super::unique(tag)).migrated().await
    }

    /// Create and migrate the database (dropped again if that panics).
    pub async fn migrated(self) -> Self {
        migrate(&self.url).await.expect("migrate");
        self
    }

    /// This database through another address (a proxy) and with URL parameters (TLS).
    pub fn url_at(&self, host_port: &str, query: &str) -> String {
        let url = format!("postgres://postgres@{host_port}/{}", self.name);
        if query.is_empty() {
            url
        } else {
            format!("{url}?{query}")
        }
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        connect(&self.url).await
    }

    /// Resolve every open alert of `kind` by hand, as `catena-ingest alerts resolve` does; how
    /// many.
    pub async fn resolve_open_alerts(&self, kind: &str) -> usize {
        let client = self.client().await;
        let filter = catena_ingest::ops::alerts::ListFilter {
            open_only: true,
            kind: catena_ingest::alerts::AlertKind::parse(kind),
            fleet_ref: None,
            limit: 1000,
        };
        let open = catena_ingest::ops::alerts::list(&client, &filter)
            .await
            .unwrap();
        for alert in &open {
            catena_ingest::ops::alerts::resolve(&client, alert.alert_id, "resolved by the test")
                .await
                .unwrap();
        }
        open.len()
    }

    /// The single `bigint` a `SELECT count(*) ..` returns.
    pub async fn count(&self, sql: &str) -> i64 {
        self.client()
            .await
            .query_one(sql, &[])
            .await
            .unwrap()
            .get(0)
    }

    /// Poll until `sql` (a count) reaches `want`, or `timeout`; returns the last value.
    pub async fn wait_for_count(&self, sql: &str, want: i64, timeout: Duration) -> i64 {
        let client = &self.client().await;
        eventually(
            timeout,
            || async move { client.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) },
            |n| *n >= want,
        )
        .await
    }

    /// Rows of `webhook_events`.
    pub async fn applied(&self) -> usize {
        self.count(APPLIED_EVENTS).await as usize
    }

    /// Poll until `want` rows are in `webhook_events`, or `timeout`; returns the last count.
    pub async fn wait_for_applied(&self, want: usize, timeout: Duration) -> usize {
        self.wait_for_count(APPLIED_EVENTS, want as i64, timeout)
            .await as usize
    }

    /// The one row `sql` returns, every column as text (`NULL` for null).
    pub async fn row(&self, sql: &str) -> Vec<String> {
        let row = self.client().await.query_one(sql, &[]).await.unwrap();
        (0..row.len())
            .map(|i| {
                row.get::<_, Option<String>>(i)
                    .unwrap_or_else(|| "NULL".into())
            })
            .collect()
    }

    /// The state that must converge, as sorted text: every contract relation (alerts: the open
    /// set).
    pub async fn snapshot(&self) -> String {
        self.snapshot_of(&SNAPSHOT).await
    }

    /// [`TestDb::snapshot`] of what the fleet events derive, for runs delivered through
    /// fake-catena: its subscriptions deliver under their own webhook ids, and its `webhook.*`
    /// events and the reconciler's alerts have no counterpart in a reference run.
    pub async fn fleet_snapshot(&self) -> String {
        let mut queries = SNAPSHOT;
        queries[9] = "SELECT (to_jsonb(t) - ARRAY['alert_id', 'created_at', 'paged'])::text FROM alerts t WHERE kind IN ('connection_stale', 'schedule_deactivated')";
        queries[10] = "SELECT (to_jsonb(t) - ARRAY['received_at', 'processed_at', 'webhook_id'])::text FROM webhook_events t WHERE event_name NOT LIKE 'webhook.%'";
        self.snapshot_of(&queries).await
    }

    async fn snapshot_of(&self, queries: &[&str]) -> String {
        let client = self.client().await;
        let mut out = String::new();
        for sql in queries {
            let mut rows: Vec<String> = client
                .query(*sql, &[])
                .await
                .unwrap()
                .iter()
                .map(|row| {
                    (0..row.len())
                        .map(|i| row.get::<_, String>(i))
                        .collect::<Vec<_>>()
                        .join("|")
                })
                .collect();
            rows.sort();
            out.push_str(&format!("## {sql}\n{}\n", rows.join("\n")));
        }
        out
    }

    /// What the outbox says of the alerts, checked against their rows: an open alert paged once
    /// and was not resolved; a resolved one either paged and was resolved once each, or (an
    /// episode first seen over) never paged at all. Empty when all holds.
    pub async fn outbox_problems(&self) -> Vec<String> {
        let rows = self
            .client()
            .await
            .query(
                "SELECT a.kind || ' ' || a.subject_id || ' ' || a.opened_at AS alert, a.state,
                        count(*) FILTER (WHERE o.action = 'open')::int AS opens,
                        count(*) FILTER (WHERE o.action = 'resolve')::int AS resolves
                 FROM alerts a LEFT JOIN alert_outbox o ON o.alert_id = a.alert_id
                 GROUP BY a.alert_id",
                &[],
            )
            .await
            .unwrap();
        rows.iter()
            .filter_map(|row| {
                let (alert, state, opens, resolves): (String, String, i32, i32) =
                    (row.get(0), row.get(1), row.get(2), row.get(3));
                let fine = match state.as_str() {
                    "open" => (opens, resolves) == (1, 0),
                    _ => (opens, resolves) == (1, 1) || (opens, resolves) == (0, 0),
                };
                (!fine).then(|| format!("{alert} {state}: {opens} open, {resolves} resolve"))
            })
            .collect()
    }

    /// Apply each batch of bodies in a transaction of its own, straight through the state layer
    /// (no broker, no worker); returns what became of every event.
    /// Like [`Self::apply_batches`], but each batch split as the worker splits it
    /// ([`partition`] into at most `parts`), its parts applied in concurrent transactions on
    /// their own connections with the back-fills deferred, then the back-fills in one more.
    /// Returns the most parts a batch had.
    pub async fn apply_batches_split<'a>(
        &self,
        batches: impl IntoIterator<Item = &'a [Vec<u8>]>,
        parts: usize,
    ) -> usize {
        let pool = pool(&self.url, parts + 1).unwrap();
        let mut most_parts = 0;
        for bodies in batches {
            let events: Vec<_> = bodies
                .iter()
                .map(|b| decode(b, chrono::Utc::now()).unwrap())
                .collect();
            let refs: Vec<_> = events.iter().collect();
            let split = partition(&refs, parts);
            most_parts = most_parts.max(split.len());
            futures::future::join_all(split.iter().map(|part| {
                let pool = pool.clone();
                let incoming: Vec<_> = part
                    .iter()
                    .map(|&i| Incoming {
                        event: &events[i],
                        received_at: None,
                        body: &bodies[i],
                    })
                    .collect();
                async move {
                    let mut client = pool.get().await.unwrap();
                    let tx = client.transaction().await.unwrap();
                    apply(&tx, &incoming, &Default::default(), Backfill::Deferred)
                        .await
                        .unwrap();
                    tx.commit().await.unwrap();
                }
            }))
            .await;
            let mut client = pool.get().await.unwrap();
            let tx = client.transaction().await.unwrap();
            backfill(&tx).await.unwrap();
            tx.commit().await.unwrap();
        }
        most_parts
    }

    pub async fn apply_batches<'a>(
        &self,
        batches: impl IntoIterator<Item = &'a [Vec<u8>]>,
    ) -> Vec<Applied> {
        let pool = pool(&self.url, 1).unwrap();
        let mut client = pool.get().await.unwrap();
        let mut applied = Vec::new();
        for bodies in batches {
            let events: Vec<_> = bodies
                .iter()
                .map(|b| decode(b, chrono::Utc::now()).unwrap())
                .collect();
            let incoming: Vec<_> = events
                .iter()
                .zip(bodies)
                .map(|(event, body)| Incoming {
                    event,
                    received_at: None,
                    body,
                })
                .collect();
            let tx = client.transaction().await.unwrap();
            let result = apply_batch(&tx, &incoming, &Default::default())
                .await
                .unwrap();
            tx.commit().await.unwrap();
            applied.extend(result.applied);
        }
        applied
    }

    /// Apply `bodies` in one transaction.
    pub async fn apply(&self, bodies: &[Vec<u8>]) -> Vec<Applied> {
        self.apply_batches([bodies]).await
    }

    /// Apply events once, in order, one transaction each: the reference state.
    pub async fn apply_in_order(&self, events: &[Event]) {
        let bodies: Vec<Vec<u8>> = events.iter().map(|e| e.body(1)).collect();
        self.apply_batches(bodies.chunks(1)).await;
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        super::clean_up_on_own_thread(format!("database {name}"), async move {
            let (client, conn) = tokio_postgres::connect(PG_ADMIN_URL, tokio_postgres::NoTls)
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            client
                .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                .await
                .map_err(|e| e.to_string())
        });
    }
}

/// Compare two snapshots and show only the differing lines.
pub fn assert_same_state(expected: &str, actual: &str) {
    if expected == actual {
        return;
    }
    let e: std::collections::BTreeSet<&str> = expected.lines().collect();
    let a: std::collections::BTreeSet<&str> = actual.lines().collect();
    let missing: Vec<_> = e.difference(&a).take(20).collect();
    let extra: Vec<_> = a.difference(&e).take(20).collect();
    panic!("state differs\nonly in expected:\n{missing:#?}\nonly in actual:\n{extra:#?}");
}

/// Every column of every table the events derive, as JSON, minus what is wall-clock or delivery
/// metadata rather than a function of the events (receive and commit times, row creation times,
/// alert ids, whether an alert paged).
const SNAPSHOT: [&str; 12] = [
    "SELECT to_jsonb(t)::text FROM invitations t",
    "SELECT (to_jsonb(t) - 'first_seen_at')::text FROM fleets t",
    "SELECT to_jsonb(t)::text FROM share_agreements t",
    "SELECT to_jsonb(t)::text FROM connections t",
    "SELECT to_jsonb(t)::text FROM fleet_connections t",
    "SELECT to_jsonb(t)::text FROM schedules t",
    "SELECT to_jsonb(t)::text FROM failed_executions t",
    "SELECT to_jsonb(t)::text FROM status_observations t",
    "SELECT (to_jsonb(t) - 'raised_at')::text FROM failure_warnings t",
    "SELECT (to_jsonb(t) - ARRAY['alert_id', 'created_at', 'paged'])::text FROM alerts t",
    "SELECT (to_jsonb(t) - ARRAY['received_at', 'processed_at'])::text FROM webhook_events t",
    // Warnings are a function of the set (fixed windows); alert pages are not, see
    // `outbox_problems`.
    "SELECT payload->>'schedule_id' || ' ' || (payload->>'window_start') FROM alert_outbox WHERE action = 'warning' AND payload ? 'schedule_id'",
];
