//! Where alerts go: a real Alertmanager and a webhook sink that records what it gets.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;

use super::TempDir;
use super::poll::wait_until;

/// A real Alertmanager (Debian's prometheus-alertmanager) on its own port and storage, killed
/// on drop.
pub struct Alertmanager {
    pub url: String,
    child: std::process::Child,
    _dir: TempDir,
}

impl Alertmanager {
    pub async fn start(port: u16) -> Self {
        let dir = TempDir::new("am");
        let config = dir.path.join("alertmanager.yml");
        std::fs::write(
            &config,
            "route:\n  receiver: 'null'\n  group_wait: 1s\nreceivers:\n  - name: 'null'\n",
        )
        .unwrap();
        let child = std::process::Command::new("prometheus-alertmanager")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.path={}", dir.path.display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--cluster.listen-address=")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("prometheus-alertmanager is installed (.ci/run installs it)");
        let alertmanager = Self {
            url: format!("http://127.0.0.1:{port}"),
            child,
            _dir: dir,
        };
        assert!(
            super::http::wait_http_ok(
                &format!("{}/-/ready", alertmanager.url),
                Duration::from_secs(20)
            )
            .await,
            "Alertmanager ready within 20 s"
        );
        alertmanager
    }

    /// Alerts Alertmanager currently holds with this alertname that are still active.
    pub async fn active(&self, alertname: &str) -> Vec<serde_json::Value> {
        let alerts: Vec<serde_json::Value> = reqwest::get(format!("{}/api/v2/alerts", self.url))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        alerts
            .into_iter()
            .filter(|a| a["labels"]["alertname"] == alertname && a["status"]["state"] == "active")
            .collect()
    }

    /// Wait until exactly `n` alerts named `alertname` are active.
    pub async fn wait_for_active(&self, alertname: &str, n: usize, timeout: Duration) -> bool {
        wait_until(timeout, || async {
            self.active(alertname).await.len() == n
        })
        .await
    }
}

impl Drop for Alertmanager {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A webhook sink the test owns: records every JSON body, and can be switched to answer 503.
pub struct RecordingSink {
    pub url: String,
    received: Arc<Mutex<Vec<serde_json::Value>>>,
    up: Arc<AtomicBool>,
}

impl RecordingSink {
    /// A JSON webhook sink at `<url>` (`/hook`).
    pub async fn start() -> Self {
        Self::serving("/hook").await
    }

    /// Something shaped like Alertmanager's API (`<url>/api/v2/alerts`); `url` is its base.
    pub async fn alertmanager() -> Self {
        let mut sink = Self::serving("/api/v2/alerts").await;
        sink.url = sink.url.trim_end_matches("/api/v2/alerts").to_owned();
        sink
    }

    async fn serving(path: &str) -> Self {
        let received = Arc::new(Mutex::new(Vec::new()));
        let up = Arc::new(AtomicBool::new(true));
        let (r, u) = (received.clone(), up.clone());
        let app = axum::Router::new().route(
            path,
            axum::routing::post(move |body: bytes::Bytes| {
                let (r, u) = (r.clone(), u.clone());
                async move {
                    if !u.load(Ordering::SeqCst) {
                        return axum::http::StatusCode::SERVICE_UNAVAILABLE;
                    }
                    r.lock()
                        .unwrap()
                        .push(serde_json::from_slice(&body).unwrap());
                    axum::http::StatusCode::OK
                }
            }),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}{path}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { url, received, up }
    }

    /// Up (records, 200) or down (503).
    pub fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::SeqCst);
    }

    pub fn bodies(&self) -> Vec<serde_json::Value> {
        self.received.lock().unwrap().clone()
    }
}
