//! `catena-ingest fake-catena`: the in-memory Catena for the demo and manual tests.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use catena_ingest::fake_catena::{self, FakeConfig};
use catena_ingest::shutdown::Shutdown;

#[derive(Args, Debug)]
pub struct FakeCatena {
    /// Address to serve the API, the token endpoint and the `/_fake/*` hooks on.
    #[arg(long, default_value = "127.0.0.1:8090")]
    listen: String,

    /// A JSON object of knobs (see `fake_catena::config`); the ones left out keep their defaults.
    #[arg(long)]
    config: Option<PathBuf>,
}

impl FakeCatena {
    pub async fn run(self) -> anyhow::Result<()> {
        let config = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                serde_json::from_str(&text)
                    .with_context(|| format!("parsing {}", path.display()))?
            }
            None => FakeConfig::default(),
        };
        let (client_id, client_secret) = (config.client_id.clone(), config.client_secret.clone());
        let shutdown = Shutdown::new();
        shutdown.trigger_on_signals();
        let running = fake_catena::start(&self.listen, config, shutdown)
            .await
            .with_context(|| format!("binding {}", self.listen))?;
        // The fake's own development credentials: printing them is the point of this command.
        println!("CATENA_API_URL={}", running.api_url());
        println!("CATENA_AUTH_URL={}", running.auth_url());
        println!("CATENA_CLIENT_ID={client_id}");
        println!("CATENA_CLIENT_SECRET={client_secret}");
        running.handle.await?;
        Ok(())
    }
}
