//! A real Prometheus (Debian's `prometheus`) evaluating the shipped rules against a test's own
//! targets, on its own port and storage, killed on drop.

use std::path::Path;
use std::time::Duration;

use super::TempDir;
use super::poll::eventually;

/// The shipped rule file.
pub fn shipped_rules_path() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus/rules/catena.yml")
}

/// The shipped rules with every `for:` set to `for_` and nothing else changed (expressions,
/// labels and annotations exactly as shipped).
pub fn rules_with_for(for_: &str) -> String {
    let shipped = std::fs::read_to_string(shipped_rules_path()).unwrap();
    let mut out = String::with_capacity(shipped.len());
    let mut replaced = 0;
    for line in shipped.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("for: ") {
            let indent = &line[..line.len() - trimmed.len()];
            out.push_str(&format!("{indent}for: {for_}\n"));
            replaced += 1;
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    assert!(replaced > 0, "the shipped rules have `for:` durations");
    out
}

/// One scrape job of the test's Prometheus.
pub struct Job {
    pub name: String,
    pub metrics_path: String,
    /// `host:port`
    pub target: String,
    pub scrape_interval: Option<String>,
    /// Extra YAML lines appended to the job (indented 4 spaces), e.g. `metric_relabel_configs`.
    pub extra: String,
}

impl Job {
    pub fn new(name: &str, target: &str, metrics_path: &str) -> Self {
        Self {
            name: name.to_owned(),
            metrics_path: metrics_path.to_owned(),
            target: target.to_owned(),
            scrape_interval: None,
            extra: String::new(),
        }
    }
}

/// One sample of an instant query: its labels and value (`NaN` and `+Inf` kept as strings
/// parse to f64).
#[derive(Debug, Clone)]
pub struct Sample {
    pub metric: serde_json::Map<String, serde_json::Value>,
    pub value: f64,
}

pub struct Prometheus {
    pub url: String,
    client: reqwest::Client,
    child: std::process::Child,
    _dir: TempDir,
}

impl Prometheus {
    /// Prometheus on `port`, scraping and evaluating every second, sending alerts to
    /// `alertmanager` (a base URL like `http://127.0.0.1:9093`), with `rules` (the text of a rule
    /// file) as its only rule file.
    pub async fn start(port: u16, jobs: &[Job], rules: &str, alertmanager: &str) -> Self {
        let dir = TempDir::new("prom");
        let rules_file = dir.path.join("catena.yml");
        std::fs::write(&rules_file, rules).unwrap();
        let am = alertmanager
            .trim_start_matches("http://")
            .trim_end_matches('/');
        let mut config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             alerting:\n  alertmanagers:\n    - static_configs:\n        - targets: ['{am}']\n\
             rule_files:\n  - '{}'\nscrape_configs:\n",
            rules_file.display()
        );
        for job in jobs {
            config.push_str(&format!(
                "  - job_name: '{}'\n    metrics_path: '{}'\n",
                job.name, job.metrics_path
            ));
            if let Some(interval) = &job.scrape_interval {
                config.push_str(&format!(
                    "    scrape_interval: {interval}\n    scrape_timeout: {interval}\n"
                ));
            }
            config.push_str(&format!(
                "    static_configs:\n      - targets: ['{}']\n",
                job.target
            ));
            for line in job.extra.lines() {
                config.push_str(&format!("    {line}\n"));
            }
        }
        let config_file = dir.path.join("prometheus.yml");
        std::fs::write(&config_file, &config).unwrap();
        let log = std::fs::File::create(dir.path.join("prometheus.log")).unwrap();
        let child = std::process::Command::new("prometheus")
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            // Resolved alerts are re-sent to Alertmanager at every evaluation for this long.
            .arg("--rules.alert.resend-delay=1s")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("prometheus is installed (scripts/setup.sh installs it)");
        let prometheus = Self {
            url: format!("http://127.0.0.1:{port}"),
            client: reqwest::Client::new(),
            child,
            _dir: dir,
        };
        let ready = super::http::wait_http_ok(
            &format!("{}/-/ready", prometheus.url),
            Duration::from_secs(30),
        )
        .await;
        if !ready {
            let log = std::fs::read_to_string(prometheus._dir.path.join("prometheus.log"))
                .unwrap_or_default();
            panic!("Prometheus not ready within 30 s; config:\n{config}\nlog:\n{log}");
        }
        prometheus
    }

    async fn api(&self, path: &str, query: &[(&str, &str)]) -> Result<serde_json::Value, String> {
        let response = self
            .client
            .get(format!("{}{path}", self.url))
            .query(query)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let body: serde_json::Value = response.json().await.map_err(|e| e.to_string())?;
        if body["status"] != "success" {
            return Err(format!("{}: {}", body["errorType"], body["error"]));
        }
        Ok(body["data"].clone())
    }

    /// An instant query: its samples (a scalar is one sample without labels), or Prometheus's
    /// error.
    pub async fn try_query(&self, promql: &str) -> Result<Vec<Sample>, String> {
        let data = self.api("/api/v1/query", &[("query", promql)]).await?;
        let value = |v: &serde_json::Value| v[1].as_str().unwrap_or("NaN").parse().unwrap();
        Ok(match data["resultType"].as_str() {
            Some("vector") => data["result"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| Sample {
                    metric: s["metric"].as_object().cloned().unwrap_or_default(),
                    value: value(&s["value"]),
                })
                .collect(),
            Some("scalar") => vec![Sample {
                metric: Default::default(),
                value: value(&data["result"]),
            }],
            other => return Err(format!("unexpected result type {other:?}")),
        })
    }

    /// [`Self::try_query`], panicking on an error.
    pub async fn query(&self, promql: &str) -> Vec<Sample> {
        self.try_query(promql)
            .await
            .unwrap_or_else(|e| panic!("query {promql}: {e}"))
    }

    /// Prometheus's alerts (`/api/v1/alerts`): pending and firing, with labels, annotations and
    /// `state`.
    pub async fn alerts(&self) -> Vec<serde_json::Value> {
        self.api("/api/v1/alerts", &[]).await.unwrap()["alerts"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Alerts named `name` in `state` (`pending` or `firing`).
    pub async fn alerts_in(&self, name: &str, state: &str) -> Vec<serde_json::Value> {
        self.alerts()
            .await
            .into_iter()
            .filter(|a| a["labels"]["alertname"] == name && a["state"] == state)
            .collect()
    }

    /// Wait until an alert named `name` is in `state`; its first such alert, or `None`.
    pub async fn wait_for_alert(
        &self,
        name: &str,
        state: &str,
        timeout: Duration,
    ) -> Option<serde_json::Value> {
        eventually(timeout, || self.alerts_in(name, state), |a| !a.is_empty())
            .await
            .into_iter()
            .next()
    }

    /// Wait until no alert named `name` is pending or firing.
    pub async fn wait_for_inactive(&self, name: &str, timeout: Duration) -> bool {
        eventually(
            timeout,
            || async {
                self.alerts()
                    .await
                    .into_iter()
                    .filter(|a| a["labels"]["alertname"] == name)
                    .count()
            },
            |n| *n == 0,
        )
        .await
            == 0
    }

    /// The alerting rules Prometheus loaded (`/api/v1/rules`): name, query, labels,
    /// annotations, `for` (`duration`, seconds).
    pub async fn alerting_rules(&self) -> Vec<serde_json::Value> {
        let data = self
            .api("/api/v1/rules", &[("type", "alert")])
            .await
            .unwrap();
        data["groups"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect()
    }

    /// The health of every scrape target: `(job, health, lastError)`.
    pub async fn targets(&self) -> Vec<(String, String, String)> {
        let data = self.api("/api/v1/targets", &[]).await.unwrap();
        data["activeTargets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| {
                (
                    t["labels"]["job"].as_str().unwrap_or("").to_owned(),
                    t["health"].as_str().unwrap_or("").to_owned(),
                    t["lastError"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
