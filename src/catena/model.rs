//! Catena's webhook-subscription API on the wire (catena-control-plane.md §1.2 and §1.3): the
//! one set of types behind both our client and `fake-catena`, so the two cannot drift apart.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The API path of the subscription collection, under `CATENA_API_URL`.
pub const WEBHOOKS_PATH: &str = "/v2/notifications/webhooks";

/// The Keycloak token path, under the auth host (`CATENA_AUTH_URL` is the whole URL).
pub const TOKEN_PATH: &str = "/realms/catena/protocol/openid-connect/token";

/// What Catena shows instead of a secret, anywhere but a create response.
pub const MASKED_SECRET: &str = "*****";

/// `status` of a subscription (G4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum WebhookStatus {
    Active,
    Paused,
    Stale,
    Deleted,
}

impl WebhookStatus {
    pub const ALL: [WebhookStatus; 4] = [
        WebhookStatus::Active,
        WebhookStatus::Paused,
        WebhookStatus::Stale,
        WebhookStatus::Deleted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            WebhookStatus::Active => "active",
            WebhookStatus::Paused => "paused",
            WebhookStatus::Stale => "stale",
            WebhookStatus::Deleted => "deleted",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == text)
    }
}

/// `filters` of a subscription; we always send `null`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Filters {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet_ids: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet_refs: Option<Vec<String>>,
}

/// `POST /` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateWebhook {
    pub url: String,
    pub event_name: String,
    #[serde(default)]
    pub filters: Option<Filters>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

/// `PATCH /{id}` body: only the fields given change.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PatchWebhook {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filters: Option<Filters>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<WebhookStatus>,
}

/// A subscription as Catena returns it (`Webhook` and `WebhookRead`): the URL always masked,
/// the secret plain only in a create response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Webhook {
    pub id: String,
    pub url: String,
    pub event_name: String,
    #[serde(default)]
    pub filters: Option<Filters>,
    #[serde(default)]
    pub secret: Option<String>,
    pub status: WebhookStatus,
    #[serde(default)]
    pub partner_id: Option<String>,
    #[serde(default)]
    pub created_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub updated_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub deleted_at: Option<DateTime<Utc>>,
}

/// `GET /` answer: one page and the cursors around it (nullable).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Page<T> {
    pub items: Vec<T>,
    #[serde(default)]
    pub current_page: Option<String>,
    #[serde(default)]
    pub current_page_backwards: Option<String>,
    #[serde(default)]
    pub previous_page: Option<String>,
    #[serde(default)]
    pub next_page: Option<String>,
}

/// The windowed figures of `GET /{id}/metrics` (one per key `6h|24h|7d|14d`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WindowMetrics {
    #[serde(default)]
    pub http_attempts: u64,
    #[serde(default)]
    pub http_success_attempts: u64,
    #[serde(default)]
    pub http_failure_attempts: u64,
    #[serde(default)]
    pub message_count: u64,
    #[serde(default)]
    pub message_success_count: u64,
    /// Percent (`96`), null below 200 messages.
    #[serde(default)]
    pub success_rate: Option<f64>,
    #[serde(default)]
    pub avg_response_time_ms: Option<f64>,
}

/// `GET /{id}/metrics`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WebhookMetrics {
    #[serde(default, rename = "6h")]
    pub h6: Option<WindowMetrics>,
    #[serde(default, rename = "24h")]
    pub h24: Option<WindowMetrics>,
    #[serde(default, rename = "7d")]
    pub d7: Option<WindowMetrics>,
    #[serde(default, rename = "14d")]
    pub d14: Option<WindowMetrics>,
    /// A fraction (`0.98`), nullable.
    #[serde(default)]
    pub ewma_success_rate: Option<f64>,
    #[serde(default)]
    pub dlq_count: u64,
}

/// `status` of a delivery log entry (and the `status` filter of `GET /{id}/logs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryStatus {
    Success,
    Failed,
}

/// One delivery attempt in `GET /{id}/logs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeliveryLog {
    pub created_at: DateTime<Utc>,
    pub webhook_id: String,
    pub message_id: String,
    pub event_name: String,
    pub status: DeliveryStatus,
    /// 0 when no HTTP answer came (connection refused, timeout).
    pub status_code: u16,
    #[serde(default)]
    pub error_message: Option<String>,
    #[serde(default)]
    pub response_time_ms: Option<u64>,
}

/// The token endpoint's answer (client credentials).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenResponse {
    pub access_token: String,
    pub expires_in: u64,
    #[serde(default)]
    pub token_type: Option<String>,
    #[serde(default)]
    pub refresh_expires_in: Option<u64>,
    #[serde(default)]
    pub scope: Option<String>,
}

/// An error body: `{code, message, detail}`, or FastAPI's `{"detail":[{loc,msg,type}]}` on 422
/// (written without `code` and `message` when they are `None`; `detail` is always written).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ErrorBody {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default)]
    pub detail: Option<Value>,
}

impl ErrorBody {
    /// One line for a log or an error message, whichever shape came.
    pub fn summary(&self) -> String {
        if let Some(message) = &self.message {
            return message.clone();
        }
        match &self.detail {
            Some(Value::String(text)) => text.clone(),
            Some(Value::Array(items)) => items
                .iter()
                .filter_map(|item| item.get("msg").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join("; "),
            Some(other) => other.to_string(),
            None => String::new(),
        }
    }
}

/// One subject of a `webhook.*` event's `data[]` (G1 `WebhookStaled`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WebhookEventData {
    pub id: String,
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub event_name: Option<String>,
    #[serde(default)]
    pub filters: Option<Filters>,
    #[serde(default)]
    pub status: Option<WebhookStatus>,
}

/// The 22 event names we subscribe to (catena-control-plane.md §2.1, "Desired set"): concrete
/// names only, one subscription and one secret each.
pub const DESIRED_EVENTS: [&str; 22] = [
    "invitation.created",
    "invitation.sent",
    "invitation.viewed",
    "invitation.accepted",
    "invitation.declined",
    "invitation.rejected",
    "invitation.expired",
    "invitation.deleted",
    "share_agreement.created",
    "share_agreement.updated",
    "share_agreement.deleted",
    "connection.created",
    "connection.staled",
    "fleet_connection.created",
    "execution.failed",
    "schedule.deactivated",
    "webhook.created",
    "webhook.updated",
    "webhook.deleted",
    "webhook.staled",
    "webhook.activated",
    "webhook.paused",
];

/// Mask a URL the way Catena does: `scheme://host/<first segment>/*****`.
pub fn mask_url(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("https", url));
    let mut parts = rest.splitn(3, '/');
    let host = parts.next().unwrap_or_default();
    match parts.next() {
        Some(segment) if !segment.is_empty() => {
            format!("{scheme}://{host}/{segment}/{MASKED_SECRET}")
        }
        _ => format!("{scheme}://{host}/{MASKED_SECRET}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_masked_like_catena() {
        assert_eq!(
            mask_url("https://ingest.example.com/webhooks/catena"),
            "https://ingest.example.com/webhooks/*****"
        );
        assert_eq!(
            mask_url("http://127.0.0.1:8080"),
            "http://127.0.0.1:8080/*****"
        );
    }

    #[test]
    fn both_error_shapes_summarise() {
        let plain: ErrorBody =
            serde_json::from_str(r#"{"code":"Conflict","message":"exists","detail":null}"#)
                .unwrap();
        assert_eq!(plain.summary(), "exists");
        let fastapi: ErrorBody = serde_json::from_str(
            r#"{"detail":[{"loc":["body","event_name"],"msg":"bad name","type":"enum"}]}"#,
        )
        .unwrap();
        assert_eq!(fastapi.summary(), "bad name");
    }

    #[test]
    fn the_desired_set_is_22_distinct_concrete_names() {
        let set: std::collections::BTreeSet<_> = DESIRED_EVENTS.iter().collect();
        assert_eq!(set.len(), 22);
        assert!(DESIRED_EVENTS.iter().all(|n| !n.ends_with(".*")));
    }
}
