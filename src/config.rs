//! Configuration: one typed settings tree, and the only place a default is written.
//!
//! Every setting is an environment variable with a same-named CLI flag, and every default points
//! at a local RabbitMQ and PostgreSQL so a developer machine needs none of it. The settings
//! structs are what the components run with (no field-by-field copies): the binary parses them,
//! and tests start from [`Default`], which is the same clap defaults parsed without the
//! environment, then override fields.

use std::path::PathBuf;
use std::time::Duration;

use clap::builder::TypedValueParser as _;
use clap::{Args, FromArgMatches};

use crate::broker::Names;
use crate::broker::topology::{EventRouting, RetryDelays};
use crate::relay::budget::CONNECTION_ALLOWANCE;
use crate::relay::secrets::{SecretStore, SecretsError};
use crate::relay::signature::Window;

pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/catena";

/// The settings' clap defaults, ignoring the environment: what an unconfigured process runs
/// with, and where tests start.
fn clap_defaults<T: Args + FromArgMatches>() -> T {
    let command = T::augment_args(clap::Command::new("defaults"))
        .mut_args(|arg| arg.env(None::<&'static str>));
    let matches = command
        .try_get_matches_from(["defaults"])
        .expect("every setting has a default");
    T::from_arg_matches(&matches).expect("defaults parse")
}

macro_rules! default_from_clap {
    ($($settings:ty),* $(,)?) => {
        $(impl Default for $settings {
            fn default() -> Self {
                clap_defaults()
            }
        })*
    };
}

default_from_clap!(
    BrokerSettings,
    DatabaseSettings,
    RelaySettings,
    WorkerSettings,
    Rules,
    NotifierSettings,
    RetentionSettings,
    DedupRetention,
    DeliverySettings,
    CatenaSettings,
    ReconcileSettings,
);

/// `250ms`, `5s`, `5m`, `1h`, `21d`; a bare number is seconds (`WORKER_DRAIN_SECONDS=20`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
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
        "d" => Duration::from_secs(n * 86_400),
        _ => return Err(format!("`{text}`: unit must be ms, s, m, h or d")),
    })
}

#[derive(Args, Clone, Debug)]
pub struct BrokerSettings {
    /// RabbitMQ URL (amqp:// or amqps://); the nodes of a cluster comma separated, tried in
    /// turn (README, "Beyond one machine").
    #[arg(long, env = "AMQP_URL", default_value = DEFAULT_AMQP_URL, hide_env_values = true)]
    pub amqp_url: String,

    /// Prefix of every exchange and queue name, so tests and tenants can share one broker.
    #[arg(long, env = "CATENA_NAME_PREFIX", default_value = "catena")]
    pub name_prefix: String,

    /// Retry tier delays, comma separated (`250ms`, `5s`, `5m`, `1h`). Each tier is a TTL queue
    /// named after its delay; a message that exhausts the tiers is parked.
    #[arg(long, env = "CATENA_RETRY_DELAYS", default_value_t = RetryDelays::default())]
    pub retry_delays: RetryDelays,

    /// How new event messages reach the events queue: `queue` (the default exchange, cheapest;
    /// concurrent requests may share a message) or `topic` (the `<prefix>.events` topic
    /// exchange keyed by event name, one message per request, for other consumers that bind
    /// by event name). Workers read both.
    #[arg(long, env = "CATENA_EVENT_ROUTING", value_enum, default_value_t = EventRouting::Queue)]
    pub event_routing: EventRouting,
}

impl BrokerSettings {
    /// Local defaults under another name prefix (what every test starts from).
    pub fn with_prefix(prefix: &str) -> Self {
        Self {
            name_prefix: prefix.to_owned(),
            ..Self::default()
        }
    }

    pub fn names(&self) -> Names {
        Names::with_retry_delays(&self.name_prefix, self.retry_delays.clone())
            .with_routing(self.event_routing)
    }
}

#[derive(Args, Clone, Debug)]
pub struct DatabaseSettings {
    /// PostgreSQL URL; `migrate` creates the database if it is missing.
    #[arg(long, env = "DATABASE_URL", default_value = DEFAULT_DATABASE_URL, hide_env_values = true)]
    pub database_url: String,

    /// Connections in the pool (per process).
    #[arg(long, env = "DB_POOL_SIZE", default_value_t = 8)]
    pub db_pool_size: usize,
}

impl DatabaseSettings {
    pub fn with_url(database_url: &str) -> Self {
        Self {
            database_url: database_url.to_owned(),
            ..Self::default()
        }
    }
}

#[derive(Args, Clone, Debug, Default)]
pub struct SecretSettings {
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

impl SecretSettings {
    /// The inline secrets only (the relay reads the file itself, and re-reads it).
    pub fn inline(&self) -> Result<SecretStore, SecretsError> {
        SecretStore::parse(self.webhook_secrets.as_deref().unwrap_or(""))
    }

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
pub struct RelaySettings {
    /// Address the relay listens on (webhooks, /healthz, /readyz, /metrics).
    #[arg(
        long = "relay-listen",
        env = "RELAY_LISTEN",
        default_value = "0.0.0.0:8080"
    )]
    pub listen: String,

    /// Largest accepted request body as sent (compressed), in bytes: larger is 413. Envelopes of
    /// many records gzip 2.2-14x (README, "Memory budget"), so every one that fits
    /// RELAY_MAX_DECOMPRESSED_BYTES fits this.
    #[arg(long, env = "RELAY_MAX_BODY_BYTES", default_value_t = 512 * 1024)]
    pub max_body_bytes: usize,

    /// Largest accepted body after gunzip, in bytes: larger is 413. Catena's envelopes are
    /// 0.4-1.2 KiB with one record; 1 MiB holds 1,300-6,900 records (README, "Memory budget").
    #[arg(long, env = "RELAY_MAX_DECOMPRESSED_BYTES", default_value_t = 1024 * 1024)]
    pub max_decompressed_bytes: usize,

    /// How long to wait for the broker's publisher confirm before answering 503. Catena gives
    /// up after 3 s, so this must stay well inside that.
    #[arg(long, env = "RELAY_CONFIRM_TIMEOUT", default_value = "2s", value_parser = parse_duration)]
    pub confirm_timeout: Duration,

    /// Confirm-mode channels, each carrying one message at a time: requests that arrive while
    /// every channel waits for a confirm share the next message (README, "Broker contract").
    #[arg(long, env = "RELAY_PUBLISH_CHANNELS", default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..).map(|n| n as usize))]
    pub publish_channels: usize,

    /// Most requests one broker message carries (1 turns grouping off).
    #[arg(long, env = "RELAY_GROUP_MAX_EVENTS", default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..).map(|n| n as usize))]
    pub group_max_events: usize,

    /// Most body bytes one group message carries; a larger body travels alone.
    #[arg(long, env = "RELAY_GROUP_MAX_BYTES", default_value_t = 256 * 1024)]
    pub group_max_bytes: usize,

    /// Memory the relay may spend on connections and request bodies, in bytes, on top of its
    /// baseline (code, runtime, broker connection: ~26 MiB). RELAY_MAX_INFLIGHT_BYTES,
    /// RELAY_MAX_CONNECTIONS and RELAY_MAX_CONCURRENCY default to shares of it (README, "Memory
    /// budget"); 128 MiB fits the 256 Mi pod limit of deploy/k8s/relay.yaml with room to spare.
    #[arg(long, env = "RELAY_MEMORY_BUDGET_BYTES", default_value_t = 128 * 1024 * 1024, value_parser = clap::value_parser!(u64).range(1..).map(|n| n as usize))]
    pub memory_budget_bytes: usize,

    /// Memory for bodies over 16 KiB, in bytes: they live in buffers of the larger cap (plus one
    /// byte), allocated once and reused, as many as fit here (one per verify thread among them);
    /// a request that finds none free is answered 503 at once. Default: half of
    /// RELAY_MEMORY_BUDGET_BYTES.
    #[arg(long, env = "RELAY_MAX_INFLIGHT_BYTES")]
    pub max_inflight_bytes: Option<usize>,

    /// Open client connections; more are closed as soon as they are accepted. Default: the rest
    /// of RELAY_MEMORY_BUDGET_BYTES at 128 KiB a connection.
    #[arg(long, env = "RELAY_MAX_CONNECTIONS", value_parser = clap::value_parser!(u64).range(1..).map(|n| n as usize))]
    pub max_connections: Option<usize>,

    /// Requests handled at once; beyond it the relay answers 503 at once instead of queueing.
    /// Default: RELAY_MAX_CONNECTIONS (HTTP/1.1 serves one request at a time per connection).
    #[arg(long, env = "RELAY_MAX_CONCURRENCY", value_parser = clap::value_parser!(u64).range(1..).map(|n| n as usize))]
    pub max_concurrency: Option<usize>,

    /// Threads of the relay's async runtime (HTTP, gunzip and HMAC of small bodies, the publish
    /// lanes). One by default: the relay's work per request is a few microseconds around
    /// syscalls, and a second runtime thread mostly adds wake-ups and work stealing between the
    /// two (on this 2-core box, four alternating pairs: 17-24 against 23-32 µs of CPU per request
    /// alone, 35-36 against 39-42 µs end to end; README, "Defaults"). Scale the relay with
    /// replicas.
    #[arg(long, env = "RELAY_RUNTIME_THREADS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..).map(usize::from))]
    pub runtime_threads: usize,

    /// Threads that inflate and verify bodies that may exceed 16 KiB decompressed, off the async
    /// threads; a request waits at most 1 s for one, then gets 503.
    #[arg(long, env = "RELAY_BLOCKING_THREADS", default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..).map(usize::from))]
    pub blocking_threads: usize,

    /// Deadline for receiving a request's headers (slowloris guard: the connection is closed).
    #[arg(long, env = "RELAY_HEADER_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub header_timeout: Duration,

    /// Deadline for reading a request body (slow clients get 408).
    #[arg(long, env = "RELAY_BODY_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub body_timeout: Duration,

    /// How a refused webhook is answered. `unavailable`: 503 with the reason in the body, so
    /// Catena retries it, keeps it in its dead-letter queue and the reconciler replays it once
    /// our side is fixed (a 4xx would lose it for good). `conventional`: 413/400/401/408/431.
    #[arg(
        long,
        env = "RELAY_REFUSAL_STATUS",
        value_enum,
        default_value = "unavailable"
    )]
    pub refusal_status: RefusalStatus,

    /// How often CATENA_WEBHOOK_SECRETS_FILE is re-read (0 = never).
    #[arg(long, env = "RELAY_SECRETS_RELOAD", default_value = "2s", value_parser = parse_duration)]
    pub secrets_reload: Duration,

    /// How far `X-Catena-Timestamp` may lie in the past and the future (Catena's documented
    /// 5 minutes and 60 s; not a flag).
    #[arg(skip)]
    pub window: Window,
}

/// How the relay answers a webhook it refuses (README, "Refusals keep the event at Catena").
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefusalStatus {
    Unavailable,
    Conventional,
}

/// The relay's effective limits: the settings given, the rest derived from the memory budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RelayLimits {
    pub inflight_bytes: usize,
    pub connections: usize,
    pub concurrency: usize,
}

impl RelaySettings {
    /// `RELAY_MAX_INFLIGHT_BYTES` defaults to half the budget; `RELAY_MAX_CONNECTIONS` to what
    /// is left, at [`CONNECTION_ALLOWANCE`] each (64 KiB of headers that hyper may buffer, a
    /// body of up to 16 KiB as sent and 16 KiB decompressed, 32 KiB of task, parser and response
    /// state); `RELAY_MAX_CONCURRENCY` to the connections. 128 MiB: 64 MiB, 512, 512.
    pub fn limits(&self) -> RelayLimits {
        let budget = self.memory_budget_bytes;
        let inflight_bytes = self.max_inflight_bytes.unwrap_or(budget / 2);
        let connections = self.max_connections.unwrap_or_else(|| {
            (budget.saturating_sub(inflight_bytes) / CONNECTION_ALLOWANCE).max(1)
        });
        RelayLimits {
            inflight_bytes,
            connections,
            concurrency: self.max_concurrency.unwrap_or(connections),
        }
    }
}

/// Catena's API and our client credentials (catena-control-plane.md §0). `Debug` leaves the
/// client secret out.
#[derive(Args, Clone)]
pub struct CatenaSettings {
    /// Catena's API base URL.
    #[arg(
        long = "catena-api-url",
        env = "CATENA_API_URL",
        default_value = "https://api.catenatelematics.com"
    )]
    pub api_url: String,

    /// Catena's OAuth 2.0 token endpoint (client credentials).
    #[arg(
        long = "catena-auth-url",
        env = "CATENA_AUTH_URL",
        default_value = "https://auth.catenatelematics.com/realms/catena/protocol/openid-connect/token"
    )]
    pub auth_url: String,

    /// OAuth client id (from support@catenaclearing.io).
    #[arg(
        long = "catena-client-id",
        env = "CATENA_CLIENT_ID",
        default_value = "",
        hide_env_values = true
    )]
    pub client_id: String,

    /// OAuth client secret. Never logged.
    #[arg(
        long = "catena-client-secret",
        env = "CATENA_CLIENT_SECRET",
        default_value = "",
        hide_env_values = true,
        hide_default_value = true
    )]
    pub client_secret: String,
}

impl std::fmt::Debug for CatenaSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CatenaSettings")
            .field("api_url", &self.api_url)
            .field("auth_url", &self.auth_url)
            .field("client_id", &self.client_id)
            .field("client_secret", &"***")
            .finish()
    }
}

/// How the reconciler runs (catena-control-plane.md §2.2).
#[derive(Args, Clone, Debug)]
pub struct ReconcileSettings {
    /// One cycle, then exit (the relay counts as healthy if it is ready right now).
    #[arg(long)]
    pub once: bool,

    /// Time between cycles; a `webhook.*` event starts one early.
    #[arg(long, env = "RECONCILE_INTERVAL", default_value = "60s", value_parser = parse_duration)]
    pub interval: Duration,

    /// How long the relay must have answered /readyz 200 without a break before a stale
    /// subscription is reactivated or a DLQ replayed.
    #[arg(long, env = "RECONCILE_HEALTHY_FOR", default_value = "60s", value_parser = parse_duration)]
    pub healthy_for: Duration,

    /// The relay readiness the reconciler trusts: the same path Catena takes where possible
    /// (the relay's Service /readyz).
    #[arg(
        long,
        env = "RELAY_READY_URL",
        default_value = "http://127.0.0.1:8080/readyz"
    )]
    pub relay_ready_url: String,

    /// Relay admin bases asked which subscriptions' signatures they refuse (comma separated;
    /// default: the base of RELAY_READY_URL).
    #[arg(
        long = "relay-admin",
        env = "CATENA_RELAY_ADMIN_URLS",
        value_delimiter = ','
    )]
    pub relay_admins: Vec<String>,

    /// Replay a DLQ again only if its count has not fallen for this long.
    #[arg(long, env = "RECONCILE_REPLAY_SETTLE", default_value = "2m", value_parser = parse_duration)]
    pub replay_settle: Duration,

    /// The first wait between two reactivations of one subscription; it doubles up to 30 min and
    /// resets after an hour active.
    #[arg(long, env = "RECONCILE_ACTIVATE_BACKOFF", default_value = "1m", value_parser = parse_duration)]
    pub activate_backoff: Duration,

    /// A DLQ with messages for this long while we are healthy raises `webhook_dlq_backlog`.
    #[arg(long, env = "RECONCILE_DLQ_ALERT_AFTER", default_value = "1h", value_parser = parse_duration)]
    pub dlq_alert_after: Duration,

    /// Never reactivate (alerts only).
    #[arg(long)]
    pub no_activate: bool,

    /// Never replay (alerts only).
    #[arg(long)]
    pub no_replay: bool,

    /// Address of the reconciler's /healthz, /readyz and /metrics.
    #[arg(
        long = "reconcile-metrics-listen",
        env = "RECONCILE_METRICS_LISTEN",
        default_value = "0.0.0.0:9091"
    )]
    pub metrics_listen: String,
}

impl ReconcileSettings {
    /// The relay admin bases: as given, else the origin of RELAY_READY_URL.
    pub fn relay_admins(&self) -> Vec<String> {
        if !self.relay_admins.is_empty() {
            return self.relay_admins.clone();
        }
        let url = &self.relay_ready_url;
        let origin_end = url
            .find("://")
            .and_then(|scheme| url[scheme + 3..].find('/').map(|p| scheme + 3 + p))
            .unwrap_or(url.len());
        vec![url[..origin_end].to_owned()]
    }
}

/// What the relay runs with.
#[derive(Clone, Debug)]
pub struct RelayConfig {
    pub relay: RelaySettings,
    pub broker: BrokerSettings,
    /// Inline secrets (`CATENA_WEBHOOK_SECRETS`), always in force.
    pub secrets: SecretStore,
    /// `CATENA_WEBHOOK_SECRETS_FILE`, merged with the inline ones and re-read while running.
    pub secrets_file: Option<PathBuf>,
}

#[derive(Args, Clone, Debug)]
pub struct WorkerSettings {
    /// Address of the worker's /healthz, /readyz and /metrics.
    #[arg(long, env = "METRICS_LISTEN", default_value = "0.0.0.0:9090")]
    pub metrics_listen: String,

    /// Consumers (each its own channel and batch loop) per process. One is fastest on a small
    /// box with a local PostgreSQL (README, "Defaults"); raise it when PostgreSQL is remote.
    #[arg(long, env = "WORKER_CONSUMERS", default_value_t = 1)]
    pub consumers: usize,

    /// Unacked messages the broker may push to each consumer (a group message counts once,
    /// whatever it carries: at most RELAY_GROUP_MAX_EVENTS events). 250 group messages are two
    /// batches even when groups average four events; 1,000 held 94-95 MiB of worker RSS in the
    /// 1M drain against 64 MiB, for the same rate (README, "Defaults").
    #[arg(long, env = "WORKER_PREFETCH", default_value_t = 250)]
    pub prefetch: u16,

    /// Most events applied in one transaction (a batch closes at the message that reaches it).
    #[arg(long, env = "WORKER_BATCH_SIZE", default_value_t = 500, value_parser = clap::value_parser!(u16).range(1..).map(usize::from))]
    pub batch_size: usize,

    /// Concurrent transactions one batch may be split into: parts that share no entity (a fleet
    /// and everything hanging off it), so PostgreSQL works on each on its own backend without
    /// lock waits between them, then one more for the back-fills that cross entities. A part
    /// has at least 32 events. 1 (no splitting) is fastest on a 2-core box that PostgreSQL
    /// shares (README, "Defaults"); raise it when PostgreSQL has cores to spare.
    #[arg(long, env = "WORKER_TRANSACTIONS_PER_BATCH", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..).map(usize::from))]
    pub transactions_per_batch: usize,

    /// After the first message of a batch, how long to wait for more before committing.
    #[arg(long, env = "WORKER_BATCH_WAIT", default_value = "2ms", value_parser = parse_duration)]
    pub batch_wait: Duration,

    /// The longest one batch attempt may take before its connection is dropped and the attempt
    /// counts as failed (a black-holed or wedged database must not hold a worker for good).
    #[arg(long, env = "WORKER_BATCH_DEADLINE", default_value = "60s", value_parser = parse_duration)]
    pub batch_deadline: Duration,

    /// On SIGTERM, how long in-flight batches get to commit and ack before the process exits.
    #[arg(long, env = "WORKER_DRAIN_SECONDS", default_value = "20s", value_parser = parse_duration)]
    pub drain_timeout: Duration,

    /// Do not run database migrations at start.
    #[arg(long, env = "WORKER_NO_MIGRATE", default_value_t = false)]
    pub no_migrate: bool,

    #[command(flatten)]
    pub rules: Rules,

    #[command(flatten)]
    pub notifier: NotifierSettings,

    #[command(flatten)]
    pub retention: RetentionSettings,
}

/// Tunable state rules.
#[derive(Args, Clone, Copy, Debug)]
pub struct Rules {
    /// More than this many distinct failed executions of one schedule inside the window raise
    /// one `warning` notification per window.
    #[arg(
        long = "execution-failure-threshold",
        env = "EXECUTION_FAILURE_THRESHOLD",
        default_value_t = 3
    )]
    pub failure_threshold: i32,

    /// The window for EXECUTION_FAILURE_THRESHOLD.
    #[arg(long = "execution-failure-window", env = "EXECUTION_FAILURE_WINDOW", default_value = "1h", value_parser = parse_duration)]
    pub failure_window: Duration,
}

/// Where alert notifications go, and how often the notifier looks.
#[derive(Args, Clone, Debug)]
pub struct NotifierSettings {
    /// Alertmanager base URL (e.g. http://127.0.0.1:9093); alerts are also always in the table.
    #[arg(long, env = "ALERTMANAGER_URL")]
    pub alertmanager_url: Option<String>,

    /// A JSON webhook for alert notifications (Slack-compatible `text` field).
    #[arg(
        long = "alert-webhook-url",
        env = "ALERT_WEBHOOK_URL",
        hide_env_values = true
    )]
    pub webhook_url: Option<String>,

    /// Open alerts are re-sent to Alertmanager this often (keep it under its resolve_timeout).
    #[arg(long = "alert-refire-interval", env = "ALERT_REFIRE_INTERVAL", default_value = "60s", value_parser = parse_duration)]
    pub refire_interval: Duration,

    /// How often pending outbox rows are looked for (not a flag).
    #[arg(skip = Duration::from_millis(500))]
    pub poll_interval: Duration,

    /// How often the state gauges are read from PostgreSQL (not a flag).
    #[arg(skip = Duration::from_secs(15))]
    pub gauge_interval: Duration,

    /// How often one worker recounts the onboarding gauges over every fleet (not a flag).
    #[arg(skip = Duration::from_secs(60))]
    pub onboarding_interval: Duration,

    /// Outbox rows claimed per transaction (not a flag).
    #[arg(skip = 50)]
    pub batch: i64,
}

/// Catena keeps undeliverable webhooks in its DLQ and replays them for this long: the floor of
/// the dedup-key retention (architecture.md, "Worker"). Not a setting: it is Catena's.
pub const CATENA_REPLAY_HORIZON: Duration = Duration::from_secs(14 * 86_400);

/// `parked replay` stops this far short of the dedup-key retention, for the time a replayed
/// message may wait in the events queue and for clock skew between the relay and PostgreSQL.
pub const REPLAY_MARGIN: Duration = Duration::from_secs(86_400);

/// How long a dedup key protects against a second application of its event. Shared by the
/// worker (which prunes older keys) and `parked replay` (which refuses messages older than the
/// keys that would catch their duplicates).
#[derive(Args, Clone, Copy, Debug)]
pub struct DedupRetention {
    /// Keep dedup keys (`webhook_events` rows) this long after they were processed. At least
    /// Catena's 14-day DLQ replay horizon plus PARKING_LOT_HORIZON (checked at start).
    #[arg(id = "retention_dedup_keys", long = "retention-dedup-keys", env = "RETENTION_DEDUP_KEYS", default_value = "21d", value_name = "DURATION", value_parser = parse_duration)]
    pub keys: Duration,

    /// How long a message may wait in the parking lot and still be replayed safely, on top of
    /// Catena's 14 days.
    #[arg(id = "parking_lot_horizon", long = "parking-lot-horizon", env = "PARKING_LOT_HORIZON", default_value = "7d", value_name = "DURATION", value_parser = parse_duration)]
    pub parking_lot_horizon: Duration,
}

impl DedupRetention {
    /// The shortest dedup-key retention that still catches every duplicate Catena or our own
    /// parking lot can deliver.
    pub fn floor(&self) -> Duration {
        CATENA_REPLAY_HORIZON + self.parking_lot_horizon
    }

    /// The oldest message (by relay receive time) `parked replay` replays without `--force`:
    /// anything older may have lost the key that would make its duplicate a no-op.
    pub fn safe_replay_age(&self) -> Duration {
        self.keys.saturating_sub(REPLAY_MARGIN)
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.keys < self.floor() {
            return Err(format!(
                "RETENTION_DEDUP_KEYS is {}, below Catena's 14-day replay horizon plus \
                 PARKING_LOT_HORIZON ({}): duplicates replayed after {} would be applied twice",
                human_duration(self.keys),
                human_duration(self.floor()),
                human_duration(self.keys)
            ));
        }
        Ok(())
    }
}

/// A duration for people: `21d`, `36h`, `90s` when exact, else `20.3d`, `4.5h`.
pub fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    if s == 0 {
        return format!("{}ms", d.as_millis());
    }
    for (unit, size) in [("d", 86_400), ("h", 3600), ("m", 60)] {
        if s.is_multiple_of(size) {
            return format!("{}{unit}", s / size);
        }
    }
    match s {
        86_400.. => format!("{:.1}d", s as f64 / 86_400.0),
        3600.. => format!("{:.1}h", s as f64 / 3600.0),
        _ => format!("{s}s"),
    }
}

/// What the worker prunes, and how gently (README, "Retention"). Every table that grows per
/// event is pruned in small batches by one worker at a time.
#[derive(Args, Clone, Copy, Debug)]
pub struct RetentionSettings {
    #[command(flatten)]
    pub dedup: DedupRetention,

    /// Keep `failed_executions` rows this long after the failure (event time). At least the
    /// dedup-key retention plus EXECUTION_FAILURE_WINDOW, so a late or replayed failure is still
    /// counted once and against the right window.
    #[arg(id = "retention_failed_executions", long = "retention-failed-executions", env = "RETENTION_FAILED_EXECUTIONS", default_value = "30d", value_name = "DURATION", value_parser = parse_duration)]
    pub failed_executions: Duration,

    /// Keep `failure_warnings` rows (the once-per-window escalations) this long after their
    /// window started. At least the dedup-key retention plus EXECUTION_FAILURE_WINDOW.
    #[arg(id = "retention_failure_warnings", long = "retention-failure-warnings", env = "RETENTION_FAILURE_WARNINGS", default_value = "30d", value_name = "DURATION", value_parser = parse_duration)]
    pub failure_warnings: Duration,

    /// Keep delivered `alert_outbox` rows this long after delivery. Never pruned: an undelivered
    /// row, the rows of an open alert, and an alert's rows before the last of them is this old.
    #[arg(id = "retention_delivered_outbox", long = "retention-delivered-outbox", env = "RETENTION_DELIVERED_OUTBOX", default_value = "30d", value_name = "DURATION", value_parser = parse_duration)]
    pub delivered_outbox: Duration,

    /// How often a worker looks for expired rows (one worker at a time prunes).
    #[arg(id = "retention_interval", long = "retention-interval", env = "RETENTION_INTERVAL", default_value = "10m", value_name = "DURATION", value_parser = parse_duration)]
    pub interval: Duration,

    /// Most rows deleted per transaction.
    #[arg(id = "retention_batch_size", long = "retention-batch-size", env = "RETENTION_BATCH_SIZE", default_value_t = 1000, value_name = "ROWS", value_parser = clap::value_parser!(u32).range(1..).map(i64::from))]
    pub batch_size: i64,

    /// Pause between two batches, so pruning never competes with ingestion for long.
    #[arg(id = "retention_batch_pause", long = "retention-batch-pause", env = "RETENTION_BATCH_PAUSE", default_value = "50ms", value_name = "DURATION", value_parser = parse_duration)]
    pub batch_pause: Duration,

    /// Do not prune (another process or an archiver does it).
    #[arg(
        id = "no_retention",
        long = "no-retention",
        env = "WORKER_NO_RETENTION",
        default_value_t = false
    )]
    pub disabled: bool,

    /// How long a prune statement waits for a lock before it gives up and tries again at the
    /// next sweep (not a flag): pruning waits for ingestion, never the other way round.
    #[arg(skip = Duration::from_millis(100))]
    pub lock_timeout: Duration,
}

impl RetentionSettings {
    /// Refuse retentions that would let a duplicate, a late event or a replay apply twice.
    pub fn validate(&self, rules: &Rules) -> Result<(), String> {
        self.dedup.validate()?;
        let keys = self.dedup.keys;
        let floor = keys + rules.failure_window;
        for (name, value) in [
            ("RETENTION_FAILED_EXECUTIONS", self.failed_executions),
            ("RETENTION_FAILURE_WARNINGS", self.failure_warnings),
        ] {
            if value < floor {
                return Err(format!(
                    "{name} is {}, below RETENTION_DEDUP_KEYS plus EXECUTION_FAILURE_WINDOW ({}): \
                     a replayed execution.failed would be counted again",
                    human_duration(value),
                    human_duration(floor)
                ));
            }
        }
        if self.delivered_outbox.is_zero() || self.interval.is_zero() {
            return Err(
                "RETENTION_DELIVERED_OUTBOX and RETENTION_INTERVAL must be positive".into(),
            );
        }
        Ok(())
    }
}

/// What a worker process runs with.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    pub worker: WorkerSettings,
    pub broker: BrokerSettings,
    pub database: DatabaseSettings,
}

/// How `send` delivers, Catena-style.
#[derive(Args, Clone, Debug)]
pub struct DeliverySettings {
    /// Requests in flight at once.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,

    /// Requests per second (0 = as fast as the concurrency allows).
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,

    /// Retries after a 5xx or a timeout, as Catena does.
    #[arg(long, default_value_t = 3)]
    pub retries: u32,

    /// Per-request timeout (Catena waits 3 s).
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pub timeout: Duration,

    /// Send uncompressed bodies.
    #[arg(long)]
    pub no_gzip: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("5"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("21d"), Ok(Duration::from_secs(21 * 86_400)));
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("5w").is_err());
        assert_eq!(human_duration(Duration::from_secs(21 * 86_400)), "21d");
        assert_eq!(human_duration(Duration::from_secs(90)), "90s");
        assert_eq!(
            human_duration(Duration::from_secs(30 * 86_400 + 7000)),
            "30.1d"
        );
    }

    #[test]
    fn defaults_ignore_the_environment() {
        #[derive(Args)]
        struct Probe {
            #[arg(long, env = "PATH", default_value = "unset")]
            path: String,
        }
        assert!(std::env::var_os("PATH").is_some());
        assert_eq!(clap_defaults::<Probe>().path, "unset");
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let worker = WorkerSettings::default();
        assert_eq!(worker.batch_size, 500);
        assert_eq!(worker.batch_wait, Duration::from_millis(2));
        assert_eq!(worker.rules.failure_threshold, 3);
        assert_eq!(worker.rules.failure_window, Duration::from_secs(3600));
        assert_eq!(worker.notifier.poll_interval, Duration::from_millis(500));
        assert_eq!(worker.notifier.batch, 50);
        let relay = RelaySettings::default();
        assert_eq!(relay.confirm_timeout, Duration::from_secs(2));
        assert_eq!(relay.max_body_bytes, 512 * 1024);
        assert_eq!(relay.max_decompressed_bytes, 1024 * 1024);
        assert_eq!(
            relay.limits(),
            RelayLimits {
                inflight_bytes: 64 * 1024 * 1024,
                connections: 512,
                concurrency: 512,
            }
        );
        let broker = BrokerSettings::default();
        assert_eq!(broker.amqp_url, DEFAULT_AMQP_URL);
        assert_eq!(broker.names().events_queue, "catena.events");
        assert_eq!(broker.names().retry_tier_count(), 4);
        assert_eq!(DatabaseSettings::default().db_pool_size, 8);
        assert_eq!(DeliverySettings::default().retries, 3);
        let retention = worker.retention;
        assert_eq!(retention.dedup.keys, Duration::from_secs(21 * 86_400));
        assert_eq!(
            retention.dedup.parking_lot_horizon,
            Duration::from_secs(7 * 86_400)
        );
        assert_eq!(retention.delivered_outbox, Duration::from_secs(30 * 86_400));
        assert_eq!(retention.batch_size, 1000);
        assert!(!retention.disabled);
        assert_eq!(retention.validate(&worker.rules), Ok(()));
        assert_eq!(
            retention.dedup.safe_replay_age(),
            Duration::from_secs(20 * 86_400)
        );
    }

    #[test]
    fn retentions_that_would_apply_a_duplicate_twice_are_refused() {
        let worker = WorkerSettings::default();
        let rules = worker.rules;
        let day = Duration::from_secs(86_400);

        let mut short_keys = worker.retention;
        short_keys.dedup.keys = 20 * day; // below 14d + 7d
        let error = short_keys.validate(&rules).unwrap_err();
        assert!(
            error.contains("RETENTION_DEDUP_KEYS is 20d") && error.contains("(21d)"),
            "{error}"
        );

        let mut long_horizon = worker.retention;
        long_horizon.dedup.parking_lot_horizon = 10 * day; // the floor moves to 24d
        assert!(long_horizon.validate(&rules).is_err());
        long_horizon.dedup.keys = 24 * day;
        assert_eq!(long_horizon.validate(&rules), Ok(()));

        let mut executions = worker.retention;
        executions.failed_executions = 21 * day; // needs 21d + the 1h window
        assert!(
            executions
                .validate(&rules)
                .unwrap_err()
                .starts_with("RETENTION_FAILED_EXECUTIONS")
        );
        let mut warnings = worker.retention;
        warnings.failure_warnings = 21 * day;
        assert!(warnings.validate(&rules).is_err());
    }

    #[test]
    fn relay_limits_derive_from_the_budget_unless_given() {
        let small = RelaySettings {
            memory_budget_bytes: 32 * 1024 * 1024,
            ..RelaySettings::default()
        };
        assert_eq!(
            small.limits(),
            RelayLimits {
                inflight_bytes: 16 * 1024 * 1024,
                connections: 128,
                concurrency: 128,
            }
        );
        let given = RelaySettings {
            max_inflight_bytes: Some(96 * 1024 * 1024),
            max_concurrency: Some(10),
            ..RelaySettings::default()
        };
        assert_eq!(
            given.limits(),
            RelayLimits {
                inflight_bytes: 96 * 1024 * 1024,
                connections: 256,
                concurrency: 10,
            }
        );
    }

    #[test]
    fn a_zero_batch_size_is_refused() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            worker: WorkerSettings,
        }
        use clap::Parser;
        assert!(Cli::try_parse_from(["x", "--batch-size", "0"]).is_err());
        assert_eq!(
            Cli::try_parse_from(["x", "--batch-size", "20"])
                .unwrap()
                .worker
                .batch_size,
            20
        );
    }
}
