//! CPU time and peak memory of processes, read from Linux's `/proc`, for the benchmark's CPU
//! accounting (`catena-ingest bench`).
//!
//! A [`Snapshot`] holds the CPU time of every process at one moment; two of them give each
//! process' CPU over the window between ([`cpu_between`]), by pid or summed by process name.

use std::collections::BTreeMap;
use std::path::Path;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Clock ticks per second of `/proc/PID/stat`'s times (`USER_HZ`, `getconf CLK_TCK`): the kernel
/// reports in it whatever its internal HZ, and it is 100 on every architecture this runs on.
pub const USER_HZ: f64 = 100.0;

/// One process' CPU figures from `/proc/PID/stat`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessCpu {
    pub pid: u32,
    /// The command name (`comm`, at most 15 bytes; the same as `/proc/PID/comm`).
    pub comm: String,
    /// Start time in ticks after boot: with the pid, it tells a reused pid from the same process.
    pub start_ticks: u64,
    /// User plus system time of all its threads, in ticks.
    pub cpu_ticks: u64,
}

impl ProcessCpu {
    pub fn cpu_seconds(&self) -> f64 {
        self.cpu_ticks as f64 / USER_HZ
    }
}

/// Parse one `/proc/PID/stat` line. The command name sits in parentheses and may itself hold
/// spaces and parentheses, so the fields after it are counted from the last `)`.
pub fn parse_stat(line: &str) -> Option<ProcessCpu> {
    let open = line.find('(')?;
    let close = line.rfind(')')?;
    if close < open {
        return None;
    }
    let pid = line[..open].trim().parse().ok()?;
    let comm = line[open + 1..close].to_owned();
    // Fields after the name, numbered as in proc(5): state is field 3, utime 14, stime 15,
    // starttime 22.
    let rest: Vec<&str> = line[close + 1..].split_whitespace().collect();
    let field = |n: usize| rest.get(n - 3)?.parse::<u64>().ok();
    Some(ProcessCpu {
        pid,
        comm,
        start_ticks: field(22)?,
        cpu_ticks: field(14)? + field(15)?,
    })
}

/// `VmHWM` (peak resident set size) of a `/proc/PID/status`, in KiB.
pub fn parse_peak_rss_kib(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
}

/// Peak resident set size of a running process, in MiB (`None` once it has exited).
pub fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_peak_rss_kib(&status).map(|kib| kib as f64 / 1024.0)
}

/// The CPU time of every process at one moment.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Snapshot {
    pub at: DateTime<Utc>,
    pub processes: Vec<ProcessCpu>,
}

impl Snapshot {
    /// Every process in `/proc` but this one (the measuring process is not what is measured).
    pub fn take() -> std::io::Result<Self> {
        let at = Utc::now();
        let me = std::process::id();
        let mut processes = Vec::new();
        for entry in std::fs::read_dir("/proc")? {
            let name = entry?.file_name();
            let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            if pid == me {
                continue;
            }
            // A process can exit between the listing and the read: skip it.
            if let Some(process) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .as_deref()
                .and_then(parse_stat)
            {
                processes.push(process);
            }
        }
        processes.sort_by_key(|p| p.pid);
        Ok(Self { at, processes })
    }

    /// A snapshot written as JSON by `catena-ingest bench snapshot`.
    pub fn read(path: &Path) -> std::io::Result<Self> {
        let text = std::fs::read_to_string(path)?;
        serde_json::from_str(&text).map_err(std::io::Error::other)
    }

    pub fn process(&self, pid: u32) -> Option<&ProcessCpu> {
        self.processes.iter().find(|p| p.pid == pid)
    }

    /// Seconds from `before` to this snapshot.
    pub fn seconds_since(&self, before: &Snapshot) -> f64 {
        (self.at - before.at).as_seconds_f64()
    }
}

/// What one process used between two snapshots.
#[derive(Clone, Debug, PartialEq)]
pub struct CpuUse {
    pub pid: u32,
    pub comm: String,
    pub seconds: f64,
}

/// The CPU each process in `after` used since `before`. A process that started in between
/// counts from zero; one that exited in between is not in `after` and so not counted (its last
/// moments are lost, as with any sampling).
pub fn cpu_between(before: &Snapshot, after: &Snapshot) -> Vec<CpuUse> {
    let earlier: std::collections::HashMap<(u32, u64), u64> = before
        .processes
        .iter()
        .map(|p| ((p.pid, p.start_ticks), p.cpu_ticks))
        .collect();
    after
        .processes
        .iter()
        .map(|p| {
            let start = earlier.get(&(p.pid, p.start_ticks)).copied().unwrap_or(0);
            CpuUse {
                pid: p.pid,
                comm: p.comm.clone(),
                seconds: p.cpu_ticks.saturating_sub(start) as f64 / USER_HZ,
            }
        })
        .collect()
}

/// CPU seconds summed per process name (every postgres backend under `postgres`, ...), and how
/// many processes of that name used any. Names that used nothing are left out.
pub fn by_name(uses: &[CpuUse]) -> BTreeMap<String, (usize, f64)> {
    let mut names: BTreeMap<String, (usize, f64)> = BTreeMap::new();
    for u in uses.iter().filter(|u| u.seconds > 0.0) {
        let entry = names.entry(u.comm.clone()).or_default();
        entry.0 += 1;
        entry.1 += u.seconds;
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 52 fields as the kernel writes them, with `comm` and the times given.
    fn stat_line(pid: u32, comm: &str, utime: u64, stime: u64, start: u64) -> String {
        let mut fields: Vec<String> = (3..=52).map(|n| n.to_string()).collect();
        fields[0] = "S".into();
        fields[14 - 3] = utime.to_string();
        fields[15 - 3] = stime.to_string();
        fields[22 - 3] = start.to_string();
        format!("{pid} ({comm}) {}\n", fields.join(" "))
    }

    #[test]
    fn stat_fields_are_counted_from_the_last_parenthesis() {
        let p = parse_stat(&stat_line(4242, "evil ) 1 2 (x", 150, 50, 987654)).unwrap();
        assert_eq!(
            p,
            ProcessCpu {
                pid: 4242,
                comm: "evil ) 1 2 (x".into(),
                start_ticks: 987654,
                cpu_ticks: 200,
            }
        );
        assert_eq!(p.cpu_seconds(), 2.0);
        let p = parse_stat(&stat_line(7, "tokio-runtime-w", 3, 4, 5)).unwrap();
        assert_eq!((p.comm.as_str(), p.cpu_ticks), ("tokio-runtime-w", 7));
    }

    #[test]
    fn a_real_stat_line_parses() {
        let line = "1234 (beam.smp) S 1 1234 1234 0 -1 4194560 52211 0 0 0 8123 1877 0 0 20 0 \
                    41 0 5566 2350092288 30000 18446744073709551615 1 1 0 0 0 0 0 4224 17991 0 0 \
                    0 17 1 0 0 0 0 0 0 0 0 0 0 0 0 0";
        let p = parse_stat(line).unwrap();
        assert_eq!(
            (p.pid, p.comm.as_str(), p.cpu_ticks, p.start_ticks),
            (1234, "beam.smp", 10000, 5566)
        );
    }

    #[test]
    fn truncated_or_garbled_stat_lines_are_none() {
        assert_eq!(parse_stat(""), None);
        assert_eq!(parse_stat("12 (short) S 1 2 3"), None);
        assert_eq!(parse_stat(") 12 (x"), None);
        assert_eq!(
            parse_stat("x (name) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19"),
            None
        );
    }

    #[test]
    fn our_own_stat_parses() {
        let text = std::fs::read_to_string("/proc/self/stat").unwrap();
        let p = parse_stat(&text).unwrap();
        assert_eq!(p.pid, std::process::id());
        assert!(!p.comm.is_empty());
    }

    #[test]
    fn peak_rss_is_vm_hwm() {
        let status = "Name:\tcatena-ingest\nVmPeak:\t  999999 kB\nVmHWM:\t   36966 kB\nVmRSS:\t   30000 kB\n";
        assert_eq!(parse_peak_rss_kib(status), Some(36966));
        assert_eq!(parse_peak_rss_kib("Name:\tkthreadd\n"), None);
        assert!(peak_rss_mib(std::process::id()).unwrap() > 0.0);
    }

    fn process(pid: u32, comm: &str, start_ticks: u64, cpu_ticks: u64) -> ProcessCpu {
        ProcessCpu {
            pid,
            comm: comm.into(),
            start_ticks,
            cpu_ticks,
        }
    }

    #[test]
    fn cpu_between_matches_pid_and_start_time() {
        let at = Utc::now();
        let before = Snapshot {
            at,
            processes: vec![
                process(10, "postgres", 1, 100),
                process(11, "postgres", 1, 50),
                process(12, "beam.smp", 1, 1000),
                process(13, "gone", 1, 500),
                process(14, "old", 1, 900),
            ],
        };
        let after = Snapshot {
            at: at + chrono::Duration::milliseconds(2500),
            processes: vec![
                process(10, "postgres", 1, 150),
                process(11, "postgres", 1, 50),
                process(12, "beam.smp", 1, 1400),
                process(14, "reused", 2, 30), // pid 14 reused by a new process
                process(15, "postgres", 3, 20),
            ],
        };
        assert_eq!(after.seconds_since(&before), 2.5);
        let uses = cpu_between(&before, &after);
        let seconds: Vec<(u32, f64)> = uses.iter().map(|u| (u.pid, u.seconds)).collect();
        assert_eq!(
            seconds,
            [(10, 0.5), (11, 0.0), (12, 4.0), (14, 0.3), (15, 0.2)]
        );
        let names = by_name(&uses);
        assert_eq!(
            names.keys().collect::<Vec<_>>(),
            ["beam.smp", "postgres", "reused"]
        );
        assert_eq!(names["postgres"].0, 2);
        assert!((names["postgres"].1 - 0.7).abs() < 1e-9);
    }

    #[test]
    fn a_snapshot_lists_processes_but_not_itself() {
        let snapshot = Snapshot::take().unwrap();
        assert!(snapshot.process(std::process::id()).is_none());
        assert!(!snapshot.processes.is_empty());
        let json = serde_json::to_string(&snapshot).unwrap();
        let back: Snapshot = serde_json::from_str(&json).unwrap();
        assert_eq!(back.processes, snapshot.processes);
    }
}
