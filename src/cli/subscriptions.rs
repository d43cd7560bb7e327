//! `catena-ingest subscriptions sync | list | rotate`: our Catena webhook subscriptions and
//! their secrets, as code (README, "Operator's guide"). Exit codes: 0 in sync, 2 drift left
//! (or, with `--dry-run`, changes to make), 1 error.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};

use catena_ingest::catena::CatenaClient;
use catena_ingest::catena::model::DESIRED_EVENTS;
use catena_ingest::config::{CatenaSettings, DatabaseSettings, parse_duration};
use catena_ingest::control::rotate::{self, Targets};
use catena_ingest::control::sink::Sink;
use catena_ingest::control::sync::{self, SyncPlan};
use catena_ingest::control::{Barrier, Control, registry};

/// Where secrets go when neither CATENA_SECRETS_SINK nor CATENA_WEBHOOK_SECRETS_FILE is set.
pub const DEFAULT_SECRETS_FILE: &str = ".catena-webhook-secrets";

#[derive(Args, Debug)]
pub struct Subscriptions {
    #[command(subcommand)]
    command: SubscriptionsCommand,
}

#[derive(Subcommand, Debug)]
enum SubscriptionsCommand {
    /// Create, adopt or repair one subscription per event name we need (idempotent).
    Sync(SyncArgs),
    /// Our subscriptions as Catena and the registry see them.
    List(ListArgs),
    /// Give subscriptions new secrets with an overlap, so no delivery fails.
    Rotate(RotateArgs),
}

/// What every subscriptions command needs: Catena, the registry, the sink, the barrier.
#[derive(Args, Debug)]
pub struct ControlArgs {
    #[command(flatten)]
    pub catena: CatenaSettings,
    #[command(flatten)]
    pub database: DatabaseSettings,
    /// `file:<path>` or `k8s:<namespace>/<secret>/<key>` (default: file: CATENA_WEBHOOK_SECRETS_FILE).
    #[arg(long, env = "CATENA_SECRETS_SINK")]
    pub secrets_sink: Option<String>,
    /// The file the relay reads (the default sink).
    #[arg(long, env = "CATENA_WEBHOOK_SECRETS_FILE")]
    pub webhook_secrets_file: Option<PathBuf>,
    /// Relay admin bases (`http://relay:8080`) whose /secrets/version must show a write before
    /// Catena may use it (comma separated).
    #[arg(
        long = "relay-admin",
        env = "CATENA_RELAY_ADMIN_URLS",
        value_delimiter = ','
    )]
    pub relay_admins: Vec<String>,
    /// Without --relay-admin, how long to wait for relays to load a write [file: 5s, k8s: 150s].
    #[arg(long, value_parser = parse_duration)]
    pub propagation_wait: Option<Duration>,
}

impl ControlArgs {
    pub fn sink(&self) -> anyhow::Result<Sink> {
        Ok(match (&self.secrets_sink, &self.webhook_secrets_file) {
            (Some(spec), _) => Sink::parse(spec)?,
            (None, Some(path)) => Sink::File(path.clone()),
            (None, None) => Sink::File(DEFAULT_SECRETS_FILE.into()),
        })
    }

    pub fn barrier(&self) -> Barrier {
        Barrier {
            relay_admins: self.relay_admins.clone(),
            propagation_wait: self.propagation_wait,
            timeout: Duration::from_secs(120),
        }
    }

    fn client(&self) -> anyhow::Result<CatenaClient> {
        if self.catena.client_id.is_empty() || self.catena.client_secret.is_empty() {
            bail!("set CATENA_CLIENT_ID and CATENA_CLIENT_SECRET (from support@catenaclearing.io)");
        }
        Ok(CatenaClient::new(self.catena.clone(), None))
    }
}

#[derive(Args, Debug)]
struct SyncArgs {
    #[command(flatten)]
    control: ControlArgs,
    /// Where Catena must deliver: the relay's public `https://…/webhooks/catena`.
    #[arg(long, env = "CATENA_PUBLIC_URL")]
    public_url: String,
    /// Allow an http:// public URL (the local demo only).
    #[arg(long)]
    allow_insecure_url: bool,
    /// Event names, comma separated (default: the 22 we handle).
    #[arg(long, value_delimiter = ',')]
    events: Vec<String>,
    /// Say what would change; change nothing (exit 2 if anything would).
    #[arg(long)]
    dry_run: bool,
    /// When several subscriptions could be ours, adopt this one.
    #[arg(long)]
    adopt: Vec<String>,
    /// Delete our own subscriptions outside the set.
    #[arg(long)]
    prune: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct ListArgs {
    #[command(flatten)]
    control: ControlArgs,
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct RotateArgs {
    #[command(flatten)]
    control: ControlArgs,
    /// Rotate these subscriptions.
    #[arg(long = "id", required_unless_present = "all", conflicts_with = "all")]
    ids: Vec<String>,
    /// Rotate every subscription of ours.
    #[arg(long)]
    all: bool,
    /// How long the old secret stays valid after Catena switched.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    overlap: Duration,
}

impl Subscriptions {
    pub async fn run(self) -> anyhow::Result<()> {
        let code = match self.command {
            SubscriptionsCommand::Sync(args) => args.run().await?,
            SubscriptionsCommand::List(args) => args.run().await?,
            SubscriptionsCommand::Rotate(args) => args.run().await?,
        };
        if code != 0 {
            std::process::exit(code);
        }
        Ok(())
    }
}

async fn prepared(control: &ControlArgs) -> anyhow::Result<deadpool_postgres::Object> {
    catena_ingest::store::migrate(&control.database.database_url)
        .await
        .context("migrating the registry")?;
    super::db_client(&control.database).await
}

impl SyncArgs {
    async fn run(self) -> anyhow::Result<i32> {
        if !self.public_url.starts_with("https://") && !self.allow_insecure_url {
            bail!("CATENA_PUBLIC_URL must be https:// (--allow-insecure-url for a local demo)");
        }
        let db = prepared(&self.control).await?;
        let catena = self.control.client()?;
        let sink = self.control.sink()?;
        let barrier = self.control.barrier();
        let control = Control {
            catena: &catena,
            db: &db,
            sink: &sink,
            barrier: &barrier,
        };
        let events = if self.events.is_empty() {
            DESIRED_EVENTS.iter().map(|e| e.to_string()).collect()
        } else {
            self.events
        };
        let plan = SyncPlan {
            public_url: self.public_url,
            events,
            dry_run: self.dry_run,
            adopt: self.adopt,
            prune: self.prune,
        };
        let report = sync::sync(&control, &plan).await?;
        if self.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            let verb = if report.dry_run { "would be " } else { "" };
            println!(
                "{} in sync, {} {verb}created, {} {verb}adopted, {} {verb}created again, {} {verb}given a new secret, {} {verb}pruned, {} old secrets retired; {} mutating calls",
                report.unchanged.len(),
                report.created.len(),
                report.adopted.len(),
                report.recreated.len(),
                report.new_secret.len(),
                report.pruned.len(),
                report.retired_secrets,
                report.mutating_calls
            );
            for warning in &report.warnings {
                println!("warning: {warning}");
            }
            for drift in &report.drift {
                println!(
                    "drift: {}: {} {}",
                    drift.event_name,
                    drift.reason,
                    drift.candidates.join(" ")
                );
            }
        }
        Ok(report.exit_code())
    }
}

impl ListArgs {
    async fn run(self) -> anyhow::Result<i32> {
        let db = prepared(&self.control).await?;
        let catena = self.control.client()?;
        let remote = catena.list_all().await?;
        let rows = registry::live(&db).await?;
        let listed: Vec<_> = rows
            .iter()
            .map(|row| {
                let at_catena = remote.iter().find(|w| w.id == row.webhook_id);
                serde_json::json!({
                    "webhook_id": row.webhook_id,
                    "event_name": row.event_name,
                    "status": at_catena.map_or("missing", |w| w.status.as_str()),
                    "url": row.url,
                    "secret_fp": row.secret_fp,
                    "rotation_started_at": row.rotation_started_at,
                    "dlq_count": row.dlq_count,
                    "ewma_success_rate": row.ewma_success_rate,
                })
            })
            .collect();
        let foreign = remote
            .iter()
            .filter(|w| !rows.iter().any(|r| r.webhook_id == w.id))
            .count();
        if self.json {
            println!("{}", serde_json::to_string_pretty(&listed)?);
        } else {
            println!(
                "{:<38} {:<26} {:<8} {:<9} DLQ",
                "WEBHOOK ID", "EVENT", "STATUS", "SECRET"
            );
            for row in &listed {
                println!(
                    "{:<38} {:<26} {:<8} {:<9} {}",
                    row["webhook_id"].as_str().unwrap_or_default(),
                    row["event_name"].as_str().unwrap_or_default(),
                    row["status"].as_str().unwrap_or_default(),
                    row["secret_fp"].as_str().unwrap_or("-"),
                    row["dlq_count"]
                        .as_i64()
                        .map_or("-".into(), |n| n.to_string()),
                );
            }
            println!(
                "{} ours; {foreign} other subscriptions at Catena (never touched)",
                listed.len()
            );
        }
        Ok(0)
    }
}

impl RotateArgs {
    async fn run(self) -> anyhow::Result<i32> {
        let db = prepared(&self.control).await?;
        let catena = self.control.client()?;
        let sink = self.control.sink()?;
        let barrier = self.control.barrier();
        let control = Control {
            catena: &catena,
            db: &db,
            sink: &sink,
            barrier: &barrier,
        };
        let targets = if self.all {
            Targets::All
        } else {
            Targets::Ids(self.ids)
        };
        let report = rotate::rotate(&control, &targets, self.overlap).await?;
        println!(
            "{} rotated; old secrets retire after {} (the next sync removes them)",
            report.rotated.len(),
            catena_ingest::config::human_duration(self.overlap)
        );
        for id in &report.unknown {
            println!("not ours: {id}");
        }
        Ok(if report.unknown.is_empty() { 0 } else { 2 })
    }
}
