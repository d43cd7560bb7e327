//! HTTP as Catena and operators speak it: signed webhook POSTs, status probes, scrapes.

use std::time::Duration;

use super::poll::wait_until;
use super::{SECRET, WEBHOOK_ID};

/// A signed, Catena-shaped POST.
pub struct Post<'a> {
    pub body: Vec<u8>,
    pub secret: &'a str,
    pub webhook_id: &'a str,
    pub timestamp: String,
    pub gzip: bool,
}

impl<'a> Post<'a> {
    pub fn new(body: &[u8]) -> Self {
        Self {
            body: body.to_vec(),
            secret: SECRET,
            webhook_id: WEBHOOK_ID,
            timestamp: chrono::Utc::now().to_rfc3339(),
            gzip: true,
        }
    }

    pub fn request(&self, client: &reqwest::Client, url: &str) -> reqwest::RequestBuilder {
        let signature = sign(self.secret, &self.timestamp, &self.body);
        let builder = client
            .post(url)
            .header("Content-Type", "application/json")
            .header("X-Catena-Signature", signature)
            .header("X-Catena-Timestamp", &self.timestamp)
            .header("X-Webhook-ID", self.webhook_id)
            .header("X-Event-Type", "connection.staled")
            .header("X-Request-ID", uuid::Uuid::new_v4().to_string())
            .header("X-Schema-Version", "1.0")
            .header("X-Source", "catena-notifications")
            .header("X-Delivery-Attempt", "1");
        if self.gzip {
            builder
                .header("Content-Encoding", "gzip")
                .body(catena_ingest::relay::gunzip::gzip(&self.body))
        } else {
            builder.body(self.body.clone())
        }
    }

    pub async fn send(&self, client: &reqwest::Client, url: &str) -> u16 {
        self.request(client, url)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }
}

/// `X-Catena-Signature` of `body` at `timestamp`.
pub fn sign(secret: &str, timestamp: &str, body: &[u8]) -> String {
    catena_ingest::relay::signature::sign(secret.as_bytes(), timestamp, body)
}

/// The status of a GET, 0 when there is no answer at all.
pub async fn http_status(url: &str) -> u16 {
    reqwest::get(url)
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

/// The body of a GET (a metrics scrape).
pub async fn get_text(url: &str) -> String {
    reqwest::get(url).await.unwrap().text().await.unwrap()
}

/// Whether a GET of `url` answers 2xx within `timeout`.
pub async fn wait_http_ok(url: &str, timeout: Duration) -> bool {
    wait_until(timeout, || async {
        reqwest::get(url)
            .await
            .is_ok_and(|r| r.status().is_success())
    })
    .await
}

/// The value of one `name{labels} value` line of a Prometheus exposition.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}
