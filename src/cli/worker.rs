//! `catena-ingest worker`

use clap::Args;

use catena_ingest::config::{BrokerSettings, DatabaseSettings, WorkerConfig, WorkerSettings};
use catena_ingest::shutdown::Shutdown;
use catena_ingest::worker;

#[derive(Args, Debug)]
pub struct Worker {
    #[command(flatten)]
    broker: BrokerSettings,
    #[command(flatten)]
    database: DatabaseSettings,
    #[command(flatten)]
    worker: WorkerSettings,
}

impl Worker {
    pub fn into_config(self) -> WorkerConfig {
        WorkerConfig {
            worker: self.worker,
            broker: self.broker,
            database: self.database,
        }
    }

    pub async fn run(self) -> anyhow::Result<()> {
        let shutdown = Shutdown::new();
        shutdown.trigger_on_signals();
        let running = worker::start(self.into_config(), shutdown).await?;
        running.handle.await?;
        Ok(())
    }
}
