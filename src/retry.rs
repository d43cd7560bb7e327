//! The one reconnect policy: broker sessions, consumers, migrations and a batch held while the
//! database is away all back off the same way, so an outage looks the same in every log.

use std::time::Duration;

use backoff::ExponentialBackoff;

/// The longest wait between two attempts; also the fallback when a backoff gives up.
pub const MAX_RECONNECT_INTERVAL: Duration = Duration::from_secs(5);

/// Exponential backoff for reconnect loops: 100 ms doubling to 5 s, forever.
pub fn reconnect_backoff() -> ExponentialBackoff {
    ExponentialBackoff {
        initial_interval: Duration::from_millis(100),
        max_interval: MAX_RECONNECT_INTERVAL,
        max_elapsed_time: None,
        ..Default::default()
    }
}

/// The next wait of `backoff` (the cap once it is exhausted, which `reconnect_backoff` never is).
pub fn next_wait(backoff: &mut ExponentialBackoff) -> Duration {
    use backoff::backoff::Backoff;
    backoff.next_backoff().unwrap_or(MAX_RECONNECT_INTERVAL)
}
