//! `catena-ingest dev`: the whole product in one process on local defaults.
//!
//! Migrate, declare the topology, then run the relay and a worker pool side by side. When no
//! webhook secret is configured a random one is generated, printed, and written to
//! `.catena-dev-secret` so `catena-ingest send` in another terminal signs with it unprompted.

use rand::Rng;
use rand::distr::Alphanumeric;

use crate::relay::RelayConfig;
use crate::secrets::SecretStore;
use crate::shutdown::Shutdown;
use crate::worker::WorkerConfig;

pub const DEV_SECRET_FILE: &str = ".catena-dev-secret";

/// Make a dev secret when none is configured; returns the store and the secret if generated.
pub fn dev_secrets(configured: SecretStore) -> std::io::Result<(SecretStore, Option<String>)> {
    if !configured.is_empty() {
        return Ok((configured, None));
    }
    let secret: String = rand::rng()
        .sample_iter(&Alphanumeric)
        .take(32)
        .map(char::from)
        .collect();
    std::fs::write(DEV_SECRET_FILE, &secret)?;
    let mut store = SecretStore::default();
    store.insert("*", &secret);
    Ok((store, Some(secret)))
}

/// Run relay and worker until `shutdown`.
pub async fn run(
    relay: RelayConfig,
    worker: WorkerConfig,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let database_url = worker.database_url.clone();
    let applied = crate::db::migrate(&database_url).await?;
    tracing::info!(?applied, "migrations done");
    let worker = crate::worker::start(
        WorkerConfig {
            migrate: false,
            ..worker
        },
        shutdown.clone(),
    )
    .await?;
    let relay = crate::relay::start(relay, shutdown.clone()).await?;
    println!(
        "catena-ingest dev: relay on http://{}{} | worker metrics on http://{}/metrics",
        relay.addr,
        crate::relay::WEBHOOK_PATH,
        worker.metrics_addr
    );
    println!("try: cargo run --release -- send --fleets 50   (Ctrl-C stops)");
    let _ = relay.handle.await;
    let _ = worker.handle.await;
    Ok(())
}
