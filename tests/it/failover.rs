//! Beyond one machine, for real: a 3-node RabbitMQ cluster losing the leader of
//! `<prefix>.events` (stopped, SIGKILLed, cut off from the clients), and a PostgreSQL primary
//! failing over to its streaming standby (stopped, SIGKILLed), each under steady load through a
//! relay and a worker. After each: every event Catena got a 202 for is applied exactly once,
//! the 503s came fast (Catena retries them; the ones it gave up on are re-sent, as its DLQ
//! replay would), nothing valid was parked, the read model equals the events applied once in
//! order, and the quorum queues have all their members back. Each case prints its figures.
//!
//! The servers are extra ones beside the machine's own: `scripts/rabbitmq-cluster.sh` (nodes
//! catena1..3 on 5691-5693) and `scripts/pg-standby.sh` (primary 5440, standby 5441). These
//! tests start and stop them, so they are `#[ignore]`d in the parallel suite and run alone:
//! `cargo test --test it -- --ignored --test-threads 1 failover::` (a step of `.ci/run`).

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::helpers::http::http_status;
use crate::helpers::load::{Event, SendReport, steady_load};
use crate::helpers::proxy::TcpProxy;
use crate::helpers::*;

fn script(name: &str, args: &[&str]) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scripts")
        .join(name);
    let out = std::process::Command::new(&path)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{name} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

async fn script_async(name: &'static str, args: Vec<&'static str>) -> String {
    tokio::task::spawn_blocking(move || script(name, &args))
        .await
        .unwrap()
}

/// What a request-every-50-ms probe saw: the first and last failure, and the slowest failure.
#[derive(Debug, Default)]
struct Outage {
    failures: usize,
    first: Option<Duration>,
    last: Option<Duration>,
    slowest_failure: Duration,
}

impl Outage {
    fn window(&self) -> Duration {
        match (self.first, self.last) {
            (Some(first), Some(last)) => last - first + Duration::from_millis(50),
            _ => Duration::ZERO,
        }
    }
}

/// Re-send event 0 (already accepted: a duplicate, no state change) every 50 ms through the
/// relay and record when publishing failed, until `stop`.
fn probe(url: String, body: Vec<u8>, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<Outage> {
    tokio::spawn(async move {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        let started = Instant::now();
        let mut outage = Outage::default();
        while !stop.load(Ordering::Relaxed) {
            let sent = Instant::now();
            let ok = Post::new(&body)
                .request(&client, &url)
                .send()
                .await
                .is_ok_and(|r| r.status().as_u16() == 202);
            if !ok {
                let at = sent - started;
                outage.failures += 1;
                outage.first.get_or_insert(at);
                outage.last = Some(at);
                outage.slowest_failure = outage.slowest_failure.max(sent.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        outage
    })
}

/// Events the worker applied more than once: its own count of events applied (or ignored, for
/// names it does not handle) beyond the number of distinct events. A redelivery that the dedup
/// key catches counts as `duplicate`, not here; `webhook_events` cannot tell (its key is unique).
fn applied_more_than_once(p: &TestPipeline, events: &[Event]) -> i64 {
    let metrics = p.worker_registry_text();
    let counted: f64 = metrics
        .lines()
        .filter(|l| {
            l.starts_with("catena_worker_events_total")
                && (l.contains("outcome=\"applied\"") || l.contains("outcome=\"ignored\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    counted as i64 - events.len() as i64
}

/// Send again, as Catena's DLQ replay would, the events Catena gave up on.
async fn resend_refused(p: &TestPipeline, events: &[Event], report: &SendReport) -> usize {
    let accepted: HashSet<usize> = report.accepted_deliveries.iter().copied().collect();
    let refused: Vec<_> = in_order(events)
        .into_iter()
        .enumerate()
        .filter(|(i, _)| !accepted.contains(i))
        .map(|(_, d)| d)
        .collect();
    if !refused.is_empty() {
        let again = p.send_deliveries(events, &refused, 8).await;
        assert_eq!(again.accepted as usize, refused.len(), "{again:?}");
    }
    refused.len()
}

// -------------------------------------------------------------------------------------------
// RabbitMQ cluster

#[derive(Clone, Copy, Debug)]
enum NodeFault {
    Stop,
    Kill,
    /// The node keeps running and clustered, but no client reaches it.
    CutOff,
}

struct Cluster {
    proxies: Vec<TcpProxy>,
    mgmt: Vec<String>,
}

impl Cluster {
    async fn up() -> Self {
        script_async("rabbitmq-cluster.sh", vec!["up"]).await;
        let ports: Vec<u16> = (1..=3).map(|n| 5690 + n).collect();
        let mut proxies = Vec::new();
        for port in ports {
            proxies.push(TcpProxy::start(&format!("127.0.0.1:{port}")).await);
        }
        let mgmt = script("rabbitmq-cluster.sh", &["mgmt-urls"])
            .split([',', '\n', ' '])
            .filter(|u| !u.is_empty())
            .map(str::to_owned)
            .collect();
        Self { proxies, mgmt }
    }

    /// The nodes through their proxies, comma separated: `AMQP_URL` for relay and worker.
    fn amqp_url(&self) -> String {
        self.proxies
            .iter()
            .map(TcpProxy::amqp_url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// On a blocking thread: the script may take seconds while a node is down, and the relay
    /// and worker under test share this runtime (blocking it would stall them, not the broker).
    async fn leader(&self, queue: &str) -> usize {
        let queue = queue.to_owned();
        let node =
            tokio::task::spawn_blocking(move || script("rabbitmq-cluster.sh", &["leader", &queue]))
                .await
                .unwrap();
        node.trim_start_matches("catena")
            .split('@')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("leader: {node:?}"))
    }

    /// `(members, online)` of a quorum queue, from the first management API that answers.
    async fn members(&self, queue: &str) -> (usize, usize) {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        for base in &self.mgmt {
            let url = format!("{}/api/queues/%2f/{queue}", base.trim_end_matches('/'));
            let Ok(response) = client
                .get(&url)
                .basic_auth("guest", Some("guest"))
                .send()
                .await
            else {
                continue;
            };
            let Ok(json) = response.json::<serde_json::Value>().await else {
                continue;
            };
            let count = |key: &str| json[key].as_array().map_or(0, Vec::len);
            return (count("members"), count("online"));
        }
        (0, 0)
    }
}

async fn broker_node_lost(fault: NodeFault, tag: &str, seed: u64) {
    let cluster = Cluster::up().await;
    let (relay_url, worker_url) = (cluster.amqp_url(), cluster.amqp_url());
    let events = scenario(150, seed);
    let mut p = TestPipeline::builder(tag)
        .reference(&events)
        .relay_config(move |c| c.broker.amqp_url = relay_url)
        .start()
        .await;
    p.start_worker_config(move |c| c.broker.amqp_url = worker_url)
        .await;
    let events_queue = p.names.events_queue.clone();
    assert_eq!(
        p.send(&events[0].body(1)).await,
        202,
        "the cluster takes events"
    );

    let load = steady_load(&p.relay_url(), &events, 150.0);
    let stop_probe = Arc::new(AtomicBool::new(false));
    let probe = probe(p.relay_url(), events[0].body(1), stop_probe.clone());
    tokio::time::sleep(Duration::from_secs(3)).await;

    let leader = cluster.leader(&events_queue).await;
    let n: &'static str = ["1", "2", "3"][leader - 1];
    let faulted = Instant::now();
    match fault {
        NodeFault::Stop => drop(script_async("rabbitmq-cluster.sh", vec!["stop-node", n]).await),
        NodeFault::Kill => drop(script_async("rabbitmq-cluster.sh", vec!["kill-node", n]).await),
        NodeFault::CutOff => cluster.proxies[leader - 1].cut(),
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let new_leader = cluster.leader(&events_queue).await;
    match fault {
        NodeFault::Stop | NodeFault::Kill => {
            assert_ne!(new_leader, leader, "another node leads");
            script_async("rabbitmq-cluster.sh", vec!["start-node", n]).await;
        }
        NodeFault::CutOff => cluster.proxies[leader - 1].restore(),
    }
    let back = faulted.elapsed();

    let report = load.await.unwrap();
    stop_probe.store(true, Ordering::Relaxed);
    let outage = probe.await.unwrap();
    let resent = resend_refused(&p, &events, &report).await;
    p.assert_converged(events.len(), Duration::from_secs(120))
        .await;
    let parked =
        crate::helpers::broker::queue_len_at(&cluster.amqp_url(), &p.names.parked_queue).await;
    let members = eventually(
        Duration::from_secs(90),
        || cluster.members(&events_queue),
        |(members, online)| *members == 3 && *online == 3,
    )
    .await;
    let doubled = applied_more_than_once(&p, &events);
    eprintln!(
        "FAILOVER broker {fault:?} of leader catena{leader} (new leader catena{new_leader}): \
         node back after {back:?}; probe: {} failures over {:?}, slowest failure {:?}; load: \
         sent {} accepted {} retried {} gave up {} (re-sent {resent}); applied {} doubled \
         {doubled} parked {parked}; events queue members {}/{} online",
        outage.failures,
        outage.window(),
        outage.slowest_failure,
        report.deliveries,
        report.accepted,
        report.retries,
        report.failed,
        events.len(),
        members.1,
        members.0,
    );
    assert_eq!(doubled, 0);
    assert_eq!(parked, 0, "nothing valid parked");
    assert_eq!(members, (3, 3), "every member of the events queue back");
    assert!(
        outage.slowest_failure < Duration::from_secs(3),
        "every refusal inside Catena's 3 s: {outage:?}"
    );
    p.stop().await;
}

#[tokio::test]
#[ignore = "runs a 3-node RabbitMQ cluster; run alone with --ignored --test-threads 1 failover::"]
async fn broker_leader_stopped_under_load() {
    init_harness();
    broker_node_lost(NodeFault::Stop, "fo_stop", 401).await;
}

#[tokio::test]
#[ignore = "runs a 3-node RabbitMQ cluster; run alone with --ignored --test-threads 1 failover::"]
async fn broker_leader_sigkilled_under_load() {
    init_harness();
    broker_node_lost(NodeFault::Kill, "fo_kill", 402).await;
}

#[tokio::test]
#[ignore = "runs a 3-node RabbitMQ cluster; run alone with --ignored --test-threads 1 failover::"]
async fn broker_leader_cut_off_from_the_clients_under_load() {
    init_harness();
    broker_node_lost(NodeFault::CutOff, "fo_cut", 403).await;
}

#[tokio::test]
#[ignore = "runs a 3-node RabbitMQ cluster; run alone with --ignored --test-threads 1 failover::"]
async fn zz_cluster_down() {
    // Last (tests run in name order with one thread): the extra nodes go away.
    script_async("rabbitmq-cluster.sh", vec!["down"]).await;
}

// -------------------------------------------------------------------------------------------
// PostgreSQL primary and standby

#[derive(Clone, Copy, Debug)]
enum PrimaryFault {
    Stop,
    Kill,
}

async fn pair_query(url: &str, sql: &str) -> Option<i64> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .ok()?;
    tokio::spawn(connection);
    client.query_one(sql, &[]).await.ok().map(|row| row.get(0))
}

async fn primary_failover(fault: PrimaryFault, tag: &str, seed: u64) {
    script_async("pg-standby.sh", vec!["up"]).await;
    let database = unique(tag);
    let admin = script("pg-standby.sh", &["url", "postgres"]);
    let (client, connection) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
        .batch_execute(&format!("CREATE DATABASE {database}"))
        .await
        .unwrap();
    let url = script("pg-standby.sh", &["url", &database]);
    catena_ingest::store::migrate(&url).await.unwrap();

    let events = scenario(150, seed);
    let worker_url = url.clone();
    let mut p = TestPipeline::builder(tag)
        .reference(&events)
        .relay()
        .start()
        .await;
    p.start_worker_config(move |c| c.database.database_url = worker_url)
        .await;
    let load = steady_load(&p.relay_url(), &events, 150.0);
    tokio::time::sleep(Duration::from_secs(3)).await;

    match fault {
        PrimaryFault::Stop => script_async("pg-standby.sh", vec!["stop-primary"]).await,
        PrimaryFault::Kill => script_async("pg-standby.sh", vec!["kill-primary"]).await,
    };
    // The worker notices (its own probe every 2 s) and reports not-ready while no primary is.
    let not_ready = wait_until(Duration::from_secs(10), || async {
        http_status(&p.worker_endpoint("/readyz")).await == 503
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    script_async("pg-standby.sh", vec!["promote"]).await;
    let promoted = Instant::now();
    let promoted_at = chrono::Utc::now();
    let since_promotion = format!(
        "SELECT count(*) FROM webhook_events WHERE processed_at > '{}'",
        promoted_at.to_rfc3339()
    );
    let first_commit = eventually(
        Duration::from_secs(60),
        || pair_query(&url, &since_promotion),
        |n| n.is_some_and(|n| n > 0),
    )
    .await;
    let to_first_commit = promoted.elapsed();
    assert!(
        first_commit.is_some_and(|n| n > 0),
        "commits on the new primary"
    );
    let ready_again = wait_until(Duration::from_secs(20), || async {
        http_status(&p.worker_endpoint("/readyz")).await == 200
    })
    .await;

    let report = load.await.unwrap();
    let resent = resend_refused(&p, &events, &report).await;
    let want = events.len() as i64;
    let applied = eventually(
        Duration::from_secs(120),
        || pair_query(&url, "SELECT count(*) FROM webhook_events"),
        |n| *n == Some(want),
    )
    .await
    .unwrap_or(0);
    let accepted: Vec<String> = report
        .accepted_deliveries
        .iter()
        .map(|&i| events[i].id.to_string())
        .collect();
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let accepted_applied: i64 = client
        .query_one(
            "SELECT count(*) FROM webhook_events WHERE event_key = ANY($1)",
            &[&accepted],
        )
        .await
        .unwrap()
        .get(0);
    let doubled = applied_more_than_once(&p, &events);
    let parked = p.parked_len().await;
    eprintln!(
        "FAILOVER postgres {fault:?}: not-ready seen {not_ready}, promotion -> first commit \
         {to_first_commit:?}, ready again {ready_again}; load: sent {} accepted {} retried {} \
         gave up {} (re-sent {resent}); accepted and applied {accepted_applied}/{}; applied \
         {applied}/{want}; doubled {doubled}; parked {parked}",
        report.deliveries,
        report.accepted,
        report.retries,
        report.failed,
        accepted.len(),
    );
    assert!(not_ready, "the worker reported not-ready without a primary");
    assert!(ready_again, "and ready again on the new one");
    assert_eq!(
        accepted_applied as usize,
        accepted.len(),
        "every 202 applied"
    );
    assert_eq!(applied, want, "every event applied once");
    // A commit the primary made but could not acknowledge before it went (the standby has it,
    // synchronously) is retried on the new primary and counted there as a duplicate: the count
    // may fall short by those, and only a double apply makes it exceed the events.
    assert!(doubled <= 0, "applied more than once: {doubled}");
    assert_eq!(parked, 0, "nothing valid parked");
    // The new primary's read model is the events applied once, in order. (Its drop only
    // drops a database of that name on the machine's own server: there is none.)
    let on_the_pair = TestDb {
        name: database.clone(),
        url: url.clone(),
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_same_state(
        &p.reference().snapshot().await,
        &on_the_pair.snapshot().await,
    );
    p.stop().await;
    script_async("pg-standby.sh", vec!["down"]).await;
}

#[tokio::test]
#[ignore = "runs a PostgreSQL primary and standby; run alone with --ignored --test-threads 1 failover::"]
async fn postgres_primary_stopped_and_standby_promoted_under_load() {
    init_harness();
    primary_failover(PrimaryFault::Stop, "fo_pgstop", 411).await;
}

#[tokio::test]
#[ignore = "runs a PostgreSQL primary and standby; run alone with --ignored --test-threads 1 failover::"]
async fn postgres_primary_sigkilled_and_standby_promoted_under_load() {
    init_harness();
    primary_failover(PrimaryFault::Kill, "fo_pgkill", 412).await;
}
