//! The relay through its real HTTP server against the real broker.

use std::time::{Duration, Instant};

use catena_ingest::config::RefusalStatus;

use crate::helpers::http::{get_text, metric_value, sign};
use crate::helpers::*;

const OLD_SECRET: &str = "old-secret-still-valid";

/// The relay's secrets: [`SECRET`] and, rotated out but still valid, [`OLD_SECRET`].
fn rotated_secrets() -> String {
    format!("{WEBHOOK_ID}={SECRET},{WEBHOOK_ID}={OLD_SECRET}")
}

/// A relay (and no database or worker) with the rotated secrets.
fn relay_only(tag: &str) -> pipeline::Builder<'static> {
    TestPipeline::builder(tag)
        .without_database()
        .relay_secrets(&rotated_secrets())
}

#[tokio::test]
async fn accepted_webhooks_land_once_with_body_and_headers() {
    let p = relay_only("relay_ok").relay().start().await;
    let body = fixture("events/09-connection.staled.json");

    assert_eq!(p.send(&body).await, 202);
    let mut plain = Post::new(&body);
    plain.gzip = false;
    assert_eq!(p.send_post(&plain).await, 202);
    // Rotation: the previous secret of the same webhook id still verifies.
    let mut rotated = Post::new(&body);
    rotated.secret = OLD_SECRET;
    assert_eq!(p.send_post(&rotated).await, 202);

    let taken = p.drain_events(Duration::from_millis(500)).await;
    assert_eq!(
        taken.len(),
        3,
        "each accepted webhook is queued exactly once"
    );
    for message in &taken {
        assert_eq!(message.body, body, "the uncompressed body is queued");
        assert_eq!(
            message.routing_key, p.names.events_queue,
            "straight into the queue through the default exchange"
        );
        assert_eq!(message.event_name, "connection.staled");
        assert_eq!(message.headers["x-webhook-id"], WEBHOOK_ID);
        assert_eq!(message.headers["x-delivery-attempt"], "1");
        assert_eq!(message.headers["x-schema-version"], "1.0");
        assert!(message.headers.contains_key("x-request-id"));
        assert!(message.headers.contains_key("x-catena-timestamp"));
        assert!(message.headers.contains_key("received_at"));
    }
    p.stop().await;
}

/// By default every refusal of a POST on the webhook path is a 503, so Catena keeps the event
/// (architecture.md, "Relay"); the body and the `outcome` label still say why.
#[tokio::test]
async fn every_bad_request_is_refused_503_and_nothing_is_queued() {
    refusals(RefusalStatus::Unavailable).await;
}

#[tokio::test]
async fn conventional_refusal_codes_on_request() {
    refusals(RefusalStatus::Conventional).await;
}

async fn refusals(mode: RefusalStatus) {
    let tag = match mode {
        RefusalStatus::Unavailable => "relay_bad",
        RefusalStatus::Conventional => "relay_bad4xx",
    };
    let p = relay_only(tag)
        .relay_config(|config| config.relay.refusal_status = mode)
        .start()
        .await;
    let (client, url) = (&p.client, p.relay_url());
    let body = fixture("events/01-invitation.created.json");
    let now = chrono::Utc::now();

    let mut cases: Vec<(&str, u16, reqwest::RequestBuilder)> = Vec::new();
    let ts = now.to_rfc3339();
    let sig = sign(SECRET, &ts, &body);
    let base = || {
        client
            .post(&url)
            .header("X-Webhook-ID", WEBHOOK_ID)
            .body(body.clone())
    };
    let mut tampered_body = body.clone();
    tampered_body.push(b' ');
    cases.push((
        "tampered body",
        401,
        base()
            .header("X-Catena-Timestamp", &ts)
            .header("X-Catena-Signature", &sig)
            .body(tampered_body),
    ));
    let mut wrong = Post::new(&body);
    wrong.secret = "not-the-secret";
    cases.push(("wrong secret", 401, wrong.request(client, &url)));
    let mut unknown = Post::new(&body);
    unknown.webhook_id = "00000000-0000-0000-0000-000000000000";
    cases.push(("unknown webhook id", 401, unknown.request(client, &url)));
    let mut old = Post::new(&body);
    old.timestamp = (now - chrono::Duration::seconds(301)).to_rfc3339();
    cases.push(("old timestamp", 401, old.request(client, &url)));
    let mut future = Post::new(&body);
    future.timestamp = (now + chrono::Duration::seconds(90)).to_rfc3339();
    cases.push(("future timestamp", 401, future.request(client, &url)));

    // Missing headers and a non-base64 signature.
    cases.push((
        "missing signature",
        401,
        base().header("X-Catena-Timestamp", &ts),
    ));
    cases.push((
        "missing timestamp",
        401,
        base().header("X-Catena-Signature", &sig),
    ));
    cases.push((
        "non-base64 signature",
        401,
        base()
            .header("X-Catena-Timestamp", &ts)
            .header("X-Catena-Signature", "%%%not-base64%%%"),
    ));
    cases.push((
        "corrupt gzip",
        400,
        client
            .post(&url)
            .header("Content-Encoding", "gzip")
            .header("X-Catena-Timestamp", &ts)
            .header("X-Catena-Signature", &sig)
            .header("X-Webhook-ID", WEBHOOK_ID)
            .body(b"\x1f\x8b\x08\x00garbage-that-is-not-deflate".to_vec()),
    ));
    // 16 MiB of zeros gzips to well under the 512 KiB body cap, and is far over the 1 MiB
    // expansion cap.
    let bomb = catena_ingest::relay::gunzip::gzip(&vec![b'0'; 16 * 1024 * 1024]);
    assert!(bomb.len() < 512 * 1024);
    cases.push((
        "gzip bomb",
        413,
        client
            .post(&url)
            .header("Content-Encoding", "gzip")
            .header("X-Catena-Timestamp", &ts)
            .header("X-Catena-Signature", &sig)
            .header("X-Webhook-ID", WEBHOOK_ID)
            .body(bomb),
    ));
    cases.push((
        "oversized body",
        413,
        base()
            .header("X-Catena-Timestamp", &ts)
            .header("X-Catena-Signature", &sig)
            .body(vec![b'x'; 2 * 1024 * 1024]),
    ));
    cases.push(("GET", 405, client.get(&url)));
    cases.push((
        "wrong path",
        404,
        client.post(p.relay_endpoint("/webhooks/other")),
    ));

    for (what, conventional, request) in cases {
        let want = match (mode, conventional) {
            (RefusalStatus::Unavailable, 400..=499) if ![404, 405].contains(&conventional) => 503,
            _ => conventional,
        };
        let response = request.send().await.unwrap();
        assert_eq!(response.status().as_u16(), want, "{what}");
        let reason = response.text().await.unwrap();
        if want != 404 {
            let label = reason.split(':').next().unwrap_or_default();
            assert!(
                [
                    "invalid_signature",
                    "stale_timestamp",
                    "bad_request",
                    "too_large",
                    "method_not_allowed"
                ]
                .contains(&label),
                "{what}: the body names the outcome: {reason:?}"
            );
        }
    }

    // Then one good one: the queue must hold exactly that one.
    assert_eq!(p.send(&body).await, 202);
    let taken = p.drain_events(Duration::from_millis(500)).await;
    assert_eq!(taken.len(), 1, "refused requests must not be queued");

    let metrics = p.relay_metrics().await;
    for line in [
        "catena_relay_requests_total{outcome=\"accepted\"} 1",
        "catena_relay_requests_total{outcome=\"invalid_signature\"} 5",
        "catena_relay_requests_total{outcome=\"stale_timestamp\"} 3",
        "catena_relay_requests_total{outcome=\"too_large\"} 2",
        "catena_relay_requests_total{outcome=\"bad_request\"} 1",
    ] {
        assert!(metrics.contains(line), "missing `{line}` in\n{metrics}");
    }
    p.stop().await;
}

#[tokio::test]
async fn broker_cut_means_503_then_recovery_without_restart() {
    let p = relay_only("relay_cut")
        .relay_via_broker_proxy()
        .relay()
        .start()
        .await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let (url, ready) = (p.relay_url(), p.relay_endpoint("/readyz"));
    let body = fixture("events/05-connection.created.json");

    assert_eq!(Post::new(&body).send(&client, &url).await, 202);
    p.broker_proxy().cut();
    let started = Instant::now();
    let status = Post::new(&body).send(&client, &url).await;
    assert_eq!(status, 503, "broker gone must be a 503 so Catena retries");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "answered within Catena's 3 s"
    );
    // Readiness follows the broker.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        client.get(&ready).send().await.unwrap().status().as_u16(),
        503
    );

    p.broker_proxy().restore();
    let recovered = wait_until(Duration::from_secs(20), || async {
        Post::new(&body).send(&client, &url).await == 202
    })
    .await;
    assert!(
        recovered,
        "relay must publish again once the broker is back, without a restart"
    );
    assert_eq!(
        client.get(&ready).send().await.unwrap().status().as_u16(),
        200
    );

    let taken = p.drain_events(Duration::from_millis(500)).await;
    assert_eq!(taken.len(), 2, "the two 202s are queued, the 503s are not");
    p.stop().await;
}

/// A black-holed broker (connections open, nothing answered): the confirm times out with a
/// 503, and that marks the session broken, so /readyz says so instead of staying green.
#[tokio::test]
async fn a_black_holed_broker_turns_the_relay_not_ready() {
    let p = relay_only("relay_hole")
        .relay_via_broker_proxy()
        .relay_config(|config| config.relay.confirm_timeout = Duration::from_millis(500))
        .relay()
        .start()
        .await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let (url, ready) = (p.relay_url(), p.relay_endpoint("/readyz"));
    let body = fixture("events/05-connection.created.json");
    assert_eq!(Post::new(&body).send(&client, &url).await, 202);

    p.broker_proxy().black_hole();
    assert_eq!(Post::new(&body).send(&client, &url).await, 503);
    let noticed = Instant::now();
    let not_ready = wait_until(Duration::from_secs(5), || async {
        client.get(&ready).send().await.unwrap().status().as_u16() == 503
    })
    .await;
    assert!(not_ready, "a confirm timeout means the session is broken");
    eprintln!(
        "black hole noticed {:?} after the first timeout",
        noticed.elapsed()
    );

    p.broker_proxy().restore();
    let recovered = wait_until(Duration::from_secs(20), || async {
        Post::new(&body).send(&client, &url).await == 202
    })
    .await;
    assert!(recovered, "a new session once the broker answers again");
    p.stop().await;
}

#[tokio::test]
async fn slow_headers_are_cut_huge_headers_refused_and_pipelining_works() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let p = relay_only("relay_abuse")
        .relay_config(|config| config.relay.header_timeout = Duration::from_millis(500))
        .start()
        .await;
    let addr = p.relay_addr();

    // Slowloris: half a request line of headers, then nothing. The relay hangs up.
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"POST /webhooks/catena HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the connection is closed, not held open");
    assert!(started.elapsed() < Duration::from_secs(3));

    // 100 KB of headers: refused.
    let mut huge = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "POST /webhooks/catena HTTP/1.1\r\nHost: x\r\nX-Junk: {}\r\nContent-Length: 0\r\n\r\n",
        "a".repeat(100 * 1024)
    );
    let _ = huge.write_all(request.as_bytes()).await;
    let mut response = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), huge.read_to_end(&mut response)).await;
    let text = String::from_utf8_lossy(&response);
    assert!(
        // hyper's own 431 past its buffer, or ours (503 by default: never a 4xx on the webhook
        // path).
        text.is_empty() || text.starts_with("HTTP/1.1 431") || text.starts_with("HTTP/1.1 503"),
        "{text}"
    );

    // Two pipelined requests on one keep-alive connection: two answers, in order.
    let body = fixture("events/05-connection.created.json");
    let ts = chrono::Utc::now().to_rfc3339();
    let sig = sign(SECRET, &ts, &body);
    let one = |body: &[u8]| {
        let mut r = format!(
            "POST /webhooks/catena HTTP/1.1\r\nHost: x\r\nX-Webhook-ID: {WEBHOOK_ID}\r\nX-Catena-Timestamp: {ts}\r\nX-Catena-Signature: {sig}\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        r.extend_from_slice(body);
        r
    };
    let mut pipelined = one(&body);
    pipelined.extend(one(&body));
    pipelined.extend(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(&pipelined).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut response))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&response);
    assert_eq!(text.matches("HTTP/1.1 202").count(), 2, "{text}");
    assert_eq!(text.matches("HTTP/1.1 200").count(), 1, "{text}");
    assert_eq!(p.drain_events(Duration::from_millis(500)).await.len(), 2);
    p.stop().await;
}

#[tokio::test]
async fn beyond_the_concurrency_cap_the_answer_is_an_immediate_503() {
    use tokio::io::AsyncWriteExt;
    let p = relay_only("relay_cap")
        .relay_config(|config| config.relay.max_concurrency = Some(1))
        .start()
        .await;
    let body = fixture("events/05-connection.created.json");

    // Hold the only slot: headers announce a body that never finishes arriving.
    let mut holder = tokio::net::TcpStream::connect(p.relay_addr())
        .await
        .unwrap();
    holder
        .write_all(b"POST /webhooks/catena HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    assert_eq!(p.send(&body).await, 503);
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "refused at once, not queued"
    );

    // Slot released: accepted again.
    drop(holder);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(p.send(&body).await, 202);
    assert_eq!(p.drain_events(Duration::from_millis(500)).await.len(), 1);
    p.stop().await;
}

/// `records` copies of the connection.staled record in one envelope (~190 bytes each).
fn envelope_of(records: usize) -> Vec<u8> {
    let mut envelope: serde_json::Value =
        serde_json::from_slice(&fixture("events/09-connection.staled.json")).unwrap();
    let record = envelope["data"][0].clone();
    envelope["data"] = serde_json::Value::Array(vec![record; records]);
    serde_json::to_vec(&envelope).unwrap()
}

/// A signed POST of `wire` (already encoded as it goes out) for the uncompressed `body`.
fn signed_raw(
    client: &reqwest::Client,
    url: &str,
    body: &[u8],
    wire: Vec<u8>,
    gzipped: bool,
) -> reqwest::RequestBuilder {
    let ts = chrono::Utc::now().to_rfc3339();
    let request = client
        .post(url)
        .header("X-Webhook-ID", WEBHOOK_ID)
        .header("X-Catena-Timestamp", &ts)
        .header("X-Catena-Signature", sign(SECRET, &ts, body))
        .body(wire);
    if gzipped {
        request.header("Content-Encoding", "gzip")
    } else {
        request
    }
}

async fn status(request: reqwest::RequestBuilder) -> u16 {
    request.send().await.unwrap().status().as_u16()
}

#[tokio::test]
async fn large_and_multi_member_bodies_are_verified_off_thread_and_queued_whole() {
    use catena_ingest::relay::gunzip::gzip;
    let p = relay_only("relay_large").relay().start().await;
    let (client, url) = (&p.client, p.relay_url());
    let large = envelope_of(1000);
    assert!(large.len() > 128 * 1024);

    // One gzip member of ~190 KiB decompressed: its size hint sends it off the async threads.
    assert_eq!(
        status(signed_raw(client, &url, &large, gzip(&large), true)).await,
        202
    );
    // Two members whose last one claims 100 bytes: tried inline, found larger, done off-thread.
    let mut two = gzip(&large[..large.len() - 100]);
    two.extend(gzip(&large[large.len() - 100..]));
    assert_eq!(
        status(signed_raw(client, &url, &large, two, true)).await,
        202
    );
    // Uncompressed: the HMAC over it runs off-thread too.
    assert_eq!(
        status(signed_raw(client, &url, &large, large.clone(), false)).await,
        202
    );
    // And a large body signed for other bytes is refused there.
    let mut tampered = large.clone();
    tampered[1000] ^= 1;
    assert_eq!(
        status(signed_raw(client, &url, &large, gzip(&tampered), true)).await,
        503
    );

    let taken = p.drain_events(Duration::from_millis(500)).await;
    assert_eq!(taken.len(), 3);
    for message in &taken {
        assert_eq!(message.body, large, "the whole body, decompressed");
        assert_eq!(message.event_name, "connection.staled");
    }
    let metrics = p.relay_metrics().await;
    assert!(
        metrics.contains("catena_relay_inflight_bytes 0"),
        "every buffer is back:\n{metrics}"
    );
    p.stop().await;
}

#[tokio::test]
async fn with_no_buffer_free_large_bodies_get_503_and_small_ones_202() {
    use catena_ingest::relay::gunzip::gzip;
    // No buffer for large bodies at all: only the verify threads' own.
    let p = relay_only("relay_nobuf")
        .relay_config(|config| config.relay.max_inflight_bytes = Some(0))
        .start()
        .await;
    let (client, url) = (&p.client, p.relay_url());
    let large = envelope_of(1000);

    // Gzipped, it arrives small, is inflated and verified in a verify thread's own buffer, and
    // then finds no buffer to be kept in; uncompressed, it finds none to be read into.
    let refused = signed_raw(client, &url, &large, gzip(&large), true)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status().as_u16(), 503);
    assert_eq!(
        refused.text().await.unwrap(),
        "unavailable: relay memory budget exhausted\n"
    );
    assert_eq!(
        status(signed_raw(client, &url, &large, large.clone(), false)).await,
        503
    );
    // A bomb that arrives small needs no buffer of the pool to be refused for what it is.
    let bomb = {
        use std::io::Write;
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        encoder.write_all(&vec![0u8; 8 * 1024 * 1024]).unwrap();
        encoder.finish().unwrap()
    };
    assert!(bomb.len() < 16 * 1024);
    assert_eq!(
        status(signed_raw(client, &url, b"x", bomb, true)).await,
        503
    );
    // Envelopes of Catena's size never need one.
    let body = fixture("events/03-invitation.accepted.json");
    assert_eq!(p.send(&body).await, 202);

    assert_eq!(p.drain_events(Duration::from_millis(500)).await.len(), 1);
    let metrics = p.relay_metrics().await;
    for line in [
        "catena_relay_shed_total{reason=\"memory\"} 2",
        "catena_relay_requests_total{outcome=\"unavailable\"} 2",
        "catena_relay_requests_total{outcome=\"too_large\"} 1",
    ] {
        assert!(metrics.contains(line), "missing `{line}` in\n{metrics}");
    }
    p.stop().await;
}

#[tokio::test]
async fn beyond_the_connection_cap_a_connection_is_closed_at_once() {
    use tokio::io::AsyncReadExt;
    let p = relay_only("relay_conns")
        .relay_config(|config| config.relay.max_connections = Some(2))
        .start()
        .await;
    let addr = p.relay_addr();
    let holders = [
        tokio::net::TcpStream::connect(addr).await.unwrap(),
        tokio::net::TcpStream::connect(addr).await.unwrap(),
    ];
    tokio::time::sleep(Duration::from_millis(100)).await;

    // The third is accepted and closed: no answer, no wait for a header deadline.
    let mut third = tokio::net::TcpStream::connect(addr).await.unwrap();
    let started = Instant::now();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(2), third.read_to_end(&mut buf)).await;
    assert!(read.is_ok() && buf.is_empty(), "closed without a word");
    assert!(started.elapsed() < Duration::from_secs(1));

    drop(holders);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let body = fixture("events/05-connection.created.json");
    assert_eq!(p.send(&body).await, 202);
    let metrics = p.relay_metrics().await;
    for line in [
        "catena_relay_shed_total{reason=\"connections\"} 1",
        "catena_relay_connections 2",
    ] {
        assert!(metrics.contains(line), "missing `{line}` in\n{metrics}");
    }
    p.stop().await;
}

/// The relay starts on an empty secrets file (ready, and saying it has no secrets), refuses
/// with 503 until a secret appears, picks up every change while it runs, keeps the loaded set
/// when the file breaks, and reports the version a writer waits for.
#[tokio::test]
async fn the_secrets_file_is_reloaded_while_running() {
    use catena_ingest::relay::live_secrets::version_of;
    let dir = std::env::temp_dir().join(unique("secrets"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("webhook-secrets");
    std::fs::write(&file, "").unwrap();
    let path = file.clone();
    let p = TestPipeline::builder("relay_reload")
        .without_database()
        .relay_config(move |config| {
            config.secrets = Default::default();
            config.secrets_file = Some(path);
            config.relay.secrets_reload = Duration::from_millis(100);
        })
        .start()
        .await;
    let body = fixture("events/09-connection.staled.json");
    let version = || async { get_text(&p.relay_endpoint("/secrets/version")).await };

    assert_eq!(
        get_text(&p.relay_endpoint("/readyz")).await,
        "ready, no secrets loaded"
    );
    assert_eq!(p.send(&body).await, 503, "nothing verifies yet");
    let empty: serde_json::Value = serde_json::from_str(&version().await).unwrap();
    assert_eq!(empty["entries"], 0);
    assert_eq!(empty["version"], version_of(b""));

    let text = format!("# written by a test\n{}\n", secrets());
    replace_file(&file, &text);
    let want = version_of(text.as_bytes());
    assert!(
        wait_until(Duration::from_secs(5), || async {
            version().await.contains(&want)
        })
        .await,
        "the new file is loaded"
    );
    assert_eq!(p.send(&body).await, 202);
    assert_eq!(get_text(&p.relay_endpoint("/readyz")).await, "ready");

    replace_file(&file, "this line has no equals sign\n");
    assert!(
        wait_until(Duration::from_secs(5), || async {
            metric_value(
                &p.relay_metrics().await,
                "catena_relay_secrets_reloads_total{outcome=\"parse_error\"}",
            )
            .is_some_and(|n| n >= 1.0)
        })
        .await
    );
    assert!(version().await.contains(&want), "the loaded set is kept");
    assert_eq!(p.send(&body).await, 202);

    let mut wrong = Post::new(&body);
    wrong.secret = "not-the-secret";
    assert_eq!(p.send_post(&wrong).await, 503);
    let refusals: serde_json::Value =
        serde_json::from_str(&get_text(&p.relay_endpoint("/secrets/refusals")).await).unwrap();
    // The one before any secret was loaded, and the wrong one.
    assert_eq!(refusals["webhooks"][WEBHOOK_ID]["invalid_signature"], 2);
    let metrics = p.relay_metrics().await;
    assert!(
        metrics.contains("catena_relay_secrets_entries 1"),
        "{metrics}"
    );
    p.stop().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `AMQP_URL` with several nodes, the first of them dead: the relay (and the worker) connect to a
/// live one, and a webhook goes through.
#[tokio::test]
async fn several_broker_urls_reach_a_live_node() {
    let nodes = format!("amqp://guest:guest@127.0.0.1:1/%2f,{}", amqp_url());
    let (relay_nodes, worker_nodes) = (nodes.clone(), nodes);
    let p = TestPipeline::builder("relay_nodes")
        .relay_config(move |config| config.broker.amqp_url = relay_nodes)
        .worker_config(move |config| config.broker.amqp_url = worker_nodes)
        .start()
        .await;
    for _ in 0..3 {
        assert_eq!(
            p.send(&fixture("events/09-connection.staled.json")).await,
            202
        );
    }
    assert_eq!(p.wait_for_applied(1, Duration::from_secs(20)).await, 1);
    p.stop().await;
}

/// Write a secrets file the way `subscriptions sync` does (a new file renamed over the old): a
/// plain `fs::write` truncates first, and a reload that lands in between reads an empty set.
fn replace_file(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}
