//! `catena-ingest send`: the demo, the load generator and a test tool.

use std::io::Read;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;

use catena_ingest::broker::{EventPublisher, GroupSettings, Publisher};
use catena_ingest::config::{
    BrokerSettings, DeliverySettings, RelaySettings, SecretSettings, parse_duration,
};
use catena_ingest::loadgen::report;
use catena_ingest::loadgen::scenario::{self, ScenarioOptions};
use catena_ingest::loadgen::send::{self, Outgoing, SendOptions, Target};
use catena_ingest::message::Producer;
use catena_ingest::relay;
use catena_ingest::shutdown::Shutdown;

use super::dev::DEV_SECRET_FILE;

#[derive(Args, Debug)]
pub struct Send {
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

    /// Signing secret. Defaults to the first secret CATENA_WEBHOOK_SECRETS(_FILE) has for the
    /// webhook id, else the secret `dev` wrote to .catena-dev-secret.
    #[arg(long, env = "SEND_SECRET", hide_env_values = true)]
    secret: Option<String>,

    #[command(flatten)]
    secrets: SecretSettings,

    #[command(flatten)]
    delivery: DeliverySettings,

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
    broker: BrokerSettings,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum SendTarget {
    Http,
    Amqp,
}

impl Send {
    /// The secret to sign with, from the same sources the relay reads.
    fn signing_secret(&self) -> anyhow::Result<Vec<u8>> {
        if let Some(secret) = &self.secret {
            return Ok(secret.as_bytes().to_vec());
        }
        let store = self.secrets.load().context("loading webhook secrets")?;
        if let Some(secret) = store.candidates(&self.webhook_id).next() {
            return Ok(secret.as_bytes().to_vec());
        }
        if let Ok(secret) = std::fs::read_to_string(DEV_SECRET_FILE) {
            return Ok(secret.trim().as_bytes().to_vec());
        }
        bail!("no signing secret: pass --secret, set CATENA_WEBHOOK_SECRETS, or start `dev` first")
    }

    fn print<T: serde::Serialize>(&self, value: &T, text: impl FnOnce(&T)) -> anyhow::Result<()> {
        if self.json {
            println!("{}", serde_json::to_string_pretty(value)?);
        } else {
            text(value);
        }
        Ok(())
    }

    /// One envelope from a file or stdin.
    fn read_envelope(&self, path: &PathBuf) -> anyhow::Result<Outgoing> {
        let mut body = Vec::new();
        if path.as_os_str() == "-" {
            std::io::stdin().read_to_end(&mut body)?;
        } else {
            body = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        }
        let envelope: serde_json::Value =
            serde_json::from_slice(&body).context("the file is not JSON")?;
        let event_name = envelope["event_name"].as_str().unwrap_or("unknown");
        let webhook_id = envelope["webhook_id"].as_str().unwrap_or(&self.webhook_id);
        Ok(Outgoing::new(event_name, webhook_id, body.clone()))
    }

    pub async fn run(self) -> anyhow::Result<()> {
        if let (Some(since), Some(db)) = (self.report_since, &self.report_db) {
            let expected = self.count.unwrap_or(0) as i64;
            let e2e = report::end_to_end(db, since, expected, report::SETTLE).await?;
            return self.print(&e2e, |e| e.print());
        }
        let secret = match self.target {
            SendTarget::Http => self.signing_secret()?,
            SendTarget::Amqp => Vec::new(), // the broker path carries no signature
        };
        let mut options = SendOptions::new(
            &format!("{}{}", self.url.trim_end_matches('/'), relay::WEBHOOK_PATH),
            secret,
        );
        options.delivery = self.delivery.clone();

        let started_at = chrono::Utc::now();
        type Stream = Box<dyn Iterator<Item = Outgoing> + std::marker::Send>;
        let (outgoing, count): (Stream, usize) = if let Some(path) = &self.file {
            (Box::new(std::iter::once(self.read_envelope(path)?)), 1)
        } else {
            let mut scenario_options = ScenarioOptions::new(self.fleets, self.seed);
            scenario_options.webhook_id = self.webhook_id.clone();
            scenario_options.ref_prefix = self.ref_prefix.clone().unwrap_or_else(|| {
                format!("FLEET-{}", &uuid::Uuid::new_v4().simple().to_string()[..6])
            });
            if self.count.is_some() || self.duration.is_some() {
                // Load mode: endless fleets, generated lazily, each event once in order.
                scenario_options.fleets = 0;
                let count = self.count.unwrap_or(usize::MAX);
                let stream = scenario::stream(&scenario_options)
                    .take(count)
                    .map(|e| Outgoing::new(&e.event_name, e.webhook_id(), e.body(1)));
                if let Some(path) = &self.wrk_corpus {
                    let (requests, bytes) = send::write_wrk_corpus(path, &options, stream)?;
                    eprintln!(
                        "wrote {requests} requests ({:.1} MiB) to {}",
                        bytes as f64 / 1048576.0,
                        path.display()
                    );
                    return Ok(());
                }
                if self.count.is_some() && self.target == SendTarget::Http {
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
                let deliveries = if self.duplicates > 0.0 || self.shuffle {
                    scenario::duplicated_and_shuffled(&events, self.duplicates, self.seed)
                } else {
                    scenario::in_order(&events)
                };
                eprintln!(
                    "sending {} deliveries of {} events for {} fleets (refs {}-*)",
                    deliveries.len(),
                    events.len(),
                    self.fleets,
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
        let deadline = self.duration.map(|d| Instant::now() + d);
        let broker_shutdown = Shutdown::new();
        let target = match self.target {
            SendTarget::Http => Target::Http(send::client(&options)),
            SendTarget::Amqp => {
                let names = self.broker.names();
                let publisher = Publisher::start(
                    &self.broker.amqp_url,
                    "catena-ingest send",
                    names.clone(),
                    4,
                    broker_shutdown.clone(),
                );
                if !publisher.wait_ready(Duration::from_secs(10)).await {
                    bail!("cannot reach RabbitMQ at the configured AMQP_URL");
                }
                let relay = RelaySettings::default();
                Target::Amqp(EventPublisher::start(
                    publisher,
                    names,
                    GroupSettings {
                        lanes: relay.publish_channels,
                        max_events: relay.group_max_events,
                        max_bytes: relay.group_max_bytes,
                        deadline: Duration::from_secs(5),
                        producer: Producer::LoadGenerator,
                    },
                    None,
                ))
            }
        };
        let sent = send::send_to(&options, target, outgoing, count, deadline).await;
        broker_shutdown.trigger();
        self.print(&sent, |r| r.print())?;
        if let Some(db) = &self.report_db {
            let e2e =
                report::end_to_end(db, started_at, sent.accepted as i64, report::SETTLE).await?;
            self.print(&e2e, |e| e.print())?;
        }
        if sent.failed > 0 || sent.rejected > 0 {
            std::process::exit(1);
        }
        Ok(())
    }
}
