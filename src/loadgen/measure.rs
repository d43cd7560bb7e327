//! One benchmark phase's figures as one JSON object ([`PhaseReport`]): what `scripts/bench.sh`
//! collects with `catena-ingest bench measure` after each phase, and what
//! [`table`](super::table) renders.
//!
//! The inputs are the load generator's output (wrk's summary line from `scripts/wrk-corpus.lua`,
//! `send --json`, the ceiling tool's text), the commits in PostgreSQL ([`report`](super::report)
//! and [`drain`]), and CPU snapshots of `/proc` ([`procstat`](super::procstat)).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::procstat::{self, Snapshot};
use super::report::EndToEnd;
use super::send::SendReport;
use crate::store::{self, DbError};

/// The phases of `scripts/bench.sh`, in the order the table lists them.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// The relay alone, nothing consuming.
    Relay,
    /// The ceiling tool's HTTP front alone (`ceiling http`: 202 without any broker).
    CeilingHttp,
    /// End to end at saturation.
    Sat,
    /// End to end at a paced rate.
    Half,
    /// The ceiling's minimal pipeline at the same paced rate.
    CeilingHalf,
    /// The backlog published straight to the broker.
    Publish,
    /// The backlog drained by the workers.
    Drain,
    /// A ceiling round: the ceiling tool's minimal pipeline.
    Ceiling,
    /// A ceiling round: ours.
    Pair,
}

impl Phase {
    /// Phases that are rounds against the ceiling (their own table), not rows of the main one.
    pub fn is_round(self) -> bool {
        matches!(self, Phase::Ceiling | Phase::Pair)
    }
}

/// The JSON line `scripts/wrk-corpus.lua` prints when wrk is done.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WrkSummary {
    pub requests: u64,
    pub seconds: f64,
    pub requests_per_second: f64,
    /// Non-2xx answers and socket errors.
    pub not_accepted: u64,
    /// Requests sent again because the corpus ran out (the pipeline drops them as duplicates).
    pub repeated: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum MeasureError {
    #[error("{0}")]
    Parse(String),
    #[error(transparent)]
    Db(#[from] DbError),
}

/// The summary in wrk's output: its last line that is a JSON object (wrk prints its own
/// report before it, the Lua `done` hook last).
pub fn parse_wrk_output(output: &str) -> Result<WrkSummary, MeasureError> {
    let line = output
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('{'))
        .ok_or_else(|| {
            MeasureError::Parse(
                "no JSON summary in wrk's output (run it with -s scripts/wrk-corpus.lua)".into(),
            )
        })?;
    serde_json::from_str(line)
        .map_err(|e| MeasureError::Parse(format!("wrk's summary line {line:?}: {e}")))
}

/// The throughput the ceiling tool prints, events per second: `committed+acked events/s=N` of
/// its pipeline, or `requests/s=N` of its HTTP front alone.
pub fn parse_ceiling_output(output: &str) -> Result<f64, MeasureError> {
    ["committed+acked events/s=", "http-only requests/s="]
        .iter()
        .find_map(|key| number_after(output, key))
        .ok_or_else(|| {
            MeasureError::Parse("no `committed+acked events/s=` in the ceiling's output".into())
        })
}

/// The ceiling pipeline's `publish->committed+acked latency: p50=..ms p99=..ms max=..ms`: its
/// nearest figure to our receive->commit (it publishes as it receives), in milliseconds.
pub fn parse_ceiling_latency(output: &str) -> Option<(f64, f64, f64)> {
    let line = output
        .lines()
        .find(|l| l.contains("publish->committed+acked latency"))?;
    Some((
        number_after(line, "p50=")?,
        number_after(line, "p99=")?,
        number_after(line, "max=")?,
    ))
}

fn number_after(text: &str, key: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let value = &l[l.find(key)? + key.len()..];
        let end = value
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(value.len());
        value[..end].parse().ok()
    })
}

/// Messages (ready and unacknowledged) in `queue`, from `rabbitmqctl -q list_queues name
/// messages`; `None` if it is not listed.
pub fn parse_queue_messages(listing: &str, queue: &str) -> Option<u64> {
    listing.lines().find_map(|l| {
        let mut fields = l.split_whitespace();
        (fields.next()? == queue).then_some(())?;
        fields.next()?.parse().ok()
    })
}

/// [`parse_queue_messages`] of a fresh `rabbitmqctl` listing (run on this machine; `RABBITMQCTL`
/// names another command line, such as `scripts/rabbitmq4.sh ctl`). Unlike a passive declare,
/// which only counts ready messages, this counts the ones a consumer holds.
pub fn queue_messages(queue: &str) -> std::io::Result<Option<u64>> {
    let ctl = std::env::var("RABBITMQCTL").unwrap_or_else(|_| "rabbitmqctl".into());
    let mut words = ctl.split_whitespace();
    let program = words.next().unwrap_or("rabbitmqctl");
    let output = std::process::Command::new(program)
        .args(words)
        .args(["-q", "list_queues", "name", "messages"])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()?;
    Ok(parse_queue_messages(
        &String::from_utf8_lossy(&output.stdout),
        queue,
    ))
}

/// How many events a phase moved, over how long.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Throughput {
    pub events: u64,
    pub seconds: f64,
    pub events_per_second: f64,
}

impl Throughput {
    /// Requests wrk sent (the relay alone, where nothing commits).
    pub fn of_wrk(wrk: &WrkSummary) -> Self {
        Self {
            events: wrk.requests,
            seconds: wrk.seconds,
            events_per_second: wrk.requests_per_second,
        }
    }

    /// Deliveries `send` got accepted (or confirmed, with `--target amqp`).
    pub fn of_send(send: &SendReport) -> Self {
        Self {
            events: send.accepted,
            seconds: send.elapsed_seconds,
            events_per_second: send.accepted_per_second,
        }
    }

    /// Events committed, from receipt of the first to commit of the last.
    pub fn of_end_to_end(e2e: &EndToEnd) -> Self {
        Self {
            events: e2e.events.max(0) as u64,
            seconds: e2e.seconds,
            events_per_second: e2e.events_per_second,
        }
    }

    /// A rate measured elsewhere (the ceiling's), applied to a window of `seconds`.
    pub fn of_rate(events_per_second: f64, seconds: f64) -> Self {
        Self {
            events: (events_per_second * seconds).round() as u64,
            seconds,
            events_per_second,
        }
    }
}

/// Events committed since `since` (a backlog drain), from the first commit to the last.
pub async fn drain(database_url: &str, since: DateTime<Utc>) -> Result<Throughput, DbError> {
    let pool = store::pool(database_url, 1)?;
    let client = pool.get().await?;
    let row = client
        .query_one(
            "SELECT count(*),
                    coalesce(extract(epoch FROM max(processed_at) - min(processed_at))::float8, 0)
             FROM webhook_events WHERE processed_at >= $1",
            &[&since],
        )
        .await?;
    let (events, seconds): (i64, f64) = (row.get(0), row.get(1));
    Ok(Throughput {
        events: events.max(0) as u64,
        seconds,
        events_per_second: events as f64 / seconds.max(1e-9),
    })
}

/// One process the phase names (`--pid relay=PID`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProcessFigures {
    pub pid: u32,
    /// CPU it used in the phase's CPU window.
    pub cpu_seconds: Option<f64>,
    pub cpu_us_per_event: Option<f64>,
    /// Peak resident set size over its life so far (`VmHWM`).
    pub peak_rss_mib: Option<f64>,
}

/// All processes of one name.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NameCpu {
    /// How many of them used CPU in the window.
    pub processes: usize,
    pub cpu_seconds: f64,
    pub cpu_us_per_event: f64,
}

/// One phase of a benchmark run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PhaseReport {
    pub phase: Phase,
    /// The round, for the rounds against the ceiling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub round: Option<u32>,
    /// The row's name in the table.
    pub label: String,
    pub events: u64,
    pub seconds: f64,
    pub events_per_second: f64,
    /// Seconds from the start the phase was measured from to the measurement (the drain's
    /// wall clock, worker start-up included).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wall_seconds: Option<f64>,
    /// wrk's view: HTTP latency from the load generator.
    pub http: Option<WrkSummary>,
    /// Receipt to commit, from PostgreSQL.
    pub end_to_end: Option<EndToEnd>,
    /// Seconds between the two CPU snapshots; the CPU figures are per event of the phase.
    pub cpu_window_seconds: Option<f64>,
    /// The processes named on the command line, by role.
    pub processes: BTreeMap<String, ProcessFigures>,
    /// CPU summed per process name over every process of the machine (`beam.smp` is RabbitMQ,
    /// `postgres` every backend, `catena-ingest` relay and workers together).
    pub cpu_by_name: BTreeMap<String, NameCpu>,
}

/// Everything a phase report is made of, measured or read by the caller.
#[derive(Clone, Debug)]
pub struct Inputs {
    pub phase: Phase,
    pub round: Option<u32>,
    /// `{seconds}` in it becomes the wall-clock seconds, rounded.
    pub label: String,
    pub throughput: Throughput,
    pub wall_seconds: Option<f64>,
    pub http: Option<WrkSummary>,
    pub end_to_end: Option<EndToEnd>,
    /// CPU snapshots at the start and the end of the CPU window.
    pub cpu: Option<(Snapshot, Snapshot)>,
    /// (role, pid) of the processes to report on.
    pub pids: Vec<(String, u32)>,
    /// Peak RSS by pid, read when measuring.
    pub peak_rss_mib: BTreeMap<u32, f64>,
}

impl Inputs {
    /// Read the peak RSS of every pid in `pids` now.
    pub fn read_peak_rss(&mut self) {
        for &(_, pid) in &self.pids {
            if let Some(mib) = procstat::peak_rss_mib(pid) {
                self.peak_rss_mib.insert(pid, mib);
            }
        }
    }

    pub fn report(self) -> PhaseReport {
        let events = self.throughput.events;
        let per_event = |seconds: f64| seconds * 1e6 / events.max(1) as f64;
        let (uses, window) = match &self.cpu {
            Some((before, after)) => (
                procstat::cpu_between(before, after),
                Some(after.seconds_since(before)),
            ),
            None => (Vec::new(), None),
        };
        let processes = self
            .pids
            .iter()
            .map(|(role, pid)| {
                let cpu_seconds = window.map(|_| {
                    uses.iter()
                        .find(|u| u.pid == *pid)
                        .map_or(0.0, |u| u.seconds)
                });
                let figures = ProcessFigures {
                    pid: *pid,
                    cpu_seconds,
                    cpu_us_per_event: cpu_seconds.map(per_event),
                    peak_rss_mib: self.peak_rss_mib.get(pid).copied(),
                };
                (role.clone(), figures)
            })
            .collect();
        let cpu_by_name = procstat::by_name(&uses)
            .into_iter()
            .map(|(name, (processes, cpu_seconds))| {
                let figures = NameCpu {
                    processes,
                    cpu_seconds,
                    cpu_us_per_event: per_event(cpu_seconds),
                };
                (name, figures)
            })
            .collect();
        let label = match self.wall_seconds {
            Some(s) => self.label.replace("{seconds}", &format!("{s:.0}")),
            None => self.label,
        };
        PhaseReport {
            phase: self.phase,
            round: self.round,
            label,
            events,
            seconds: self.throughput.seconds,
            events_per_second: self.throughput.events_per_second,
            wall_seconds: self.wall_seconds,
            http: self.http,
            end_to_end: self.end_to_end,
            cpu_window_seconds: window,
            processes,
            cpu_by_name,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loadgen::procstat::ProcessCpu;

    const WRK_OUTPUT: &str = "Running 20s test @ http://127.0.0.1:18180
  1 threads and 256 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    14.01ms    4.20ms  61.93ms   80.11%
    Req/Sec    18.03k     1.20k   20.11k    71.00%
  358821 requests in 20.00s, 31.15MB read
Requests/sec:  17940.71
Transfer/sec:      1.56MB
{\"requests\": 358821, \"seconds\": 20.00, \"requests_per_second\": 17941, \"not_accepted\": 0, \"repeated\": 0, \"p50_ms\": 13.51, \"p99_ms\": 26.80, \"max_ms\": 61.93}
";

    #[test]
    fn wrk_summary_is_its_last_json_line() {
        let wrk = parse_wrk_output(WRK_OUTPUT).unwrap();
        assert_eq!(
            wrk,
            WrkSummary {
                requests: 358821,
                seconds: 20.0,
                requests_per_second: 17941.0,
                not_accepted: 0,
                repeated: 0,
                p50_ms: 13.51,
                p99_ms: 26.8,
                max_ms: 61.93,
            }
        );
        let t = Throughput::of_wrk(&wrk);
        assert_eq!((t.events, t.events_per_second), (358821, 17941.0));
    }

    #[test]
    fn wrk_output_without_a_summary_is_an_error() {
        let without = WRK_OUTPUT.lines().take(8).collect::<Vec<_>>().join("\n");
        let error = parse_wrk_output(&without).unwrap_err().to_string();
        assert!(error.contains("wrk-corpus.lua"), "{error}");
        let error = parse_wrk_output("{\"requests\": 12}\n").unwrap_err();
        assert!(error.to_string().contains("missing field"), "{error}");
    }

    #[test]
    fn ceiling_rate_is_committed_and_acked_events() {
        let output = "RESULT pipeline source=http queue=quorum workers=2 prefetch=1000 batch=500
  accepted/s=13901 committed+acked events/s=13796 txn/s=28 avg_batch=492.7 backlog_growth=2 nacked=0
  confirm latency (=HTTP response time minus HTTP): p50=9.1ms p99=30.2ms
";
        assert_eq!(parse_ceiling_output(output).unwrap(), 13796.0);
        assert!(parse_ceiling_output("error: connection refused\n").is_err());
        assert_eq!(
            parse_ceiling_output("RESULT http-only requests/s=45120\n  cpu ...").unwrap(),
            45120.0
        );
        let with_latency = format!(
            "{output}  publish->committed+acked latency: p50=8.25ms p99=47.10ms max=494.0ms\n"
        );
        assert_eq!(
            parse_ceiling_latency(&with_latency),
            Some((8.25, 47.1, 494.0))
        );
        assert_eq!(parse_ceiling_latency(output), None);
        let t = Throughput::of_rate(13796.0, 16.0);
        assert_eq!(t.events, 220736);
    }

    #[test]
    fn queue_length_is_the_named_queues_messages() {
        let listing =
            "name\tmessages\nbench1.events.retry.5s\t3\nbench1.events\t1250\nbench1.parked\t0\n";
        assert_eq!(parse_queue_messages(listing, "bench1.events"), Some(1250));
        assert_eq!(parse_queue_messages(listing, "bench1.parked"), Some(0));
        assert_eq!(parse_queue_messages(listing, "bench2.events"), None);
        assert_eq!(
            parse_queue_messages("bench1.events\n", "bench1.events"),
            None
        );
    }

    fn cpu(pid: u32, comm: &str, cpu_ticks: u64) -> ProcessCpu {
        ProcessCpu {
            pid,
            comm: comm.into(),
            start_ticks: 1,
            cpu_ticks,
        }
    }

    #[test]
    fn report_divides_cpu_by_the_phase_events() {
        let at = Utc::now();
        let before = Snapshot {
            at,
            processes: vec![cpu(100, "catena-ingest", 0), cpu(200, "beam.smp", 500)],
        };
        let after = Snapshot {
            at: at + chrono::Duration::seconds(10),
            processes: vec![
                cpu(100, "catena-ingest", 400),
                cpu(101, "catena-ingest", 200),
                cpu(200, "beam.smp", 1300),
                cpu(300, "idle", 0),
            ],
        };
        let inputs = Inputs {
            phase: Phase::Drain,
            round: None,
            label: "drain ({seconds} s)".into(),
            throughput: Throughput {
                events: 100_000,
                seconds: 9.5,
                events_per_second: 10526.3,
            },
            wall_seconds: Some(11.6),
            http: None,
            end_to_end: None,
            cpu: Some((before, after)),
            pids: vec![("worker".into(), 100), ("gone".into(), 999)],
            peak_rss_mib: [(100, 39.7)].into(),
        };
        let report = inputs.report();
        assert_eq!(report.label, "drain (12 s)");
        assert_eq!(report.cpu_window_seconds, Some(10.0));
        assert_eq!(
            report.processes["worker"],
            ProcessFigures {
                pid: 100,
                cpu_seconds: Some(4.0),
                cpu_us_per_event: Some(40.0),
                peak_rss_mib: Some(39.7),
            }
        );
        assert_eq!(report.processes["gone"].cpu_seconds, Some(0.0));
        assert_eq!(report.processes["gone"].peak_rss_mib, None);
        assert_eq!(
            report.cpu_by_name.keys().collect::<Vec<_>>(),
            ["beam.smp", "catena-ingest"]
        );
        let ours = &report.cpu_by_name["catena-ingest"];
        assert_eq!((ours.processes, ours.cpu_us_per_event), (2, 60.0));
        assert_eq!(report.cpu_by_name["beam.smp"].cpu_us_per_event, 80.0);

        let json = serde_json::to_string(&report).unwrap();
        assert_eq!(serde_json::from_str::<PhaseReport>(&json).unwrap(), report);
    }

    #[test]
    fn without_snapshots_there_are_no_cpu_figures() {
        let report = Inputs {
            phase: Phase::Publish,
            round: None,
            label: "publish {seconds}".into(),
            throughput: Throughput::of_rate(22000.0, 2.0),
            wall_seconds: None,
            http: None,
            end_to_end: None,
            cpu: None,
            pids: vec![("relay".into(), 7)],
            peak_rss_mib: BTreeMap::new(),
        }
        .report();
        assert_eq!(report.label, "publish {seconds}");
        assert_eq!(report.cpu_window_seconds, None);
        assert_eq!(report.processes["relay"].cpu_us_per_event, None);
        assert!(report.cpu_by_name.is_empty());
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["phase"], "publish");
        assert!(json.get("round").is_none());
    }
}
