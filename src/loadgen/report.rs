//! End-to-end figures read back from PostgreSQL after a `send` run: how many events were
//! committed, how fast, and `processed_at - received_at` percentiles.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::store::{self, DbError};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EndToEnd {
    pub events: i64,
    pub seconds: f64,
    pub events_per_second: f64,
    pub lag_ms_p50: f64,
    pub lag_ms_p90: f64,
    pub lag_ms_p99: f64,
    pub lag_ms_max: f64,
}

impl EndToEnd {
    pub fn print(&self) {
        println!(
            "end to end: {} events committed in {:.2}s -> {:.0} events/s; processed_at - received_at ms: p50={:.1} p90={:.1} p99={:.1} max={:.1}",
            self.events,
            self.seconds,
            self.events_per_second,
            self.lag_ms_p50,
            self.lag_ms_p90,
            self.lag_ms_p99,
            self.lag_ms_max
        );
    }
}

/// How long [`end_to_end`] waits for the count of committed events to stop moving, by default.
pub const SETTLE: Duration = Duration::from_secs(10);

/// Wait until `expected` events received since `since` are committed (or nothing changes for
/// `settle`), then measure them.
pub async fn end_to_end(
    database_url: &str,
    since: DateTime<Utc>,
    expected: i64,
    settle: Duration,
) -> Result<EndToEnd, DbError> {
    let pool = store::pool(database_url, 1)?;
    let client = pool.get().await?;
    let (mut last, mut last_change) = (-1i64, Instant::now());
    loop {
        let n: i64 = client
            .query_one(
                "SELECT count(*) FROM webhook_events WHERE received_at >= $1",
                &[&since],
            )
            .await?
            .get(0);
        if n >= expected {
            break;
        }
        if n != last {
            (last, last_change) = (n, Instant::now());
        } else if last_change.elapsed() > settle {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let row = client
        .query_one(
            "SELECT count(*),
                    coalesce(extract(epoch FROM max(processed_at) - min(received_at))::float8, 0),
                    coalesce(percentile_cont(ARRAY[0.5, 0.9, 0.99]) WITHIN GROUP (ORDER BY extract(epoch FROM processed_at - received_at)::float8), ARRAY[0,0,0]::float8[]),
                    coalesce(max(extract(epoch FROM processed_at - received_at))::float8, 0)
             FROM webhook_events WHERE received_at >= $1",
            &[&since],
        )
        .await?;
    let events: i64 = row.get(0);
    let seconds: f64 = row.get(1);
    let q: Vec<f64> = row.get(2);
    let max: f64 = row.get(3);
    Ok(EndToEnd {
        events,
        seconds,
        events_per_second: events as f64 / seconds.max(1e-9),
        lag_ms_p50: q[0] * 1000.0,
        lag_ms_p90: q[1] * 1000.0,
        lag_ms_p99: q[2] * 1000.0,
        lag_ms_max: max * 1000.0,
    })
}
