//! Answers the fake gives instead of the real one, for the client's retry tests: `fail_next`
//! rules and the optional token bucket of `rate_limit` (answering 429).

use std::time::Instant;

use axum::http::StatusCode;

use super::errors::ApiError;
use super::state::Fake;
use crate::catena::model::WEBHOOKS_PATH;

impl Fake {
    /// The error this call gets instead of being handled, if any. A matching `fail_next` rule
    /// is used up by one; the rate limit only covers the subscription API.
    pub(super) fn injected_fault(&self, method: &str, path: &str) -> Option<ApiError> {
        let mut state = self.lock();
        let rule = state.config.fail_next.iter_mut().find(|rule| {
            rule.count > 0
                && path.contains(&rule.path_contains)
                && rule
                    .method
                    .as_ref()
                    .is_none_or(|m| m.eq_ignore_ascii_case(method))
        });
        if let Some(rule) = rule {
            rule.count -= 1;
            let status =
                StatusCode::from_u16(rule.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            state.config.fail_next.retain(|rule| rule.count > 0);
            return Some(ApiError::injected(status));
        }
        let limit = state.config.rate_limit.clone()?;
        if !path.starts_with(WEBHOOKS_PATH) {
            return None;
        }
        let now = Instant::now();
        let burst = f64::from(limit.burst.max(1));
        let (tokens, last) = state.bucket.unwrap_or((burst, now));
        let tokens =
            (tokens + now.duration_since(last).as_secs_f64() * limit.per_second).min(burst);
        if tokens >= 1.0 {
            state.bucket = Some((tokens - 1.0, now));
            return None;
        }
        state.bucket = Some((tokens, now));
        let wait = if limit.per_second > 0.0 {
            ((1.0 - tokens) / limit.per_second).ceil().max(1.0) as u64
        } else {
            1
        };
        Some(ApiError::too_many_requests(
            limit.retry_after.then_some(wait),
        ))
    }
}
