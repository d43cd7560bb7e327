//! `catena-ingest topology`

use anyhow::Context;
use clap::Args;

use catena_ingest::broker;
use catena_ingest::config::BrokerSettings;

#[derive(Args, Debug)]
pub struct Topology {
    #[command(flatten)]
    broker: BrokerSettings,
}

impl Topology {
    pub async fn run(self) -> anyhow::Result<()> {
        let connection = broker::connect(&self.broker.amqp_url, "catena-ingest topology")
            .await
            .context("connecting to RabbitMQ")?;
        broker::topology::declare(&connection, &self.broker.names())
            .await
            .context("declaring the topology")?;
        println!(
            "topology declared with prefix `{}`",
            self.broker.name_prefix
        );
        Ok(())
    }
}
