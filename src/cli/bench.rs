//! `catena-ingest bench snapshot | wait-empty | measure | rate | table`: the measuring half of
//! `scripts/bench.sh`, which only starts processes, waits and prints what these print. Hidden
//! from `--help`: the script is its user.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use clap::{Args, Subcommand};

use catena_ingest::config::{BrokerSettings, DatabaseSettings};
use catena_ingest::loadgen::measure::{self, Inputs, Phase, PhaseReport, Throughput};
use catena_ingest::loadgen::procstat::Snapshot;
use catena_ingest::loadgen::send::SendReport;
use catena_ingest::loadgen::{report, table};

#[derive(Args, Debug)]
pub struct Bench {
    #[command(subcommand)]
    command: BenchCommand,
}

#[derive(Subcommand, Debug)]
enum BenchCommand {
    /// Print the CPU time of every process (one JSON object), to measure a window from.
    Snapshot,
    /// Wait until the events queue holds no message, ready or unacknowledged (rabbitmqctl).
    WaitEmpty {
        #[command(flatten)]
        broker: BrokerSettings,
        /// Another queue than the events queue of CATENA_NAME_PREFIX.
        #[arg(long)]
        queue: Option<String>,
    },
    /// Measure one phase and print its report (one JSON object).
    Measure(Box<Measure>),
    /// Print a phase report's events/s, rounded, times FRACTION, rounded down (a paced rate).
    Rate {
        report: PathBuf,
        #[arg(long, default_value_t = 1.0)]
        fraction: f64,
    },
    /// Print the run's markdown summary from every `*.phase.json` report in DIR.
    Table { dir: PathBuf },
}

/// Where the phase's events come from: `--received-since` (end to end, with `--wrk`),
/// `--processed-since` (a drain), `--ceiling-output`, `--send-report`, or else `--wrk` alone
/// (requests sent, for the relay alone).
#[derive(Args, Debug)]
struct Measure {
    #[arg(long, value_enum)]
    phase: Phase,

    /// The round, for the ceiling rounds.
    #[arg(long)]
    round: Option<u32>,

    /// The row's name in the table; `{seconds}` becomes the seconds since --processed-since.
    #[arg(long, default_value = "")]
    label: String,

    /// wrk's output, run with `-s scripts/wrk-corpus.lua`: HTTP latency and requests sent.
    #[arg(long)]
    wrk: Option<PathBuf>,

    /// Wait until wrk's requests received since this RFC 3339 time are committed in
    /// DATABASE_URL, and report them end to end.
    #[arg(long, requires = "wrk", conflicts_with_all = ["processed_since", "ceiling_output", "send_report"])]
    received_since: Option<DateTime<Utc>>,

    /// Report the events committed in DATABASE_URL since this RFC 3339 time (a backlog drain),
    /// over the span from the first commit to the last.
    #[arg(long, conflicts_with_all = ["ceiling_output", "send_report"])]
    processed_since: Option<DateTime<Utc>>,

    /// The ceiling tool's output: its committed events/s, applied to the CPU window.
    #[arg(long, requires = "cpu_since", conflicts_with = "send_report")]
    ceiling_output: Option<PathBuf>,

    /// The output of `send --json`: its accepted deliveries are the events.
    #[arg(long)]
    send_report: Option<PathBuf>,

    /// A process to report CPU per event and peak RSS for, as ROLE=PID (repeatable).
    #[arg(long = "pid", value_name = "ROLE=PID", value_parser = role_pid)]
    pids: Vec<(String, u32)>,

    /// A `bench snapshot` taken at the start of the CPU window.
    #[arg(long)]
    cpu_since: Option<PathBuf>,

    /// A `bench snapshot` taken at its end (default: now, after the events are committed).
    #[arg(long, requires = "cpu_since")]
    cpu_until: Option<PathBuf>,

    #[command(flatten)]
    database: DatabaseSettings,
}

fn role_pid(value: &str) -> Result<(String, u32), String> {
    let (role, pid) = value
        .split_once('=')
        .ok_or_else(|| format!("{value:?} is not ROLE=PID"))?;
    let pid = pid.parse().map_err(|_| format!("{pid:?} is not a pid"))?;
    Ok((role.to_owned(), pid))
}

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> anyhow::Result<T> {
    serde_json::from_str(&read(path)?).with_context(|| format!("parsing {}", path.display()))
}

fn snapshot(path: &Path) -> anyhow::Result<Snapshot> {
    Snapshot::read(path).with_context(|| format!("reading the CPU snapshot {}", path.display()))
}

impl Bench {
    pub async fn run(self) -> anyhow::Result<()> {
        match self.command {
            BenchCommand::Snapshot => {
                let snapshot = Snapshot::take().context("reading /proc")?;
                println!("{}", serde_json::to_string(&snapshot)?);
            }
            BenchCommand::WaitEmpty { broker, queue } => {
                let queue = queue.unwrap_or_else(|| broker.names().events_queue);
                wait_empty(&queue).await?;
            }
            BenchCommand::Measure(measure) => {
                let report = measure.run().await?;
                println!("{}", serde_json::to_string_pretty(&report)?);
            }
            BenchCommand::Rate { report, fraction } => {
                let report: PhaseReport = read_json(&report)?;
                println!(
                    "{:.0}",
                    (report.events_per_second.round() * fraction).floor()
                );
            }
            BenchCommand::Table { dir } => {
                let mut phases = Vec::new();
                let entries = std::fs::read_dir(&dir)
                    .with_context(|| format!("listing {}", dir.display()))?;
                for entry in entries {
                    let path = entry?.path();
                    if path.to_string_lossy().ends_with(".phase.json") {
                        phases.push(read_json::<PhaseReport>(&path)?);
                    }
                }
                print!("{}", table::render(&phases));
            }
        }
        Ok(())
    }
}

/// Poll once a second, as an operator watching `rabbitmqctl list_queues` would.
async fn wait_empty(queue: &str) -> anyhow::Result<()> {
    const UNLISTED_LIMIT: u32 = 30;
    let mut unlisted = 0;
    loop {
        match measure::queue_messages(queue).context("running rabbitmqctl")? {
            Some(0) => return Ok(()),
            Some(_) => unlisted = 0,
            None if unlisted >= UNLISTED_LIMIT => {
                bail!("rabbitmqctl has not listed queue {queue} for {UNLISTED_LIMIT} s")
            }
            None => unlisted += 1,
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

impl Measure {
    async fn run(self) -> anyhow::Result<PhaseReport> {
        let started = Utc::now();
        let http = match &self.wrk {
            Some(path) => Some(measure::parse_wrk_output(&read(path)?)?),
            None => None,
        };
        let before = self.cpu_since.as_deref().map(snapshot).transpose()?;
        let until = self.cpu_until.as_deref().map(snapshot).transpose()?;
        let db = &self.database.database_url;
        let mut end_to_end = None;
        let mut wall_seconds = None;
        let throughput = if let Some(since) = self.received_since {
            let expected = http.as_ref().map_or(0, |h| h.requests as i64);
            let e2e = report::end_to_end(db, since, expected, report::SETTLE).await?;
            let throughput = Throughput::of_end_to_end(&e2e);
            end_to_end = Some(e2e);
            throughput
        } else if let Some(since) = self.processed_since {
            wall_seconds = Some((started - since).as_seconds_f64());
            measure::drain(db, since).await?
        } else if let Some(path) = &self.ceiling_output {
            let output = read(path)?;
            let rate = measure::parse_ceiling_output(&output)
                .with_context(|| format!("in {}", path.display()))?;
            let (Some(before), Some(after)) = (&before, &until) else {
                bail!("--ceiling-output needs the CPU window: --cpu-since and --cpu-until");
            };
            let throughput = Throughput::of_rate(rate, after.seconds_since(before));
            end_to_end =
                measure::parse_ceiling_latency(&output).map(|(p50, p99, max)| report::EndToEnd {
                    events: throughput.events as i64,
                    seconds: throughput.seconds,
                    events_per_second: rate,
                    lag_ms_p50: p50,
                    lag_ms_p90: 0.0,
                    lag_ms_p99: p99,
                    lag_ms_max: max,
                });
            throughput
        } else if let Some(path) = &self.send_report {
            Throughput::of_send(&read_json::<SendReport>(path)?)
        } else if let Some(wrk) = &http {
            Throughput::of_wrk(wrk)
        } else {
            bail!(
                "nothing to measure: give --wrk, --processed-since, --ceiling-output or --send-report"
            );
        };
        // The end of the CPU window is now, after the events are committed, unless given.
        let cpu = match (before, until) {
            (Some(before), Some(after)) => Some((before, after)),
            (Some(before), None) => Some((before, Snapshot::take().context("reading /proc")?)),
            _ => None,
        };
        let mut inputs = Inputs {
            phase: self.phase,
            round: self.round,
            label: self.label,
            throughput,
            wall_seconds,
            http,
            end_to_end,
            cpu,
            pids: self.pids,
            peak_rss_mib: Default::default(),
        };
        inputs.read_peak_rss();
        Ok(inputs.report())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pids_are_role_equals_pid() {
        assert_eq!(role_pid("relay=4242"), Ok(("relay".into(), 4242)));
        assert_eq!(role_pid("worker2=7"), Ok(("worker2".into(), 7)));
        assert!(role_pid("relay").is_err());
        assert!(role_pid("relay=abc").is_err());
    }
}
