//! The one poll-until-deadline loop: counts converging, servers getting ready, alerts arriving.

use std::future::Future;
use std::time::Duration;

const INTERVAL: Duration = Duration::from_millis(100);

/// Probe every 100 ms until `done` holds for the probed value or `timeout` has passed, and
/// return the last value. Probes at least once.
pub async fn eventually<T, F, Fut>(timeout: Duration, mut probe: F, done: impl Fn(&T) -> bool) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = T>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let value = probe().await;
        if done(&value) || tokio::time::Instant::now() >= deadline {
            return value;
        }
        tokio::time::sleep(INTERVAL).await;
    }
}

/// Whether `check` held within `timeout` (checked every 100 ms).
pub async fn wait_until<F, Fut>(timeout: Duration, check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    eventually(timeout, check, |ok| *ok).await
}
