//! The harness. A test asks [`TestPipeline::builder`] for its own slice of the shared servers (a
//! broker prefix, a migrated database, optionally a reference database, a relay, an in-process
//! worker, TCP proxies it can cut, child processes of the real binary) and gets it back cleaned
//! up on drop, whether the test passed or panicked.
//!
//! Files by concept: [`pipeline`] (the `TestPipeline` and its builder), [`db`] (`TestDb`,
//! snapshots), [`broker`] (queues, `TestTopology`), [`proxy`] (`TcpProxy`), [`http`] (signed
//! requests, scraping), [`load`] (generated scenarios through the relay), [`processes`] (the
//! binary as a child), [`alerting`] (Alertmanager, a recording sink), [`prometheus`] (a real
//! Prometheus evaluating the shipped rules) and [`poll`] (the one poll-until-deadline loop).
//!
//! The crate's own constructors and modules are reached from these files only (`Names`,
//! `RelayConfig`, `WorkerConfig`, `db`, `scenario`, `send`), so a rename in `src/` is fixed here.

pub mod alerting;
pub mod broker;
pub mod control;
pub mod db;
pub mod http;
pub mod load;
pub mod pipeline;
pub mod poll;
pub mod processes;
pub mod prometheus;
pub mod proxy;

use std::future::Future;
use std::path::PathBuf;

pub use db::{TestDb, assert_same_state};
pub use http::Post;
pub use load::{churn_scenario, duplicated_and_shuffled, in_order, scenario};
pub use pipeline::TestPipeline;
pub use poll::{eventually, wait_until};
pub use processes::terminate_all;

/// The broker every test uses: the machine's RabbitMQ, or `CATENA_TEST_AMQP_URL` (the broker
/// group of `.ci/run` points it at the RabbitMQ 4 of `scripts/rabbitmq4.sh`).
pub fn amqp_url() -> &'static str {
    static URL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    URL.get_or_init(|| {
        std::env::var("CATENA_TEST_AMQP_URL")
            .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
    })
}

/// Where [`proxy::TcpProxy`]s in front of the broker forward to: the host and port of
/// [`amqp_url`].
pub fn broker_addr() -> &'static str {
    static ADDR: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ADDR.get_or_init(|| {
        let url = amqp_url();
        let after_scheme = url.split_once("://").map_or(url, |(_, rest)| rest);
        let host_port = after_scheme.split('/').next().unwrap_or(after_scheme);
        host_port.rsplit('@').next().unwrap_or(host_port).to_owned()
    })
}
pub const POSTGRES_ADDR: &str = "127.0.0.1:5432";
pub const WEBHOOK_ID: &str = "247b2dea-a030-48b7-9a05-ee33c1b6ab0a";
pub const SECRET: &str = "test-secret-0123456789";

/// `CATENA_WEBHOOK_SECRETS` for the relay: [`SECRET`] for [`WEBHOOK_ID`].
pub fn secrets() -> String {
    format!("{WEBHOOK_ID}={SECRET}")
}

/// Also makes sure the shared PostgreSQL and RabbitMQ answer, starting them once per run if they
/// are installed but down (`scripts/services.sh`), so `cargo test` works as the first command.
pub fn init_harness() {
    static SERVICES: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    let services = SERVICES.get_or_init(|| {
        catena_ingest::local::ensure_services(&[POSTGRES_ADDR.to_owned(), broker_addr().to_owned()])
    });
    if let Err(line) = services {
        panic!("{line}");
    }
    catena_ingest::telemetry::init_for_tests();
}

/// A name unique to this test run: `t_<tag>_<random>` (what the leak checks look for).
pub fn unique(tag: &str) -> String {
    format!(
        "t_{tag}_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

pub fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(fixtures_dir().join(name)).unwrap()
}

/// Every event fixture (`tests/fixtures/events/*.json`), in file-name order.
pub fn fixture_events() -> Vec<Vec<u8>> {
    let mut files: Vec<_> = std::fs::read_dir(fixtures_dir().join("events"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| std::fs::read(p).unwrap())
        .collect()
}

fn fixtures_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures"))
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A directory of this test's own under the system temp dir, removed on drop.
pub struct TempDir {
    pub path: PathBuf,
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

/// Run a cleanup future to completion from a `Drop`: on a thread of its own with its own
/// current-thread runtime, joined before returning. `Drop` cannot await, and the test's runtime
/// may be the very thread dropping (blocked here, so it cannot run the cleanup) or already
/// unwinding from a panic. Never panics itself: a failure is reported on stderr.
fn clean_up_on_own_thread<F>(what: String, cleanup: F)
where
    F: Future<Output = Result<(), String>> + Send + 'static,
{
    let joined = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        runtime.block_on(async {
            tokio::time::timeout(std::time::Duration::from_secs(30), cleanup)
                .await
                .unwrap_or_else(|_| Err("timed out".into()))
        })
    })
    .join();
    match joined {
        Ok(Ok(())) => {}
        Ok(Err(e)) => eprintln!("cleanup of {what} failed: {e}"),
        Err(_) => eprintln!("cleanup of {what} panicked"),
    }
}
