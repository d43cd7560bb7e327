//! `catena-ingest reconcile`: the singleton that brings back what Catena could not deliver.

use clap::Args;

use catena_ingest::config::{CatenaSettings, DatabaseSettings, ReconcileSettings};
use catena_ingest::shutdown::Shutdown;

#[derive(Args, Debug)]
pub struct Reconcile {
    #[command(flatten)]
    catena: CatenaSettings,
    #[command(flatten)]
    database: DatabaseSettings,
    #[command(flatten)]
    settings: ReconcileSettings,
}

impl Reconcile {
    pub async fn run(self) -> anyhow::Result<()> {
        if self.catena.client_id.is_empty() || self.catena.client_secret.is_empty() {
            anyhow::bail!("set CATENA_CLIENT_ID and CATENA_CLIENT_SECRET");
        }
        catena_ingest::store::migrate(&self.database.database_url).await?;
        let shutdown = Shutdown::new();
        shutdown.trigger_on_signals();
        let running = catena_ingest::control::reconcile::start(
            self.catena,
            &self.database.database_url,
            self.settings,
            shutdown,
        )
        .await?;
        tracing::info!(metrics = %running.metrics_addr, "reconciler started");
        running.handle.await?;
        Ok(())
    }
}
