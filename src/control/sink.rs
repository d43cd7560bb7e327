//! Where `subscriptions sync` and `rotate` keep the webhook secrets, and the barrier that waits
//! until every relay has loaded what was written.
//!
//! The secrets live only there (a file locally, a Kubernetes Secret mounted as a volume in
//! production), never in PostgreSQL: the relay must stay off the database, and plain text there
//! would spread to backups and replicas. A lost secret is fixed by a rotation.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use crate::relay::live_secrets::version_of;

/// `CATENA_SECRETS_SINK`: `file:<path>` or `k8s:<namespace>/<secret>/<key>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sink {
    File(PathBuf),
    Kubernetes {
        namespace: String,
        secret: String,
        key: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("CATENA_SECRETS_SINK `{0}` is neither file:<path> nor k8s:<namespace>/<secret>/<key>")]
    Spec(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("Kubernetes API: {0}")]
    Kubernetes(String),
    #[error(
        "relays did not load secrets version {version} within {waited:?} (still: {lagging:?}); nothing was changed at Catena"
    )]
    Barrier {
        version: String,
        waited: Duration,
        lagging: Vec<String>,
    },
}

impl Sink {
    pub fn parse(text: &str) -> Result<Self, SinkError> {
        if let Some(path) = text.strip_prefix("file:") {
            return Ok(Sink::File(PathBuf::from(path)));
        }
        if let Some(rest) = text.strip_prefix("k8s:") {
            let parts: Vec<&str> = rest.split('/').collect();
            if let [namespace, secret, key] = parts[..]
                && ![namespace, secret, key].iter().any(|p| p.is_empty())
            {
                return Ok(Sink::Kubernetes {
                    namespace: namespace.into(),
                    secret: secret.into(),
                    key: key.into(),
                });
            }
        }
        Err(SinkError::Spec(text.to_owned()))
    }

    /// How long a written secret takes to reach every relay when no relay can be asked: the
    /// file's reload interval with room to spare, or the kubelet's sync period plus its cache.
    pub fn default_propagation(&self) -> Duration {
        match self {
            Sink::File(_) => Duration::from_secs(5),
            Sink::Kubernetes { .. } => Duration::from_secs(150),
        }
    }

    /// The current contents (empty when there is none yet).
    pub async fn read(&self) -> Result<String, SinkError> {
        match self {
            Sink::File(path) => match tokio::fs::read_to_string(path).await {
                Ok(text) => Ok(text),
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
                Err(source) => Err(SinkError::Io {
                    path: path.clone(),
                    source,
                }),
            },
            Sink::Kubernetes {
                namespace,
                secret,
                key,
            } => kubernetes::read(namespace, secret, key).await,
        }
    }

    /// Replace the contents; returns the version a relay reports once it has loaded them.
    pub async fn write(&self, text: &str) -> Result<String, SinkError> {
        match self {
            Sink::File(path) => write_file(path, text).await?,
            Sink::Kubernetes {
                namespace,
                secret,
                key,
            } => kubernetes::write(namespace, secret, key, text).await?,
        }
        Ok(version_of(text.as_bytes()))
    }
}

/// Write beside the target, mode 0600, then rename over it: a relay reading at any moment sees
/// the old file or the new one, never half of one.
async fn write_file(path: &Path, text: &str) -> Result<(), SinkError> {
    let io = |source| SinkError::Io {
        path: path.to_owned(),
        source,
    };
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    {
        use std::io::Write;
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(&tmp).map_err(io)?;
        file.write_all(text.as_bytes()).map_err(io)?;
        file.sync_all().map_err(io)?;
    }
    std::fs::rename(&tmp, path).map_err(io)?;
    if let Some(dir) = dir
        && let Ok(dir) = std::fs::File::open(dir)
    {
        let _ = dir.sync_all();
    }
    Ok(())
}

/// Wait until every relay admin endpoint (`http://relay:8080`) reports `version` at
/// `/secrets/version`; without any, sleep `fallback`.
pub async fn barrier(
    relay_admins: &[String],
    version: &str,
    fallback: Duration,
    timeout: Duration,
) -> Result<(), SinkError> {
    if relay_admins.is_empty() {
        tokio::time::sleep(fallback).await;
        return Ok(());
    }
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .expect("building an HTTP client");
    let started = Instant::now();
    loop {
        let mut lagging = Vec::new();
        for admin in relay_admins {
            let url = format!("{}/secrets/version", admin.trim_end_matches('/'));
            let loaded = match http.get(&url).send().await {
                Ok(response) => response
                    .json::<serde_json::Value>()
                    .await
                    .ok()
                    .and_then(|v| v["version"].as_str().map(str::to_owned)),
                Err(_) => None,
            };
            if loaded.as_deref() != Some(version) {
                lagging.push(admin.clone());
            }
        }
        if lagging.is_empty() {
            return Ok(());
        }
        if started.elapsed() > timeout {
            return Err(SinkError::Barrier {
                version: version.to_owned(),
                waited: started.elapsed(),
                lagging,
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The `k8s:` sink through the API server with the pod's service account (RBAC: `get` and
/// `patch` on that one Secret). Plain reqwest: a Kubernetes client crate would double the build
/// for two calls.
mod kubernetes {
    use super::*;

    const ACCOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

    fn client() -> Result<(reqwest::Client, String, String), SinkError> {
        let fail = |what: &str, error: String| SinkError::Kubernetes(format!("{what}: {error}"));
        let token = std::fs::read_to_string(format!("{ACCOUNT}/token"))
            .map_err(|e| fail("service account token", e.to_string()))?;
        let ca = std::fs::read(format!("{ACCOUNT}/ca.crt"))
            .map_err(|e| fail("service account CA", e.to_string()))?;
        let ca = reqwest::Certificate::from_pem(&ca).map_err(|e| fail("CA", e.to_string()))?;
        let host =
            std::env::var("KUBERNETES_SERVICE_HOST").unwrap_or("kubernetes.default.svc".into());
        let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or("443".into());
        let http = reqwest::Client::builder()
            .add_root_certificate(ca)
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| fail("client", e.to_string()))?;
        Ok((
            http,
            format!("https://{host}:{port}"),
            token.trim().to_owned(),
        ))
    }

    fn url(base: &str, namespace: &str, secret: &str) -> String {
        format!("{base}/api/v1/namespaces/{namespace}/secrets/{secret}")
    }

    pub async fn read(namespace: &str, secret: &str, key: &str) -> Result<String, SinkError> {
        let (http, base, token) = client()?;
        let response = http
            .get(url(&base, namespace, secret))
            .bearer_auth(token)
            .send()
            .await
            .map_err(|e| SinkError::Kubernetes(e.without_url().to_string()))?;
        if !response.status().is_success() {
            return Err(SinkError::Kubernetes(format!(
                "GET secret {namespace}/{secret}: {}",
                response.status()
            )));
        }
        let body: serde_json::Value = response
            .json()
            .await
            .map_err(|e| SinkError::Kubernetes(e.to_string()))?;
        let Some(encoded) = body["data"][key].as_str() else {
            return Ok(String::new());
        };
        let bytes = STANDARD
            .decode(encoded)
            .map_err(|e| SinkError::Kubernetes(format!("data.{key}: {e}")))?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    pub async fn write(
        namespace: &str,
        secret: &str,
        key: &str,
        text: &str,
    ) -> Result<(), SinkError> {
        let (http, base, token) = client()?;
        let patch = serde_json::json!({ "data": { key: STANDARD.encode(text) } });
        let response = http
            .patch(url(&base, namespace, secret))
            .bearer_auth(token)
            .header("Content-Type", "application/merge-patch+json")
            .body(patch.to_string())
            .send()
            .await
            .map_err(|e| SinkError::Kubernetes(e.without_url().to_string()))?;
        if !response.status().is_success() {
            return Err(SinkError::Kubernetes(format!(
                "PATCH secret {namespace}/{secret}: {}",
                response.status()
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sink_specs() {
        assert_eq!(
            Sink::parse("file:.catena-webhook-secrets").unwrap(),
            Sink::File(".catena-webhook-secrets".into())
        );
        assert_eq!(
            Sink::parse("k8s:catena/catena-webhook-secrets/secrets").unwrap(),
            Sink::Kubernetes {
                namespace: "catena".into(),
                secret: "catena-webhook-secrets".into(),
                key: "secrets".into()
            }
        );
        assert!(Sink::parse("k8s:only/two").is_err());
        assert!(Sink::parse("s3://bucket").is_err());
    }

    #[tokio::test]
    async fn the_file_is_replaced_whole_and_private() {
        let dir = std::env::temp_dir().join(format!("sink-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let sink = Sink::File(dir.join("secrets"));
        assert_eq!(sink.read().await.unwrap(), "");
        let version = sink.write("a=b\n").await.unwrap();
        assert_eq!(version, version_of(b"a=b\n"));
        assert_eq!(sink.read().await.unwrap(), "a=b\n");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.join("secrets"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
