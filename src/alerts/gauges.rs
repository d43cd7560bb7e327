//! State gauges read from PostgreSQL (and the parking lot depth from RabbitMQ). Every replica
//! reports the same numbers, so dashboards aggregate them with `max`, not `sum`.

use super::AlertKind;
use crate::broker::{Names, Publisher};
use crate::metrics::WorkerMetrics;
use crate::store::DbError;

/// One cheap query (index-only counts on small tables) for every state gauge.
const STATE_COUNTS: &str = "
SELECT 'alerts_open' AS metric, kind AS label, count(*) FROM alerts WHERE state = 'open' GROUP BY kind
UNION ALL SELECT 'connections', status, count(*) FROM connections GROUP BY status
UNION ALL SELECT 'schedules', status, count(*) FROM schedules GROUP BY status
UNION ALL SELECT 'outbox_pending', '', count(*) FROM alert_outbox WHERE delivered_at IS NULL
UNION ALL SELECT metric, label, n FROM onboarding_counts";

/// The onboarding counts: over every fleet and invitation, so they run once a minute on one
/// worker (under a transaction-scoped advisory lock, and only when the last refresh is older
/// than the interval) into `onboarding_counts`, which every replica reads with the others.
const ONBOARDING_REFRESH: &str = "
WITH counts AS (
    SELECT 'fleets' AS metric, onboarding_status AS label, count(*) AS n FROM fleets GROUP BY onboarding_status
    UNION ALL SELECT 'invitations', status, count(*) FROM invitations GROUP BY status
    UNION ALL SELECT 'invitations_stuck', '', count(*) FROM invitations
        WHERE status = 'viewed' AND status_at < now() - interval '1 day'
    UNION ALL SELECT 'fleets_without_active_connection', '', count(*) FROM fleets f
        WHERE onboarding_status = 'connected'
          AND NOT EXISTS (SELECT 1 FROM connections c WHERE c.fleet_id = f.fleet_id AND c.status = 'active')
)
INSERT INTO onboarding_counts (metric, label, n) SELECT metric, label, n FROM counts";

/// Lock key of the onboarding refresh (any constant unique to this app).
const ONBOARDING_LOCK: i64 = 0x6361_7465_6e61_0003;

/// Refresh `onboarding_counts` if no other worker did within `interval`. Returns whether this
/// one did.
pub async fn refresh_onboarding(
    client: &mut tokio_postgres::Client,
    interval: std::time::Duration,
) -> Result<bool, DbError> {
    let tx = client.transaction().await?;
    let locked: bool = tx
        .query_one("SELECT pg_try_advisory_xact_lock($1)", &[&ONBOARDING_LOCK])
        .await?
        .get(0);
    if !locked {
        return Ok(false);
    }
    let seconds = interval.as_secs_f64();
    let due = tx
        .query_opt(
            "SELECT 1 FROM onboarding_counts_refreshed WHERE refreshed_at > now() - make_interval(secs => $1)",
            &[&seconds],
        )
        .await?
        .is_none();
    if !due {
        return Ok(false);
    }
    tx.execute("DELETE FROM onboarding_counts", &[]).await?;
    tx.execute(ONBOARDING_REFRESH, &[]).await?;
    tx.execute(
        "INSERT INTO onboarding_counts_refreshed (refreshed_at) VALUES (now())
         ON CONFLICT (singleton) DO UPDATE SET refreshed_at = now()",
        &[],
    )
    .await?;
    tx.commit().await?;
    Ok(true)
}

/// Onboarding stages and invitation statuses (the schema's CHECK values): every series exists
/// from the first scrape.
const ONBOARDING_STATUSES: [&str; 8] = [
    "invited",
    "viewed",
    "accepted",
    "declined",
    "expired",
    "deleted",
    "share_agreed",
    "connected",
];
const INVITATION_STATUSES: [&str; 8] = [
    "created", "sent", "viewed", "accepted", "declined", "rejected", "expired", "deleted",
];

/// Connection statuses with a series of their own (Catena's `StatusEnum` values that a
/// connection takes); anything else counts as `other`, so the label set stays bounded.
const CONNECTION_STATUSES: [&str; 7] = [
    "active", "stale", "inactive", "paused", "expired", "deleted", "other",
];

fn connection_status_label(status: &str) -> &'static str {
    CONNECTION_STATUSES
        .iter()
        .find(|s| **s == status)
        .copied()
        .unwrap_or("other")
}

pub async fn refresh_gauges(
    client: &tokio_postgres::Client,
    publisher: &Publisher,
    names: &Names,
    metrics: &WorkerMetrics,
) -> Result<(), DbError> {
    let rows = client.query(STATE_COUNTS, &[]).await?;
    // Zero every known series first, so a value that dropped to nothing reads 0, not stale.
    for kind in AlertKind::ALL {
        metrics
            .alerts_open
            .with_label_values(&[kind.as_str()])
            .set(0);
    }
    for status in CONNECTION_STATUSES {
        metrics.connections.with_label_values(&[status]).set(0);
    }
    for status in ["active", "deactivated"] {
        metrics.schedules.with_label_values(&[status]).set(0);
    }
    metrics.outbox_pending.set(0);
    for status in ONBOARDING_STATUSES {
        metrics.fleets.with_label_values(&[status]).set(0);
    }
    for status in INVITATION_STATUSES {
        metrics.invitations.with_label_values(&[status]).set(0);
    }
    metrics.invitations_stuck.set(0);
    metrics.fleets_without_active_connection.set(0);
    for row in rows {
        let (metric, label, n): (&str, &str, i64) = (row.get(0), row.get(1), row.get(2));
        match metric {
            "alerts_open" => metrics.alerts_open.with_label_values(&[label]).set(n),
            "connections" => metrics
                .connections
                .with_label_values(&[connection_status_label(label)])
                .add(n),
            "schedules" => metrics.schedules.with_label_values(&[label]).set(n),
            "fleets" if ONBOARDING_STATUSES.contains(&label) => {
                metrics.fleets.with_label_values(&[label]).set(n)
            }
            "invitations" if INVITATION_STATUSES.contains(&label) => {
                metrics.invitations.with_label_values(&[label]).set(n)
            }
            "invitations_stuck" => metrics.invitations_stuck.set(n),
            "fleets_without_active_connection" => metrics.fleets_without_active_connection.set(n),
            "outbox_pending" => metrics.outbox_pending.set(n),
            _ => {}
        }
    }
    if let Some(depth) = publisher.queue_depth(&names.parked_queue).await {
        metrics.parked_messages.set(depth as i64);
    }
    Ok(())
}
