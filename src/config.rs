//! Configuration: every setting is an environment variable with a same-named CLI flag, and every
//! default points at a local RabbitMQ and PostgreSQL so a developer machine needs none of it.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::secrets::{SecretStore, SecretsError};
use crate::topology::{Names, RETRY_TIERS};

pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/catena";

#[derive(Args, Clone, Debug)]
pub struct BrokerArgs {
    /// RabbitMQ URL (amqp:// or amqps://).
    #[arg(long, env = "AMQP_URL", default_value = DEFAULT_AMQP_URL, hide_env_values = true)]
    pub amqp_url: String,

    /// Prefix of every exchange and queue name, so tests and tenants can share one broker.
    #[arg(long, env = "CATENA_NAME_PREFIX", default_value = "catena")]
    pub name_prefix: String,

    /// Retry tier delays, comma separated (`250ms`, `5s`, `5m`, `1h`). Each tier is a TTL queue
    /// named after its delay; a message that exhausts the tiers is parked.
    #[arg(long, env = "CATENA_RETRY_DELAYS", default_value = "5s,30s,5m,30m", value_parser = parse_delays)]
    pub retry_delays: Delays,
}

impl BrokerArgs {
    pub fn names(&self) -> Names {
        Names::with_retry_delays(&self.name_prefix, self.retry_delays.0.clone())
    }
}

/// A parsed list of retry delays.
#[derive(Clone, Debug)]
pub struct Delays(pub Vec<Duration>);

impl Default for Delays {
    fn default() -> Self {
        Self(RETRY_TIERS.to_vec())
    }
}

pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    // A bare number is seconds (WORKER_DRAIN_SECONDS=20).
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration"))?;
    Ok(match unit {
        "ms" => Duration::from_millis(n),
        "s" | "" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => return Err(format!("`{text}`: unit must be ms, s, m or h")),
    })
}

fn parse_delays(text: &str) -> Result<Delays, String> {
    let delays = text
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(parse_duration)
        .collect::<Result<Vec<_>, _>>()?;
    if delays.is_empty() {
        return Err("at least one retry delay is required".into());
    }
    Ok(Delays(delays))
}

#[derive(Args, Clone, Debug)]
pub struct DatabaseArgs {
    /// PostgreSQL URL; `migrate` creates the database if it is missing.
    #[arg(long, env = "DATABASE_URL", default_value = DEFAULT_DATABASE_URL, hide_env_values = true)]
    pub database_url: String,

    /// Connections in the pool (per process).
    #[arg(long, env = "DB_POOL_SIZE", default_value_t = 8)]
    pub db_pool_size: usize,
}

#[derive(Args, Clone, Debug)]
pub struct SecretArgs {
    /// Webhook secrets as `webhook_id=secret` pairs, comma separated. An id may appear twice
    /// during a rotation; `*` matches any id.
    #[arg(long, env = "CATENA_WEBHOOK_SECRETS", hide_env_values = true)]
    pub webhook_secrets: Option<String>,

    /// A file of `webhook_id=secret` pairs, one a line (`#` comments allowed).
    #[arg(long, env = "CATENA_WEBHOOK_SECRETS_FILE")]
    pub webhook_secrets_file: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum SecretLoadError {
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Parse(#[from] SecretsError),
}

impl SecretArgs {
    pub fn load(&self) -> Result<SecretStore, SecretLoadError> {
        let mut store = SecretStore::default();
        if let Some(text) = &self.webhook_secrets {
            store.extend_from(text)?;
        }
        if let Some(path) = &self.webhook_secrets_file {
            let text = std::fs::read_to_string(path).map_err(|source| SecretLoadError::Io {
                path: path.clone(),
                source,
            })?;
            store.extend_from(&text)?;
        }
        Ok(store)
    }
}

#[derive(Args, Clone, Debug)]
pub struct RelayArgs {
    /// Address the relay listens on (webhooks, /healthz, /readyz, /metrics).
    #[arg(long, env = "RELAY_LISTEN", default_value = "0.0.0.0:8080")]
    pub relay_listen: String,

    /// Largest accepted request body as sent (compressed), in bytes: larger is 413.
    #[arg(long, env = "RELAY_MAX_BODY_BYTES", default_value_t = 1024 * 1024)]
    pub max_body_bytes: usize,

    /// Largest accepted body after gunzip, in bytes: larger is 413.
    #[arg(long, env = "RELAY_MAX_DECOMPRESSED_BYTES", default_value_t = 10 * 1024 * 1024)]
    pub max_decompressed_bytes: usize,

    /// How long to wait for the broker's publisher confirm before answering 503. Catena gives
    /// up after 3 s, so this must stay well inside that.
    #[arg(long, env = "RELAY_CONFIRM_TIMEOUT", default_value = "2s", value_parser = parse_duration)]
    pub confirm_timeout: Duration,

    /// Confirm-mode channels shared by all requests (round-robin).
    #[arg(long, env = "RELAY_PUBLISH_CHANNELS", default_value_t = 4)]
    pub publish_channels: usize,

    /// Requests handled at once; beyond it the relay answers 503 at once instead of queueing.
    #[arg(long, env = "RELAY_MAX_CONCURRENCY", default_value_t = 4096)]
    pub max_concurrency: usize,

    /// Deadline for receiving a request's headers (slowloris guard: the connection is closed).
    #[arg(long, env = "RELAY_HEADER_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub header_timeout: Duration,

    /// Deadline for reading a request body (slow clients get 408).
    #[arg(long, env = "RELAY_BODY_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub body_timeout: Duration,
}

#[derive(Args, Clone, Debug)]
pub struct WorkerArgs {
    /// Address of the worker's /healthz, /readyz and /metrics.
    #[arg(long, env = "METRICS_LISTEN", default_value = "0.0.0.0:9090")]
    pub metrics_listen: String,

    /// Consumers (each its own channel and batch loop) per process. One is fastest on a small
    /// box with a local PostgreSQL (README, "Defaults"); raise it when PostgreSQL is remote.
    #[arg(long, env = "WORKER_CONSUMERS", default_value_t = 1)]
    pub consumers: usize,

    /// Unacked messages the broker may push to each consumer.
    #[arg(long, env = "WORKER_PREFETCH", default_value_t = 1000)]
    pub prefetch: u16,

    /// Most messages applied in one transaction.
    #[arg(long, env = "WORKER_BATCH_SIZE", default_value_t = 500)]
    pub batch_size: usize,

    /// After the first message of a batch, how long to wait for more before committing.
    #[arg(long, env = "WORKER_BATCH_WAIT", default_value = "2ms", value_parser = parse_duration)]
    pub batch_wait: Duration,

    /// On SIGTERM, how long in-flight batches get to commit and ack before the process exits.
    #[arg(long, env = "WORKER_DRAIN_SECONDS", default_value = "20s", value_parser = parse_duration)]
    pub drain_timeout: Duration,

    /// Do not run database migrations at start.
    #[arg(long, env = "WORKER_NO_MIGRATE", default_value_t = false)]
    pub no_migrate: bool,

    /// Alertmanager base URL (e.g. http://127.0.0.1:9093); alerts are also always in the table.
    #[arg(long, env = "ALERTMANAGER_URL")]
    pub alertmanager_url: Option<String>,

    /// A JSON webhook for alert notifications (Slack-compatible `text` field).
    #[arg(long, env = "ALERT_WEBHOOK_URL", hide_env_values = true)]
    pub alert_webhook_url: Option<String>,

    /// Open alerts are re-sent to Alertmanager this often (keep it under its resolve_timeout).
    #[arg(long, env = "ALERT_REFIRE_INTERVAL", default_value = "60s", value_parser = parse_duration)]
    pub alert_refire_interval: Duration,

    /// More than this many failed executions of one schedule inside the window raise a warning.
    #[arg(long, env = "EXECUTION_FAILURE_THRESHOLD", default_value_t = 3)]
    pub execution_failure_threshold: i32,

    /// The window for EXECUTION_FAILURE_THRESHOLD.
    #[arg(long, env = "EXECUTION_FAILURE_WINDOW", default_value = "1h", value_parser = parse_duration)]
    pub execution_failure_window: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_delays() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("5"), Ok(Duration::from_secs(5)));
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("5d").is_err());
        assert_eq!(parse_delays("1s, 2s").unwrap().0.len(), 2);
        assert!(parse_delays("").is_err());
    }
}
