//! The one reconnect policy: broker sessions, consumers, migrations and a batch held while the
//! database is away all back off the same way, so an outage looks the same in every log.

use std::time::Duration;

use backoff::ExponentialBackoff;

/// The longest wait between two attempts; also the fallback when a backoff gives up.
pub const MAX_RECONNECT_INTERVAL: Duration = Duration::from_secs(5);

/// Exponential backoff for reconnect loops: 100 ms doubling to 5 s, forever.
pub fn reconnect_backoff() -> ExponentialBackoff {
    let initial = Duration::from_millis(100);
    ExponentialBackoff {
        // The crate starts from `current_interval` (its default is 500 ms), not from
        // `initial_interval`, until the first reset.
        current_interval: initial,
        initial_interval: initial,
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

/// How long a session must have stayed up before its loss counts as a fresh start.
pub const STABLE_SESSION: Duration = Duration::from_secs(10);

/// A reconnect loop's pacing: exponential backoff between attempts, reset only once a session
/// has stayed up for [`STABLE_SESSION`], so a session that dies right after it opens (a broker
/// that accepts and then closes, a black hole) cannot make the loop spin.
pub struct Reconnect {
    backoff: ExponentialBackoff,
    up_since: Option<std::time::Instant>,
}

impl Default for Reconnect {
    fn default() -> Self {
        Self {
            backoff: reconnect_backoff(),
            up_since: None,
        }
    }
}

impl Reconnect {
    /// A session is up.
    pub fn up(&mut self) {
        self.up_since = Some(std::time::Instant::now());
    }

    /// The session was lost, or an attempt failed: how long to wait before the next attempt.
    pub fn down(&mut self) -> Duration {
        use backoff::backoff::Backoff;
        if self
            .up_since
            .take()
            .is_some_and(|since| since.elapsed() >= STABLE_SESSION)
        {
            self.backoff.reset();
        }
        next_wait(&mut self.backoff)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_that_dies_at_once_backs_off() {
        let mut pacing = Reconnect::default();
        let waits: Vec<Duration> = (0..6)
            .map(|_| {
                pacing.up();
                pacing.down()
            })
            .collect();
        // 100 ms growing by 1.5x with ±50% jitter: the sixth is at least 380 ms, the first at
        // most 150 ms.
        assert!(waits[0] <= Duration::from_millis(150), "{waits:?}");
        assert!(waits[5] >= Duration::from_millis(380), "{waits:?}");
    }
}
