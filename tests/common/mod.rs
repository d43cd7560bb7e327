//! Test harness: each test gets its own broker prefix and database, spawns the app in-process
//! (or the real binary when it must be killed), and can cut the network to a dependency for real
//! through a TCP proxy it owns.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use catena_ingest::broker;
use catena_ingest::relay::{self, RelayConfig, RunningRelay};
use catena_ingest::secrets::SecretStore;
use catena_ingest::shutdown::Shutdown;
use catena_ingest::topology::Names;
use lapin::options::{BasicAckOptions, BasicGetOptions, ExchangeDeleteOptions, QueueDeleteOptions};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
pub const PG_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
pub const WEBHOOK_ID: &str = "247b2dea-a030-48b7-9a05-ee33c1b6ab0a";
pub const SECRET: &str = "test-secret-0123456789";

pub fn init_tracing() {
    catena_ingest::telemetry::init_for_tests();
}

/// A name unique to this test run: `t_<test>_<random>`.
pub fn unique(test: &str) -> String {
    format!(
        "t_{test}_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

pub struct TestRelay {
    pub running: RunningRelay,
    pub shutdown: Shutdown,
    pub url: String,
    pub names: Names,
}

impl TestRelay {
    pub async fn stop(self) {
        self.shutdown.trigger();
        let _ = self.running.handle.await;
    }
}

/// A relay configuration on an ephemeral port, for tests that change a setting before spawning.
pub fn relay_config(names: Names, amqp_url: &str, secrets: &str) -> RelayConfig {
    RelayConfig::new(
        "127.0.0.1:0",
        amqp_url,
        names,
        SecretStore::parse(secrets).unwrap(),
    )
}

pub async fn spawn_relay(names: Names, amqp_url: &str, secrets: &str) -> TestRelay {
    spawn_relay_with(relay_config(names, amqp_url, secrets)).await
}

pub async fn spawn_relay_with(config: RelayConfig) -> TestRelay {
    init_tracing();
    let names = config.names.clone();
    let shutdown = Shutdown::new();
    let running = relay::start(config, shutdown.clone())
        .await
        .expect("relay binds");
    assert!(
        running.publisher.wait_ready(Duration::from_secs(10)).await,
        "relay never connected to the broker"
    );
    let url = format!("http://{}{}", running.addr, relay::WEBHOOK_PATH);
    TestRelay {
        running,
        shutdown,
        url,
        names,
    }
}

/// A message taken off a queue.
pub struct Taken {
    pub body: Vec<u8>,
    pub routing_key: String,
    pub headers: std::collections::BTreeMap<String, String>,
}

fn header_string(value: &lapin::types::AMQPValue) -> String {
    use lapin::types::AMQPValue;
    match value {
        AMQPValue::LongString(s) => s.to_string(),
        AMQPValue::ShortString(s) => s.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        other => format!("{other:?}"),
    }
}

/// Take every message currently in `queue`, waiting up to `settle` for stragglers.
pub async fn drain(queue: &str, settle: Duration) -> Vec<Taken> {
    let connection = broker::connect(AMQP_URL, "test drain").await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + settle;
    loop {
        match channel
            .basic_get(queue.into(), BasicGetOptions::default())
            .await
            .unwrap()
        {
            Some(message) => {
                let delivery = message.delivery;
                let headers = delivery
                    .properties
                    .headers()
                    .as_ref()
                    .map(|t| {
                        t.inner()
                            .iter()
                            .map(|(k, v)| (k.to_string(), header_string(v)))
                            .collect()
                    })
                    .unwrap_or_default();
                out.push(Taken {
                    body: delivery.data.clone(),
                    routing_key: delivery.routing_key.to_string(),
                    headers,
                });
                delivery.ack(BasicAckOptions::default()).await.unwrap();
            }
            None if tokio::time::Instant::now() >= deadline => break,
            None => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let _ = connection.close(200, "done".into()).await;
    out
}

/// Count of messages ready in a queue (declared passively).
pub async fn queue_len(queue: &str) -> u32 {
    let connection = broker::connect(AMQP_URL, "test count").await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    let q = channel
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    let _ = connection.close(200, "done".into()).await;
    q.message_count()
}

/// Delete every queue and the exchange of a test prefix.
pub async fn delete_topology(names: &Names) {
    let Ok(connection) = broker::connect(AMQP_URL, "test cleanup").await else {
        return;
    };
    let channel = connection.create_channel().await.unwrap();
    let mut queues = vec![names.events_queue.clone(), names.parked_queue.clone()];
    queues.extend(names.retry_tiers().map(|(q, _)| q));
    for q in queues {
        let _ = channel
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    let _ = channel
        .exchange_delete(
            names.events_exchange.as_str().into(),
            ExchangeDeleteOptions::default(),
        )
        .await;
    let _ = connection.close(200, "done".into()).await;
}

/// A TCP proxy the test owns: `cut()` drops every live connection and refuses new ones until
/// `restore()`, which is what a network partition or a dead broker looks like to a client.
pub struct TcpProxy {
    pub addr: SocketAddr,
    up: Arc<AtomicBool>,
    epoch: watch::Sender<u64>,
}

impl TcpProxy {
    pub async fn start(target: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let (epoch, _) = watch::channel(0u64);
        let target = target.to_owned();
        let (up2, epoch2) = (up.clone(), epoch.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    break;
                };
                if !up2.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let target = target.clone();
                let mut cut = epoch2.subscribe();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(&target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Self { addr, up, epoch }
    }

    pub fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        self.epoch.send_modify(|e| *e += 1);
    }

    pub fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }

    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.addr)
    }
}

/// A signed, Catena-shaped POST.
pub struct Post<'a> {
    pub body: Vec<u8>,
    pub secret: &'a str,
    pub webhook_id: &'a str,
    pub timestamp: String,
    pub gzip: bool,
}

impl<'a> Post<'a> {
    pub fn new(body: &[u8]) -> Self {
        Self {
            body: body.to_vec(),
            secret: SECRET,
            webhook_id: WEBHOOK_ID,
            timestamp: chrono::Utc::now().to_rfc3339(),
            gzip: true,
        }
    }

    pub fn request(&self, client: &reqwest::Client, url: &str) -> reqwest::RequestBuilder {
        let signature =
            catena_ingest::signature::sign(self.secret.as_bytes(), &self.timestamp, &self.body);
        let builder = client
            .post(url)
            .header("Content-Type", "application/json")
            .header("X-Catena-Signature", signature)
            .header("X-Catena-Timestamp", &self.timestamp)
            .header("X-Webhook-ID", self.webhook_id)
            .header("X-Event-Type", "connection.staled")
            .header("X-Request-ID", uuid::Uuid::new_v4().to_string())
            .header("X-Schema-Version", "1.0")
            .header("X-Source", "catena-notifications")
            .header("X-Delivery-Attempt", "1");
        if self.gzip {
            builder
                .header("Content-Encoding", "gzip")
                .body(catena_ingest::gunzip::gzip(&self.body))
        } else {
            builder.body(self.body.clone())
        }
    }

    pub async fn send(&self, client: &reqwest::Client, url: &str) -> u16 {
        self.request(client, url)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }
}

pub fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!(
        "{}/tests/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

// ---------------------------------------------------------------------------------------------
// Database and worker helpers

pub fn db_url(name: &str) -> String {
    format!("postgres://postgres@127.0.0.1:5432/{name}")
}

/// A fresh, migrated database of this test's own.
pub async fn fresh_db(test: &str) -> String {
    let url = db_url(&unique(test));
    catena_ingest::db::migrate(&url).await.expect("migrate");
    url
}

pub async fn drop_db(url: &str) {
    let name = url.rsplit('/').next().unwrap().to_owned();
    if let Ok((client, conn)) = tokio_postgres::connect(PG_ADMIN_URL, tokio_postgres::NoTls).await {
        tokio::spawn(conn);
        let _ = client
            .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
            .await;
    }
}

pub async fn pg(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect to the test database");
    tokio::spawn(conn);
    client
}

pub async fn count(url: &str, sql: &str) -> i64 {
    pg(url).await.query_one(sql, &[]).await.unwrap().get(0)
}

/// Poll until `sql` (a count) reaches `want`, or `timeout`; returns the last value.
pub async fn wait_for_count(url: &str, sql: &str, want: i64, timeout: Duration) -> i64 {
    let client = pg(url).await;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let n: i64 = client.query_one(sql, &[]).await.unwrap().get(0);
        if n >= want || tokio::time::Instant::now() >= deadline {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The state that must converge, as sorted text: every contract relation (alerts: the open set).
pub async fn snapshot(url: &str) -> String {
    let client = pg(url).await;
    let queries = [
        "SELECT invitation_id::text, coalesce(fleet_ref,''), coalesce(fleet_id::text,''), status, coalesce(decline_reason,''), coalesce(expires_at::text,'') FROM invitations",
        "SELECT fleet_id::text, coalesce(fleet_ref,''), coalesce(invitation_id::text,''), coalesce(share_agreement_id::text,''), coalesce(share_status,''), onboarding_status FROM fleets",
        "SELECT connection_id::text, coalesce(fleet_id::text,''), coalesce(tsp_id::text,''), coalesce(source_name,''), status, coalesce(staled_at::text,''), coalesce(updated_at::text,'') FROM connections",
        "SELECT fleet_connection_id::text, fleet_id::text, connection_id::text, created_at::text FROM fleet_connections",
        "SELECT schedule_id::text, coalesce(connection_id::text,''), coalesce(resource,''), status, coalesce(consecutive_error_threshold::text,''), failed_executions::text, coalesce(last_failed_at::text,''), coalesce(deactivated_at::text,'') FROM schedules",
        "SELECT share_agreement_id::text, fleet_id::text, status FROM share_agreements",
        "SELECT kind, subject_id::text, coalesce(fleet_id::text,''), coalesce(fleet_ref,''), opened_at::text FROM alerts WHERE state = 'open'",
        "SELECT event_key, event_name, outcome FROM webhook_events",
    ];
    let mut out = String::new();
    for sql in queries {
        let mut rows: Vec<String> = client
            .query(sql, &[])
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

/// Apply events once, in order, straight through the state layer: the reference state.
pub async fn apply_in_order(url: &str, events: &[catena_ingest::scenario::Event]) {
    use catena_ingest::state::{Incoming, apply_batch};
    let pool = catena_ingest::db::pool(url, 1).unwrap();
    let mut client = pool.get().await.unwrap();
    let decoded: Vec<_> = events
        .iter()
        .map(|e| catena_ingest::envelope::decode(&e.body(1), chrono::Utc::now()).unwrap())
        .collect();
    for event in &decoded {
        let tx = client.transaction().await.unwrap();
        apply_batch(
            &tx,
            &[Incoming {
                event,
                received_at: None,
            }],
            &Default::default(),
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
    }
}

pub async fn spawn_worker(
    names: Names,
    database_url: &str,
    amqp_url: &str,
) -> (catena_ingest::worker::RunningWorker, Shutdown) {
    init_tracing();
    let mut config = catena_ingest::worker::WorkerConfig::new(amqp_url, names, database_url);
    // Two consumers, so every pipeline test also races batches against each other.
    config.consumers = 2;
    spawn_worker_with(config).await
}

pub async fn spawn_worker_with(
    config: catena_ingest::worker::WorkerConfig,
) -> (catena_ingest::worker::RunningWorker, Shutdown) {
    init_tracing();
    let shutdown = Shutdown::new();
    let worker = catena_ingest::worker::start(config, shutdown.clone())
        .await
        .expect("worker starts");
    (worker, shutdown)
}

/// The real binary as a child process (for SIGKILL/SIGTERM tests).
pub fn worker_process(
    prefix: &str,
    database_url: &str,
    amqp_url: &str,
    extra: &[(&str, &str)],
) -> std::process::Child {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_catena-ingest"));
    command
        .arg("worker")
        .env("CATENA_NAME_PREFIX", prefix)
        .env("DATABASE_URL", database_url)
        .env("AMQP_URL", amqp_url)
        .env("METRICS_LISTEN", "127.0.0.1:0")
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit());
    for (k, v) in extra {
        command.env(k, v);
    }
    command.spawn().expect("spawn the worker binary")
}

pub fn signal(child: &std::process::Child, signal: &str) {
    let status = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
}

/// Send a generated scenario through the relay; returns the send report.
pub async fn send_deliveries(
    relay_url: &str,
    events: &[catena_ingest::scenario::Event],
    deliveries: &[catena_ingest::scenario::Delivery],
    concurrency: usize,
) -> catena_ingest::send::SendReport {
    let mut options = catena_ingest::send::SendOptions::new(relay_url, SECRET);
    options.concurrency = concurrency;
    let outgoing = deliveries
        .iter()
        .map(|d| catena_ingest::send::Outgoing::from_delivery(events, d))
        .collect();
    catena_ingest::send::send_all(&options, outgoing).await
}

pub fn scenario(fleets: usize, seed: u64) -> Vec<catena_ingest::scenario::Event> {
    let mut options = catena_ingest::scenario::ScenarioOptions::new(fleets, seed);
    options.webhook_id = WEBHOOK_ID.into();
    options.ref_prefix = format!("F{seed}");
    catena_ingest::scenario::generate(&options)
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

// ---------------------------------------------------------------------------------------------
// Alerting helpers

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A real Alertmanager (Debian's prometheus-alertmanager) on its own port and storage.
pub struct Alertmanager {
    pub url: String,
    child: std::process::Child,
    _dir: TempDir,
}

impl Alertmanager {
    pub async fn start(port: u16) -> Self {
        let dir = TempDir::new("am");
        let config = dir.path.join("alertmanager.yml");
        std::fs::write(
            &config,
            "route:\n  receiver: 'null'\n  group_wait: 1s\nreceivers:\n  - name: 'null'\n",
        )
        .unwrap();
        let child = std::process::Command::new("prometheus-alertmanager")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.path={}", dir.path.display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--cluster.listen-address=")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("prometheus-alertmanager is installed (.ci/run installs it)");
        let url = format!("http://127.0.0.1:{port}");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while tokio::time::Instant::now() < deadline {
            if reqwest::get(format!("{url}/-/ready"))
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Self {
            url,
            child,
            _dir: dir,
        }
    }

    /// Alerts Alertmanager currently holds with this alertname that are still active.
    pub async fn active(&self, alertname: &str) -> Vec<serde_json::Value> {
        let alerts: Vec<serde_json::Value> = reqwest::get(format!("{}/api/v2/alerts", self.url))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        alerts
            .into_iter()
            .filter(|a| a["labels"]["alertname"] == alertname && a["status"]["state"] == "active")
            .collect()
    }

    pub fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Alertmanager {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct TempDir {
    pub path: std::path::PathBuf,
}

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let path = std::env::temp_dir().join(unique(tag));
        std::fs::create_dir_all(&path).unwrap();
        Self { path }
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A webhook sink the test owns: records every JSON body, and can be switched to answer 503.
#[derive(Clone)]
pub struct RecordingSink {
    pub url: String,
    pub received: Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
    pub up: Arc<AtomicBool>,
}

impl RecordingSink {
    pub async fn start() -> Self {
        let received = Arc::new(std::sync::Mutex::new(Vec::new()));
        let up = Arc::new(AtomicBool::new(true));
        let (r, u) = (received.clone(), up.clone());
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |body: bytes::Bytes| {
                let (r, u) = (r.clone(), u.clone());
                async move {
                    if !u.load(Ordering::SeqCst) {
                        return axum::http::StatusCode::SERVICE_UNAVAILABLE;
                    }
                    r.lock()
                        .unwrap()
                        .push(serde_json::from_slice(&body).unwrap());
                    axum::http::StatusCode::OK
                }
            }),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { url, received, up }
    }

    pub fn bodies(&self) -> Vec<serde_json::Value> {
        self.received.lock().unwrap().clone()
    }
}

/// The relay as a child process, logging to `log` (for log-content checks).
pub fn relay_process(
    prefix: &str,
    listen: &str,
    secrets: &str,
    log: &std::path::Path,
) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_catena-ingest"))
        .arg("relay")
        .env("CATENA_NAME_PREFIX", prefix)
        .env("AMQP_URL", AMQP_URL)
        .env("RELAY_LISTEN", listen)
        .env("CATENA_WEBHOOK_SECRETS", secrets)
        .env("RUST_LOG", "debug")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("spawn the relay binary")
}

pub async fn wait_http_ok(url: &str, timeout: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        if reqwest::get(url)
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// Parse `name{labels} value` lines of a Prometheus exposition.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}
