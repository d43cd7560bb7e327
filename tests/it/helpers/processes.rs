//! The real binary as a child process: for SIGKILL/SIGTERM, log-content and CLI tests.
//! `TestPipeline::{worker_process, relay_process, cli}` prepare one for the pipeline's prefix
//! and database.

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::Arc;

use super::pipeline::Leftovers;

/// A command line for the binary, not yet started.
pub struct Process {
    command: Command,
    leftovers: Arc<Leftovers>,
}

impl Process {
    pub(super) fn new(args: &[&str], leftovers: Arc<Leftovers>) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_catena-ingest"));
        command.args(args);
        Self { command, leftovers }
    }

    pub fn env(mut self, key: &str, value: impl AsRef<OsStr>) -> Self {
        self.command.env(key, value);
        self
    }

    pub fn envs(mut self, vars: &[(&str, &str)]) -> Self {
        self.command.envs(vars.iter().copied());
        self
    }

    /// Standard error (the logs) into `path`.
    pub fn log_to(mut self, path: &Path) -> Self {
        self.command
            .stderr(std::fs::File::create(path).expect("create the log file"));
        self
    }

    pub(super) fn discard_stdout(mut self) -> Self {
        self.command.stdout(Stdio::null());
        self
    }

    pub fn spawn(mut self) -> ChildProcess {
        let child = self
            .command
            .spawn()
            .expect("spawn the catena-ingest binary");
        ChildProcess {
            child: Some(child),
            _leftovers: self.leftovers,
        }
    }

    /// Run to the end, capturing standard output and error.
    pub async fn output(mut self) -> Output {
        tokio::task::spawn_blocking(move || self.command.output())
            .await
            .unwrap()
            .expect("run the catena-ingest binary")
    }
}

/// A running child, SIGKILLed and reaped on drop. It holds the pipeline's leftovers, so the
/// database and queues it uses are removed only after it is gone (it could declare them again).
pub struct ChildProcess {
    child: Option<Child>,
    _leftovers: Arc<Leftovers>,
}

/// A child's resident memory from `/proc/<pid>/status`, in bytes.
#[derive(Debug, Clone, Copy)]
pub struct Memory {
    /// `VmRSS`: resident now.
    pub rss: usize,
    /// `VmHWM`: the most it has been resident since it started.
    pub peak: usize,
}

impl ChildProcess {
    /// Its resident memory now and at its peak (Linux only).
    pub fn memory(&self) -> Memory {
        let pid = self.child.as_ref().expect("running").id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("procfs");
        let kib = |field: &str| -> usize {
            status
                .lines()
                .find_map(|line| line.strip_prefix(field))
                .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
        };
        Memory {
            rss: kib("VmRSS:") * 1024,
            peak: kib("VmHWM:") * 1024,
        }
    }

    /// `kill -<signal>` (TERM, KILL).
    pub fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("running").id();
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} {pid}");
    }

    /// SIGTERM, then wait for the exit.
    pub async fn terminate(self) -> ExitStatus {
        self.signal("TERM");
        self.wait().await
    }

    /// Wait for the exit (off the test's runtime thread).
    pub async fn wait(mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        tokio::task::spawn_blocking(move || child.wait().unwrap())
            .await
            .unwrap()
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// SIGTERM every child at once (so they drain side by side), then assert each exits 0.
pub async fn terminate_all(children: impl IntoIterator<Item = ChildProcess>) {
    let children: Vec<_> = children.into_iter().collect();
    for child in &children {
        child.signal("TERM");
    }
    for child in children {
        let status = child.wait().await;
        assert!(status.success(), "exits 0 on SIGTERM: {status:?}");
    }
}
