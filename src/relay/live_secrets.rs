//! The relay's secrets while it runs: the inline ones (`CATENA_WEBHOOK_SECRETS`) plus the file
//! (`CATENA_WEBHOOK_SECRETS_FILE`), re-read every `RELAY_SECRETS_RELOAD`.
//!
//! `subscriptions sync` and `rotate` write the file, then wait until every relay reports the
//! file's version at `GET /secrets/version` before Catena may sign with a new secret: that
//! barrier is why no delivery is refused during a sync or a rotation. A file that does not parse
//! (or cannot be read) keeps the set already loaded: refusing every delivery because of a typo
//! would be worse than running on the previous set for a while, and the metric says so.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use prometheus::{IntCounterVec, IntGauge};
use sha2::{Digest, Sha256};

use super::secrets::{SecretStore, SecretsError};
use crate::shutdown::Shutdown;

/// The `outcome` label of `catena_relay_secrets_reloads_total`.
pub const RELOAD_OK: &str = "ok";
pub const RELOAD_UNCHANGED: &str = "unchanged";
pub const RELOAD_PARSE_ERROR: &str = "parse_error";
pub const RELOAD_IO_ERROR: &str = "io_error";
pub const RELOAD_OUTCOMES: [&str; 4] = [
    RELOAD_OK,
    RELOAD_UNCHANGED,
    RELOAD_PARSE_ERROR,
    RELOAD_IO_ERROR,
];

/// One loaded set: what verifies requests, and what `/secrets/version` reports.
#[derive(Debug)]
pub struct Loaded {
    pub store: SecretStore,
    /// The first 16 hex digits of SHA-256 over the file's bytes (over the inline text when
    /// there is no file): what a writer compares with what it wrote.
    pub version: String,
    pub entries: usize,
}

/// The version a writer expects a relay to report once it has loaded `bytes`.
pub fn version_of(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parsing {path}: {source}")]
    Parse { path: PathBuf, source: SecretsError },
    #[error("parsing CATENA_WEBHOOK_SECRETS: {0}")]
    Inline(SecretsError),
}

/// The secrets in force, swapped atomically on reload.
pub struct LiveSecrets {
    current: ArcSwap<Loaded>,
    inline: SecretStore,
    file: Option<PathBuf>,
}

impl LiveSecrets {
    /// Load once; a missing or malformed file is an error at start (a typo must not start a
    /// relay that refuses everything), an empty one is not.
    pub fn load(inline: SecretStore, file: Option<PathBuf>) -> Result<Self, LoadError> {
        let this = Self {
            current: ArcSwap::from_pointee(Loaded {
                store: inline.clone(),
                version: version_of(b""),
                entries: inline.len(),
            }),
            inline,
            file,
        };
        if let Some(loaded) = this.read()? {
            this.current.store(Arc::new(loaded));
        }
        Ok(this)
    }

    /// Only inline secrets (tests, and relays without a file).
    pub fn fixed(store: SecretStore) -> Self {
        Self::load(store, None).expect("no file, nothing to fail")
    }

    pub fn current(&self) -> Arc<Loaded> {
        self.current.load_full()
    }

    /// Read the file and merge it with the inline secrets; `None` without a file.
    fn read(&self) -> Result<Option<Loaded>, LoadError> {
        let Some(path) = &self.file else {
            return Ok(None);
        };
        let bytes = std::fs::read(path).map_err(|source| LoadError::Io {
            path: path.clone(),
            source,
        })?;
        let mut store = self.inline.clone();
        let text = String::from_utf8_lossy(&bytes);
        store
            .extend_from(&text)
            .map_err(|source| LoadError::Parse {
                path: path.clone(),
                source,
            })?;
        Ok(Some(Loaded {
            entries: store.len(),
            store,
            version: version_of(&bytes),
        }))
    }

    /// One reload: the outcome label. The file is read whole each time (a few KiB), which is
    /// simpler and more robust than watching it: Kubernetes updates a mounted Secret by
    /// swapping a symlink, which inotify watches on the file itself miss.
    pub fn reload(&self) -> &'static str {
        match self.read() {
            Ok(None) => RELOAD_UNCHANGED,
            Ok(Some(loaded)) if loaded.version == self.current.load().version => RELOAD_UNCHANGED,
            Ok(Some(loaded)) => {
                tracing::info!(
                    version = %loaded.version,
                    entries = loaded.entries,
                    "webhook secrets reloaded"
                );
                if loaded.entries == 0 {
                    tracing::warn!(
                        "no secrets loaded: every delivery is refused until one appears"
                    );
                }
                self.current.store(Arc::new(loaded));
                RELOAD_OK
            }
            Err(error @ LoadError::Io { .. }) => {
                tracing::warn!(%error, "secrets file unreadable, keeping the loaded secrets");
                RELOAD_IO_ERROR
            }
            Err(error) => {
                tracing::warn!(%error, "secrets file does not parse, keeping the loaded secrets");
                RELOAD_PARSE_ERROR
            }
        }
    }

    /// Reload every `interval` until shutdown, counting each outcome.
    pub fn spawn_reloader(
        self: &Arc<Self>,
        interval: Duration,
        reloads: IntCounterVec,
        entries: IntGauge,
        shutdown: Shutdown,
    ) {
        entries.set(self.current.load().entries as i64);
        if self.file.is_none() || interval.is_zero() {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticks.tick().await;
            loop {
                tokio::select! {
                    _ = shutdown.wait() => break,
                    _ = ticks.tick() => {}
                }
                let reader = this.clone();
                let outcome = tokio::task::spawn_blocking(move || reader.reload())
                    .await
                    .unwrap_or(RELOAD_IO_ERROR);
                reloads.with_label_values(&[outcome]).inc();
                entries.set(this.current.load().entries as i64);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reload_swaps_on_change_and_keeps_the_old_set_on_a_bad_file() {
        let dir = std::env::temp_dir().join(format!("live-secrets-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("secrets");
        std::fs::write(&path, "").unwrap();
        let live = LiveSecrets::load(SecretStore::default(), Some(path.clone())).unwrap();
        assert_eq!(live.current().entries, 0, "an empty file starts");
        assert_eq!(live.current().version, version_of(b""));

        std::fs::write(&path, "a=first-secret\n").unwrap();
        assert_eq!(live.reload(), RELOAD_OK);
        assert_eq!(live.current().version, version_of(b"a=first-secret\n"));
        assert_eq!(live.current().store.candidates("a").count(), 1);
        assert_eq!(live.reload(), RELOAD_UNCHANGED);

        std::fs::write(&path, "no equals sign\n").unwrap();
        assert_eq!(live.reload(), RELOAD_PARSE_ERROR);
        assert_eq!(
            live.current().store.candidates("a").count(),
            1,
            "old set kept"
        );
        std::fs::remove_file(&path).unwrap();
        assert_eq!(live.reload(), RELOAD_IO_ERROR);
        assert_eq!(live.current().entries, 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_bad_file_at_start_is_an_error() {
        let missing = std::env::temp_dir().join(format!("missing-{}", uuid::Uuid::new_v4()));
        assert!(matches!(
            LiveSecrets::load(SecretStore::default(), Some(missing)),
            Err(LoadError::Io { .. })
        ));
    }
}
