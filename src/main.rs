//! The `catena-ingest` binary: parse the command line, set up telemetry, run one subcommand.

use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};

use catena_ingest::config::{
    BrokerArgs, DatabaseArgs, RelayArgs, SecretArgs, WorkerArgs, parse_duration,
};
use catena_ingest::relay::{self, RelayConfig};
use catena_ingest::scenario::{self, ScenarioOptions};
use catena_ingest::send::{self, Outgoing, SendOptions};
use catena_ingest::shutdown::Shutdown;
use catena_ingest::telemetry::{self, LogFormat};
use catena_ingest::worker::{self, WorkerConfig};
use catena_ingest::{broker, topology};

/// Webhook ingestion for Catena fleet events: edge relay -> RabbitMQ -> workers -> PostgreSQL.
#[derive(Parser, Debug)]
#[command(name = "catena-ingest", version, about, long_about = None)]
struct Cli {
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
    Relay {
        #[command(flatten)]
        broker: BrokerArgs,
        #[command(flatten)]
        secrets: SecretArgs,
        #[command(flatten)]
        relay: RelayArgs,
    },
    /// Declare exchanges and queues (idempotent; relay and worker also do it at start).
    Topology {
        #[command(flatten)]
        broker: BrokerArgs,
    },
    /// Consume, deduplicate, apply to fleet state in PostgreSQL, raise/resolve alerts, retry, park.
    Worker {
        #[command(flatten)]
        broker: BrokerArgs,
        #[command(flatten)]
        database: DatabaseArgs,
        #[command(flatten)]
        worker: WorkerArgs,
    },
    /// Create the database if missing and apply the embedded SQL migrations.
    Migrate {
        #[command(flatten)]
        database: DatabaseArgs,
    },
    /// Everything in one process on local defaults: migrate, topology, relay and workers.
    Dev {
        #[command(flatten)]
        broker: BrokerArgs,
        #[command(flatten)]
        database: DatabaseArgs,
        #[command(flatten)]
        secrets: SecretArgs,
        #[command(flatten)]
        relay: RelayArgs,
        #[command(flatten)]
        worker: WorkerArgs,
    },
    /// Sign and POST Catena-shaped webhooks: one event from a file, or a generated scenario.
    Send(SendArgs),
    /// Look into, replay or purge the parking lot (works while workers run).
    Parked {
        #[command(flatten)]
        broker: BrokerArgs,
        #[command(subcommand)]
        command: ParkedCommand,
    },
    /// Show one fleet's onboarding, connections, schedules, open alerts and last events.
    Fleet {
        #[command(flatten)]
        database: DatabaseArgs,
        #[command(subcommand)]
        command: FleetCommand,
    },
    /// List open alerts, or resolve one by hand (the sinks are notified too).
    Alerts {
        #[command(flatten)]
        database: DatabaseArgs,
        #[command(subcommand)]
        command: AlertsCommand,
    },
}

#[derive(Args, Debug, Clone)]
struct ParkedFilterArgs {
    /// Only this event name (routing key).
    #[arg(long = "event")]
    event_name: Option<String>,
    /// Only this park reason (malformed, invalid_record, unsupported_version, retries_exhausted,
    /// rejected_by_database, handler_panic, broker:delivery_limit, ...).
    #[arg(long)]
    reason: Option<String>,
    /// Only messages parked at least this long ago (e.g. 10m, 2h).
    #[arg(long, value_parser = parse_duration)]
    older_than: Option<Duration>,
}

impl ParkedFilterArgs {
    fn filter(&self, id: Option<String>) -> catena_ingest::parked::Filter {
        catena_ingest::parked::Filter {
            event_name: self.event_name.clone(),
            reason: self.reason.clone(),
            older_than: self.older_than,
            id,
        }
    }
}

#[derive(Subcommand, Debug)]
enum ParkedCommand {
    /// List parked messages (nothing is changed).
    List {
        #[command(flatten)]
        filter: ParkedFilterArgs,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// Show one message: headers, reason, attempts, and the body with secrets masked.
    Show { id: String },
    /// Republish matching messages to the events exchange (confirmed), then drop the parked copy.
    Replay {
        #[command(flatten)]
        filter: ParkedFilterArgs,
        /// Only this message.
        #[arg(long)]
        id: Option<String>,
        /// Count what would be replayed; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Replays per second (0 = unlimited).
        #[arg(long, default_value_t = 0.0)]
        rate: f64,
    },
    /// Delete matching messages for good.
    Purge {
        #[command(flatten)]
        filter: ParkedFilterArgs,
        #[arg(long)]
        id: Option<String>,
        /// Required: purging cannot be undone.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Subcommand, Debug)]
enum FleetCommand {
    /// Show a fleet by fleet_ref or fleet_id.
    Show {
        ref_or_id: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum AlertsCommand {
    /// List alerts, newest first.
    List {
        /// Only open alerts.
        #[arg(long)]
        open: bool,
        /// Only this kind (connection_stale or schedule_deactivated).
        #[arg(long)]
        kind: Option<String>,
        /// Only this fleet_ref.
        #[arg(long)]
        fleet: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: i64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Resolve an open alert by hand.
    Resolve {
        /// The alert_id.
        id: uuid::Uuid,
        /// Why (kept in alerts.resolution_note).
        #[arg(long)]
        note: String,
    },
}

#[derive(Args, Debug)]
struct SendArgs {
    /// Relay base URL.
    #[arg(long, env = "SEND_URL", default_value = "http://127.0.0.1:8080")]
    url: String,

    /// Send this one envelope (a JSON file, or `-` for stdin) instead of a scenario.
    #[arg(long, conflicts_with = "fleets")]
    file: Option<PathBuf>,

    /// Generate the full lifecycles of this many fleets.
    #[arg(long, default_value_t = 10)]
    fleets: usize,

    /// Seed of the generated scenario (same seed, same events).
    #[arg(long, default_value_t = 1)]
    seed: u64,

    /// Prefix of generated fleet_refs (defaults to a random run tag).
    #[arg(long)]
    ref_prefix: Option<String>,

    /// Fraction of deliveries repeated with a higher delivery attempt, as Catena's retries do.
    #[arg(long, default_value_t = 0.0)]
    duplicates: f64,

    /// Send in random order instead of lifecycle order.
    #[arg(long)]
    shuffle: bool,

    /// Webhook subscription id to send as (X-Webhook-ID).
    #[arg(long, default_value = scenario::DEFAULT_WEBHOOK_ID)]
    webhook_id: String,

    /// Signing secret. Defaults to the first usable entry of CATENA_WEBHOOK_SECRETS, else the
    /// secret `dev` wrote to .catena-dev-secret.
    #[arg(long, env = "SEND_SECRET", hide_env_values = true)]
    secret: Option<String>,

    /// Requests in flight at once.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,

    /// Requests per second (0 = as fast as the concurrency allows).
    #[arg(long, default_value_t = 0.0)]
    rate: f64,

    /// Retries after a 5xx or a timeout, as Catena does.
    #[arg(long, default_value_t = 3)]
    retries: u32,

    /// Per-request timeout (Catena waits 3 s).
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    timeout: Duration,

    /// Send uncompressed bodies.
    #[arg(long)]
    no_gzip: bool,

    /// Print the report as JSON.
    #[arg(long)]
    json: bool,

    /// Load mode: send this many events from an endless generated stream (no duplicates).
    #[arg(long, conflicts_with = "file")]
    count: Option<usize>,

    /// Load mode: send for this long (with --count, whichever ends first).
    #[arg(long, value_parser = parse_duration, conflicts_with = "file")]
    duration: Option<Duration>,

    /// `http` posts to the relay like Catena; `amqp` publishes with confirm straight to the
    /// broker (the broker-only baseline, and a fast way to build a backlog).
    #[arg(long, value_enum, default_value = "http")]
    target: SendTarget,

    /// After sending, wait for the events to be committed in this database and report end-to-end
    /// throughput and processed_at - received_at percentiles.
    #[arg(long)]
    report_db: Option<String>,

    /// With --count: write the signed, compressed requests to this file for
    /// `scripts/wrk-corpus.lua` (wrk replays them) instead of sending them.
    #[arg(long, requires = "count", conflicts_with = "report_since")]
    wrk_corpus: Option<PathBuf>,

    /// With --report-db: send nothing, report the events received since this RFC 3339 time
    /// (waiting for --count of them to commit), e.g. after a wrk run.
    #[arg(long, requires = "report_db")]
    report_since: Option<chrono::DateTime<chrono::Utc>>,

    #[command(flatten)]
    broker: BrokerArgs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum SendTarget {
    Http,
    Amqp,
}

/// mimalloc instead of glibc malloc: under load glibc spent ~19% of the relay's CPU in
/// malloc/free/consolidate (perf, README "Performance"); mimalloc's per-thread free lists
/// suit a runtime that allocates on one thread and frees on another.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    telemetry::init(cli.log_format);
    match cli.command {
        Command::Relay {
            broker,
            secrets,
            relay,
        } => run_relay(broker, secrets, relay).await,
        Command::Topology { broker } => {
            let connection = broker::connect(&broker.amqp_url, "catena-ingest topology")
                .await
                .context("connecting to RabbitMQ")?;
            let channel = connection.create_channel().await?;
            topology::declare(&channel, &broker.names())
                .await
                .context("declaring the topology")?;
            println!("topology declared with prefix `{}`", broker.name_prefix);
            Ok(())
        }
        Command::Send(args) => run_send(args).await,
        Command::Alerts { database, command } => run_alerts(&database, command).await,
        Command::Parked { broker, command } => run_parked(&broker, command).await,
        Command::Fleet {
            database,
            command: FleetCommand::Show { ref_or_id, json },
        } => {
            let client = db_client(&database).await?;
            match catena_ingest::fleet::show(&client, &ref_or_id).await? {
                Some(view) if json => println!("{}", serde_json::to_string_pretty(&view)?),
                Some(view) => catena_ingest::fleet::print(&view),
                None => bail!("no fleet or invitation matches `{ref_or_id}`"),
            }
            Ok(())
        }
        Command::Migrate { database } => {
            let applied = catena_ingest::db::migrate(&database.database_url).await?;
            println!("migrations applied: {applied:?} (none means up to date)");
            Ok(())
        }
        Command::Worker {
            broker,
            database,
            worker,
        } => {
            let shutdown = Shutdown::new();
            shutdown.trigger_on_signals();
            let running =
                worker::start(worker_config(&broker, &database, &worker), shutdown).await?;
            running.handle.await?;
            Ok(())
        }
        Command::Dev {
            broker,
            database,
            secrets,
            relay,
            worker,
        } => {
            let (store, generated) = catena_ingest::dev::dev_secrets(
                secrets.load().context("loading webhook secrets")?,
            )?;
            if let Some(secret) = generated {
                println!(
                    "no CATENA_WEBHOOK_SECRETS set: generated a dev secret for every webhook id\n  \
                     CATENA_WEBHOOK_SECRETS='*={secret}'   (also written to {})",
                    catena_ingest::dev::DEV_SECRET_FILE
                );
            }
            let relay_config = relay_config_with(&broker, store, &relay);
            let shutdown = Shutdown::new();
            shutdown.trigger_on_signals();
            catena_ingest::dev::run(
                relay_config,
                worker_config(&broker, &database, &worker),
                shutdown,
            )
            .await
        }
    }
}

fn worker_config(
    broker: &BrokerArgs,
    database: &DatabaseArgs,
    worker: &WorkerArgs,
) -> WorkerConfig {
    let mut config = WorkerConfig::new(&broker.amqp_url, broker.names(), &database.database_url);
    config.db_pool_size = database.db_pool_size;
    config.metrics_listen = worker.metrics_listen.clone();
    config.consumers = worker.consumers;
    config.prefetch = worker.prefetch;
    config.batch_size = worker.batch_size.max(1);
    config.batch_wait = worker.batch_wait;
    config.drain_timeout = worker.drain_timeout;
    config.migrate = !worker.no_migrate;
    config.rules = catena_ingest::state::Rules {
        failure_threshold: worker.execution_failure_threshold,
        failure_window: worker.execution_failure_window,
    };
    config.notifier.alertmanager_url = worker.alertmanager_url.clone();
    config.notifier.webhook_url = worker.alert_webhook_url.clone();
    config.notifier.refire_interval = worker.alert_refire_interval;
    config
}

pub fn relay_config(
    broker: &BrokerArgs,
    secrets: &SecretArgs,
    relay: &RelayArgs,
) -> anyhow::Result<RelayConfig> {
    let store = secrets.load().context("loading webhook secrets")?;
    if store.is_empty() {
        bail!("no webhook secrets: set CATENA_WEBHOOK_SECRETS or CATENA_WEBHOOK_SECRETS_FILE");
    }
    Ok(relay_config_with(broker, store, relay))
}

fn relay_config_with(
    broker: &BrokerArgs,
    store: catena_ingest::secrets::SecretStore,
    relay: &RelayArgs,
) -> RelayConfig {
    let mut config = RelayConfig::new(&relay.relay_listen, &broker.amqp_url, broker.names(), store);
    config.max_body_bytes = relay.max_body_bytes;
    config.max_decompressed_bytes = relay.max_decompressed_bytes;
    config.confirm_timeout = relay.confirm_timeout;
    config.publish_channels = relay.publish_channels;
    config.max_concurrency = relay.max_concurrency;
    config.body_timeout = relay.body_timeout;
    config.header_timeout = relay.header_timeout;
    config
}

async fn run_relay(
    broker: BrokerArgs,
    secrets: SecretArgs,
    relay: RelayArgs,
) -> anyhow::Result<()> {
    let config = relay_config(&broker, &secrets, &relay)?;
    let shutdown = Shutdown::new();
    shutdown.trigger_on_signals();
    let running = relay::start(config, shutdown)
        .await
        .with_context(|| format!("binding {}", relay.relay_listen))?;
    running.handle.await?;
    Ok(())
}

async fn run_parked(broker: &BrokerArgs, command: ParkedCommand) -> anyhow::Result<()> {
    use catena_ingest::parked;
    let names = broker.names();
    let url = &broker.amqp_url;
    match command {
        ParkedCommand::List {
            filter,
            limit,
            json,
        } => {
            let mut found = parked::list(url, &names, &filter.filter(None), limit).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&found)?);
            } else {
                for p in &mut found {
                    p.headers.remove("body");
                }
                parked::print_table(&found);
            }
        }
        ParkedCommand::Show { id } => {
            let filter = parked::Filter {
                id: Some(id.clone()),
                ..Default::default()
            };
            let found = parked::list(url, &names, &filter, 1).await?;
            let Some(p) = found.first() else {
                bail!("no parked message with id {id}");
            };
            let mut headers = p.headers.clone();
            let body = headers.remove("body").unwrap_or_default();
            println!(
                "id:        {}\nevent:     {}\nreason:    {}\ndetail:    {}\nparked_at: {}\nattempts:  {}",
                p.id,
                p.event_name,
                p.reason,
                p.detail.as_deref().unwrap_or("-"),
                p.parked_at
                    .map(|t| t.to_rfc3339())
                    .unwrap_or_else(|| "-".into()),
                p.attempts
                    .map(|a| a.to_string())
                    .unwrap_or_else(|| "-".into())
            );
            println!("headers:\n{}", serde_json::to_string_pretty(&headers)?);
            println!("body (secrets masked):\n{}", body.as_str().unwrap_or(""));
        }
        ParkedCommand::Replay {
            filter,
            id,
            dry_run,
            rate,
        } => {
            let report = parked::replay(url, &names, &filter.filter(id), dry_run, rate).await?;
            println!(
                "{}examined={} matched={} replayed={}",
                if dry_run { "dry run: " } else { "" },
                report.examined,
                report.matched,
                report.replayed
            );
        }
        ParkedCommand::Purge { filter, id, yes } => {
            if !yes {
                bail!("purge deletes parked messages for good: add --yes");
            }
            let report = parked::purge(url, &names, &filter.filter(id)).await?;
            println!("examined={} purged={}", report.examined, report.purged);
        }
    }
    Ok(())
}

async fn db_client(database: &DatabaseArgs) -> anyhow::Result<deadpool_postgres::Object> {
    let pool = catena_ingest::db::pool(&database.database_url, 1)?;
    pool.get().await.context("connecting to PostgreSQL")
}

async fn run_alerts(database: &DatabaseArgs, command: AlertsCommand) -> anyhow::Result<()> {
    use catena_ingest::alerts;
    let client = db_client(database).await?;
    match command {
        AlertsCommand::List {
            open,
            kind,
            fleet,
            limit,
            json,
        } => {
            let filter = alerts::ListFilter {
                open_only: open,
                kind,
                fleet_ref: fleet,
                limit,
            };
            let found = alerts::list(&client, &filter).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&found)?);
            } else {
                alerts::print_table(&found);
            }
        }
        AlertsCommand::Resolve { id, note } => {
            alerts::resolve(&client, id, &note).await?;
            println!("alert {id} resolved; the sinks will be notified");
        }
    }
    Ok(())
}

fn send_secret(args: &SendArgs) -> anyhow::Result<String> {
    if let Some(secret) = &args.secret {
        return Ok(secret.clone());
    }
    if let Ok(pairs) = std::env::var("CATENA_WEBHOOK_SECRETS") {
        for pair in pairs.split([',', '\n']) {
            if let Some((id, secret)) = pair.trim().split_once('=')
                && (id.trim() == args.webhook_id || id.trim() == "*")
            {
                return Ok(secret.trim().to_owned());
            }
        }
    }
    if let Ok(secret) = std::fs::read_to_string(".catena-dev-secret") {
        return Ok(secret.trim().to_owned());
    }
    bail!("no signing secret: pass --secret, set CATENA_WEBHOOK_SECRETS, or start `dev` first")
}

async fn run_send(args: SendArgs) -> anyhow::Result<()> {
    if let (Some(since), Some(db)) = (args.report_since, &args.report_db) {
        let expected = args.count.unwrap_or(0) as i64;
        let e2e =
            catena_ingest::bench::end_to_end(db, since, expected, Duration::from_secs(10)).await?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&e2e)?);
        } else {
            e2e.print();
        }
        return Ok(());
    }
    let secret = match args.target {
        SendTarget::Http => send_secret(&args)?,
        SendTarget::Amqp => String::new(), // the broker path carries no signature
    };
    let mut options = SendOptions::new(
        &format!("{}{}", args.url.trim_end_matches('/'), relay::WEBHOOK_PATH),
        &secret,
    );
    options.concurrency = args.concurrency;
    options.rate = args.rate;
    options.retries = args.retries;
    options.timeout = args.timeout;
    options.gzip = !args.no_gzip;

    let started_at = chrono::Utc::now();
    let (outgoing, count): (Box<dyn Iterator<Item = Outgoing> + Send>, usize) = if let Some(path) =
        &args.file
    {
        let mut body = Vec::new();
        if path.as_os_str() == "-" {
            std::io::stdin().read_to_end(&mut body)?;
        } else {
            body = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        }
        let envelope: serde_json::Value =
            serde_json::from_slice(&body).context("the file is not JSON")?;
        let event_name = envelope["event_name"].as_str().unwrap_or("unknown");
        let webhook_id = envelope["webhook_id"].as_str().unwrap_or(&args.webhook_id);
        (
            Box::new(std::iter::once(Outgoing::new(
                event_name,
                webhook_id,
                body.clone(),
            ))),
            1,
        )
    } else {
        let mut scenario_options = ScenarioOptions::new(args.fleets, args.seed);
        scenario_options.webhook_id = args.webhook_id.clone();
        scenario_options.ref_prefix = args.ref_prefix.clone().unwrap_or_else(|| {
            format!("FLEET-{}", &uuid::Uuid::new_v4().simple().to_string()[..6])
        });
        if args.count.is_some() || args.duration.is_some() {
            // Load mode: endless fleets, generated lazily, each event once in order.
            scenario_options.fleets = 0;
            let count = args.count.unwrap_or(usize::MAX);
            let stream = scenario::stream(&scenario_options)
                .take(count)
                .map(|e| Outgoing::new(&e.event_name, e.webhook_id(), e.body(1)));
            if let Some(path) = &args.wrk_corpus {
                let (requests, bytes) = send::write_wrk_corpus(path, &options, stream)?;
                eprintln!(
                    "wrote {requests} requests ({:.1} MiB) to {}",
                    bytes as f64 / 1048576.0,
                    path.display()
                );
                return Ok(());
            }
            if args.count.is_some() && args.target == SendTarget::Http {
                // A counted run prepares (gzip + sign) every request before the clock starts.
                let prepared: Vec<_> = stream.map(|o| o.prepare(&options)).collect();
                eprintln!("load: {} prepared requests", prepared.len());
                (Box::new(prepared.into_iter()), count)
            } else {
                eprintln!("load: up to {count} events");
                (Box::new(stream), count)
            }
        } else {
            let events = scenario::generate(&scenario_options);
            let deliveries = if args.duplicates > 0.0 || args.shuffle {
                scenario::duplicated_and_shuffled(&events, args.duplicates, args.seed)
            } else {
                scenario::in_order(&events)
            };
            eprintln!(
                "sending {} deliveries of {} events for {} fleets (refs {}-*)",
                deliveries.len(),
                events.len(),
                args.fleets,
                scenario_options.ref_prefix
            );
            let outgoing: Vec<_> = deliveries
                .iter()
                .map(|d| Outgoing::from_delivery(&events, d))
                .collect();
            let n = outgoing.len();
            (Box::new(outgoing.into_iter()), n)
        }
    };
    let deadline = args.duration.map(|d| std::time::Instant::now() + d);
    let broker_shutdown = Shutdown::new();
    let target = match args.target {
        SendTarget::Http => send::Target::Http(send::client(&options)),
        SendTarget::Amqp => {
            let names = args.broker.names();
            let publisher = catena_ingest::broker::Publisher::start(
                &args.broker.amqp_url,
                "catena-ingest send",
                names.clone(),
                4,
                broker_shutdown.clone(),
            );
            if !publisher.wait_ready(Duration::from_secs(10)).await {
                bail!("cannot reach RabbitMQ at the configured AMQP_URL");
            }
            send::Target::Amqp {
                publisher,
                exchange: names.events_exchange,
            }
        }
    };
    let report = send::send_to(&options, target, outgoing, count, deadline).await;
    broker_shutdown.trigger();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        report.print();
    }
    if let Some(db) = &args.report_db {
        let e2e = catena_ingest::bench::end_to_end(
            db,
            started_at,
            report.accepted as i64,
            Duration::from_secs(10),
        )
        .await?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&e2e)?);
        } else {
            e2e.print();
        }
    }
    if report.failed > 0 || report.rejected > 0 {
        std::process::exit(1);
    }
    Ok(())
}
