//! Where notifications go: Alertmanager's v2 API, and a generic JSON webhook (Slack-compatible
//! `text` field) for teams without Alertmanager.

use std::time::Duration;

use chrono::{SecondsFormat, Utc};
use serde_json::{Value, json};

use super::{Alert, AlertKind};

/// What one outbox row announces.
pub enum Notification {
    /// An alert opened (or re-sent while open): firing.
    Firing {
        alert: Alert,
        reauth_link: Option<String>,
    },
    /// An alert resolved: `endsAt` set.
    Resolved { alert: Alert },
    /// An escalation that is not an alert row (execution failures over the threshold).
    Warning { payload: Value },
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("HTTP {0}")]
    Status(u16),
    #[error("{0}")]
    Transport(String),
}

#[derive(Clone)]
pub enum Sink {
    Alertmanager {
        client: reqwest::Client,
        url: String,
    },
    Webhook {
        client: reqwest::Client,
        url: String,
    },
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("building an HTTP client")
}

impl Sink {
    pub fn alertmanager(base: &str) -> Self {
        Sink::Alertmanager {
            client: client(),
            url: format!("{}/api/v2/alerts", base.trim_end_matches('/')),
        }
    }

    pub fn webhook(url: &str) -> Self {
        Sink::Webhook {
            client: client(),
            url: url.to_owned(),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Sink::Alertmanager { .. } => "alertmanager",
            Sink::Webhook { .. } => "webhook",
        }
    }

    /// Deliver one notification. The body may carry the fleet's re-authentication link, so it
    /// is never logged; errors carry only status codes and transport messages.
    pub async fn send(&self, outbox_id: i64, notification: &Notification) -> Result<(), SinkError> {
        let (client, url, body) = match self {
            Sink::Alertmanager { client, url } => {
                (client, url, json!([alertmanager_alert(notification)]))
            }
            Sink::Webhook { client, url } => (client, url, webhook_body(outbox_id, notification)),
        };
        post(client, url, &body).await
    }
}

impl Sink {
    /// Many notifications in one Alertmanager request (its API takes an array); other sinks
    /// take them one at a time.
    pub async fn send_alertmanager_batch(
        &self,
        notifications: &[Notification],
    ) -> Result<(), SinkError> {
        let Sink::Alertmanager { client, url } = self else {
            for notification in notifications {
                self.send(0, notification).await?;
            }
            return Ok(());
        };
        let body: Value = notifications.iter().map(alertmanager_alert).collect();
        post(client, url, &body).await
    }
}

async fn post(client: &reqwest::Client, url: &str, body: &Value) -> Result<(), SinkError> {
    let response = client
        .post(url)
        .json(body)
        .send()
        .await
        .map_err(|e| SinkError::Transport(describe(&e)))?;
    if response.status().is_success() {
        Ok(())
    } else {
        Err(SinkError::Status(response.status().as_u16()))
    }
}

/// A transport error without its URL (a webhook URL can embed a token).
fn describe(error: &reqwest::Error) -> String {
    if error.is_timeout() {
        "timed out".into()
    } else if error.is_connect() {
        "connection refused or unreachable".into()
    } else {
        "request failed".into()
    }
}

fn ts(t: chrono::DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn labels(alert: &Alert) -> serde_json::Map<String, Value> {
    let mut labels = serde_json::Map::new();
    labels.insert("alertname".into(), alert.kind.alertname().into());
    labels.insert("severity".into(), alert.severity().into());
    labels.insert("alert_id".into(), alert.alert_id.to_string().into());
    if let Some(fleet_ref) = &alert.fleet_ref {
        labels.insert("fleet_ref".into(), fleet_ref.clone().into());
    }
    if let Some(fleet_id) = alert.fleet_id {
        labels.insert("fleet_id".into(), fleet_id.to_string().into());
    }
    let subject = match alert.kind {
        AlertKind::ConnectionStale => "connection_id",
        AlertKind::ScheduleDeactivated => "schedule_id",
        AlertKind::WebhookStale | AlertKind::WebhookDlqBacklog | AlertKind::WebhookMissing => {
            "webhook_id"
        }
    };
    labels.insert(subject.into(), alert.subject_id.to_string().into());
    for key in ["source_name", "resource", "connection_id", "event_name"] {
        if let Some(value) = alert.details[key].as_str()
            && !labels.contains_key(key)
        {
            labels.insert(key.into(), value.into());
        }
    }
    labels
}

/// One alert in Alertmanager's v2 `postableAlert` shape.
pub fn alertmanager_alert(notification: &Notification) -> Value {
    match notification {
        Notification::Firing { alert, reauth_link } => {
            let mut annotations = json!({
                "summary": alert.summary(),
                "description": alert.action(),
            });
            if let Some(link) = reauth_link {
                annotations["reauth_link"] = link.clone().into();
            }
            json!({
                "labels": labels(alert),
                "annotations": annotations,
                "startsAt": ts(alert.opened_at),
            })
        }
        Notification::Resolved { alert } => json!({
            "labels": labels(alert),
            "annotations": {"summary": alert.summary(), "description": alert.action()},
            "startsAt": ts(alert.opened_at),
            "endsAt": ts(alert.resolved_at.unwrap_or_else(Utc::now)),
        }),
        Notification::Warning { payload } if payload["alertname"].is_string() => {
            // A warning that says everything itself (the reconciler's).
            let mut labels = json!({"alertname": payload["alertname"], "severity": "warning"});
            for key in ["webhook_id", "event_name"] {
                if let Some(v) = payload[key].as_str() {
                    labels[key] = v.into();
                }
            }
            json!({
                "labels": labels,
                "annotations": {"summary": payload["summary"], "description": payload["description"]},
                "startsAt": ts(Utc::now()),
                "endsAt": ts(Utc::now() + chrono::Duration::hours(1)),
            })
        }
        Notification::Warning { payload } => {
            let mut labels = json!({"alertname": "CatenaExecutionFailures", "severity": "warning"});
            for key in [
                "schedule_id",
                "fleet_ref",
                "fleet_id",
                "connection_id",
                "resource",
                "source_name",
            ] {
                if let Some(v) = payload[key].as_str() {
                    labels[key] = v.into();
                }
            }
            // A warning is a one-off: it ends on its own after one window.
            let window = payload["window_seconds"].as_i64().unwrap_or(3600);
            json!({
                "labels": labels,
                "annotations": {
                    "summary": format!("Schedule {} failed {} times within {} s", payload["schedule_id"].as_str().unwrap_or("?"), payload["failures"], window),
                    "description": "Catena retries failed executions by itself; repeated failures usually precede schedule.deactivated. Check the TSP connection with the fleet.",
                },
                "startsAt": ts(Utc::now()),
                "endsAt": ts(Utc::now() + chrono::Duration::seconds(window)),
            })
        }
    }
}

fn webhook_body(outbox_id: i64, notification: &Notification) -> Value {
    match notification {
        Notification::Firing { alert, .. } => json!({
            "text": format!(":rotating_light: {} - {}", alert.summary(), alert.action()),
            "action": "open",
            "outbox_id": outbox_id,
            "alert": alert,
        }),
        Notification::Resolved { alert } => json!({
            "text": format!(":white_check_mark: resolved: {}", alert.summary()),
            "action": "resolve",
            "outbox_id": outbox_id,
            "alert": alert,
        }),
        Notification::Warning { payload } if payload["summary"].is_string() => json!({
            "text": format!(":warning: {}", payload["summary"].as_str().unwrap_or_default()),
            "action": "warning",
            "outbox_id": outbox_id,
            "warning": payload,
        }),
        Notification::Warning { payload } => json!({
            "text": format!(":warning: schedule {} failed {} times within the window", payload["schedule_id"].as_str().unwrap_or("?"), payload["failures"]),
            "action": "warning",
            "outbox_id": outbox_id,
            "warning": payload,
        }),
    }
}
