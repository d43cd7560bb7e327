//! [`TestPipeline`]: one test's own slice of the shared servers and the pieces of the pipeline
//! it runs (relay -> RabbitMQ -> worker -> PostgreSQL), with methods for what tests do.
//!
//! ```ignore
//! let p = TestPipeline::builder("conv").reference(&events).relay().worker().start().await;
//! p.send_deliveries(&events, &deliveries, 32).await;
//! p.assert_converged(events.len(), Duration::from_secs(120)).await;
//! p.stop().await;
//! ```
//!
//! Cleanup is by ownership, not by calls at the end of a test, so it also happens when an
//! assertion panics: dropping the pipeline stops its relay and worker, then (once the last
//! child process it spawned is gone too) deletes its queues and exchange and drops its
//! databases. `stop()` is the graceful end of a test that passed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use catena_ingest::config::{BrokerSettings, DatabaseSettings, RelaySettings, WorkerSettings};
use catena_ingest::relay::secrets::SecretStore;
use catena_ingest::relay::{self, RelayConfig, RunningRelay};
use catena_ingest::shutdown::Shutdown;
use catena_ingest::worker::{self, RunningWorker, WorkerConfig};
use tokio::task::JoinHandle;

use super::broker::{self, Names, Taken, TestTopology};
use super::db::{TestDb, assert_same_state};
use super::http::{self, Post};
use super::load::{self, Delivery, Event, SendReport};
use super::processes::Process;
use super::proxy::TcpProxy;
use super::{POSTGRES_ADDR, amqp_url, broker_addr, init_harness, secrets, unique};

/// The binary's broker defaults, with this test's broker and name prefix.
fn broker_settings(names: &Names, amqp_url: &str) -> BrokerSettings {
    BrokerSettings {
        amqp_url: amqp_url.to_owned(),
        ..BrokerSettings::with_prefix(&names.prefix)
    }
}

/// The relay's configuration for tests: the binary's defaults, an ephemeral port, the given
/// broker and secrets.
pub fn relay_config(names: Names, amqp_url: &str, secrets: &str) -> RelayConfig {
    RelayConfig {
        relay: RelaySettings {
            listen: "127.0.0.1:0".into(),
            ..RelaySettings::default()
        },
        broker: broker_settings(&names, amqp_url),
        secrets: SecretStore::parse(secrets).unwrap(),
        secrets_file: None,
    }
}

/// The worker's configuration for tests: the binary's defaults, metrics on an ephemeral port,
/// and no retention sweeper: the fixtures' events happened in 2025, so the default retentions
/// would prune their failed executions and resolved alerts from under a test that runs past the
/// first sweep. `tests/it/retention.rs` turns it on (`config.worker.retention.disabled = false`).
pub fn worker_config(amqp_url: &str, names: Names, database_url: &str) -> WorkerConfig {
    let mut worker = WorkerSettings {
        metrics_listen: "127.0.0.1:0".into(),
        ..WorkerSettings::default()
    };
    worker.retention.disabled = true;
    WorkerConfig {
        worker,
        broker: broker_settings(&names, amqp_url),
        database: DatabaseSettings::with_url(database_url),
    }
}

/// What a pipeline leaves on the shared servers. Shared by the pipeline and every child process
/// it spawned; dropping the last of them removes it all (queues first, then databases).
pub struct Leftovers {
    _topology: TestTopology,
    db: Option<TestDb>,
    reference: Option<TestDb>,
}

type Configure<'a, C> = Box<dyn FnOnce(&mut C) + 'a>;

enum Database {
    Migrated,
    /// Named, but created (and migrated) by whoever connects first: the worker.
    Unmigrated,
    None,
}

/// How a [`TestPipeline`] is made; nothing runs until [`Builder::start`].
pub struct Builder<'a> {
    name: String,
    database: Database,
    reference: Option<&'a [Event]>,
    relay: Option<Configure<'a, RelayConfig>>,
    relay_secrets: String,
    worker: Option<Configure<'a, WorkerConfig>>,
    relay_via_broker_proxy: bool,
    worker_via_broker_proxy: bool,
    worker_via_db_proxy: bool,
}

impl<'a> Builder<'a> {
    /// The unique name: the broker prefix (`CATENA_NAME_PREFIX`) and the database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// No database (relay-only tests).
    pub fn without_database(mut self) -> Self {
        self.database = Database::None;
        self
    }

    /// Reserve the database's name only: the worker creates and migrates it.
    pub fn unmigrated_database(mut self) -> Self {
        self.database = Database::Unmigrated;
        self
    }

    /// A second database, `<name>_ref`, with `events` applied once each, in order, straight
    /// through the state layer: the state the pipeline must converge to.
    pub fn reference(mut self, events: &'a [Event]) -> Self {
        self.reference = Some(events);
        self
    }

    /// An in-process relay with the test defaults.
    pub fn relay(self) -> Self {
        self.relay_config(|_| {})
    }

    /// An in-process relay, its configuration changed by `configure` before it starts.
    pub fn relay_config(mut self, configure: impl FnOnce(&mut RelayConfig) + 'a) -> Self {
        self.relay = Some(Box::new(configure));
        self
    }

    /// `CATENA_WEBHOOK_SECRETS` of the in-process relay and relay processes (default: [`secrets`]).
    pub fn relay_secrets(mut self, secrets: &str) -> Self {
        self.relay_secrets = secrets.to_owned();
        self
    }

    /// An in-process worker with two consumers, so the test also races batches against each
    /// other.
    pub fn worker(self) -> Self {
        self.worker_config(racing_batches)
    }

    /// An in-process worker from [`worker_config`], changed by `configure` before it starts.
    pub fn worker_config(mut self, configure: impl FnOnce(&mut WorkerConfig) + 'a) -> Self {
        self.worker = Some(Box::new(configure));
        self
    }

    /// The relay reaches the broker through a [`TcpProxy`] ([`TestPipeline::broker_proxy`]).
    pub fn relay_via_broker_proxy(mut self) -> Self {
        self.relay_via_broker_proxy = true;
        self
    }

    /// The worker reaches the broker through a [`TcpProxy`] ([`TestPipeline::broker_proxy`]).
    pub fn worker_via_broker_proxy(mut self) -> Self {
        self.worker_via_broker_proxy = true;
        self
    }

    /// The worker reaches the database through a [`TcpProxy`] ([`TestPipeline::db_proxy`]).
    pub fn worker_via_db_proxy(mut self) -> Self {
        self.worker_via_db_proxy = true;
        self
    }

    pub async fn start(self) -> TestPipeline {
        init_harness();
        let names = Names::new(&self.name);
        // Owned from here on: whatever panics below, what exists so far is cleaned up.
        let topology = TestTopology {
            names: names.clone(),
        };
        let db = match self.database {
            Database::Migrated => Some(TestDb::reserve(self.name.clone()).migrated().await),
            Database::Unmigrated => Some(TestDb::reserve(self.name.clone())),
            Database::None => None,
        };
        let reference = match self.reference {
            Some(events) => {
                let reference = TestDb::reserve(format!("{}_ref", self.name))
                    .migrated()
                    .await;
                reference.apply_in_order(events).await;
                Some(reference)
            }
            None => None,
        };
        let leftovers = Arc::new(Leftovers {
            _topology: topology,
            db,
            reference,
        });

        let broker_proxy = if self.relay_via_broker_proxy || self.worker_via_broker_proxy {
            Some(TcpProxy::start(broker_addr()).await)
        } else {
            None
        };
        let db_proxy = if self.worker_via_db_proxy {
            Some(TcpProxy::start(POSTGRES_ADDR).await)
        } else {
            None
        };
        let relay = match self.relay {
            Some(configure) => {
                let amqp_url = match (&broker_proxy, self.relay_via_broker_proxy) {
                    (Some(proxy), true) => proxy.amqp_url(),
                    _ => amqp_url().to_owned(),
                };
                let mut config = relay_config(names.clone(), &amqp_url, &self.relay_secrets);
                configure(&mut config);
                Some(TestRelay::start(config).await)
            }
            None => None,
        };
        let mut pipeline = TestPipeline {
            names,
            relay_secrets: self.relay_secrets,
            client: reqwest::Client::new(),
            relay,
            worker: None,
            broker_proxy,
            db_proxy,
            leftovers,
        };
        if let Some(configure) = self.worker {
            pipeline
                .start_worker_with(self.worker_via_broker_proxy, configure)
                .await;
        }
        pipeline
    }
}

/// The default in-process worker: two consumers, and batches of 64 events or more split in two
/// concurrent transactions, so the test also races batches and their parts against each other.
fn racing_batches(config: &mut WorkerConfig) {
    config.worker.consumers = 2;
    config.worker.transactions_per_batch = 2;
}

/// One test's pipeline. Fields drop in order: relay and worker stop before the proxies go and
/// before the leftovers are cleaned up.
pub struct TestPipeline {
    pub names: Names,
    relay_secrets: String,
    /// A plain HTTP client for the test's requests.
    pub client: reqwest::Client,
    relay: Option<TestRelay>,
    worker: Option<TestWorker>,
    broker_proxy: Option<TcpProxy>,
    db_proxy: Option<TcpProxy>,
    leftovers: Arc<Leftovers>,
}

impl TestPipeline {
    /// A pipeline named `t_<tag>_<random>`, with a fresh migrated database and nothing running
    /// until the builder says so.
    pub fn builder<'a>(tag: &str) -> Builder<'a> {
        Builder {
            name: unique(tag),
            database: Database::Migrated,
            reference: None,
            relay: None,
            relay_secrets: secrets(),
            worker: None,
            relay_via_broker_proxy: false,
            worker_via_broker_proxy: false,
            worker_via_db_proxy: false,
        }
    }

    /// Stop the worker and the relay gracefully (the worker must end without an error).
    /// Cleanup of queues and databases follows when the pipeline is dropped.
    pub async fn stop(mut self) {
        if let Some(worker) = self.worker.take() {
            worker.stop().await;
        }
        if let Some(relay) = self.relay.take() {
            relay.stop().await;
        }
    }

    // -- relay ------------------------------------------------------------------------------

    fn running_relay(&self) -> &RunningRelay {
        &self
            .relay
            .as_ref()
            .expect("this pipeline has a relay")
            .running
    }

    pub fn relay_addr(&self) -> SocketAddr {
        self.running_relay().addr
    }

    /// The relay's webhook URL.
    pub fn relay_url(&self) -> String {
        self.relay_endpoint(relay::WEBHOOK_PATH)
    }

    /// Another path on the relay (`/readyz`, `/metrics`).
    pub fn relay_endpoint(&self, path: &str) -> String {
        format!("http://{}{path}", self.relay_addr())
    }

    pub async fn relay_metrics(&self) -> String {
        http::get_text(&self.relay_endpoint("/metrics")).await
    }

    /// POST a signed `body` (gzipped, [`super::SECRET`]) to the relay; the status.
    pub async fn send(&self, body: &[u8]) -> u16 {
        self.send_post(&Post::new(body)).await
    }

    pub async fn send_post(&self, post: &Post<'_>) -> u16 {
        post.send(&self.client, &self.relay_url()).await
    }

    /// Send `deliveries` of `events` through the relay, `concurrency` at a time.
    pub async fn send_deliveries(
        &self,
        events: &[Event],
        deliveries: &[Delivery],
        concurrency: usize,
    ) -> SendReport {
        load::send_deliveries(&self.relay_url(), events, deliveries, concurrency).await
    }

    /// [`Self::send_deliveries`] in the background.
    pub fn spawn_deliveries(
        &self,
        events: &[Event],
        deliveries: &[Delivery],
        concurrency: usize,
    ) -> JoinHandle<SendReport> {
        load::spawn_deliveries(&self.relay_url(), events, deliveries, concurrency)
    }

    // -- worker -----------------------------------------------------------------------------

    /// Start the default in-process worker ([`Builder::worker`]) now, in a pipeline built
    /// without one.
    pub async fn start_worker(&mut self) {
        self.start_worker_with(false, Box::new(racing_batches))
            .await;
    }

    /// Start an in-process worker from [`worker_config`], changed by `configure`, now.
    pub async fn start_worker_config(&mut self, configure: impl FnOnce(&mut WorkerConfig)) {
        self.start_worker_with(false, Box::new(configure)).await;
    }

    async fn start_worker_with(
        &mut self,
        via_broker_proxy: bool,
        configure: Configure<'_, WorkerConfig>,
    ) {
        assert!(self.worker.is_none(), "one in-process worker per pipeline");
        let amqp_url = match (&self.broker_proxy, via_broker_proxy) {
            (Some(proxy), true) => proxy.amqp_url(),
            _ => amqp_url().to_owned(),
        };
        let db = self.db();
        let database_url = match &self.db_proxy {
            Some(proxy) => db.url_at(&proxy.addr.to_string(), ""),
            None => db.url.clone(),
        };
        let mut config = worker_config(&amqp_url, self.names.clone(), &database_url);
        configure(&mut config);
        self.worker = Some(TestWorker::start(config).await);
    }

    pub fn worker(&self) -> &RunningWorker {
        &self
            .worker
            .as_ref()
            .expect("this pipeline has a worker")
            .running
    }

    /// A path on the worker's metrics listener (`/readyz`, `/metrics`).
    pub fn worker_endpoint(&self, path: &str) -> String {
        format!("http://{}{path}", self.worker().metrics_addr)
    }

    /// The worker's registry as Prometheus text.
    pub fn worker_registry_text(&self) -> String {
        catena_ingest::metrics::render(&self.worker().registry)
    }

    // -- proxies ----------------------------------------------------------------------------

    pub fn broker_proxy(&self) -> &TcpProxy {
        self.broker_proxy
            .as_ref()
            .expect("built with a broker proxy")
    }

    pub fn db_proxy(&self) -> &TcpProxy {
        self.db_proxy.as_ref().expect("built with a database proxy")
    }

    // -- database ---------------------------------------------------------------------------

    pub fn db(&self) -> &TestDb {
        self.leftovers
            .db
            .as_ref()
            .expect("this pipeline has a database")
    }

    pub fn reference(&self) -> &TestDb {
        self.leftovers
            .reference
            .as_ref()
            .expect("built with a reference")
    }

    pub async fn count(&self, sql: &str) -> i64 {
        self.db().count(sql).await
    }

    /// Rows in `webhook_events`.
    pub async fn applied(&self) -> usize {
        self.db().applied().await
    }

    /// Poll until `want` events are applied, or `timeout`; the last count.
    pub async fn wait_for_applied(&self, want: usize, timeout: Duration) -> usize {
        self.db().wait_for_applied(want, timeout).await
    }

    /// Every one of `events` events is applied within `timeout`, and after a moment for
    /// stragglers the state is exactly the reference's.
    pub async fn assert_converged(&self, events: usize, timeout: Duration) {
        assert_eq!(self.wait_for_applied(events, timeout).await, events);
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_same_state(
            &self.reference().snapshot().await,
            &self.db().snapshot().await,
        );
        let problems = self.db().outbox_problems().await;
        assert!(
            problems.is_empty(),
            "outbox disagrees with alerts: {problems:#?}"
        );
    }

    // -- broker -----------------------------------------------------------------------------

    pub async fn events_queue_len(&self) -> u32 {
        broker::queue_len(&self.names.events_queue).await
    }

    pub async fn parked_len(&self) -> u32 {
        broker::queue_len(&self.names.parked_queue).await
    }

    /// Take everything off the events queue, waiting `settle` for stragglers.
    pub async fn drain_events(&self, settle: Duration) -> Vec<Taken> {
        broker::drain(&self.names.events_queue, settle).await
    }

    /// Take everything off the parking lot, waiting `settle` for stragglers.
    pub async fn drain_parked(&self, settle: Duration) -> Vec<Taken> {
        broker::drain(&self.names.parked_queue, settle).await
    }

    // -- child processes --------------------------------------------------------------------

    /// `catena-ingest <args>` with this pipeline's prefix and database, logging at warn.
    pub fn cli(&self, args: &[&str]) -> Process {
        let process = Process::new(args, self.leftovers.clone())
            .env("CATENA_NAME_PREFIX", &self.names.prefix)
            .env("AMQP_URL", amqp_url())
            .env("RUST_LOG", "warn");
        match &self.leftovers.db {
            Some(db) => process.env("DATABASE_URL", &db.url),
            None => process,
        }
    }

    /// `catena-ingest worker` on this pipeline's prefix, database and the broker; metrics on an
    /// ephemeral port, logs at warn to the test's stderr; no retention sweeper (as in
    /// [`worker_config`]).
    pub fn worker_process(&self) -> Process {
        self.cli(&["worker"])
            .env("METRICS_LISTEN", "127.0.0.1:0")
            .env("WORKER_NO_RETENTION", "true")
            .discard_stdout()
    }

    /// `catena-ingest relay` on this pipeline's prefix and the relay secrets, listening on
    /// `listen`, logging at debug (send them somewhere with [`Process::log_to`]).
    pub fn relay_process(&self, listen: &str) -> Process {
        self.cli(&["relay"])
            .env("RELAY_LISTEN", listen)
            .env("CATENA_WEBHOOK_SECRETS", &self.relay_secrets)
            .env("RUST_LOG", "debug")
            .discard_stdout()
    }
}

/// The relay in-process; stopped (not gracefully) on drop.
struct TestRelay {
    running: RunningRelay,
    shutdown: Shutdown,
}

impl TestRelay {
    async fn start(config: RelayConfig) -> Self {
        let shutdown = Shutdown::new();
        let running = relay::start(config, shutdown.clone())
            .await
            .expect("relay binds");
        let relay = Self { running, shutdown };
        assert!(
            relay
                .running
                .publisher
                .wait_ready(Duration::from_secs(10))
                .await,
            "relay never connected to the broker"
        );
        relay
    }

    async fn stop(mut self) {
        self.shutdown.trigger();
        let _ = (&mut self.running.handle).await;
    }
}

impl Drop for TestRelay {
    fn drop(&mut self) {
        self.shutdown.trigger();
        self.running.handle.abort();
    }
}

/// The worker in-process; stopped (not gracefully) on drop.
struct TestWorker {
    running: RunningWorker,
    shutdown: Shutdown,
}

impl TestWorker {
    async fn start(config: WorkerConfig) -> Self {
        let shutdown = Shutdown::new();
        let running = worker::start(config, shutdown.clone())
            .await
            .expect("worker starts");
        Self { running, shutdown }
    }

    async fn stop(mut self) {
        self.shutdown.trigger();
        (&mut self.running.handle)
            .await
            .expect("the worker ends cleanly");
    }
}

impl Drop for TestWorker {
    fn drop(&mut self) {
        self.shutdown.trigger();
        self.running.handle.abort();
    }
}
