//! Catena's side for the control-plane tests: an in-process fake-catena, the relay behind a
//! cuttable proxy (Catena delivers through it, and the reconciler's readiness probe goes the
//! same way, as it would through an ingress), a secrets file the relay re-reads, and the
//! library entry points of `subscriptions sync`, `rotate` and `reconcile`.

use std::path::PathBuf;
use std::time::Duration;

use catena_ingest::catena::CatenaClient;
use catena_ingest::catena::model::{DESIRED_EVENTS, WEBHOOKS_PATH};
use catena_ingest::config::{CatenaSettings, ReconcileSettings};
use catena_ingest::control::reconcile::{self, RunningReconciler};
use catena_ingest::control::rotate::{self, RotateReport, Targets};
use catena_ingest::control::sink::Sink;
use catena_ingest::control::sync::{self, SyncPlan, SyncReport};
use catena_ingest::control::{Barrier, Control, ControlError};
use catena_ingest::fake_catena::{self, FakeConfig, RunningFake};
use catena_ingest::shutdown::Shutdown;

use super::pipeline::{Builder, TestPipeline};
use super::proxy::TcpProxy;
use super::unique;

/// The fake's config for the end-to-end tests (catena-control-plane.md §3): a 5 s grace period
/// and a quicker EWMA, so a 30 s outage trips the breaker and a test does not wait 15 minutes.
pub fn test_fake_config() -> FakeConfig {
    FakeConfig {
        grace: Duration::from_secs(5),
        ewma_alpha: 0.2,
        ..FakeConfig::default()
    }
}

pub struct ControlPlane {
    pub pipeline: TestPipeline,
    pub fake: RunningFake,
    /// In front of the relay: Catena's way in.
    pub proxy: TcpProxy,
    pub secrets_file: PathBuf,
    dir: PathBuf,
    shutdown: Shutdown,
}

impl ControlPlane {
    /// A relay reading an empty secrets file (re-read every 100 ms) and a worker, with the
    /// builder's other settings; fake-catena with `config`.
    pub async fn start(builder: Builder<'_>, config: FakeConfig) -> Self {
        let dir = std::env::temp_dir().join(unique("control"));
        std::fs::create_dir_all(&dir).unwrap();
        let secrets_file = dir.join("webhook-secrets");
        std::fs::write(&secrets_file, "").unwrap();
        let file = secrets_file.clone();
        let pipeline = builder
            .relay_config(move |config| {
                config.secrets = Default::default();
                config.secrets_file = Some(file);
                config.relay.secrets_reload = Duration::from_millis(100);
            })
            .worker()
            .start()
            .await;
        let proxy = TcpProxy::start(&pipeline.relay_addr().to_string()).await;
        let shutdown = Shutdown::new();
        let fake = fake_catena::start("127.0.0.1:0", config, shutdown.clone())
            .await
            .unwrap();
        Self {
            pipeline,
            fake,
            proxy,
            secrets_file,
            dir,
            shutdown,
        }
    }

    pub fn public_url(&self) -> String {
        format!("http://{}/webhooks/catena", self.proxy.addr)
    }

    pub fn catena_settings(&self) -> CatenaSettings {
        self.fake.catena_settings()
    }

    pub fn client(&self) -> CatenaClient {
        CatenaClient::new(self.catena_settings(), None)
    }

    pub fn sink(&self) -> Sink {
        Sink::File(self.secrets_file.clone())
    }

    /// The barrier asks the relay itself (not through the proxy: a cut must not block a sync).
    pub fn barrier(&self) -> Barrier {
        Barrier {
            relay_admins: vec![format!("http://{}", self.pipeline.relay_addr())],
            propagation_wait: None,
            timeout: Duration::from_secs(20),
        }
    }

    pub fn plan(&self) -> SyncPlan {
        SyncPlan {
            public_url: self.public_url(),
            events: DESIRED_EVENTS.iter().map(|e| e.to_string()).collect(),
            dry_run: false,
            adopt: vec![],
            prune: false,
        }
    }

    pub async fn sync_with(&self, plan: &SyncPlan) -> Result<SyncReport, ControlError> {
        let db = self.pipeline.db().client().await;
        let catena = self.client();
        let (sink, barrier) = (self.sink(), self.barrier());
        let control = Control {
            catena: &catena,
            db: &db,
            sink: &sink,
            barrier: &barrier,
        };
        sync::sync(&control, plan).await
    }

    pub async fn sync(&self) -> SyncReport {
        self.sync_with(&self.plan()).await.unwrap()
    }

    pub async fn rotate(&self, targets: Targets, overlap: Duration) -> RotateReport {
        let db = self.pipeline.db().client().await;
        let catena = self.client();
        let (sink, barrier) = (self.sink(), self.barrier());
        let control = Control {
            catena: &catena,
            db: &db,
            sink: &sink,
            barrier: &barrier,
        };
        rotate::rotate(&control, &targets, overlap).await.unwrap()
    }

    /// The reconciler as the tests run it: 1 s cycles, ready for 3 s before it acts, short
    /// backoffs; readiness through the proxy, refusals from the relay itself.
    pub fn reconcile_settings(&self) -> ReconcileSettings {
        test_reconcile_settings(
            format!("http://{}/readyz", self.proxy.addr),
            format!("http://{}", self.pipeline.relay_addr()),
        )
    }

    pub async fn start_reconciler(&self, settings: ReconcileSettings) -> RunningReconciler {
        reconcile::start(
            self.catena_settings(),
            &self.pipeline.db().url,
            settings,
            self.shutdown.clone(),
        )
        .await
        .unwrap()
    }

    /// POST, PATCH and DELETE calls on the subscription API so far.
    pub fn mutating_calls(&self) -> usize {
        self.fake
            .fake
            .calls()
            .iter()
            .filter(|c| {
                c.path.starts_with(WEBHOOKS_PATH)
                    && ["POST", "PATCH", "DELETE"].contains(&c.method.as_str())
            })
            .count()
    }

    /// `/activate` calls so far.
    pub fn activations(&self) -> usize {
        self.fake
            .fake
            .calls()
            .iter()
            .filter(|c| c.path.ends_with("/activate"))
            .count()
    }

    pub async fn stop(self) {
        self.shutdown.trigger();
        let _ = self.fake.handle.await;
        self.pipeline.stop().await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A reconciler of `pipeline`'s own against a fake-catena with no subscriptions: what a
/// deployment runs beside relay and worker, for tests that only need it up and exporting
/// (`tests/it/sre.rs`). Stopped when `shutdown` is triggered.
pub struct IdleReconciler {
    pub fake: RunningFake,
    pub reconciler: RunningReconciler,
    pub shutdown: Shutdown,
}

impl IdleReconciler {
    pub async fn start(pipeline: &TestPipeline) -> Self {
        let shutdown = Shutdown::new();
        let fake = fake_catena::start("127.0.0.1:0", test_fake_config(), shutdown.clone())
            .await
            .unwrap();
        let catena = fake.catena_settings();
        let settings = test_reconcile_settings(
            pipeline.relay_endpoint("/readyz"),
            format!("http://{}", pipeline.relay_addr()),
        );
        let reconciler = reconcile::start(catena, &pipeline.db().url, settings, shutdown.clone())
            .await
            .unwrap();
        Self {
            fake,
            reconciler,
            shutdown,
        }
    }
}

impl IdleReconciler {
    /// A client of its fake Catena, with the reconciler's credentials.
    pub fn client(&self) -> CatenaClient {
        CatenaClient::new(self.fake.catena_settings(), None)
    }
}

impl Drop for IdleReconciler {
    fn drop(&mut self) {
        self.shutdown.trigger();
    }
}

/// The reconciler as the tests run it: 1 s cycles, ready for 3 s before it acts, short
/// backoffs, readiness from `relay_ready_url` and refusals from the relay at `relay_admin`.
fn test_reconcile_settings(relay_ready_url: String, relay_admin: String) -> ReconcileSettings {
    ReconcileSettings {
        once: false,
        interval: Duration::from_secs(1),
        healthy_for: Duration::from_secs(3),
        relay_ready_url,
        relay_admins: vec![relay_admin],
        replay_settle: Duration::from_secs(5),
        activate_backoff: Duration::from_secs(2),
        dlq_alert_after: Duration::from_secs(3600),
        no_activate: false,
        no_replay: false,
        metrics_listen: "127.0.0.1:0".into(),
    }
}
