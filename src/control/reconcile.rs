//! `catena-ingest reconcile`: notice when Catena stops delivering to us and bring every
//! undelivered event back (catena-control-plane.md §2.2).
//!
//! Catena's breaker marks a subscription `stale` after a few seconds of failures and never
//! reactivates it by itself; what it could not deliver waits 14 days in its DLQ, returned only
//! by a replay. Each cycle (every `--interval`, or early on a `webhook.*` event the worker
//! announces with `NOTIFY catena_control`) the reconciler polls Catena, the source of truth:
//!
//! 1. lists every subscription, and fetches the metrics of ours that are not active or hold DLQ
//!    messages (all of ours every 5th cycle);
//! 2. reactivates `stale` ones (never `paused`: a person paused it) only once the relay has
//!    answered `/readyz` 200 for `--healthy-for` without a break, after a backoff per
//!    subscription, and never while our relays refuse that subscription's signatures: that is a
//!    secret problem, which reactivating would only trip again, and the alert says "rotate";
//! 3. replays the DLQ of active subscriptions right after reactivating, and again only when its
//!    count has not fallen for `--replay-settle` (at most 5 times an hour): every event comes
//!    back, and the dedup keys make those Catena had already delivered a no-op;
//! 4. raises and resolves `webhook_stale`, `webhook_dlq_backlog` and `webhook_missing` through
//!    the alert outbox.
//!
//! One reconciler acts at a time: the leader holds a session advisory lock; others wait.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::get;
use chrono::{DateTime, Utc};
use prometheus::Registry;
use serde_json::json;

use super::ControlError;
use super::alerts;
use super::registry::{self, Registered};
use crate::alerts::AlertKind;
use crate::catena::CatenaClient;
use crate::catena::model::WebhookStatus;
use crate::config::ReconcileSettings;
use crate::metrics::{self, ControlMetrics};
use crate::relay::refusals::RefusalReport;
use crate::shutdown::Shutdown;

/// The advisory lock of the one acting reconciler (any constant unique to this app).
const LEADER_LOCK: i64 = 0x6361_7465_6e61_0002;
/// A DLQ with messages this long pages (half Catena's 14-day horizon).
const DLQ_PAGE_AFTER: chrono::Duration = chrono::Duration::days(7);
const MAX_ACTIVATE_BACKOFF: Duration = Duration::from_secs(30 * 60);
const REPLAYS_PER_HOUR: i32 = 5;
/// Catena's breaker trips below this EWMA on busy subscriptions: warn before it does.
const EWMA_WARNING: f64 = 0.95;

/// Whether the relay has been ready without a break, probed every second.
pub struct ReadyProbe {
    ready_since: Mutex<Option<Instant>>,
}

impl ReadyProbe {
    pub fn spawn(url: String, shutdown: Shutdown) -> Arc<Self> {
        let probe = Arc::new(Self {
            ready_since: Mutex::new(None),
        });
        let this = probe.clone();
        tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(2))
                .build()
                .expect("building an HTTP client");
            loop {
                let ready = matches!(http.get(&url).send().await, Ok(r) if r.status().is_success());
                {
                    let mut since = this.ready_since.lock().expect("never poisoned");
                    *since = match (ready, *since) {
                        (true, Some(t)) => Some(t),
                        (true, None) => Some(Instant::now()),
                        (false, _) => None,
                    };
                }
                tokio::select! {
                    _ = shutdown.wait() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        });
        probe
    }

    pub fn ready_for(&self) -> Option<Duration> {
        self.ready_since
            .lock()
            .expect("never poisoned")
            .map(|t| t.elapsed())
    }
}

/// What one cycle did (for logs and tests).
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct CycleReport {
    pub healthy: bool,
    pub activated: Vec<String>,
    pub replayed: Vec<String>,
    pub secret_mismatch: Vec<String>,
    pub dlq_messages: u64,
    pub by_status: HashMap<String, i64>,
}

pub struct Reconciler {
    catena: CatenaClient,
    pool: deadpool_postgres::Pool,
    settings: ReconcileSettings,
    metrics: ControlMetrics,
    http: reqwest::Client,
    cycles: u64,
}

impl Reconciler {
    pub fn new(
        catena: CatenaClient,
        pool: deadpool_postgres::Pool,
        settings: ReconcileSettings,
        metrics: ControlMetrics,
    ) -> Self {
        Self {
            catena,
            pool,
            settings,
            metrics,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(2))
                .build()
                .expect("building an HTTP client"),
            cycles: 0,
        }
    }

    /// Which subscriptions' deliveries our relays refused for their signature, and when last.
    /// A relay that cannot be asked refuses nothing we know of.
    async fn refusals(&self) -> HashMap<String, DateTime<Utc>> {
        let mut last = HashMap::new();
        for admin in self.settings.relay_admins() {
            let url = format!("{}/secrets/refusals", admin.trim_end_matches('/'));
            let Ok(response) = self.http.get(&url).send().await else {
                continue;
            };
            let Ok(report) = response.json::<RefusalReport>().await else {
                continue;
            };
            for (id, refused) in report.webhooks {
                if let Some(at) = refused.last_at {
                    let entry = last.entry(id).or_insert(at);
                    *entry = (*entry).max(at);
                }
            }
        }
        last
    }

    fn count(&self, action: &str, outcome: &str) {
        self.metrics
            .actions
            .with_label_values(&[action, outcome])
            .inc();
    }

    async fn alert_open(
        &self,
        db: &tokio_postgres::Client,
        kind: AlertKind,
        row: &Registered,
        details: serde_json::Value,
    ) -> Result<(), ControlError> {
        if alerts::open(db, kind, &row.webhook_id, details).await? {
            self.count("alert_open", "ok");
            tracing::warn!(kind = kind.as_str(), webhook_id = %row.webhook_id, event_name = %row.event_name, "alert opened");
        }
        Ok(())
    }

    async fn alert_resolve(
        &self,
        db: &tokio_postgres::Client,
        kind: AlertKind,
        row: &Registered,
        resolution: &str,
    ) -> Result<(), ControlError> {
        if alerts::resolve(db, kind, &row.webhook_id, resolution).await? {
            self.count("alert_resolve", "ok");
            tracing::info!(kind = kind.as_str(), webhook_id = %row.webhook_id, "alert resolved");
        }
        Ok(())
    }

    /// One cycle; `healthy` is whether the relay has been ready for `--healthy-for`.
    pub async fn cycle(&mut self, healthy: bool) -> Result<CycleReport, ControlError> {
        let mut report = CycleReport {
            healthy,
            ..CycleReport::default()
        };
        let db = self.pool.get().await.map_err(crate::store::DbError::from)?;
        let remote = self.catena.list_all().await?;
        let live = registry::live(&db).await?;
        let refusals = self.refusals().await;
        let full = self.cycles.is_multiple_of(5);
        self.cycles += 1;
        let now = Utc::now();
        let mut secret_mismatches = 0;
        for row in &live {
            let Some(hook) = remote
                .iter()
                .find(|w| w.id == row.webhook_id && w.status != WebhookStatus::Deleted)
            else {
                *report.by_status.entry("deleted".into()).or_default() += 1;
                let details = json!({"event_name": row.event_name, "status": "missing"});
                self.alert_open(&db, AlertKind::WebhookMissing, row, details)
                    .await?;
                continue;
            };
            self.alert_resolve(
                &db,
                AlertKind::WebhookMissing,
                row,
                "subscription present again",
            )
            .await?;
            let mut status = hook.status;
            registry::observe_status(&db, row, status).await?;
            let mut dlq = row.dlq_count.unwrap_or(0);
            let mut ewma = row.ewma_success_rate;
            if status != WebhookStatus::Active || dlq > 0 || full {
                match self.catena.metrics(&row.webhook_id).await {
                    Ok(m) => {
                        dlq = m.dlq_count as i64;
                        ewma = m.ewma_success_rate;
                        registry::observe_health(&db, &row.webhook_id, ewma, dlq).await?;
                    }
                    Err(error) => {
                        tracing::warn!(webhook_id = %row.webhook_id, %error, "metrics unavailable, using the last seen")
                    }
                }
            }
            let nonzero_since = match dlq {
                0 => None,
                _ => Some(row.dlq_nonzero_since.unwrap_or(now)),
            };
            let fell_at = if dlq < row.dlq_count.unwrap_or(0) {
                Some(now)
            } else {
                row.dlq_last_fell_at
            };
            // Refused since the secret last changed: our relays do not have what Catena signs with.
            let secret_mismatch = refusals
                .get(&row.webhook_id)
                .is_some_and(|at| row.rotation_started_at.is_none_or(|rotated| *at > rotated));

            if matches!(status, WebhookStatus::Stale | WebhookStatus::Paused) {
                let cause = match status {
                    WebhookStatus::Paused => "paused",
                    _ if secret_mismatch => "secret_mismatch",
                    _ => "undelivered",
                };
                let details = json!({
                    "event_name": row.event_name,
                    "status": status.as_str(),
                    "cause": cause,
                });
                self.alert_open(&db, AlertKind::WebhookStale, row, details)
                    .await?;
            }
            if status == WebhookStatus::Stale && !self.settings.no_activate {
                if secret_mismatch {
                    secret_mismatches += 1;
                    report.secret_mismatch.push(row.webhook_id.clone());
                    self.count("activate", "skipped");
                    tracing::error!(
                        webhook_id = %row.webhook_id,
                        event_name = %row.event_name,
                        "not reactivating: our relays refuse this subscription's signatures (a secret mismatch); run `catena-ingest subscriptions rotate --id {}`",
                        row.webhook_id
                    );
                } else if !healthy {
                    tracing::info!(webhook_id = %row.webhook_id, "stale; waiting for the relay to be ready for {:?}", self.settings.healthy_for);
                } else if self.activate_due(row, now) {
                    match self.catena.activate(&row.webhook_id).await {
                        Ok(_) => {
                            registry::activated(&db, &row.webhook_id).await?;
                            registry::log(
                                &db,
                                "reconcile",
                                "activate",
                                Some(&row.webhook_id),
                                Some(&row.event_name),
                                "ok",
                                "",
                            )
                            .await?;
                            self.count("activate", "ok");
                            tracing::info!(webhook_id = %row.webhook_id, event_name = %row.event_name, "reactivated");
                            report.activated.push(row.webhook_id.clone());
                            status = WebhookStatus::Active;
                            // Replay in the same cycle, inside any grace period activation
                            // gives; an empty replay is a no-op.
                            if !self.settings.no_replay {
                                self.replay(&db, row, &mut report).await?;
                            }
                        }
                        Err(error) => {
                            self.count("activate", "error");
                            tracing::warn!(webhook_id = %row.webhook_id, %error, "reactivation failed");
                        }
                    }
                }
            }
            if status == WebhookStatus::Active {
                registry::reset_activate_backoff(&db, &row.webhook_id).await?;
                let replayed_now = report.replayed.contains(&row.webhook_id);
                if dlq > 0
                    && healthy
                    && !self.settings.no_replay
                    && !secret_mismatch
                    && !replayed_now
                    && self.replay_due(row, nonzero_since, fell_at, now)
                {
                    self.replay(&db, row, &mut report).await?;
                }
                if dlq == 0 {
                    self.alert_resolve(&db, AlertKind::WebhookStale, row, "active, DLQ empty")
                        .await?;
                    self.alert_resolve(&db, AlertKind::WebhookDlqBacklog, row, "DLQ empty")
                        .await?;
                }
                if let Some(ewma) = ewma.filter(|e| *e < EWMA_WARNING) {
                    let payload = json!({
                        "alertname": "CatenaWebhookDeliveryDegraded",
                        "webhook_id": row.webhook_id,
                        "event_name": row.event_name,
                        "summary": format!("Catena's success rate for {} ({}) is {:.2}: its breaker trips below 0.95", row.webhook_id, row.event_name, ewma),
                        "description": "Deliveries to our relay fail often enough for Catena to stop delivering soon. Check the relay's refusals and 503s (catena_relay_requests_total).",
                    });
                    alerts::warn_once_an_hour(&db, &row.webhook_id, payload).await?;
                }
            }
            if let Some(since) = nonzero_since
                && healthy
                && now - since
                    >= chrono::Duration::from_std(self.settings.dlq_alert_after)
                        .unwrap_or(chrono::Duration::hours(1))
            {
                let severity = if now - since >= DLQ_PAGE_AFTER {
                    "page"
                } else {
                    "warning"
                };
                let details = json!({
                    "event_name": row.event_name,
                    "dlq_count": dlq,
                    "dlq_nonzero_since": since,
                    "severity": severity,
                });
                self.alert_open(&db, AlertKind::WebhookDlqBacklog, row, details)
                    .await?;
            }
            *report.by_status.entry(status.as_str().into()).or_default() += 1;
            report.dlq_messages += dlq.max(0) as u64;
        }
        for status in WebhookStatus::ALL {
            self.metrics
                .subscriptions
                .with_label_values(&[status.as_str()])
                .set(report.by_status.get(status.as_str()).copied().unwrap_or(0));
        }
        self.metrics.dlq_messages.set(report.dlq_messages as i64);
        self.metrics.secret_refusals.set(secret_mismatches);
        self.metrics.last_success.set(Utc::now().timestamp());
        Ok(report)
    }

    /// 1 min (`--activate-backoff`) after the first reactivation, doubling to 30 min.
    fn activate_due(&self, row: &Registered, now: DateTime<Utc>) -> bool {
        let Some(last) = row.last_activate_at else {
            return true;
        };
        let doublings = row.activate_attempts.clamp(1, 16) as u32 - 1;
        let wait = self
            .settings
            .activate_backoff
            .saturating_mul(1 << doublings)
            .min(MAX_ACTIVATE_BACKOFF);
        (now - last).to_std().unwrap_or_default() >= wait
    }

    /// First replay of a backlog at once; another only when the count has not fallen for
    /// `--replay-settle`, at most [`REPLAYS_PER_HOUR`].
    fn replay_due(
        &self,
        row: &Registered,
        nonzero_since: Option<DateTime<Utc>>,
        fell_at: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> bool {
        let Some(last) = row.last_replay_at else {
            return true;
        };
        if nonzero_since.is_some_and(|since| last < since) {
            return true; // a new backlog since the last replay
        }
        let settle = chrono::Duration::from_std(self.settings.replay_settle).unwrap_or_default();
        let settled = now - last >= settle && fell_at.is_none_or(|fell| now - fell >= settle);
        let recent_replays = if now - last < chrono::Duration::hours(1) {
            row.replay_attempts
        } else {
            0
        };
        settled && recent_replays < REPLAYS_PER_HOUR
    }

    async fn replay(
        &self,
        db: &tokio_postgres::Client,
        row: &Registered,
        report: &mut CycleReport,
    ) -> Result<(), ControlError> {
        match self.catena.replay(&row.webhook_id).await {
            Ok(()) => {
                registry::replayed(db, &row.webhook_id).await?;
                registry::log(
                    db,
                    "reconcile",
                    "replay",
                    Some(&row.webhook_id),
                    Some(&row.event_name),
                    "ok",
                    "",
                )
                .await?;
                self.count("replay", "ok");
                tracing::info!(webhook_id = %row.webhook_id, event_name = %row.event_name, "DLQ replayed");
                report.replayed.push(row.webhook_id.clone());
            }
            Err(error) => {
                self.count("replay", "error");
                tracing::warn!(webhook_id = %row.webhook_id, %error, "replay failed");
            }
        }
        Ok(())
    }
}

/// The reconciler's own endpoints: `/healthz`, `/readyz` (it can reach PostgreSQL) and `/metrics`.
struct Endpoints {
    registry: Registry,
    pool: deadpool_postgres::Pool,
}

async fn metrics_text(State(state): State<Arc<Endpoints>>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        metrics::render(&state.registry),
    )
}

async fn readyz(State(state): State<Arc<Endpoints>>) -> impl IntoResponse {
    match state.pool.get().await {
        Ok(_) => (axum::http::StatusCode::OK, "ready"),
        Err(_) => (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "database unavailable",
        ),
    }
}

/// A running reconciler.
pub struct RunningReconciler {
    pub metrics_addr: std::net::SocketAddr,
    pub handle: tokio::task::JoinHandle<()>,
}

/// Serve the endpoints and run cycles until shutdown (or one, with `--once`).
pub async fn start(
    catena: crate::config::CatenaSettings,
    database_url: &str,
    settings: ReconcileSettings,
    shutdown: Shutdown,
) -> Result<RunningReconciler, ControlError> {
    let registry = Registry::new();
    let control_metrics = ControlMetrics::new(&registry);
    let client = CatenaClient::new(catena, Some(control_metrics.api_requests.clone()));
    let pool = crate::store::pool(database_url, 2)?;
    let listener = tokio::net::TcpListener::bind(&settings.metrics_listen)
        .await
        .map_err(|e| {
            ControlError::Db(crate::store::DbError::Config(format!(
                "binding {}: {e}",
                settings.metrics_listen
            )))
        })?;
    let metrics_addr = listener.local_addr().expect("bound");
    let endpoints = Arc::new(Endpoints {
        registry,
        pool: pool.clone(),
    });
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(endpoints);
    let server_shutdown = shutdown.clone();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { server_shutdown.wait().await })
            .await;
    });
    let (wake_tx, wake) = tokio::sync::mpsc::channel(1);
    crate::store::spawn_listener(
        database_url.to_owned(),
        "catena_control",
        wake_tx,
        shutdown.clone(),
    );
    let probe = ReadyProbe::spawn(settings.relay_ready_url.clone(), shutdown.clone());
    let reconciler = Reconciler::new(client, pool, settings, control_metrics);
    let handle = tokio::spawn(lead(reconciler, probe, wake, shutdown));
    Ok(RunningReconciler {
        metrics_addr,
        handle,
    })
}

/// Take the leader lock (waiting as a standby meanwhile), then cycle while holding it.
async fn lead(
    mut reconciler: Reconciler,
    probe: Arc<ReadyProbe>,
    mut wake: tokio::sync::mpsc::Receiver<()>,
    shutdown: Shutdown,
) {
    let settings = reconciler.settings.clone();
    if settings.once {
        // Give the probe its first answer.
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    while !shutdown.is_triggered() {
        let lock = match reconciler.pool.get().await {
            Ok(conn) => match conn
                .query_one("SELECT pg_try_advisory_lock($1)", &[&LEADER_LOCK])
                .await
            {
                Ok(row) if row.get::<_, bool>(0) => Some(conn),
                Ok(_) => None,
                Err(error) => {
                    tracing::warn!(%error, "leader lock unavailable");
                    None
                }
            },
            Err(error) => {
                tracing::warn!(%error, "database unavailable");
                None
            }
        };
        let Some(lock) = lock else {
            reconciler.metrics.leader.set(0);
            if settings.once {
                tracing::info!("another reconciler holds the lock; nothing to do");
                return;
            }
            tokio::select! {
                _ = shutdown.wait() => return,
                _ = tokio::time::sleep(settings.interval) => continue,
            }
        };
        reconciler.metrics.leader.set(1);
        tracing::info!("reconciler leading");
        // The lock lives as long as this connection: it is never returned to the pool while held.
        let lock = deadpool_postgres::Object::take(lock);
        loop {
            let ready_for = probe.ready_for();
            let healthy = match settings.once {
                true => ready_for.is_some(),
                false => ready_for.is_some_and(|d| d >= settings.healthy_for),
            };
            match reconciler.cycle(healthy).await {
                Ok(report) => tracing::debug!(?report, "reconcile cycle"),
                Err(error) => tracing::warn!(%error, "reconcile cycle failed"),
            }
            if settings.once {
                return;
            }
            tokio::select! {
                _ = shutdown.wait() => return,
                _ = tokio::time::sleep(settings.interval) => {}
                _ = wake.recv() => tracing::debug!("woken by a webhook.* event"),
            }
            if lock.is_closed() {
                tracing::warn!("lost the leader lock's connection");
                reconciler.metrics.leader.set(0);
                break;
            }
        }
    }
}
