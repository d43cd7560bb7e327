//! `catena-ingest dev`: the whole product in one process on local defaults.
//!
//! Migrate, declare the topology, then run the relay and a worker pool side by side. When no
//! webhook secret is configured a random one is generated, printed, and written to
//! [`DEV_SECRET_FILE`] so `catena-ingest send` in another terminal signs with it unprompted.
//! With `--fake-catena`, also a fake Catena, `subscriptions sync` against it and the reconciler
//! ([`super::dev_catena`]).

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
    /// Also run a fake Catena delivering through a door you can close (`close`/`open` on stdin),
    /// sync our subscriptions against it and run the reconciler: the control-plane loop.
    #[arg(long)]
    fake_catena: bool,
    /// Where the fake Catena listens.
    #[arg(long, default_value = "127.0.0.1:8090")]
    fake_catena_listen: String,
    /// Where the door in front of the relay listens (Catena's way in).
    #[arg(long, default_value = "127.0.0.1:8081")]
    door_listen: String,
}

/// The secrets file `dev --fake-catena` syncs into and the relay re-reads.
pub const DEV_SYNCED_SECRETS_FILE: &str = ".catena-webhook-secrets";

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
        // Before anything is printed: start the local services if they are installed and down,
        // or say in one line what to install.
        let services: Vec<String> = [
            catena_ingest::local::local_address(&self.database.database_url, 5432),
            catena_ingest::local::local_address(&self.broker.amqp_url, 5672),
        ]
        .into_iter()
        .flatten()
        .collect();
        if let Err(line) = catena_ingest::local::ensure_services(&services) {
            eprintln!("{line}");
            std::process::exit(1);
        }
        // The file, when there is one, is the relay's to read (and re-read).
        let configured = match self.secrets.webhook_secrets_file.is_some() || self.fake_catena {
            true => self
                .secrets
                .inline()
                .context("parsing CATENA_WEBHOOK_SECRETS")?,
            false => self.secrets.load().context("loading webhook secrets")?,
        };
        let (secrets, generated) = dev_secrets(configured)?;
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
                database: self.database.clone(),
            },
            shutdown.clone(),
        )
        .await?;
        let secrets_file = match (&self.secrets.webhook_secrets_file, self.fake_catena) {
            (Some(path), _) => Some(path.clone()),
            (None, true) => {
                let path = std::path::PathBuf::from(DEV_SYNCED_SECRETS_FILE);
                if !path.exists() {
                    std::fs::write(&path, "")?;
                }
                Some(path)
            }
            (None, false) => None,
        };
        let relay = relay::start(
            RelayConfig {
                relay: self.relay,
                broker: self.broker,
                secrets,
                secrets_file: secrets_file.clone(),
            },
            shutdown.clone(),
        )
        .await?;
        if self.fake_catena {
            super::dev_catena::start(
                super::dev_catena::DemoAddrs {
                    fake: self.fake_catena_listen,
                    door: self.door_listen,
                },
                local(relay.addr),
                secrets_file.as_deref().expect("set above"),
                &self.database,
                shutdown.clone(),
            )
            .await?;
        }
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

/// A listening address as a client reaches it: 0.0.0.0 means this machine.
fn local(addr: std::net::SocketAddr) -> std::net::SocketAddr {
    match addr.ip().is_unspecified() {
        true => std::net::SocketAddr::from(([127, 0, 0, 1], addr.port())),
        false => addr,
    }
}
