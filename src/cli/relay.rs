//! `catena-ingest relay`

use anyhow::{Context, bail};
use clap::Args;

use catena_ingest::config::{BrokerSettings, RelayConfig, RelaySettings, SecretSettings};
use catena_ingest::relay;
use catena_ingest::shutdown::Shutdown;

#[derive(Args, Debug)]
pub struct Relay {
    #[command(flatten)]
    broker: BrokerSettings,
    #[command(flatten)]
    secrets: SecretSettings,
    #[command(flatten)]
    relay: RelaySettings,
}

impl Relay {
    pub fn runtime_threads(&self) -> usize {
        self.relay.runtime_threads
    }

    /// Without any secret source the relay could never verify anything: refused at start. An
    /// empty file is fine (`subscriptions sync` fills it, and the relay re-reads it).
    fn into_config(self) -> anyhow::Result<RelayConfig> {
        let secrets = self
            .secrets
            .inline()
            .context("parsing CATENA_WEBHOOK_SECRETS")?;
        if secrets.is_empty() && self.secrets.webhook_secrets_file.is_none() {
            bail!(
                "no webhook secrets: set CATENA_WEBHOOK_SECRETS_FILE (or CATENA_WEBHOOK_SECRETS)"
            );
        }
        Ok(RelayConfig {
            relay: self.relay,
            broker: self.broker,
            secrets,
            secrets_file: self.secrets.webhook_secrets_file,
        })
    }

    pub async fn run(self) -> anyhow::Result<()> {
        let config = self.into_config()?;
        let listen = config.relay.listen.clone();
        let shutdown = Shutdown::new();
        shutdown.trigger_on_signals();
        let running = relay::start(config, shutdown)
            .await
            .with_context(|| format!("binding {listen}"))?;
        running.handle.await?;
        Ok(())
    }
}
