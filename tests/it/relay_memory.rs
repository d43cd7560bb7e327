//! The relay's memory is bounded by its configuration (README, "Memory budget"): the real binary,
//! given a small `RELAY_MEMORY_BUDGET_BYTES`, is flooded with gzip bombs, bodies at the caps and
//! slow uploads while a signed stream keeps going. Its peak RSS (`VmHWM`) must stay within the
//! budget over its own baseline, and the signed stream must keep getting 202.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use catena_ingest::config::RelaySettings;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::helpers::http::{get_text, metric_value, sign, wait_http_ok};
use crate::helpers::*;

/// The relay's budget in this test: small, so the flood below is many times over it.
const BUDGET: usize = 32 << 20;
/// How long the flood lasts (each flooding task also stops after [`MAX_PER_TASK`] requests).
const FLOOD: Duration = Duration::from_secs(8);
const MAX_PER_TASK: usize = 2_000;

/// Statuses by kind of request (`0` = no HTTP answer: the connection was refused or cut).
#[derive(Default)]
struct Tally(Mutex<BTreeMap<&'static str, BTreeMap<u16, usize>>>);

impl Tally {
    fn add(&self, kind: &'static str, status: u16) {
        *self
            .0
            .lock()
            .unwrap()
            .entry(kind)
            .or_default()
            .entry(status)
            .or_default() += 1;
    }

    fn of(&self, kind: &str) -> BTreeMap<u16, usize> {
        self.0
            .lock()
            .unwrap()
            .get(kind)
            .cloned()
            .unwrap_or_default()
    }
}

/// A signed-looking POST of `body`: a fresh timestamp (so the relay gets as far as the HMAC),
/// signed with a secret the relay does not have unless `valid`.
fn post(
    client: &reqwest::Client,
    url: &str,
    body: Bytes,
    signed_body: &[u8],
    gzipped: bool,
    valid: bool,
) -> reqwest::RequestBuilder {
    let ts = chrono::Utc::now().to_rfc3339();
    let secret = if valid { SECRET } else { "not-the-secret" };
    let request = client
        .post(url)
        .header("X-Webhook-ID", WEBHOOK_ID)
        .header("X-Catena-Timestamp", &ts)
        .header("X-Catena-Signature", sign(secret, &ts, signed_body))
        .header("X-Event-Type", "connection.staled");
    let request = if gzipped {
        request.header("Content-Encoding", "gzip")
    } else {
        request
    };
    request.body(body)
}

async fn status_of(request: reqwest::RequestBuilder) -> u16 {
    match request.send().await {
        Ok(response) => {
            let status = response.status().as_u16();
            let _ = response.bytes().await;
            status
        }
        Err(_) => 0,
    }
}

/// POST `body` in a loop until `deadline`.
fn flood_posts(
    tally: &Arc<Tally>,
    kind: &'static str,
    url: &str,
    body: Bytes,
    gzipped: bool,
    deadline: Instant,
) -> tokio::task::JoinHandle<()> {
    let (tally, url) = (tally.clone(), url.to_owned());
    tokio::spawn(async move {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(15))
            .build()
            .unwrap();
        for _ in 0..MAX_PER_TASK {
            if Instant::now() >= deadline {
                break;
            }
            // The signature covers something else: these bodies are refused, never published.
            let request = post(&client, &url, body.clone(), b"x", gzipped, false);
            tally.add(kind, status_of(request).await);
        }
    })
}

/// Raw connections that send `head` and then `prefix` of a body announced as `announced`
/// bytes, then trickle `trickle` bytes every 100 ms (or nothing), until the relay answers or
/// hangs up, or `deadline`; then again on a new connection.
fn slow_uploads(
    tally: &Arc<Tally>,
    kind: &'static str,
    addr: std::net::SocketAddr,
    head: Vec<u8>,
    prefix: usize,
    trickle: usize,
    deadline: Instant,
) -> tokio::task::JoinHandle<()> {
    let tally = tally.clone();
    tokio::spawn(async move {
        for _ in 0..MAX_PER_TASK {
            if Instant::now() >= deadline {
                break;
            }
            let Ok(mut stream) = TcpStream::connect(addr).await else {
                tally.add(kind, 0);
                continue;
            };
            let (mut read, mut write) = stream.split();
            let upload = upload(&mut write, &head, prefix, trickle);
            let mut answer = [0u8; 12];
            let answered = async {
                match read.read_exact(&mut answer).await {
                    Ok(_) => std::str::from_utf8(&answer[9..12])
                        .ok()
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(0),
                    Err(_) => 0,
                }
            };
            let status = tokio::select! {
                status = answered => status,
                _ = upload => 0,
                _ = tokio::time::sleep_until(deadline) => continue,
            };
            tally.add(kind, status);
            // Do not reconnect in a tight loop when the relay hangs up at once.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
}

/// Write `head` and `prefix` bytes of body, then `trickle` bytes every 100 ms, until an error.
async fn upload(
    write: &mut (impl AsyncWriteExt + Unpin),
    head: &[u8],
    prefix: usize,
    trickle: usize,
) -> std::io::Result<()> {
    write.write_all(head).await?;
    write.write_all(&vec![b'x'; prefix]).await?;
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if trickle > 0 {
            write.write_all(&vec![b'x'; trickle]).await?;
        }
    }
}

/// gzip at the best compression: a bomb of a thousandth of its expansion.
fn gzip_best(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

/// An authentic envelope of `records` copies of the connection.staled record (~190 bytes each,
/// as compact JSON).
fn large_envelope(records: usize) -> Vec<u8> {
    let one: serde_json::Value =
        serde_json::from_slice(&fixture("events/09-connection.staled.json")).unwrap();
    let mut envelope = one.clone();
    let record = one["data"][0].clone();
    envelope["data"] = serde_json::Value::Array(vec![record; records]);
    serde_json::to_vec(&envelope).unwrap()
}

/// The flood, for [`FLOOD`], all at once on 104 connections (under the 128 that a 32 MiB budget
/// allows):
/// - 24 loops of gzip bombs (4 KiB that expand to 4x the decompressed cap), 8 of bombs that
///   expand to exactly the cap (so they pass gunzip and are held through the HMAC), 8 of plain
///   bodies at the compressed cap; none signed right;
/// - 16 uploads that announce a body at the cap, send all of it but a byte and stall, 24 that
///   trickle 64 bytes every 100 ms, 24 that send 48 KiB of an unfinished header;
/// - meanwhile one signed stream: the fixtures, every tenth request a ~190 KiB envelope.
///
/// Criteria: the relay's `VmHWM` at the end is at most its RSS before the flood (after a
/// warm-up) plus the budget; every small signed request during the flood got 202, and at least
/// 20 did (the relay before the budget answered 9 to 27 of them in the 8 s); a large signed one
/// got 202 or 503 (unauthenticated large bodies compete with it for the same buffers);
/// afterwards no buffer is held, and every 202 is on the queue once.
#[tokio::test]
async fn a_flood_of_bombs_and_slow_uploads_stays_inside_the_memory_budget() {
    let p = TestPipeline::builder("relay_mem")
        .without_database()
        .start()
        .await;
    let dir = TempDir::new("relay_mem");
    let listen = format!("127.0.0.1:{}", free_port());
    let relay = p
        .relay_process(&listen)
        .env("RELAY_MEMORY_BUDGET_BYTES", BUDGET.to_string())
        // 413 tells a refused bomb from a shed request (both are 503 by default).
        .env("RELAY_REFUSAL_STATUS", "conventional")
        .env("RUST_LOG", "error")
        .log_to(&dir.path.join("relay.log"))
        .spawn();
    let base = format!("http://{listen}");
    assert!(wait_http_ok(&format!("{base}/readyz"), Duration::from_secs(20)).await);
    let url = format!("{base}/webhooks/catena");
    let addr: std::net::SocketAddr = listen.parse().unwrap();
    // The binary's own caps (the defaults; this test does not change them).
    let caps = RelaySettings::default();
    let (max_body, max_out) = (caps.max_body_bytes, caps.max_decompressed_bytes);

    // Warm up with the signed stream (runtime, broker channels, allocator), then take the
    // baseline the budget is on top of.
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()
        .unwrap();
    let events = fixture_events();
    let envelope = large_envelope(1000);
    assert!(envelope.len() > 128 * 1024 && envelope.len() < max_out);
    let mut accepted = 0;
    for body in events.iter().cycle().take(200) {
        assert_eq!(Post::new(body).send(&client, &url).await, 202);
        accepted += 1;
    }
    assert_eq!(Post::new(&envelope).send(&client, &url).await, 202);
    accepted += 1;
    let baseline = relay.memory();

    let tally = Arc::new(Tally::default());
    let deadline = Instant::now() + FLOOD;
    let mut flood = Vec::new();
    let bomb = Bytes::from(gzip_best(&vec![0u8; 4 * max_out]));
    let cap_bomb = Bytes::from(gzip_best(&vec![b'0'; max_out]));
    assert!(bomb.len() < 64 * 1024 && cap_bomb.len() < 16 * 1024);
    for _ in 0..24 {
        flood.push(flood_posts(
            &tally,
            "bomb",
            &url,
            bomb.clone(),
            true,
            deadline,
        ));
    }
    for _ in 0..8 {
        flood.push(flood_posts(
            &tally,
            "cap_bomb",
            &url,
            cap_bomb.clone(),
            true,
            deadline,
        ));
    }
    let large = Bytes::from(vec![b'x'; max_body]);
    for _ in 0..8 {
        flood.push(flood_posts(
            &tally,
            "large",
            &url,
            large.clone(),
            false,
            deadline,
        ));
    }
    let head = format!(
        "POST /webhooks/catena HTTP/1.1\r\nHost: x\r\nX-Webhook-ID: {WEBHOOK_ID}\r\nContent-Length: {max_body}\r\n\r\n"
    )
    .into_bytes();
    for _ in 0..16 {
        flood.push(slow_uploads(
            &tally,
            "stalled",
            addr,
            head.clone(),
            max_body - 1,
            0,
            deadline,
        ));
    }
    for _ in 0..24 {
        flood.push(slow_uploads(
            &tally,
            "trickle",
            addr,
            head.clone(),
            0,
            64,
            deadline,
        ));
    }
    let mut slow_head = b"POST /webhooks/catena HTTP/1.1\r\nHost: x\r\nX-Junk: ".to_vec();
    slow_head.extend(vec![b'a'; 48 * 1024]);
    for _ in 0..24 {
        flood.push(slow_uploads(
            &tally,
            "slow_headers",
            addr,
            slow_head.clone(),
            0,
            0,
            deadline,
        ));
    }

    let mut peak_seen = baseline.rss;
    let mut sent = 0usize;
    while Instant::now() < deadline {
        let (kind, body) = if sent % 10 == 9 {
            ("valid_large", &envelope)
        } else {
            ("valid", &events[sent % events.len()])
        };
        let status = match Post::new(body).request(&client, &url).send().await {
            Ok(response) => response.status().as_u16(),
            Err(_) => 0,
        };
        tally.add(kind, status);
        sent += 1;
        peak_seen = peak_seen.max(relay.memory().rss);
    }
    for task in flood {
        task.await.unwrap();
    }
    let after = relay.memory();

    let mib = |bytes: usize| bytes as f64 / (1 << 20) as f64;
    eprintln!(
        "relay memory: RSS {:.1} MiB before the flood, {:.1} MiB at most when sampled during it, \
         VmHWM {:.1} MiB: {:.1} MiB over the baseline, budget {:.1} MiB",
        mib(baseline.rss),
        mib(peak_seen),
        mib(after.peak),
        mib(after.peak.saturating_sub(baseline.rss)),
        mib(BUDGET)
    );
    let kinds = [
        "valid",
        "valid_large",
        "bomb",
        "cap_bomb",
        "large",
        "stalled",
        "trickle",
        "slow_headers",
    ];
    for kind in kinds {
        eprintln!(
            "  {kind}: {:?} (status: count; 0 = no HTTP answer)",
            tally.of(kind)
        );
    }
    let metrics = get_text(&format!("{base}/metrics")).await;
    for line in metrics
        .lines()
        .filter(|l| l.starts_with("catena_relay_shed_total"))
    {
        eprintln!("  {line}");
    }

    assert!(
        after.peak <= baseline.rss + BUDGET,
        "the relay's peak RSS ({:.1} MiB) exceeded its baseline ({:.1} MiB) plus its budget ({:.1} MiB)",
        mib(after.peak),
        mib(baseline.rss),
        mib(BUDGET)
    );
    // The flood reached the relay and was refused there.
    let bombs = tally.of("bomb");
    assert!(
        bombs.get(&413).copied().unwrap_or(0) >= 100,
        "bombs: {bombs:?}"
    );
    let valid = tally.of("valid");
    let valid_202 = valid.get(&202).copied().unwrap_or(0);
    assert!(
        valid.keys().all(|&status| status == 202) && valid_202 >= 20,
        "small signed requests during the flood: {valid:?}"
    );
    let valid_large = tally.of("valid_large");
    assert!(
        valid_large
            .keys()
            .all(|&status| status == 202 || status == 503),
        "large signed requests during the flood: {valid_large:?}"
    );
    accepted += valid_202 + valid_large.get(&202).copied().unwrap_or(0);

    // After the flood: every buffer is back, and the relay answers as before.
    let held = eventually(
        Duration::from_secs(10),
        || async {
            let metrics = get_text(&format!("{base}/metrics")).await;
            metric_value(&metrics, "catena_relay_inflight_bytes")
        },
        |held| *held == Some(0.0),
    )
    .await;
    assert_eq!(held, Some(0.0), "buffers still held after the flood");
    for body in events.iter().cycle().take(20) {
        assert_eq!(Post::new(body).send(&client, &url).await, 202);
        accepted += 1;
    }
    assert_eq!(Post::new(&envelope).send(&client, &url).await, 202);
    accepted += 1;

    assert_eq!(
        p.drain_events(Duration::from_millis(500)).await.len(),
        accepted,
        "every 202 is queued once, nothing refused is"
    );
    relay.terminate().await;
    p.stop().await;
}
