//! Retention against the real PostgreSQL and RabbitMQ: what a sweep deletes and what it must
//! never delete, bounded batches, BRIN summaries that stay tight across purge and reuse, one
//! sweeper at a time, pruning while events are being applied, and `parked replay` refusing a
//! message older than the dedup keys.

use std::time::Duration;

use catena_ingest::broker::Publisher;
use catena_ingest::config::{DedupRetention, RetentionSettings, WorkerSettings};
use catena_ingest::ops::parked::{self, Filter, ReplayOptions};
use catena_ingest::retention::{self, RETENTION_LOCK, Sweep, Swept};
use catena_ingest::shutdown::Shutdown;

use catena_ingest::message::ParkReason;

use crate::helpers::broker::park_directly;
use crate::helpers::*;

fn settings(batch_size: i64) -> RetentionSettings {
    RetentionSettings {
        batch_size,
        batch_pause: Duration::from_millis(1),
        ..RetentionSettings::default()
    }
}

/// A connection prepared as the worker's sweeper prepares its own.
async fn sweeper(db: &TestDb, settings: &RetentionSettings) -> tokio_postgres::Client {
    let client = db.client().await;
    retention::prepare_session(&client, settings).await.unwrap();
    client
}

async fn sweep(db: &TestDb, settings: &RetentionSettings) -> Swept {
    let client = sweeper(db, settings).await;
    match retention::sweep(&client, settings, None, &Shutdown::new())
        .await
        .unwrap()
    {
        Sweep::Swept(swept) => swept,
        Sweep::Locked => panic!("nobody else holds the retention lock"),
    }
}

/// `n` dedup keys processed `age` ago, named `<prefix><i>`.
async fn dedup_keys(db: &TestDb, prefix: &str, n: i64, age: &str) {
    db.client()
        .await
        .execute(
            "INSERT INTO webhook_events (event_key, event_name, outcome, received_at, processed_at)
             SELECT $1 || i, 'connection.staled', 'applied', now() - $3::text::interval,
                    now() - $3::text::interval + i * interval '1 ms'
             FROM generate_series(1, $2::int8) i",
            &[&prefix, &n, &age],
        )
        .await
        .unwrap();
}

/// One of everything a sweep must delete and, beside each, what it must keep: rows younger than
/// their retention, undelivered outbox rows however old, the notifications of open alerts, an
/// alert's notifications until the last of them is old, and every alert row (alerts are
/// episodes of the status timelines, not pruned yet: `retention::TABLES`).
const SEED: &str = "
INSERT INTO failed_executions (execution_id, schedule_id, failed_at)
SELECT gen_random_uuid(), gen_random_uuid(), now() - interval '40 days' FROM generate_series(1, 12);
-- Older than the dedup keys, younger than their own 30 days: kept.
INSERT INTO failed_executions (execution_id, schedule_id, failed_at)
SELECT gen_random_uuid(), gen_random_uuid(), now() - interval '25 days' FROM generate_series(1, 5);

INSERT INTO failure_warnings (schedule_id, window_start, failures)
SELECT gen_random_uuid(), now() - interval '40 days', 4 FROM generate_series(1, 8);
INSERT INTO failure_warnings (schedule_id, window_start, failures)
SELECT gen_random_uuid(), now() - interval '2 days', 4 FROM generate_series(1, 3);

-- The bodies of ignored events go with their dedup keys.
INSERT INTO ignored_events (event_key, event_name, body)
SELECT 'old-' || i, 'fleet.renamed', '{}'::bytea FROM generate_series(1, 3) i;
INSERT INTO ignored_events (event_key, event_name, body)
SELECT 'new-' || i, 'fleet.renamed', '{}'::bytea FROM generate_series(1, 2) i;

INSERT INTO alerts (alert_id, kind, subject_id, state, opened_at, resolved_at) VALUES
  ('00000000-0000-0000-0000-0000000000a1', 'connection_stale', gen_random_uuid(), 'resolved', now() - interval '101 days', now() - interval '100 days'),
  ('00000000-0000-0000-0000-0000000000a2', 'connection_stale', gen_random_uuid(), 'resolved', now() - interval '101 days', now() - interval '100 days'),
  ('00000000-0000-0000-0000-0000000000a3', 'connection_stale', gen_random_uuid(), 'resolved', now() - interval '101 days', now() - interval '100 days'),
  ('00000000-0000-0000-0000-0000000000b1', 'connection_stale', gen_random_uuid(), 'resolved', now() - interval '101 days', now() - interval '100 days'),
  ('00000000-0000-0000-0000-0000000000b2', 'schedule_deactivated', gen_random_uuid(), 'open', now() - interval '200 days', NULL),
  ('00000000-0000-0000-0000-0000000000b3', 'connection_stale', gen_random_uuid(), 'open', now() - interval '200 days', NULL),
  ('00000000-0000-0000-0000-0000000000b4', 'connection_stale', gen_random_uuid(), 'resolved', now() - interval '11 days', now() - interval '10 days');

INSERT INTO alert_outbox (alert_id, action, created_at, delivered_at) VALUES
  -- resolved long ago, both notifications delivered long ago: both go
  ('00000000-0000-0000-0000-0000000000a1', 'open', now() - interval '101 days', now() - interval '101 days'),
  ('00000000-0000-0000-0000-0000000000a1', 'resolve', now() - interval '100 days', now() - interval '100 days'),
  -- resolved long ago, delivered yesterday (a late sink): kept
  ('00000000-0000-0000-0000-0000000000a2', 'open', now() - interval '101 days', now() - interval '1 day'),
  ('00000000-0000-0000-0000-0000000000a2', 'resolve', now() - interval '100 days', now() - interval '1 day'),
  -- the `open` delivered long ago, the `resolve` yesterday: both kept, until both are old
  ('00000000-0000-0000-0000-0000000000a3', 'open', now() - interval '101 days', now() - interval '101 days'),
  ('00000000-0000-0000-0000-0000000000a3', 'resolve', now() - interval '100 days', now() - interval '1 day'),
  -- resolve not delivered yet: both kept (the old delivered `open` too)
  ('00000000-0000-0000-0000-0000000000b1', 'open', now() - interval '101 days', now() - interval '101 days'),
  ('00000000-0000-0000-0000-0000000000b1', 'resolve', now() - interval '100 days', NULL),
  -- open alerts: kept, delivered or not
  ('00000000-0000-0000-0000-0000000000b2', 'open', now() - interval '200 days', now() - interval '200 days'),
  ('00000000-0000-0000-0000-0000000000b3', 'open', now() - interval '200 days', NULL),
  -- recent: kept
  ('00000000-0000-0000-0000-0000000000b4', 'resolve', now() - interval '10 days', now() - interval '10 days');
-- Execution-failure warnings (no alert row): delivered long ago go, undelivered stay, recent stay.
INSERT INTO alert_outbox (alert_id, action, payload, created_at, delivered_at)
SELECT NULL, 'warning', '{}'::jsonb, now() - interval '40 days', now() - interval '40 days' FROM generate_series(1, 9);
INSERT INTO alert_outbox (alert_id, action, payload, created_at, delivered_at)
SELECT NULL, 'warning', '{}'::jsonb, now() - interval '60 days', NULL FROM generate_series(1, 2);
INSERT INTO alert_outbox (alert_id, action, payload, created_at, delivered_at)
SELECT NULL, 'warning', '{}'::jsonb, now() - interval '1 day', now() - interval '1 day' FROM generate_series(1, 4);
";

#[tokio::test]
async fn a_sweep_prunes_every_expired_row_and_nothing_else() {
    let db = TestDb::fresh("ret_tables").await;
    dedup_keys(&db, "old-", 30, "30 days").await;
    dedup_keys(&db, "kept-", 5, "20 days").await; // inside the 21 days
    dedup_keys(&db, "new-", 10, "1 hour").await;
    db.client().await.batch_execute(SEED).await.unwrap();

    let settings = settings(7);
    let swept = sweep(&db, &settings).await;
    assert!(swept.complete, "{swept:?}");

    // What is left, table by table.
    assert_eq!(
        db.count("SELECT count(*) FROM webhook_events WHERE event_key LIKE 'old-%'")
            .await,
        0
    );
    assert_eq!(db.count("SELECT count(*) FROM webhook_events").await, 15);
    assert_eq!(db.count("SELECT count(*) FROM ignored_events").await, 2);
    assert_eq!(db.count("SELECT count(*) FROM failed_executions").await, 5);
    assert_eq!(db.count("SELECT count(*) FROM failure_warnings").await, 3);
    assert_eq!(
        db.count("SELECT count(*) FROM alerts").await,
        7,
        "no alert row is pruned"
    );
    assert_eq!(
        db.count("SELECT count(*) FROM alert_outbox WHERE delivered_at IS NULL")
            .await,
        4,
        "no undelivered notification is ever pruned"
    );
    assert_eq!(
        db.count("SELECT count(*) FROM alert_outbox WHERE alert_id IS NULL")
            .await,
        6,
        "old delivered warnings go, undelivered and recent ones stay"
    );
    let kept = db
        .client()
        .await
        .query(
            "SELECT right(alert_id::text, 2) || ' ' || action FROM alert_outbox
             WHERE alert_id IS NOT NULL ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect::<Vec<_>>();
    assert_eq!(
        kept,
        [
            "a2 open",
            "a2 resolve",
            "a3 open",
            "a3 resolve",
            "b1 open",
            "b1 resolve",
            "b2 open",
            "b3 open",
            "b4 resolve"
        ],
        "an alert's notifications go together, once it is resolved and all are old"
    );

    // The report says the same, and no batch was larger than the batch size.
    assert_eq!(swept.rows("webhook_events"), 30);
    assert_eq!(swept.rows("ignored_events"), 3);
    assert_eq!(swept.rows("failed_executions"), 12);
    assert_eq!(swept.rows("failure_warnings"), 8);
    assert_eq!(swept.rows("alert_outbox"), 9 + 2);
    assert_eq!(swept.rows("alerts"), 0);
    for table in &swept.tables {
        assert!(table.largest_batch <= 7, "{table:?}");
        assert!(table.batches >= table.rows.div_ceil(7), "{table:?}");
    }
    assert_eq!(swept.table("webhook_events").unwrap().batches, 5); // 7+7+7+7+2

    // Nothing is left to do but summarize afresh the BRIN ranges the first sweep emptied.
    assert!(db.count(PENDING).await > 0);
    let again = sweep(&db, &settings).await;
    assert_eq!(again.total_rows(), 0, "{again:?}");
    assert_eq!(db.count(PENDING).await, 0);
}

const PENDING: &str = "SELECT count(*) FROM retention_brin_pending";

/// Explain `sql` and return how many heap blocks its bitmap heap scan read.
async fn heap_blocks_read(client: &tokio_postgres::Client, sql: &str) -> i64 {
    let plan: serde_json::Value = client
        .query_one(
            &format!("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {sql}"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    fn find(node: &serde_json::Value) -> Option<i64> {
        if node["Node Type"] == "Bitmap Heap Scan" {
            return Some(
                node["Lossy Heap Blocks"].as_i64().unwrap_or(0)
                    + node["Exact Heap Blocks"].as_i64().unwrap_or(0),
            );
        }
        node["Plans"].as_array()?.iter().find_map(find)
    }
    find(&plan[0]["Plan"]).unwrap_or_else(|| panic!("no bitmap heap scan in {plan}"))
}

#[tokio::test]
async fn a_large_purge_keeps_the_brin_index_tight_across_vacuum_and_reuse() {
    let db = TestDb::fresh("ret_brin").await;
    dedup_keys(&db, "old-", 60_000, "40 days").await;
    dedup_keys(&db, "new-", 5_000, "1 hour").await;
    let admin = db.client().await;
    admin
        .batch_execute("VACUUM ANALYZE webhook_events")
        .await
        .unwrap();
    let blocks: i64 = admin
        .query_one(
            "SELECT pg_relation_size('webhook_events') / current_setting('block_size')::int8",
            &[],
        )
        .await
        .unwrap()
        .get(0);

    let settings = settings(1000);
    let swept = sweep(&db, &settings).await;
    let events = swept.table("webhook_events").unwrap();
    assert_eq!(events.rows, 60_000);
    assert_eq!(events.largest_batch, 1000);
    assert_eq!(
        events.batches, 61,
        "60 full batches and one that found nothing more"
    );
    assert!(events.ranges_resummarized > 0, "{events:?}");
    assert_eq!(db.count("SELECT count(*) FROM webhook_events").await, 5_000);

    // Vacuum gives the emptied pages to new rows, the next sweep summarizes afresh what the
    // first one emptied; then look for expired rows the way the purge does. Without fresh
    // summaries, every reused range still claims its old minimum and the index selects them all
    // (`migrations/0005_retention.sql`).
    admin.batch_execute("VACUUM webhook_events").await.unwrap();
    dedup_keys(&db, "reuse-", 60_000, "1 minute").await;
    let next = sweep(&db, &settings).await;
    assert_eq!(next.total_rows(), 0);
    assert!(
        next.table("webhook_events").unwrap().ranges_resummarized > 0,
        "{next:?}"
    );
    assert_eq!(db.count(PENDING).await, 0, "every pending range summarized");
    let grown: i64 = admin
        .query_one(
            "SELECT pg_relation_size('webhook_events') / current_setting('block_size')::int8",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        grown < blocks + blocks / 4,
        "the new rows reused the pruned pages ({blocks} -> {grown} blocks)"
    );
    let probe = sweeper(&db, &settings).await;
    let read = heap_blocks_read(
        &probe,
        "SELECT ctid FROM webhook_events WHERE processed_at < now() - interval '21 days' LIMIT 1000",
    )
    .await;
    assert!(
        read <= 2 * 128,
        "finding expired rows read {read} of {grown} heap blocks: the BRIN summaries went stale"
    );
}

#[tokio::test]
async fn one_sweeper_at_a_time() {
    let db = TestDb::fresh("ret_lock").await;
    dedup_keys(&db, "old-", 20_000, "30 days").await;
    let settings = RetentionSettings {
        batch_size: 500,
        batch_pause: Duration::from_millis(20),
        ..RetentionSettings::default()
    };

    // Another worker holds the lock: this one does nothing.
    let holder = db.client().await;
    holder
        .execute("SELECT pg_advisory_lock($1)", &[&RETENTION_LOCK])
        .await
        .unwrap();
    let client = sweeper(&db, &settings).await;
    let shutdown = Shutdown::new();
    assert!(matches!(
        retention::sweep(&client, &settings, None, &shutdown)
            .await
            .unwrap(),
        Sweep::Locked
    ));
    assert_eq!(
        db.count("SELECT count(*) FROM webhook_events").await,
        20_000
    );
    holder
        .execute("SELECT pg_advisory_unlock($1)", &[&RETENTION_LOCK])
        .await
        .unwrap();

    // Two at once (40 batches with pauses take the first one well over a second): one sweeps,
    // the other skips, and the lock is released at the end.
    let other = sweeper(&db, &settings).await;
    let (a, b) = tokio::join!(
        retention::sweep(&client, &settings, None, &shutdown),
        async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            retention::sweep(&other, &settings, None, &shutdown).await
        }
    );
    match (a.unwrap(), b.unwrap()) {
        (Sweep::Swept(swept), Sweep::Locked) => assert_eq!(swept.rows("webhook_events"), 20_000),
        outcomes => panic!("expected one sweep and one skip: {outcomes:?}"),
    }
    assert_eq!(
        db.count(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'
               AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        )
        .await,
        0,
        "the lock is released after the sweep"
    );
}

#[tokio::test]
async fn the_worker_prunes_a_backlog_while_events_keep_applying() {
    let events = scenario(25, 4242);
    let p = TestPipeline::builder("ret_live")
        .reference(&events)
        .relay()
        .start()
        .await;
    // A 150k-row backlog of expired keys, pruned 1000 at a time with 50 ms pauses: 7.5 s at
    // least, while the scenario goes through relay and worker.
    dedup_keys(p.db(), "old-", 150_000, "30 days").await;
    let mut p = p;
    p.start_worker_config(|config| {
        config.worker.retention = RetentionSettings {
            disabled: false,
            interval: Duration::from_millis(200),
            batch_size: 1000,
            batch_pause: Duration::from_millis(50),
            ..RetentionSettings::default()
        };
    })
    .await;
    let old = "SELECT count(*) FROM webhook_events WHERE event_key LIKE 'old-%'";
    assert!(
        wait_until(Duration::from_secs(20), || async {
            p.count(old).await < 150_000
        })
        .await,
        "the sweep started"
    );

    let deliveries = duplicated_and_shuffled(&events, 0.3, 7);
    let report = p.send_deliveries(&events, &deliveries, 32).await;
    assert_eq!(report.failed, 0, "{report:?}");
    let left_when_sent = p.count(old).await;
    let applied = "SELECT count(*) FROM webhook_events WHERE event_key NOT LIKE 'old-%'";
    assert_eq!(
        p.db()
            .wait_for_count(applied, events.len() as i64, Duration::from_secs(60))
            .await,
        events.len() as i64,
        "every event applied while the sweep ran"
    );
    assert!(
        left_when_sent > 0,
        "the scenario was sent while the backlog was being pruned"
    );
    assert_eq!(
        eventually(Duration::from_secs(60), || p.count(old), |n| *n == 0).await,
        0,
        "the whole backlog is pruned"
    );
    // The pruned keys were the expired ones only: the state is the reference's.
    p.assert_converged(events.len(), Duration::from_secs(10))
        .await;
    let metrics = p.worker_registry_text();
    let pruned = metrics
        .lines()
        .find(|l| l.starts_with("catena_retention_pruned_rows_total{table=\"webhook_events\"}"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<u64>().ok());
    assert_eq!(pruned, Some(150_000), "{metrics}");
    assert!(metrics.contains("catena_retention_sweeps_total{outcome=\"completed\"}"));
    p.stop().await;
}

#[tokio::test]
async fn a_worker_refuses_retentions_below_the_replay_horizon() {
    let names = catena_ingest::broker::Names::new(&unique("ret_floor"));
    let mut config = pipeline::worker_config(
        amqp_url(),
        names,
        "postgres://postgres@127.0.0.1:5432/unused",
    );
    config.worker.retention.disabled = false;
    config.worker.retention.dedup.keys = Duration::from_secs(10 * 86_400);
    let error = catena_ingest::worker::start(config, Shutdown::new())
        .await
        .err()
        .expect("refused");
    assert!(
        error.to_string().contains("RETENTION_DEDUP_KEYS is 10d"),
        "{error}"
    );
    // The defaults are valid.
    let defaults = WorkerSettings::default();
    assert_eq!(defaults.retention.validate(&defaults.rules), Ok(()));
}

#[tokio::test]
async fn parked_replay_leaves_a_message_older_than_the_dedup_keys_parked() {
    let mut p = TestPipeline::builder("ret_replay").start().await;
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
    let fixtures = fixture_events();
    let (old, recent) = (&fixtures[0], &fixtures[4]);
    park_directly(
        &publisher,
        &names.parked_queue,
        old,
        "invitation.created",
        ParkReason::RetriesExhausted,
        chrono::Utc::now() - chrono::Duration::days(25),
        1,
    )
    .await;
    park_directly(
        &publisher,
        &names.parked_queue,
        recent,
        "connection.created",
        ParkReason::RetriesExhausted,
        chrono::Utc::now() - chrono::Duration::days(3),
        1,
    )
    .await;
    p.start_worker().await;

    // Default horizon: 21 days of keys, less a day. The dry run already says so.
    let options = ReplayOptions::new(&DedupRetention::default());
    let dry = parked::replay(
        amqp_url(),
        &names,
        &Filter::default(),
        &ReplayOptions {
            dry_run: true,
            ..options.clone()
        },
    )
    .await
    .unwrap();
    assert_eq!((dry.matched, dry.too_old, dry.replayed), (2, 1, 0));
    // The dry run's messages go back to the (quorum) queue asynchronously after it closes.
    assert!(
        wait_until(Duration::from_secs(10), || async {
            p.parked_len().await == 2
        })
        .await
    );

    // The CLI replays the recent one, names the old one loudly and exits non-zero.
    let out = p.cli(&["parked", "replay"]).output().await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("replayed=1 too_old=1"), "{stdout}");
    assert!(
        stderr.contains("WARNING: 1 message(s) are older than the dedup horizon (20d)")
            && stderr.contains("invitation.created")
            && stderr.contains("NOT replayed"),
        "{stderr}"
    );
    assert_eq!(p.wait_for_applied(1, Duration::from_secs(20)).await, 1);
    assert_eq!(p.parked_len().await, 1, "the old message is still parked");
    let kept = parked::list(amqp_url(), &names, &Filter::default(), 10)
        .await
        .unwrap();
    assert_eq!(kept[0].event_name, "invitation.created");

    // A longer dedup retention moves the horizon; --force replays regardless, and says so.
    let longer = DedupRetention {
        keys: Duration::from_secs(30 * 86_400),
        ..DedupRetention::default()
    };
    let dry = parked::replay(
        amqp_url(),
        &names,
        &Filter::default(),
        &ReplayOptions {
            dry_run: true,
            ..ReplayOptions::new(&longer)
        },
    )
    .await
    .unwrap();
    assert_eq!((dry.matched, dry.too_old), (1, 0));
    assert!(
        wait_until(Duration::from_secs(10), || async {
            p.parked_len().await == 1
        })
        .await
    );
    let forced = parked::replay(
        amqp_url(),
        &names,
        &Filter::default(),
        &ReplayOptions {
            force: true,
            ..options
        },
    )
    .await
    .unwrap();
    assert_eq!((forced.replayed, forced.forced, forced.too_old), (1, 1, 0));
    assert_eq!(forced.refused[0].event_name, "invitation.created");
    assert_eq!(p.wait_for_applied(2, Duration::from_secs(20)).await, 2);
    assert_eq!(p.parked_len().await, 0);
    p.stop().await;
    shutdown.trigger();
}
