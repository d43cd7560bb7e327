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
    /// The relay refuses to start without a secret: it could verify nothing.
    fn into_config(self) -> anyhow::Result<RelayConfig> {
        let secrets = self.secrets.load().context("loading webhook secrets")?;
        if secrets.is_empty() {
            bail!("no webhook secrets: set CATENA_WEBHOOK_SECRETS or CATENA_WEBHOOK_SECRETS_FILE");
        }
        Ok(RelayConfig {
            relay: self.relay,
            broker: self.broker,
            secrets,
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
