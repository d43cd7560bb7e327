//! `catena-ingest dev`: the whole product in one process on local defaults.
//!
//! Migrate, declare the topology, then run the relay and a worker pool side by side. When no
//! webhook secret is configured a random one is generated, printed, and written to
//! [`DEV_SECRET_FILE`] so `catena-ingest send` in another terminal signs with it unprompted.

use anyhow::Context;
use clap::Args;
use rand::Rng;
use rand::distr::Alphanumeric;

use catena_ingest::config::{
    BrokerSettings, DatabaseSettings, RelayConfig, RelaySettings, SecretSettings, WorkerConfig,
    WorkerSettings,
};
use catena_ingest::relay::{self, secrets::SecretStore};
use catena_ingest::shutdown::Shutdown;
use catena_ingest::worker;

/// Where `dev` leaves the secret it generated, for `send`.
pub const DEV_SECRET_FILE: &str = ".catena-dev-secret";

#[derive(Args, Debug)]
pub struct Dev {
    #[command(flatten)]
    broker: BrokerSettings,
    #[command(flatten)]
    database: DatabaseSettings,
    #[command(flatten)]
    secrets: SecretSettings,
    #[command(flatten)]
    relay: RelaySettings,
    #[command(flatten)]
    worker: WorkerSettings,
}

/// Make a dev secret when none is configured; returns the store and the secret if generated.
fn dev_secrets(configured: SecretStore) -> std::io::Result<(SecretStore, Option<String>)> {
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

impl Dev {
    /// Run relay and worker until Ctrl-C or SIGTERM.
    pub async fn run(self) -> anyhow::Result<()> {
        let (secrets, generated) =
            dev_secrets(self.secrets.load().context("loading webhook secrets")?)?;
        if let Some(secret) = generated {
            println!(
                "no CATENA_WEBHOOK_SECRETS set: generated a dev secret for every webhook id\n  \
                 CATENA_WEBHOOK_SECRETS='*={secret}'   (also written to {DEV_SECRET_FILE})"
            );
        }
        let shutdown = Shutdown::new();
        shutdown.trigger_on_signals();

        let applied = catena_ingest::store::migrate(&self.database.database_url).await?;
        tracing::info!(?applied, "migrations done");
        let mut worker_settings = self.worker;
        worker_settings.no_migrate = true; // done just above
        let worker = worker::start(
            WorkerConfig {
                worker: worker_settings,
                broker: self.broker.clone(),
                database: self.database,
            },
            shutdown.clone(),
        )
        .await?;
        let relay = relay::start(
            RelayConfig {
                relay: self.relay,
                broker: self.broker,
                secrets,
                secrets_file: None,
            },
            shutdown.clone(),
        )
        .await?;
        println!(
            "catena-ingest dev: relay on http://{}{} | worker metrics on http://{}/metrics",
            relay.addr,
            relay::WEBHOOK_PATH,
            worker.metrics_addr
        );
        println!("try: cargo run --release -- send --fleets 50   (Ctrl-C stops)");
        let _ = relay.handle.await;
        let _ = worker.handle.await;
        Ok(())
    }
}
