//! A subscription's health: message outcomes, their EWMA, the S4 circuit breaker and the figures
//! of `GET /{id}/metrics`.
//!
//! Health counts messages, not attempts, and a message's outcome is its latest: a message that
//! was dead-lettered and then delivered by a replay counts as a success.

use std::collections::HashMap;

use chrono::{DateTime, Duration, Utc};

use crate::catena::model::{DeliveryLog, DeliveryStatus, WebhookMetrics, WindowMetrics};

#[derive(Debug, Default)]
pub(super) struct Health {
    /// Latest outcome per message, keyed by the fake's message number (which a replay keeps even
    /// when it re-mints the envelope id).
    outcomes: HashMap<u64, Outcome>,
    ewma: Option<f64>,
    consecutive_failures: u32,
}

#[derive(Debug, Clone, Copy)]
struct Outcome {
    at: DateTime<Utc>,
    success: bool,
}

/// What decides a trip, read from the config at each evaluation.
#[derive(Debug, Clone, Copy)]
pub(super) struct Breaker {
    pub window: Duration,
}

impl Health {
    /// Record a message's (new) outcome and fold it into the EWMA, which starts at the first
    /// outcome.
    pub fn record(&mut self, message: u64, success: bool, at: DateTime<Utc>, alpha: f64) {
        self.outcomes.insert(message, Outcome { at, success });
        let x = if success { 1.0 } else { 0.0 };
        self.ewma = Some(match self.ewma {
            Some(previous) => alpha * x + (1.0 - alpha) * previous,
            None => x,
        });
        self.consecutive_failures = if success {
            0
        } else {
            self.consecutive_failures + 1
        };
    }

    /// S4, by the number of messages in the window: from 50 the EWMA must stay at 0.95, from 20
    /// the success rate at 80 %, below that 10 failures in a row trip.
    pub fn should_trip(&self, now: DateTime<Utc>, breaker: Breaker) -> bool {
        let (count, successes) = self.messages_since(now - breaker.window);
        match count {
            50.. => self.ewma.is_some_and(|ewma| ewma < 0.95),
            20..=49 => (successes as f64) < 0.8 * count as f64,
            _ => self.consecutive_failures >= 10,
        }
    }

    fn messages_since(&self, since: DateTime<Utc>) -> (u64, u64) {
        self.outcomes
            .values()
            .filter(|o| o.at >= since)
            .fold((0, 0), |(count, ok), o| {
                (count + 1, ok + u64::from(o.success))
            })
    }

    /// The answer of `GET /{id}/metrics`; `attempts` are this subscription's delivery logs.
    pub fn metrics<'a>(
        &self,
        attempts: impl Iterator<Item = &'a DeliveryLog> + Clone,
        dlq_count: usize,
        now: DateTime<Utc>,
        min_messages_for_rate: u64,
    ) -> WebhookMetrics {
        let window = |length: Duration| {
            let since = now - length;
            let (message_count, message_success_count) = self.messages_since(since);
            let in_window = attempts.clone().filter(|a| a.created_at >= since);
            let (mut http_attempts, mut http_success_attempts) = (0, 0);
            let (mut timed, mut total_ms) = (0u64, 0u64);
            for attempt in in_window {
                http_attempts += 1;
                http_success_attempts += u64::from(attempt.status == DeliveryStatus::Success);
                if let Some(ms) = attempt.response_time_ms {
                    timed += 1;
                    total_ms += ms;
                }
            }
            Some(WindowMetrics {
                http_attempts,
                http_success_attempts,
                http_failure_attempts: http_attempts - http_success_attempts,
                message_count,
                message_success_count,
                success_rate: (message_count >= min_messages_for_rate.max(1))
                    .then(|| 100.0 * message_success_count as f64 / message_count as f64),
                avg_response_time_ms: (timed > 0).then(|| total_ms as f64 / timed as f64),
            })
        };
        WebhookMetrics {
            h6: window(Duration::hours(6)),
            h24: window(Duration::hours(24)),
            d7: window(Duration::days(7)),
            d14: window(Duration::days(14)),
            ewma_success_rate: self.ewma,
            dlq_count: dlq_count as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BREAKER: Breaker = Breaker {
        window: Duration::hours(6),
    };

    #[test]
    fn few_messages_trip_on_ten_failures_in_a_row() {
        let now = Utc::now();
        let mut health = Health::default();
        for n in 0..9 {
            health.record(n, false, now, 0.1);
        }
        assert!(!health.should_trip(now, BREAKER));
        health.record(9, true, now, 0.1);
        health.record(10, false, now, 0.1);
        assert!(
            !health.should_trip(now, BREAKER),
            "the success broke the run"
        );
        health.record(9, false, now, 0.1);
        assert!(!health.should_trip(now, BREAKER), "a message counts once");
    }

    #[test]
    fn a_successful_replay_turns_a_failure_into_a_success() {
        let now = Utc::now();
        let mut health = Health::default();
        for n in 0..30 {
            health.record(n, n % 2 == 0, now, 0.1);
        }
        assert!(health.should_trip(now, BREAKER), "50 % with 30 messages");
        for n in 0..30 {
            health.record(n, true, now, 0.1);
        }
        assert!(!health.should_trip(now, BREAKER));
        let metrics = health.metrics(std::iter::empty(), 0, now, 20);
        let h6 = metrics.h6.unwrap();
        assert_eq!((h6.message_count, h6.message_success_count), (30, 30));
        assert_eq!(h6.success_rate, Some(100.0));
        assert_eq!(
            health
                .metrics(std::iter::empty(), 0, now, 200)
                .h6
                .unwrap()
                .success_rate,
            None
        );
    }

    #[test]
    fn many_messages_trip_on_the_ewma() {
        let now = Utc::now();
        let mut health = Health::default();
        for n in 0..60 {
            health.record(n, true, now, 0.1);
        }
        health.record(60, false, now, 0.1);
        assert!(health.should_trip(now, BREAKER), "0.9 < 0.95");
    }
}
