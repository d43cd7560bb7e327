//! `catena-ingest send`: sign and POST webhooks exactly the way Catena does.
//!
//! gzip body, `X-Catena-Timestamp` + HMAC signature over the uncompressed bytes, every header of
//! Catena's sample request, and Catena's retry behaviour on 5xx/timeouts (the same event with a
//! higher `X-Delivery-Attempt`). It is the demo, the load generator and a test tool.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{SecondsFormat, Utc};
use hdrhistogram::Histogram;
use tokio::sync::{Mutex, Semaphore};

use super::scenario::{Delivery, Event};
use crate::broker::EventPublisher;
use crate::config::DeliverySettings;
use crate::message::{CatenaHeaders, EventMeta};
use crate::relay::gunzip::gzip;
use crate::relay::signature::sign;

#[derive(Clone, Debug)]
pub struct SendOptions {
    /// Full webhook URL, e.g. http://127.0.0.1:8080/webhooks/catena
    pub url: String,
    /// The signing secret's bytes (the HMAC key).
    pub secret: Vec<u8>,
    pub delivery: DeliverySettings,
}

impl SendOptions {
    /// Deliver to `url` signing with `secret`, with the default delivery settings.
    pub fn new(url: &str, secret: impl AsRef<[u8]>) -> Self {
        Self {
            url: url.to_owned(),
            secret: secret.as_ref().to_vec(),
            delivery: DeliverySettings::default(),
        }
    }

    fn gzip(&self) -> bool {
        !self.delivery.no_gzip
    }
}

/// What happened to each delivery, and latencies of every HTTP exchange.
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub struct SendReport {
    pub deliveries: u64,
    /// Deliveries that ended in a 2xx (after retries).
    pub accepted: u64,
    /// Deliveries refused with a 4xx (not retried, as Catena does not).
    pub rejected: u64,
    /// Deliveries still failing after every retry (Catena would dead-letter them).
    pub failed: u64,
    /// HTTP attempts beyond the first.
    pub retries: u64,
    pub requests: u64,
    pub elapsed_seconds: f64,
    pub accepted_per_second: f64,
    pub latency_ms_p50: f64,
    pub latency_ms_p90: f64,
    pub latency_ms_p99: f64,
    pub latency_ms_max: f64,
    /// Indexes (into the delivery list) of deliveries that got a 2xx.
    #[serde(skip)]
    pub accepted_deliveries: Vec<usize>,
    /// Status counts, e.g. {"202": 100, "503": 3}.
    pub statuses: std::collections::BTreeMap<String, u64>,
}

impl SendReport {
    pub fn print(&self) {
        println!(
            "deliveries={} accepted={} rejected={} failed={} retries={} in {:.2}s -> {:.0} accepted/s",
            self.deliveries,
            self.accepted,
            self.rejected,
            self.failed,
            self.retries,
            self.elapsed_seconds,
            self.accepted_per_second
        );
        println!(
            "latency ms: p50={:.2} p90={:.2} p99={:.2} max={:.2}   statuses: {:?}",
            self.latency_ms_p50,
            self.latency_ms_p90,
            self.latency_ms_p99,
            self.latency_ms_max,
            self.statuses
        );
    }
}

/// One prepared request: the body and how to address it.
pub struct Outgoing {
    pub event_name: String,
    pub webhook_id: String,
    body: Vec<u8>,
    /// Compressed body, timestamp and signature made ahead of time (see [`Outgoing::prepare`]).
    prepared: Option<Prepared>,
}

struct Prepared {
    wire_body: bytes::Bytes,
    timestamp: String,
    signature: String,
}

impl Outgoing {
    pub fn new(event_name: &str, webhook_id: &str, body: Vec<u8>) -> Self {
        Self {
            event_name: event_name.to_owned(),
            webhook_id: webhook_id.to_owned(),
            body,
            prepared: None,
        }
    }

    /// Compress and sign now, so a load run spends its CPU on sending, not on making requests.
    /// The signature stays valid for the relay's 5-minute window.
    pub fn prepare(mut self, options: &SendOptions) -> Self {
        let timestamp = Utc::now().to_rfc3339_opts(SecondsFormat::Secs, false);
        let signature = sign(&options.secret, &timestamp, &self.body);
        let wire_body = if options.gzip() {
            gzip(&self.body).into()
        } else {
            bytes::Bytes::copy_from_slice(&self.body)
        };
        self.prepared = Some(Prepared {
            wire_body,
            timestamp,
            signature,
        });
        self
    }

    /// [`catena_headers`] for this request: behind both [`send_to`] and [`Outgoing::raw_http`], so
    /// the wrk corpus sends what `send` sends.
    fn headers(
        &self,
        timestamp: &str,
        signature: &str,
        attempt: u32,
        gzip: bool,
    ) -> Vec<(&'static str, String)> {
        catena_headers(
            &self.event_name,
            &self.webhook_id,
            timestamp,
            signature,
            attempt,
            gzip,
        )
    }

    /// This request (first attempt) as raw HTTP/1.1 bytes, for a load generator that replays a
    /// corpus (wrk). Compresses and signs now if not prepared.
    pub fn raw_http(self, options: &SendOptions) -> Vec<u8> {
        let out = if self.prepared.is_some() {
            self
        } else {
            self.prepare(options)
        };
        let p = out.prepared.as_ref().expect("prepared above");
        let without_scheme = options
            .url
            .split_once("://")
            .map_or(&*options.url, |(_, r)| r);
        let (host, path) = without_scheme
            .split_once('/')
            .map_or((without_scheme, "/".to_owned()), |(h, p)| {
                (h, format!("/{p}"))
            });
        let mut head = format!("POST {path} HTTP/1.1\r\nHost: {host}\r\n");
        for (name, value) in out.headers(&p.timestamp, &p.signature, 1, options.gzip()) {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str(&format!("Content-Length: {}\r\n\r\n", p.wire_body.len()));
        let mut raw = head.into_bytes();
        raw.extend_from_slice(&p.wire_body);
        raw
    }

    pub fn from_delivery(events: &[Event], delivery: &Delivery) -> Self {
        let event = &events[delivery.event];
        Self::new(
            &event.event_name,
            event.webhook_id(),
            event.body(delivery.attempt),
        )
    }
}

/// Catena's headers for one delivery attempt (S1), in the order Catena sends them, with a fresh
/// `X-Request-ID`. Shared by `send` and `fake-catena`, so both deliver alike.
pub fn catena_headers(
    event_name: &str,
    webhook_id: &str,
    timestamp: &str,
    signature: &str,
    attempt: u32,
    gzip: bool,
) -> Vec<(&'static str, String)> {
    let mut headers = vec![
        ("Content-Type", "application/json".to_owned()),
        ("User-Agent", "Catena-Webhook".to_owned()),
        ("Accept", "application/json".to_owned()),
        ("X-Catena-Signature", signature.to_owned()),
        ("X-Catena-Timestamp", timestamp.to_owned()),
        ("X-Event-Type", event_name.to_owned()),
        ("X-Webhook-ID", webhook_id.to_owned()),
        ("X-Request-ID", uuid::Uuid::new_v4().to_string()),
        ("X-Schema-Version", "1.0".to_owned()),
        ("X-Source", "catena-notifications".to_owned()),
        ("X-Delivery-Attempt", attempt.to_string()),
    ];
    if gzip {
        headers.push(("Content-Encoding", "gzip".to_owned()));
    }
    headers
}

struct Shared {
    report: SendReport,
    histogram: Histogram<u64>,
}

pub fn client(options: &SendOptions) -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(options.delivery.timeout)
        .pool_max_idle_per_host(options.delivery.concurrency.max(1))
        .build()
        .expect("building an HTTP client")
}

/// Send every request, `concurrency` at a time, at most `rate` per second.
pub async fn send_all(options: &SendOptions, outgoing: Vec<Outgoing>) -> SendReport {
    let count = outgoing.len();
    send_stream(options, outgoing.into_iter(), count, None).await
}

/// Where `send` delivers.
#[derive(Clone)]
pub enum Target {
    /// POST to the relay, as Catena does.
    Http(reqwest::Client),
    /// Publish with confirm straight to the broker (the broker-only baseline).
    Amqp(EventPublisher),
}

/// Send from an iterator (generated lazily), stopping at `deadline` if given.
pub async fn send_stream(
    options: &SendOptions,
    outgoing: impl Iterator<Item = Outgoing>,
    count_hint: usize,
    deadline: Option<Instant>,
) -> SendReport {
    send_to(
        options,
        Target::Http(client(options)),
        outgoing,
        count_hint,
        deadline,
    )
    .await
}

pub async fn send_to(
    options: &SendOptions,
    target: Target,
    outgoing: impl Iterator<Item = Outgoing>,
    count_hint: usize,
    deadline: Option<Instant>,
) -> SendReport {
    let permits = Arc::new(Semaphore::new(options.delivery.concurrency.max(1)));
    let shared = Arc::new(Mutex::new(Shared {
        report: SendReport {
            deliveries: count_hint as u64,
            ..Default::default()
        },
        histogram: Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds"),
    }));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let mut sent = 0usize;
    for (index, out) in outgoing.enumerate() {
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        sent += 1;
        if options.delivery.rate > 0.0 {
            let due = started + Duration::from_secs_f64(index as f64 / options.delivery.rate);
            tokio::time::sleep_until(due.into()).await;
        }
        let permit = permits
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore open");
        let (target, options, shared) = (target.clone(), options.clone(), shared.clone());
        tasks.spawn(async move {
            let _permit = permit;
            match &target {
                Target::Http(client) => deliver(client, &options, index, out, &shared).await,
                Target::Amqp(events) => publish(events, index, out, &shared).await,
            }
        });
        // Reap finished tasks as we go so the set stays small on long runs.
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    let elapsed = started.elapsed().as_secs_f64();
    let shared = Arc::try_unwrap(shared)
        .ok()
        .expect("all tasks finished")
        .into_inner();
    let mut report = shared.report;
    report.deliveries = sent as u64;
    let h = shared.histogram;
    report.elapsed_seconds = elapsed;
    report.accepted_per_second = report.accepted as f64 / elapsed.max(1e-9);
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    report.latency_ms_p50 = ms(0.5);
    report.latency_ms_p90 = ms(0.9);
    report.latency_ms_p99 = ms(0.99);
    report.latency_ms_max = h.max() as f64 / 1000.0;
    report.accepted_deliveries.sort_unstable();
    report
}

/// Broker-only path: the relay's publish (the same shape and grouping, persistent, mandatory,
/// confirmed).
async fn publish(events: &EventPublisher, index: usize, out: Outgoing, shared: &Mutex<Shared>) {
    let catena = CatenaHeaders {
        webhook_id: Some(&out.webhook_id),
        event_type: Some(&out.event_name),
        delivery_attempt: Some("1"),
        ..Default::default()
    };
    let meta = EventMeta::of_request(&catena, &out.event_name, Utc::now());
    let t0 = Instant::now();
    let result = events.publish(meta, Box::new(out.body)).await;
    let micros = t0.elapsed().as_micros() as u64;
    let mut s = shared.lock().await;
    s.report.requests += 1;
    let _ = s.histogram.record(micros.max(1));
    let label = if result.is_ok() {
        "confirmed"
    } else {
        "failed"
    };
    *s.report.statuses.entry(label.to_owned()).or_default() += 1;
    if result.is_ok() {
        s.report.accepted += 1;
        s.report.accepted_deliveries.push(index);
    } else {
        s.report.failed += 1;
    }
}

async fn deliver(
    client: &reqwest::Client,
    options: &SendOptions,
    index: usize,
    out: Outgoing,
    shared: &Mutex<Shared>,
) {
    let wire_body: bytes::Bytes = match &out.prepared {
        Some(p) => p.wire_body.clone(),
        None if options.gzip() => gzip(&out.body).into(),
        None => bytes::Bytes::copy_from_slice(&out.body),
    };
    let mut attempt = 1u32;
    loop {
        let (timestamp, signature) = match (&out.prepared, attempt) {
            (Some(p), 1) => (p.timestamp.clone(), p.signature.clone()),
            _ => {
                let timestamp = Utc::now().to_rfc3339_opts(SecondsFormat::Secs, false);
                let signature = sign(&options.secret, &timestamp, &out.body);
                (timestamp, signature)
            }
        };
        let mut request = client.post(&options.url);
        for (name, value) in out.headers(&timestamp, &signature, attempt, options.gzip()) {
            request = request.header(name, value);
        }
        request = request.body(wire_body.clone());
        let t0 = Instant::now();
        let status = request.send().await.map(|r| r.status().as_u16()).ok();
        let micros = t0.elapsed().as_micros() as u64;
        let mut s = shared.lock().await;
        s.report.requests += 1;
        let _ = s.histogram.record(micros.max(1));
        let label = status.map_or_else(|| "error".to_owned(), |c| c.to_string());
        *s.report.statuses.entry(label).or_default() += 1;
        match status {
            Some(code) if (200..300).contains(&code) => {
                s.report.accepted += 1;
                s.report.accepted_deliveries.push(index);
                return;
            }
            Some(code) if (400..500).contains(&code) => {
                s.report.rejected += 1;
                return;
            }
            _ if attempt > options.delivery.retries => {
                s.report.failed += 1;
                return;
            }
            _ => {
                s.report.retries += 1;
                drop(s);
                // Catena: exponential backoff, all retries inside ~5 s.
                tokio::time::sleep(Duration::from_millis(250 << (attempt - 1))).await;
                attempt += 1;
            }
        }
    }
}

/// Write `outgoing` as a corpus for `scripts/wrk-corpus.lua`: each request as its length in
/// decimal, a newline, then the raw HTTP bytes. Returns (requests, bytes).
pub fn write_wrk_corpus(
    path: &std::path::Path,
    options: &SendOptions,
    outgoing: impl Iterator<Item = Outgoing>,
) -> std::io::Result<(usize, u64)> {
    use std::io::Write;
    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    let (mut requests, mut bytes) = (0usize, 0u64);
    for out in outgoing {
        let raw = out.raw_http(options);
        writeln!(file, "{}", raw.len())?;
        file.write_all(&raw)?;
        requests += 1;
        bytes += raw.len() as u64;
    }
    file.flush()?;
    Ok((requests, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::secrets::SecretStore;
    use crate::relay::signature::{SignedHeaders, Window, verify};

    /// A corpus request is one the relay accepts: parse it back and verify it as the relay does.
    #[test]
    fn raw_http_is_a_signed_request_the_relay_accepts() {
        let options =
            SendOptions::new("http://127.0.0.1:8080/webhooks/catena", "s3cret-0123456789");
        let body = br#"{"event_name":"connection.created","webhook_id":"w1"}"#.to_vec();
        let raw = Outgoing::new("connection.created", "w1", body.clone()).raw_http(&options);

        let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        let (head, wire_body) = (
            std::str::from_utf8(&raw[..split]).unwrap(),
            &raw[split + 4..],
        );
        let mut lines = head.split("\r\n");
        assert_eq!(lines.next(), Some("POST /webhooks/catena HTTP/1.1"));
        let headers: std::collections::HashMap<String, &str> = lines
            .map(|l| l.split_once(": ").unwrap())
            .map(|(k, v)| (k.to_ascii_lowercase(), v))
            .collect();
        assert_eq!(headers["host"], "127.0.0.1:8080");
        assert_eq!(headers["content-length"], wire_body.len().to_string());
        assert_eq!(headers["content-encoding"], "gzip");
        assert_eq!(headers["x-event-type"], "connection.created");

        let plain = crate::relay::gunzip::gunzip_capped(wire_body, 1 << 20).unwrap();
        assert_eq!(plain, body);
        let mut secrets = SecretStore::default();
        secrets.insert("w1", "s3cret-0123456789");
        let signed = SignedHeaders {
            timestamp: Some(headers["x-catena-timestamp"]),
            signature: Some(headers["x-catena-signature"]),
            webhook_id: Some(headers["x-webhook-id"]),
        };
        assert!(verify(&secrets, signed, &plain, Utc::now(), Window::default()).is_ok());
    }
}
