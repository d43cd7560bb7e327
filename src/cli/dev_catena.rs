//! `dev --fake-catena`: the whole loop on one machine. A fake Catena delivers through a door in
//! front of the relay (as an ingress would), `subscriptions sync` runs against it, and the
//! reconciler watches it. Typing `close` at the prompt shuts the door (deliveries and the
//! reconciler's readiness probe are refused, as in an outage of the relay), `open` opens it
//! again: Catena's DLQs fill, its breaker stales the busy subscriptions, and after `open` the
//! reconciler reactivates them and replays every event (README, "Demo: the control-plane loop").

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use tokio::io::AsyncBufReadExt;
use tokio::net::{TcpListener, TcpStream};

use catena_ingest::catena::CatenaClient;
use catena_ingest::catena::model::DESIRED_EVENTS;
use catena_ingest::config::{DatabaseSettings, ReconcileSettings};
use catena_ingest::control::sink::Sink;
use catena_ingest::control::sync::{self, SyncPlan};
use catena_ingest::control::{Barrier, Control};
use catena_ingest::fake_catena::{self, FakeConfig};
use catena_ingest::shutdown::Shutdown;

/// Where `dev --fake-catena` listens besides the relay.
pub struct DemoAddrs {
    pub fake: String,
    pub door: String,
}

/// A TCP door: forwards to `target` while open; closed, it refuses new connections and drops
/// the open ones (connection refused, as a stopped relay behind an ingress gives).
async fn door(
    listen: &str,
    target: SocketAddr,
    open: Arc<AtomicBool>,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            if !open.load(Ordering::Relaxed) {
                continue;
            }
            let open = open.clone();
            tokio::spawn(async move {
                let Ok(mut outbound) = TcpStream::connect(target).await else {
                    return;
                };
                let closed = async {
                    while open.load(Ordering::Relaxed) {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                };
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    _ = closed => {}
                }
            });
        }
    });
    Ok(addr)
}

/// Start the fake, the door, sync and the reconciler; returns when they run.
pub async fn start(
    addrs: DemoAddrs,
    relay: SocketAddr,
    secrets_file: &std::path::Path,
    database: &DatabaseSettings,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let config = FakeConfig {
        // A breaker that trips within a minute of an outage, for the demo.
        grace: Duration::from_secs(10),
        ewma_alpha: 0.2,
        ..FakeConfig::default()
    };
    let running = fake_catena::start(&addrs.fake, config, shutdown.clone())
        .await
        .with_context(|| format!("binding {}", addrs.fake))?;
    let catena = running.catena_settings();
    let open = Arc::new(AtomicBool::new(true));
    let door = door(&addrs.door, relay, open.clone())
        .await
        .with_context(|| format!("binding {}", addrs.door))?;
    let public_url = format!("http://{door}/webhooks/catena");

    let db = super::db_client(database).await?;
    let client = CatenaClient::new(catena.clone(), None);
    let sink = Sink::File(secrets_file.to_owned());
    let barrier = Barrier {
        relay_admins: vec![format!("http://{relay}")],
        propagation_wait: None,
        timeout: Duration::from_secs(30),
    };
    let control = Control {
        catena: &client,
        db: &db,
        sink: &sink,
        barrier: &barrier,
    };
    let plan = SyncPlan {
        public_url: public_url.clone(),
        events: DESIRED_EVENTS.iter().map(|e| e.to_string()).collect(),
        dry_run: false,
        adopt: vec![],
        prune: false,
    };
    let report = sync::sync(&control, &plan).await?;
    println!(
        "fake Catena on {}: {} subscriptions created, secrets in {}",
        running.api_url(),
        report.created.len() + report.adopted.len() + report.unchanged.len(),
        secrets_file.display()
    );
    let settings = ReconcileSettings {
        once: false,
        interval: Duration::from_secs(5),
        healthy_for: Duration::from_secs(10),
        relay_ready_url: format!("http://{door}/readyz"),
        relay_admins: vec![format!("http://{relay}")],
        replay_settle: Duration::from_secs(30),
        activate_backoff: Duration::from_secs(10),
        dlq_alert_after: Duration::from_secs(3600),
        no_activate: false,
        no_replay: false,
        metrics_listen: "127.0.0.1:9091".into(),
    };
    let reconciler = catena_ingest::control::reconcile::start(
        catena.clone(),
        &database.database_url,
        settings,
        shutdown.clone(),
    )
    .await?;
    println!(
        "reconciler metrics on http://{}/metrics | Catena delivers through http://{door}\n\
         traffic: curl -s -XPOST {}/_fake/scenario -H 'content-type: application/json' -d '{{\"fleets\":100,\"seed\":1,\"rate\":5}}'\n\
         watch:   CATENA_API_URL={} CATENA_AUTH_URL={} CATENA_CLIENT_ID={} CATENA_CLIENT_SECRET={} cargo run --release -- subscriptions list\n\
         type `close` to stop deliveries to the relay (an outage), `open` to restore them",
        reconciler.metrics_addr,
        running.api_url(),
        catena.api_url,
        catena.auth_url,
        catena.client_id,
        catena.client_secret,
    );
    tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            match line.trim() {
                "close" => {
                    open.store(false, Ordering::Relaxed);
                    println!("door closed: Catena's deliveries are refused");
                }
                "open" => {
                    open.store(true, Ordering::Relaxed);
                    println!(
                        "door open: the reconciler reactivates and replays once the relay has been ready for 10 s"
                    );
                }
                "" => {}
                other => println!("`{other}`? type close or open"),
            }
        }
    });
    Ok(())
}
