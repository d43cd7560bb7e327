//! The notifier: delivers outbox rows, re-fires open alerts, refreshes the state gauges.
//!
//! Runs inside every worker process. Rows are claimed with `FOR UPDATE SKIP LOCKED`, so any
//! number of replicas deliver each row once; a sink that already took a row is remembered in
//! `delivered_sinks`, so a retry only goes to the sinks that failed. A dead sink backs off per
//! row (exponential, with jitter) and never touches event processing, which uses its own
//! connections.

use std::sync::Arc;

use deadpool_postgres::Pool;
use tokio::task::JoinHandle;

use super::sinks::{Notification, Sink};
use super::{ALERT_COLUMNS, Alert, retry_delay};
use crate::broker::{Names, Publisher};
use crate::config::NotifierSettings;
use crate::metrics::WorkerMetrics;
use crate::shutdown::Shutdown;
use crate::store::DbError;

fn sinks(config: &NotifierSettings) -> Vec<Sink> {
    let mut sinks = Vec::new();
    if let Some(url) = &config.alertmanager_url {
        sinks.push(Sink::alertmanager(url));
    }
    if let Some(url) = &config.webhook_url {
        sinks.push(Sink::webhook(url));
    }
    sinks
}

/// How long one claim may spend delivering before it commits (well under the 60 s
/// `idle_in_transaction_session_timeout` of `deploy/sql/least-privilege.sql`).
const CLAIM_TIME_BUDGET: std::time::Duration = std::time::Duration::from_secs(20);

/// Serialises re-firing across replicas (transaction-scoped advisory lock).
const REFIRE_LOCK: i64 = 0x6361_7465_6e61_0002;

const CLAIM: &str = "
SELECT o.id, o.action, o.attempts, o.delivered_sinks, o.payload,
       a.alert_id, a.kind, a.subject_id, a.fleet_id, a.fleet_ref, a.state, a.opened_at,
       a.resolved_at, a.resolution, a.details,
       (SELECT i.magic_link FROM invitations i
         WHERE a.kind = 'connection_stale' AND a.fleet_id IS NOT NULL AND i.fleet_id = a.fleet_id
         ORDER BY i.updated_at DESC LIMIT 1) AS magic_link
FROM alert_outbox o LEFT JOIN alerts a ON a.alert_id = o.alert_id
WHERE o.delivered_at IS NULL AND o.next_attempt_at <= now()
ORDER BY o.id
LIMIT $1
FOR UPDATE OF o SKIP LOCKED";

pub fn spawn(
    pool: Pool,
    publisher: Publisher,
    names: Names,
    metrics: WorkerMetrics,
    config: NotifierSettings,
    shutdown: Shutdown,
) -> JoinHandle<()> {
    let sinks = Arc::new(sinks(&config));
    tokio::spawn(async move {
        let mut poll = tokio::time::interval(config.poll_interval);
        let mut refire = tokio::time::interval(config.refire_interval);
        let mut gauges = tokio::time::interval(config.gauge_interval);
        for timer in [&mut poll, &mut refire, &mut gauges] {
            timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        }
        loop {
            tokio::select! {
                _ = shutdown.wait() => break,
                _ = poll.tick() => {
                    // Drain everything due, a batch at a time.
                    loop {
                        match deliver_pending(&pool, &sinks, &metrics, config.batch).await {
                            Ok(n) if n as i64 == config.batch => continue,
                            Ok(_) => break,
                            Err(error) => {
                                tracing::debug!(%error, "notifier could not reach the database");
                                break;
                            }
                        }
                    }
                }
                _ = refire.tick() => {
                    if let Err(error) = refire_open(&pool, &sinks, &metrics).await {
                        tracing::debug!(%error, "re-firing open alerts failed");
                    }
                }
                _ = gauges.tick() => {
                    match pool.get().await {
                        Ok(mut client) => {
                            if let Err(error) = super::gauges::refresh_onboarding(&mut client, config.onboarding_interval).await {
                                tracing::debug!(%error, "onboarding counts refresh failed");
                            }
                            if let Err(error) = super::refresh_gauges(&client, &publisher, &names, &metrics).await {
                                tracing::debug!(%error, "gauge refresh failed");
                            }
                        }
                        Err(error) => tracing::debug!(%error, "gauge refresh: no database connection"),
                    }
                }
            }
        }
    })
}

fn notification_of(row: &tokio_postgres::Row) -> Option<Notification> {
    let action: &str = row.get("action");
    if action == "warning" {
        return Some(Notification::Warning {
            payload: row
                .get::<_, Option<serde_json::Value>>("payload")
                .unwrap_or_default(),
        });
    }
    row.get::<_, Option<uuid::Uuid>>("alert_id")?;
    let alert = Alert::from_row(row);
    // Announce the alert's state as of now: an `open` row retried after its alert resolved
    // must not re-fire it (retries can reorder rows of one alert).
    Some(match action {
        _ if alert.state == "resolved" => Notification::Resolved { alert },
        "resolve" => Notification::Resolved { alert },
        _ => Notification::Firing {
            alert,
            reauth_link: row.get("magic_link"),
        },
    })
}

/// Claim due outbox rows and deliver them to every sink that has not had them yet. Returns how
/// many rows were claimed.
pub async fn deliver_pending(
    pool: &Pool,
    sinks: &[Sink],
    metrics: &WorkerMetrics,
    batch: i64,
) -> Result<usize, DbError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let rows = tx.query(CLAIM, &[&batch]).await?;
    let started = std::time::Instant::now();
    let mut handled = 0;
    // Rows delivered to every sink, by the sinks they list (nearly always one list).
    let mut finished: Vec<(Vec<String>, Vec<i64>)> = Vec::new();
    for row in &rows {
        // Slow sinks must not keep this transaction open past the role's
        // idle_in_transaction_session_timeout: rows not reached stay due for the next round.
        if started.elapsed() > CLAIM_TIME_BUDGET {
            break;
        }
        handled += 1;
        let id: i64 = row.get("id");
        let attempts: i32 = row.get("attempts");
        let mut delivered: Vec<String> = row.get("delivered_sinks");
        let mut last_error: Option<String> = None;
        match notification_of(row) {
            Some(notification) => {
                let pending: Vec<&Sink> = sinks
                    .iter()
                    .filter(|s| !delivered.iter().any(|d| d == s.name()))
                    .collect();
                for sink in pending {
                    match sink.send(id, &notification).await {
                        Ok(()) => {
                            metrics
                                .notifications
                                .with_label_values(&[sink.name(), "delivered"])
                                .inc();
                            delivered.push(sink.name().to_owned());
                        }
                        Err(error) => {
                            metrics
                                .notifications
                                .with_label_values(&[sink.name(), "failed"])
                                .inc();
                            tracing::warn!(outbox_id = id, sink = sink.name(), %error, attempts = attempts + 1, "notification not delivered, will retry");
                            last_error = Some(format!("{}: {error}", sink.name()));
                        }
                    }
                }
            }
            None => last_error = None,
        }
        let done = sinks
            .iter()
            .all(|s| delivered.iter().any(|d| d == s.name()));
        if done {
            // Marked together below: one statement per round rather than one per row.
            match finished.iter_mut().find(|(sinks, _)| *sinks == delivered) {
                Some((_, ids)) => ids.push(id),
                None => finished.push((delivered, vec![id])),
            }
        } else {
            let delay = retry_delay(attempts as u32 + 1);
            tx.execute(
                "UPDATE alert_outbox SET delivered_sinks = $2, attempts = attempts + 1, last_error = $3,
                        next_attempt_at = now() + make_interval(secs => $4)
                 WHERE id = $1",
                &[&id, &delivered, &last_error, &delay.as_secs_f64()],
            )
            .await?;
        }
    }
    if !finished.is_empty() {
        let mark = tx
            .prepare_cached(
                "UPDATE alert_outbox SET delivered_at = now(), delivered_sinks = $2, attempts = attempts + 1
                 WHERE id = ANY($1)",
            )
            .await?;
        for (delivered, ids) in &finished {
            tx.execute(&mark, &[ids, delivered]).await?;
        }
    }
    tx.commit().await?;
    Ok(handled)
}

/// Keep open alerts firing in Alertmanager (it resolves anything not re-sent within its
/// resolve_timeout). One replica at a time does it.
async fn refire_open(pool: &Pool, sinks: &[Sink], metrics: &WorkerMetrics) -> Result<(), DbError> {
    let Some(alertmanager) = sinks.iter().find(|s| s.name() == "alertmanager") else {
        return Ok(());
    };
    // Read in a short transaction; send after it ends. A transaction held open while
    // Alertmanager answers could outlive `idle_in_transaction_session_timeout` (the shipped
    // role sets 60 s) and be killed. The lock only keeps replicas from reading at once; a rare
    // double send is harmless (Alertmanager merges alerts with the same labels).
    let notifications: Vec<Notification> = {
        let mut client = pool.get().await?;
        let tx = client.transaction().await?;
        let locked: bool = tx
            .query_one("SELECT pg_try_advisory_xact_lock($1)", &[&REFIRE_LOCK])
            .await?
            .get(0);
        if !locked {
            return Ok(());
        }
        let sql = format!(
            "SELECT {ALERT_COLUMNS},
                (SELECT i.magic_link FROM invitations i
                  WHERE alerts.kind = 'connection_stale' AND alerts.fleet_id IS NOT NULL AND i.fleet_id = alerts.fleet_id
                  ORDER BY i.updated_at DESC LIMIT 1) AS magic_link
             FROM alerts WHERE state = 'open'
               AND NOT EXISTS (SELECT 1 FROM alert_outbox o WHERE o.alert_id = alerts.alert_id AND o.delivered_at IS NULL)"
        );
        let rows = tx.query(&sql, &[]).await?;
        tx.commit().await?;
        rows.iter()
            .map(|row| Notification::Firing {
                alert: Alert::from_row(row),
                reauth_link: row.get("magic_link"),
            })
            .collect()
    };
    if notifications.is_empty() {
        return Ok(());
    }
    // One request for all of them: Alertmanager's API takes an array.
    let outcome = match alertmanager.send_alertmanager_batch(&notifications).await {
        Ok(()) => "delivered",
        Err(_) => "failed",
    };
    metrics
        .notifications
        .with_label_values(&["alertmanager", outcome])
        .inc_by(notifications.len() as u64);
    Ok(())
}
