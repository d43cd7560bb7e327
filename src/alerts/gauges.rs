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
UNION ALL SELECT 'outbox_pending', '', count(*) FROM alert_outbox WHERE delivered_at IS NULL";

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
    for row in rows {
        let (metric, label, n): (&str, &str, i64) = (row.get(0), row.get(1), row.get(2));
        match metric {
            "alerts_open" => metrics.alerts_open.with_label_values(&[label]).set(n),
            "connections" => metrics
                .connections
                .with_label_values(&[connection_status_label(label)])
                .add(n),
            "schedules" => metrics.schedules.with_label_values(&[label]).set(n),
            _ => metrics.outbox_pending.set(n),
        }
    }
    if let Some(depth) = publisher.queue_depth(&names.parked_queue).await {
        metrics.parked_messages.set(depth as i64);
    }
    Ok(())
}
