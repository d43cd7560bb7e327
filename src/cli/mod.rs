//! The command line: one file per subcommand, each an argument struct with a `run`.
//!
//! Parsing builds the settings tree of [`catena_ingest::config`] directly (every flag is also an
//! environment variable), so a subcommand only assembles its config and calls the library.

mod alerts;
mod bench;
mod dev;
mod dev_catena;
mod fake_catena;
mod fleet;
mod ignored;
mod migrate;
mod parked;
mod reconcile;
mod relay;
mod send;
mod subscriptions;
mod topology;
mod worker;

use clap::{Parser, Subcommand};

use catena_ingest::telemetry::{self, LogFormat};

/// Webhook ingestion for Catena fleet events: edge relay -> RabbitMQ -> workers -> PostgreSQL.
#[derive(Parser, Debug)]
#[command(name = "catena-ingest", version, about, long_about = None)]
pub struct Cli {
    /// Log encoding.
    #[arg(
        long,
        env = "LOG_FORMAT",
        value_enum,
        default_value = "text",
        global = true
    )]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// The HTTP edge: verify each webhook, publish it with a confirm, answer 202 (or 401/4xx/503).
    Relay(relay::Relay),
    /// Declare exchanges and queues (idempotent; relay and worker also do it at start).
    Topology(topology::Topology),
    /// Consume, deduplicate, apply to fleet state in PostgreSQL, raise/resolve alerts, retry, park.
    Worker(worker::Worker),
    /// Create the database if missing and apply the embedded SQL migrations.
    Migrate(migrate::Migrate),
    /// Everything in one process on local defaults: migrate, topology, relay and workers.
    Dev(Box<dev::Dev>),
    /// Sign and POST Catena-shaped webhooks: one event from a file, or a generated scenario.
    Send(Box<send::Send>),
    /// Look into, replay or purge the parking lot (works while workers run).
    Parked(parked::Parked),
    /// Show one fleet's onboarding, connections, schedules, open alerts and last events.
    Fleet(fleet::Fleet),
    /// List open alerts, or resolve one by hand (the sinks are notified too).
    Alerts(alerts::Alerts),
    /// List, or re-apply after an upgrade, the stored events whose names were not understood.
    Ignored(ignored::Ignored),
    /// Our Catena webhook subscriptions and their secrets, as code: sync, list, rotate.
    Subscriptions(subscriptions::Subscriptions),
    /// Reactivate stale Catena subscriptions and replay their DLQs once our relay is healthy.
    Reconcile(Box<reconcile::Reconcile>),
    /// A stand-in for Catena (API, delivery, breaker, DLQ) for tests and the demo.
    FakeCatena(fake_catena::FakeCatena),
    /// The measuring half of scripts/bench.sh: CPU snapshots, one JSON report per phase, the
    /// summary table.
    #[command(hide = true)]
    Bench(bench::Bench),
}

impl Cli {
    /// The runtime the subcommand runs on: the relay's sized by `RELAY_RUNTIME_THREADS`, the
    /// others tokio's default (one thread per core, or `TOKIO_WORKER_THREADS`).
    pub fn runtime(&self) -> std::io::Result<tokio::runtime::Runtime> {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        if let Some(threads) = self.runtime_threads() {
            builder.worker_threads(threads);
        }
        builder.enable_all().build()
    }

    fn runtime_threads(&self) -> Option<usize> {
        match &self.command {
            Command::Relay(command) => Some(command.runtime_threads()),
            _ => None,
        }
    }

    /// Set up telemetry, then run the subcommand to completion.
    pub async fn run(self) -> anyhow::Result<()> {
        telemetry::init(self.log_format);
        match self.command {
            Command::Relay(command) => command.run().await,
            Command::Topology(command) => command.run().await,
            Command::Worker(command) => command.run().await,
            Command::Migrate(command) => command.run().await,
            Command::Dev(command) => command.run().await,
            Command::Send(command) => command.run().await,
            Command::Parked(command) => command.run().await,
            Command::Fleet(command) => command.run().await,
            Command::Alerts(command) => command.run().await,
            Command::Ignored(command) => command.run().await,
            Command::Subscriptions(command) => command.run().await,
            Command::Reconcile(command) => command.run().await,
            Command::FakeCatena(command) => command.run().await,
            Command::Bench(command) => command.run().await,
        }
    }
}

/// One PostgreSQL connection for an operator command.
async fn db_client(
    database: &catena_ingest::config::DatabaseSettings,
) -> anyhow::Result<deadpool_postgres::Object> {
    use anyhow::Context;
    let pool = catena_ingest::store::pool(&database.database_url, 1)?;
    pool.get().await.context("connecting to PostgreSQL")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_relay_sizes_its_runtime() {
        let threads = |args: &[&str]| Cli::try_parse_from(args).unwrap().runtime_threads();
        assert_eq!(threads(&["catena-ingest", "relay"]), Some(1));
        assert_eq!(
            threads(&["catena-ingest", "relay", "--runtime-threads", "3"]),
            Some(3)
        );
        assert_eq!(threads(&["catena-ingest", "worker"]), None);
    }
}
