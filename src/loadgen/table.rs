//! The markdown summary `scripts/bench.sh` prints at the end, rendered from the run's
//! [`PhaseReport`]s: the phase table, the table of rounds against the ceiling with each round's
//! CPU per event by process name, then peak RSS and CPU per event of relay and worker.

use std::fmt::Write;

use super::measure::{Phase, PhaseReport, ProcessFigures};

/// Process names whose CPU per event is below this are left out of the CPU lines.
const MIN_CPU_US: f64 = 1.0;

/// Render the summary. The order of `phases` does not matter: rows follow the phase order, and
/// rounds their number.
pub fn render(phases: &[PhaseReport]) -> String {
    let mut main: Vec<&PhaseReport> = phases.iter().filter(|p| !p.phase.is_round()).collect();
    main.sort_by_key(|p| p.phase);
    let mut out = String::from(
        "| phase | events/s | HTTP p50 ms | HTTP p99 ms | receive->commit p50 ms | p99 ms |\n\
         |---|---|---|---|---|---|\n",
    );
    for p in main {
        let (http50, http99) = p.http.as_ref().map_or((dash(), dash()), |h| {
            (format!("{:.1}", h.p50_ms), format!("{:.1}", h.p99_ms))
        });
        let (lag50, lag99) = p.end_to_end.as_ref().map_or((dash(), dash()), |e| {
            (
                format!("{:.1}", e.lag_ms_p50),
                format!("{:.1}", e.lag_ms_p99),
            )
        });
        let _ = writeln!(
            out,
            "| {} | {:.0} | {http50} | {http99} | {lag50} | {lag99} |",
            p.label, p.events_per_second
        );
    }
    let rounds = rounds(phases);
    if !rounds.is_empty() {
        out.push_str(
            "\n| round | A: ceiling events/s | B: catena-ingest events/s | B / A |\n\
             |---|---|---|---|\n",
        );
        for (round, [ceiling, ours]) in &rounds {
            let rate = |p: &Option<&PhaseReport>| p.map(|p| p.events_per_second.round());
            let (a, b) = (rate(ceiling), rate(ours));
            let ratio = match (b, a) {
                (Some(b), Some(a)) if a > 0.0 => format!("{:.2}", b / a),
                _ => dash(),
            };
            let _ = writeln!(
                out,
                "| {round} | {} | {} | {ratio} |",
                or_dash(a),
                or_dash(b)
            );
        }
        out.push('\n');
        for (round, variants) in &rounds {
            for (p, name) in variants.iter().zip(["A, ceiling:", "B, ours:"]) {
                if let Some(p) = p {
                    let _ = writeln!(
                        out,
                        "round {round} CPU per event, {name:<12}{}",
                        cpu_by_name(p)
                    );
                }
            }
        }
    }
    ratios(phases, &mut out);
    footer(phases, &mut out);
    out
}

/// Each round's (ceiling, ours), by round number.
type Round<'a> = (u32, [Option<&'a PhaseReport>; 2]);

fn rounds(phases: &[PhaseReport]) -> Vec<Round<'_>> {
    let mut rounds: Vec<Round<'_>> = Vec::new();
    for p in phases.iter().filter(|p| p.phase.is_round()) {
        let round = p.round.unwrap_or(0);
        let slot = usize::from(p.phase != Phase::Ceiling);
        match rounds.iter_mut().find(|(r, _)| *r == round) {
            Some((_, variants)) => variants[slot] = Some(p),
            None => {
                let mut variants = [None; 2];
                variants[slot] = Some(p);
                rounds.push((round, variants));
            }
        }
    }
    rounds.sort_by_key(|(r, _)| *r);
    rounds
}

/// The same-run comparisons the targets are stated in: the relay against the ceiling's HTTP
/// front, and both pipelines at the same paced rate.
fn ratios(phases: &[PhaseReport], out: &mut String) {
    let find = |phase: Phase| phases.iter().find(|p| p.phase == phase);
    if let (Some(relay), Some(front)) = (find(Phase::Relay), find(Phase::CeilingHttp)) {
        let _ = writeln!(
            out,
            "\nrelay alone / ceiling HTTP front: {:.0} / {:.0} = {:.2}",
            relay.events_per_second,
            front.events_per_second,
            relay.events_per_second / front.events_per_second.max(1e-9)
        );
    }
    if let (Some(ours), Some(ceiling)) = (find(Phase::Half), find(Phase::CeilingHalf)) {
        let p99 = |p: &PhaseReport| {
            (
                p.http
                    .as_ref()
                    .map_or(dash(), |h| format!("{:.1}", h.p99_ms)),
                p.end_to_end
                    .as_ref()
                    .map_or(dash(), |e| format!("{:.1}", e.lag_ms_p99)),
            )
        };
        let ((ours_http, ours_commit), (their_http, their_commit)) = (p99(ours), p99(ceiling));
        let _ = writeln!(
            out,
            "\nat {:.0}/s, both paced: HTTP p99 ours {ours_http} ms, ceiling {their_http} ms; \
             receive->commit p99 ours {ours_commit} ms, ceiling (publish->commit) {their_commit} ms",
            ours.events_per_second
        );
    }
}

/// `beam.smp 50 us, catena-ingest 65 us, postgres 40 us`: every name above [`MIN_CPU_US`].
fn cpu_by_name(p: &PhaseReport) -> String {
    p.cpu_by_name
        .iter()
        .filter(|(_, cpu)| cpu.cpu_us_per_event > MIN_CPU_US)
        .map(|(name, cpu)| format!("{name} {:.0} us", cpu.cpu_us_per_event))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Peak RSS and CPU per event of relay and worker: alone, end to end, and in the drain.
fn footer(phases: &[PhaseReport], out: &mut String) {
    let find = |phase: Phase| phases.iter().find(|p| p.phase == phase);
    let figure = |phase: Phase, role: &str, pick: fn(&ProcessFigures) -> Option<f64>| {
        find(phase)
            .and_then(|p| p.processes.get(role))
            .and_then(pick)
    };
    let rss = |f: &ProcessFigures| f.peak_rss_mib;
    let cpu = |f: &ProcessFigures| f.cpu_us_per_event;
    // Peak RSS never falls, so the end-to-end figure is the later phase's.
    let end_to_end_rss = |role: &str| {
        [Phase::Sat, Phase::Half]
            .into_iter()
            .filter_map(|phase| figure(phase, role, rss))
            .reduce(f64::max)
    };
    let mib = |v: Option<f64>| v.map_or(dash(), |v| format!("{v:.1}"));
    let us = |v: Option<f64>| v.map_or(dash(), |v| format!("{v:.0}"));
    let mut worker = mib(end_to_end_rss("worker"));
    if find(Phase::Drain).is_some() {
        let _ = write!(
            worker,
            " (drain: {})",
            mib(figure(Phase::Drain, "worker", rss))
        );
    }
    let _ = writeln!(
        out,
        "\npeak RSS MiB: relay {} (alone: {}), worker {worker}",
        mib(end_to_end_rss("relay")),
        mib(figure(Phase::Relay, "relay", rss)),
    );
    let _ = writeln!(
        out,
        "CPU per event: relay alone {} us; at saturation relay {} us, worker {} us",
        us(figure(Phase::Relay, "relay", cpu)),
        us(figure(Phase::Sat, "relay", cpu)),
        us(figure(Phase::Sat, "worker", cpu)),
    );
}

fn dash() -> String {
    "-".to_owned()
}

fn or_dash(v: Option<f64>) -> String {
    v.map_or(dash(), |v| format!("{v:.0}"))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::loadgen::measure::{NameCpu, WrkSummary};
    use crate::loadgen::report::EndToEnd;

    fn phase(phase: Phase, round: Option<u32>, label: &str, events_per_second: f64) -> PhaseReport {
        PhaseReport {
            phase,
            round,
            label: label.into(),
            events: 1000,
            seconds: 1.0,
            events_per_second,
            wall_seconds: None,
            http: None,
            end_to_end: None,
            cpu_window_seconds: None,
            processes: BTreeMap::new(),
            cpu_by_name: BTreeMap::new(),
        }
    }

    fn http(p50_ms: f64, p99_ms: f64) -> Option<WrkSummary> {
        Some(WrkSummary {
            requests: 1000,
            seconds: 1.0,
            requests_per_second: 1000.0,
            not_accepted: 0,
            repeated: 0,
            p50_ms,
            p99_ms,
            max_ms: 99.0,
        })
    }

    fn lag(p50: f64, p99: f64) -> Option<EndToEnd> {
        Some(EndToEnd {
            events: 1000,
            seconds: 1.0,
            events_per_second: 1000.0,
            lag_ms_p50: p50,
            lag_ms_p90: 0.0,
            lag_ms_p99: p99,
            lag_ms_max: 0.0,
        })
    }

    fn process(pid: u32, cpu_us: Option<f64>, rss: Option<f64>) -> ProcessFigures {
        ProcessFigures {
            pid,
            cpu_seconds: cpu_us.map(|_| 1.0),
            cpu_us_per_event: cpu_us,
            peak_rss_mib: rss,
        }
    }

    fn names(cpu: &[(&str, f64)]) -> BTreeMap<String, NameCpu> {
        cpu.iter()
            .map(|&(n, us)| {
                let figures = NameCpu {
                    processes: 1,
                    cpu_seconds: 1.0,
                    cpu_us_per_event: us,
                };
                (n.to_owned(), figures)
            })
            .collect()
    }

    #[test]
    fn a_full_run_renders_every_table_and_line() {
        let mut relay = phase(Phase::Relay, None, "relay alone", 17940.6);
        relay.http = http(13.51, 26.8);
        relay.processes = [("relay".into(), process(1, Some(34.4), Some(35.6)))].into();
        let mut sat = phase(
            Phase::Sat,
            None,
            "end to end at saturation (wrk -c256)",
            9672.2,
        );
        sat.http = http(23.9, 53.64);
        sat.end_to_end = lag(143.0, 359.04);
        sat.processes = [
            ("relay".into(), process(2, Some(41.2), Some(35.9))),
            ("worker".into(), process(3, Some(20.6), Some(39.0))),
        ]
        .into();
        let mut half = phase(
            Phase::Half,
            None,
            "end to end at half (4836/s, paced)",
            4829.0,
        );
        half.http = http(3.6, 128.7);
        half.end_to_end = lag(11.0, 96.5);
        half.processes = [
            ("relay".into(), process(2, None, Some(36.1))),
            ("worker".into(), process(3, None, Some(39.7))),
        ]
        .into();
        let publish = phase(Phase::Publish, None, "backlog publish", 22184.4);
        let mut drain = phase(Phase::Drain, None, "backlog drain (70 s)", 14670.0);
        drain.processes = [("worker".into(), process(4, Some(30.0), Some(41.5)))].into();
        let mut a1 = phase(Phase::Ceiling, Some(1), "", 13796.0);
        a1.cpu_by_name = names(&[("beam.smp", 50.2), ("ceiling-minima", 36.0), ("sshd", 0.4)]);
        let mut front = phase(
            Phase::CeilingHttp,
            None,
            "ceiling HTTP front alone",
            40000.0,
        );
        front.http = http(5.0, 9.0);
        let mut ceiling_half = phase(Phase::CeilingHalf, None, "ceiling at half", 4831.0);
        ceiling_half.http = http(2.0, 40.0);
        ceiling_half.end_to_end = lag(8.0, 47.1);
        let mut b1 = phase(Phase::Pair, Some(1), "", 9571.4);
        b1.cpu_by_name = names(&[("beam.smp", 80.0), ("catena-ingest", 65.0)]);
        let a2 = phase(Phase::Ceiling, Some(2), "", 15101.0);
        let b2 = phase(Phase::Pair, Some(2), "", 9137.0);
        // Any order: the rendering sorts.
        let phases = [
            b2,
            drain,
            ceiling_half,
            sat,
            a2,
            publish,
            half,
            a1,
            relay,
            front,
            b1,
        ];
        let expected = "\
| phase | events/s | HTTP p50 ms | HTTP p99 ms | receive->commit p50 ms | p99 ms |
|---|---|---|---|---|---|
| relay alone | 17941 | 13.5 | 26.8 | - | - |
| ceiling HTTP front alone | 40000 | 5.0 | 9.0 | - | - |
| end to end at saturation (wrk -c256) | 9672 | 23.9 | 53.6 | 143.0 | 359.0 |
| end to end at half (4836/s, paced) | 4829 | 3.6 | 128.7 | 11.0 | 96.5 |
| ceiling at half | 4831 | 2.0 | 40.0 | 8.0 | 47.1 |
| backlog publish | 22184 | - | - | - | - |
| backlog drain (70 s) | 14670 | - | - | - | - |

| round | A: ceiling events/s | B: catena-ingest events/s | B / A |
|---|---|---|---|
| 1 | 13796 | 9571 | 0.69 |
| 2 | 15101 | 9137 | 0.61 |

round 1 CPU per event, A, ceiling: beam.smp 50 us, ceiling-minima 36 us
round 1 CPU per event, B, ours:    beam.smp 80 us, catena-ingest 65 us
round 2 CPU per event, A, ceiling: 
round 2 CPU per event, B, ours:    

relay alone / ceiling HTTP front: 17941 / 40000 = 0.45

at 4829/s, both paced: HTTP p99 ours 128.7 ms, ceiling 40.0 ms; receive->commit p99 ours 96.5 ms, ceiling (publish->commit) 47.1 ms

peak RSS MiB: relay 36.1 (alone: 35.6), worker 39.7 (drain: 41.5)
CPU per event: relay alone 34 us; at saturation relay 41 us, worker 21 us
";
        assert_eq!(render(&phases), expected);
    }

    #[test]
    fn no_phases_render_the_empty_table_and_dashes() {
        let expected = "\
| phase | events/s | HTTP p50 ms | HTTP p99 ms | receive->commit p50 ms | p99 ms |
|---|---|---|---|---|---|

peak RSS MiB: relay - (alone: -), worker -
CPU per event: relay alone - us; at saturation relay - us, worker - us
";
        assert_eq!(render(&[]), expected);
    }

    #[test]
    fn half_alone_gives_the_end_to_end_rss_and_no_saturation_cpu() {
        let mut half = phase(Phase::Half, None, "half", 4800.0);
        half.processes = [
            ("relay".into(), process(2, None, Some(30.0))),
            ("worker".into(), process(3, None, Some(31.0))),
        ]
        .into();
        let out = render(&[half]);
        assert!(
            out.contains("peak RSS MiB: relay 30.0 (alone: -), worker 31.0\n"),
            "{out}"
        );
        assert!(
            out.contains("at saturation relay - us, worker - us"),
            "{out}"
        );
    }
}
