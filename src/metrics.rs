//! Prometheus metrics: the names are a public contract (dashboards and alert rules use them).
//!
//! Each component registers into its own [`Registry`] rather than the global default, so several
//! apps can run in one test process and `dev` can serve relay and worker metrics side by side.
//! No label ever carries an id: label sets are bounded by construction.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::alerts::AlertKind;
use crate::envelope::KeySource;
use crate::relay::Outcome as RelayOutcome;
use crate::worker::Outcome as WorkerOutcome;

const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0,
];
const LAG_BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// An hour to 90 days: invitations are answered in hours to weeks.
const ONBOARDING_BUCKETS: [f64; 11] = [
    3600.0,
    21_600.0,
    43_200.0,
    86_400.0,
    172_800.0,
    259_200.0,
    604_800.0,
    1_209_600.0,
    2_592_000.0,
    5_184_000.0,
    7_776_000.0,
];

fn register<T: prometheus::core::Collector + Clone + 'static>(registry: &Registry, metric: T) -> T {
    registry
        .register(Box::new(metric.clone()))
        .expect("metric names are unique per registry");
    metric
}

/// The `reason` label of `catena_relay_shed_total`: why the relay refused work before looking
/// at it (a request answered 503, or a connection closed at accept).
pub const SHED_CONCURRENCY: &str = "concurrency";
pub const SHED_MEMORY: &str = "memory";
pub const SHED_BLOCKING: &str = "blocking";
pub const SHED_CONNECTIONS: &str = "connections";

#[derive(Clone)]
pub struct RelayMetrics {
    pub requests: IntCounterVec,
    pub request_duration: Histogram,
    pub publish_confirm: Histogram,
    pub group_events: Histogram,
    pub broker_ready: IntGauge,
    pub inflight: IntGauge,
    pub inflight_bytes: IntGauge,
    pub connections: IntGauge,
    pub shed: IntCounterVec,
    pub secrets_reloads: IntCounterVec,
    pub secrets_entries: IntGauge,
}

impl RelayMetrics {
    pub fn new(registry: &Registry) -> Self {
        let requests = register(
            registry,
            IntCounterVec::new(
                Opts::new("catena_relay_requests_total", "Webhook requests by outcome"),
                &["outcome"],
            )
            .unwrap(),
        );
        for outcome in RelayOutcome::ALL {
            requests.with_label_values(&[outcome.as_str()]);
        }
        let shed = register(
            registry,
            IntCounterVec::new(
                Opts::new(
                    "catena_relay_shed_total",
                    "Requests answered 503 and connections closed before any work, by reason",
                ),
                &["reason"],
            )
            .unwrap(),
        );
        for reason in [
            SHED_CONCURRENCY,
            SHED_MEMORY,
            SHED_BLOCKING,
            SHED_CONNECTIONS,
        ] {
            shed.with_label_values(&[reason]);
        }
        let secrets_reloads = register(
            registry,
            IntCounterVec::new(
                Opts::new(
                    "catena_relay_secrets_reloads_total",
                    "Re-reads of the secrets file by outcome (errors keep the loaded secrets)",
                ),
                &["outcome"],
            )
            .unwrap(),
        );
        for outcome in crate::relay::live_secrets::RELOAD_OUTCOMES {
            secrets_reloads.with_label_values(&[outcome]);
        }
        Self {
            requests,
            shed,
            secrets_reloads,
            secrets_entries: register(
                registry,
                IntGauge::new(
                    "catena_relay_secrets_entries",
                    "Webhook secret entries loaded (0: every delivery is refused)",
                )
                .unwrap(),
            ),
            request_duration: register(
                registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "catena_relay_request_duration_seconds",
                        "Time from request start to response, all outcomes",
                    )
                    .buckets(LATENCY_BUCKETS.to_vec()),
                )
                .unwrap(),
            ),
            publish_confirm: register(
                registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "catena_relay_publish_confirm_seconds",
                        "Time from publish to broker confirm",
                    )
                    .buckets(LATENCY_BUCKETS.to_vec()),
                )
                .unwrap(),
            ),
            group_events: register(
                registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "catena_relay_group_events",
                        "Requests carried by each broker message (a group publish)",
                    )
                    .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0]),
                )
                .unwrap(),
            ),
            broker_ready: register(
                registry,
                IntGauge::new(
                    "catena_relay_broker_ready",
                    "1 when a confirm channel to the broker is ready",
                )
                .unwrap(),
            ),
            inflight: register(
                registry,
                IntGauge::new(
                    "catena_relay_inflight_requests",
                    "Webhook requests being handled",
                )
                .unwrap(),
            ),
            inflight_bytes: register(
                registry,
                IntGauge::new(
                    "catena_relay_inflight_bytes",
                    "Bytes of the large-body buffers taken: bodies over 16 KiB and the publisher's copies",
                )
                .unwrap(),
            ),
            connections: register(
                registry,
                IntGauge::new("catena_relay_connections", "Open client connections").unwrap(),
            ),
        }
    }
}

/// Event names used as metric labels are the ones we subscribe to; anything else is `other`, so
/// label cardinality is bounded.
const KNOWN_EVENTS: [&str; 22] = crate::catena::model::DESIRED_EVENTS;

/// The `event_name` label for an event name.
pub fn event_label(name: &str) -> &'static str {
    KNOWN_EVENTS
        .iter()
        .find(|k| **k == name)
        .copied()
        .unwrap_or("other")
}

#[derive(Clone)]
pub struct WorkerMetrics {
    pub events: IntCounterVec,
    pub dedup_keys: IntCounterVec,
    pub batch_seconds: Histogram,
    pub batch_size: Histogram,
    pub stage_seconds: prometheus::CounterVec,
    pub event_lag: Histogram,
    pub inflight: IntGauge,
    pub ready: IntGauge,
    pub pool_connections: IntGaugeVec,
    pub pool_max: IntGauge,
    pub alerts_raised: IntCounterVec,
    pub alerts_open: IntGaugeVec,
    pub connections: IntGaugeVec,
    pub schedules: IntGaugeVec,
    pub fleets: IntGaugeVec,
    pub invitations: IntGaugeVec,
    pub onboarding_duration: Histogram,
    pub onboarding_unmeasured: prometheus::IntCounter,
    pub invitations_stuck: IntGauge,
    pub fleets_without_active_connection: IntGauge,
    pub parked_messages: IntGauge,
    pub outbox_pending: IntGauge,
    pub notifications: IntCounterVec,
}

/// The stages of a batch, for `catena_worker_stage_seconds_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Waiting for the first delivery of a batch (nothing to do).
    Idle,
    /// From the first delivery until the batch is full or its wait is over.
    Gather,
    /// Unpacking groups and decoding envelopes.
    Decode,
    /// Waiting for a pooled database connection.
    Connect,
    Begin,
    /// The entity advisory locks (waits here are other batches holding them).
    Lock,
    /// The dedup-key insert.
    Dedup,
    /// The state upserts, in one pipelined flight.
    Write,
    /// Alert reconciliation, the second flight.
    Alerts,
    Commit,
    /// The back-fills of a batch split into parts, in a transaction of their own.
    Backfill,
    /// Acking the batch to the broker.
    Settle,
}

impl Stage {
    pub const ALL: [Stage; 12] = [
        Stage::Idle,
        Stage::Gather,
        Stage::Decode,
        Stage::Connect,
        Stage::Begin,
        Stage::Lock,
        Stage::Dedup,
        Stage::Write,
        Stage::Alerts,
        Stage::Commit,
        Stage::Backfill,
        Stage::Settle,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Idle => "idle",
            Stage::Gather => "gather",
            Stage::Decode => "decode",
            Stage::Connect => "connect",
            Stage::Begin => "begin",
            Stage::Lock => "lock",
            Stage::Dedup => "dedup",
            Stage::Write => "write",
            Stage::Alerts => "alerts",
            Stage::Commit => "commit",
            Stage::Backfill => "backfill",
            Stage::Settle => "settle",
        }
    }
}

impl WorkerMetrics {
    /// Add `elapsed` to the time spent in `stage`.
    pub fn stage(&self, stage: Stage, elapsed: std::time::Duration) {
        self.stage_seconds
            .with_label_values(&[stage.as_str()])
            .inc_by(elapsed.as_secs_f64());
    }

    pub fn new(registry: &Registry) -> Self {
        Self {
            events: register(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "catena_worker_events_total",
                        "Events handled by the worker, by event name (known names, else `other`) and outcome",
                    ),
                    &["event_name", "outcome"],
                )
                .unwrap(),
            ),
            dedup_keys: {
                let keys = register(
                    registry,
                    IntCounterVec::new(
                        Opts::new(
                            "catena_worker_dedup_keys_total",
                            "Decoded events by where their dedup key came from (envelope_id; content_hash when the id is missing; invalid_id when it is not a UUID)",
                        ),
                        &["source"],
                    )
                    .unwrap(),
                );
                for source in KeySource::ALL {
                    keys.with_label_values(&[source.as_str()]);
                }
                keys
            },
            batch_seconds: register(
                registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "catena_worker_batch_seconds",
                        "Time to apply and commit one batch",
                    )
                    .buckets(LATENCY_BUCKETS.to_vec()),
                )
                .unwrap(),
            ),
            stage_seconds: {
                let stages = register(
                    registry,
                    prometheus::CounterVec::new(
                        Opts::new(
                            "catena_worker_stage_seconds_total",
                            "Wall time the consumers spent in each stage of a batch (idle, gather, decode, connect, begin, lock, dedup, write, alerts, commit, backfill, settle; the database stages summed over a batch's concurrent parts): divided by events, where an event's time goes",
                        ),
                        &["stage"],
                    )
                    .unwrap(),
                );
                for stage in Stage::ALL {
                    stages.with_label_values(&[stage.as_str()]);
                }
                stages
            },
            batch_size: register(
                registry,
                Histogram::with_opts(
                    HistogramOpts::new("catena_worker_batch_size", "Messages per batch")
                        .buckets(vec![1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0]),
                )
                .unwrap(),
            ),
            event_lag: register(
                registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "catena_worker_event_lag_seconds",
                        "Commit time minus relay receive time",
                    )
                    .buckets(LAG_BUCKETS.to_vec()),
                )
                .unwrap(),
            ),
            inflight: register(
                registry,
                IntGauge::new(
                    "catena_worker_inflight",
                    "Messages received and not yet acked",
                )
                .unwrap(),
            ),
            ready: register(
                registry,
                IntGauge::new(
                    "catena_worker_ready",
                    "1 when consuming with broker and database reachable",
                )
                .unwrap(),
            ),
            pool_connections: register(
                registry,
                IntGaugeVec::new(
                    Opts::new("catena_db_pool_connections", "Database pool connections by state"),
                    &["state"],
                )
                .unwrap(),
            ),
            pool_max: register(
                registry,
                IntGauge::new("catena_db_pool_max_connections", "Database pool size").unwrap(),
            ),
            alerts_raised: {
                let raised = register(
                    registry,
                    IntCounterVec::new(
                        Opts::new("catena_alerts_raised_total", "Alerts opened by this worker"),
                        &["kind"],
                    )
                    .unwrap(),
                );
                for kind in AlertKind::ALL {
                    raised.with_label_values(&[kind.as_str()]);
                }
                raised
            },
            alerts_open: register(
                registry,
                IntGaugeVec::new(
                    Opts::new(
                        "catena_alerts_open",
                        "Open alerts by kind (from PostgreSQL; identical on every replica, aggregate with max)",
                    ),
                    &["kind"],
                )
                .unwrap(),
            ),
            connections: register(
                registry,
                IntGaugeVec::new(
                    Opts::new(
                        "catena_connections",
                        "Connections by status (from PostgreSQL; aggregate with max)",
                    ),
                    &["status"],
                )
                .unwrap(),
            ),
            schedules: register(
                registry,
                IntGaugeVec::new(
                    Opts::new(
                        "catena_schedules",
                        "Schedules by status (from PostgreSQL; aggregate with max)",
                    ),
                    &["status"],
                )
                .unwrap(),
            ),
            fleets: register(
                registry,
                IntGaugeVec::new(
                    Opts::new(
                        "catena_fleets",
                        "Fleets by onboarding stage (from PostgreSQL, refreshed once a minute; aggregate with max)",
                    ),
                    &["onboarding_status"],
                )
                .unwrap(),
            ),
            invitations: register(
                registry,
                IntGaugeVec::new(
                    Opts::new(
                        "catena_invitations",
                        "Invitations by status (from PostgreSQL, refreshed once a minute; aggregate with max)",
                    ),
                    &["status"],
                )
                .unwrap(),
            ),
            onboarding_duration: register(
                registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "catena_onboarding_duration_seconds",
                        "Time from invitation to connected (event times), observed once per fleet when it reaches connected",
                    )
                    .buckets(ONBOARDING_BUCKETS.to_vec()),
                )
                .unwrap(),
            ),
            onboarding_unmeasured: register(
                registry,
                prometheus::IntCounter::new(
                    "catena_onboarding_unmeasured_total",
                    "Fleets that reached connected before their invitation was known (not in the duration histogram)",
                )
                .unwrap(),
            ),
            invitations_stuck: register(
                registry,
                IntGauge::new(
                    "catena_invitations_stuck",
                    "Invitations viewed but not accepted for more than a day",
                )
                .unwrap(),
            ),
            fleets_without_active_connection: register(
                registry,
                IntGauge::new(
                    "catena_fleets_without_active_connection",
                    "Connected fleets none of whose TSP connections is active",
                )
                .unwrap(),
            ),
            parked_messages: register(
                registry,
                IntGauge::new(
                    "catena_parked_messages",
                    "Messages in the parking lot queue (aggregate with max)",
                )
                .unwrap(),
            ),
            outbox_pending: register(
                registry,
                IntGauge::new(
                    "catena_outbox_pending",
                    "Alert notifications not yet delivered to every sink (aggregate with max)",
                )
                .unwrap(),
            ),
            notifications: {
                let notifications = register(
                    registry,
                    IntCounterVec::new(
                        Opts::new(
                            "catena_alert_notifications_total",
                            "Alert notification deliveries by sink and outcome",
                        ),
                        &["sink", "outcome"],
                    )
                    .unwrap(),
                );
                for sink in ["alertmanager", "webhook"] {
                    for outcome in ["delivered", "failed"] {
                        notifications.with_label_values(&[sink, outcome]);
                    }
                }
                notifications
            },
        }
    }
}

impl WorkerMetrics {
    /// Count one event's outcome (`catena_worker_events_total`).
    pub fn count_event(&self, event_name: &str, outcome: WorkerOutcome) {
        self.events
            .with_label_values(&[event_label(event_name), outcome.as_str()])
            .inc();
    }

    pub fn count_alert_raised(&self, kind: AlertKind) {
        self.alerts_raised.with_label_values(&[kind.as_str()]).inc();
    }
}

/// The retention sweeper's metrics (registered only where it runs: `--no-retention` exports none,
/// so the stalled-retention alert cannot fire for a worker that is told not to prune).
#[derive(Clone)]
pub struct RetentionMetrics {
    pub pruned: IntCounterVec,
    pub sweeps: IntCounterVec,
    pub sweep_seconds: Histogram,
    pub last_success: IntGauge,
}

impl RetentionMetrics {
    pub fn new(registry: &Registry) -> Self {
        let pruned = register(
            registry,
            IntCounterVec::new(
                Opts::new(
                    "catena_retention_pruned_rows_total",
                    "Expired rows deleted by the retention sweeps of this worker, by table",
                ),
                &["table"],
            )
            .unwrap(),
        );
        for table in crate::retention::pruned_table_names() {
            pruned.with_label_values(&[table]);
        }
        let sweeps = register(
            registry,
            IntCounterVec::new(
                Opts::new(
                    "catena_retention_sweeps_total",
                    "Retention sweeps by outcome: completed, locked (another worker was sweeping), failed",
                ),
                &["outcome"],
            )
            .unwrap(),
        );
        for outcome in ["completed", "locked", "failed"] {
            sweeps.with_label_values(&[outcome]);
        }
        Self {
            pruned,
            sweeps,
            sweep_seconds: register(
                registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "catena_retention_sweep_seconds",
                        "Duration of the retention sweeps this worker ran (pauses included)",
                    )
                    .buckets(vec![0.01, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0]),
                )
                .unwrap(),
            ),
            last_success: register(
                registry,
                IntGauge::new(
                    "catena_retention_last_success_timestamp_seconds",
                    "Unix time of this worker's last complete retention sweep (0: none yet; aggregate with max)",
                )
                .unwrap(),
            ),
        }
    }
}

/// The `text/plain; version=0.0.4` exposition of a registry.
pub fn render(registry: &Registry) -> String {
    let mut buf = Vec::with_capacity(8 * 1024);
    TextEncoder::new()
        .encode(&registry.gather(), &mut buf)
        .expect("text encoding cannot fail");
    String::from_utf8(buf).expect("exposition is UTF-8")
}

/// The reconciler's metrics (catena-control-plane.md §2.2 item 6). No id labels.
#[derive(Clone)]
pub struct ControlMetrics {
    pub subscriptions: IntGaugeVec,
    pub dlq_messages: IntGauge,
    pub actions: IntCounterVec,
    pub api_requests: IntCounterVec,
    pub last_success: IntGauge,
    pub leader: IntGauge,
    pub secret_refusals: IntGauge,
}

/// `action` and `outcome` labels of `catena_control_actions_total`.
pub const CONTROL_ACTIONS: [&str; 4] = ["activate", "replay", "alert_open", "alert_resolve"];
pub const CONTROL_OUTCOMES: [&str; 3] = ["ok", "error", "skipped"];

impl ControlMetrics {
    pub fn new(registry: &Registry) -> Self {
        let subscriptions = register(
            registry,
            IntGaugeVec::new(
                Opts::new(
                    "catena_control_subscriptions",
                    "Our Catena subscriptions by Catena status, as last polled",
                ),
                &["status"],
            )
            .unwrap(),
        );
        for status in crate::catena::model::WebhookStatus::ALL {
            subscriptions.with_label_values(&[status.as_str()]);
        }
        let actions = register(
            registry,
            IntCounterVec::new(
                Opts::new(
                    "catena_control_actions_total",
                    "What the reconciler did, by action and outcome",
                ),
                &["action", "outcome"],
            )
            .unwrap(),
        );
        for action in CONTROL_ACTIONS {
            for outcome in CONTROL_OUTCOMES {
                actions.with_label_values(&[action, outcome]);
            }
        }
        Self {
            subscriptions,
            actions,
            api_requests: register(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "catena_control_api_requests_total",
                        "Calls to Catena's API by endpoint and answer class",
                    ),
                    &["endpoint", "class"],
                )
                .unwrap(),
            ),
            dlq_messages: register(
                registry,
                IntGauge::new(
                    "catena_control_dlq_messages",
                    "Messages in Catena's dead-letter queues of our subscriptions",
                )
                .unwrap(),
            ),
            last_success: register(
                registry,
                IntGauge::new(
                    "catena_control_last_success_timestamp_seconds",
                    "Unix time of the reconciler's last complete poll of Catena",
                )
                .unwrap(),
            ),
            leader: register(
                registry,
                IntGauge::new(
                    "catena_control_leader",
                    "1 on the reconciler that holds the singleton lock",
                )
                .unwrap(),
            ),
            secret_refusals: register(
                registry,
                IntGauge::new(
                    "catena_control_secret_refusals",
                    "Subscriptions whose deliveries our relays refuse for their signature (not reactivated)",
                )
                .unwrap(),
            ),
        }
    }
}
