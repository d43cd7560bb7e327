//! Catena's side of the loop, as code (catena-control-plane.md §2): our webhook subscriptions
//! and their secrets ([`sync`], [`rotate`]), kept in a [`registry`] in PostgreSQL (metadata
//! only) and a secrets [`sink`] the relays read ([`secrets_file`]); and the [`reconcile`]r that
//! notices when Catena stops delivering and brings every undelivered event back.

mod alerts;
pub mod reconcile;
pub mod registry;
pub mod rotate;
pub mod secrets_file;
pub mod sink;
pub mod sync;

use std::time::Duration;

use crate::catena::{CatenaClient, CatenaError};
use crate::store::DbError;
use secrets_file::SecretsFile;
use sink::{Sink, SinkError};

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("Catena API: {0}")]
    Catena(#[from] CatenaError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("secrets sink: {0}")]
    Sink(#[from] SinkError),
    #[error("secrets sink holds a file we cannot read: {0}")]
    File(#[from] secrets_file::ParseError),
}

impl From<tokio_postgres::Error> for ControlError {
    fn from(error: tokio_postgres::Error) -> Self {
        ControlError::Db(error.into())
    }
}

/// How a subscription became ours (the control log's `action`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mutation {
    Created,
    Recreated,
    Adopted,
}

impl Mutation {
    pub fn as_str(self) -> &'static str {
        match self {
            Mutation::Created => "create",
            Mutation::Recreated => "recreate",
            Mutation::Adopted => "adopt",
        }
    }
}

/// Waiting until the relays have what was written.
#[derive(Debug, Clone)]
pub struct Barrier {
    /// Relay admin bases (`http://relay:8080`) asked for `/secrets/version`.
    pub relay_admins: Vec<String>,
    /// Without any, how long to wait instead (default per sink).
    pub propagation_wait: Option<Duration>,
    /// The longest to wait for the relays before giving up, with nothing changed at Catena.
    pub timeout: Duration,
}

/// What sync and rotate work with.
pub struct Control<'a> {
    pub catena: &'a CatenaClient,
    pub db: &'a tokio_postgres::Client,
    pub sink: &'a Sink,
    pub barrier: &'a Barrier,
}

impl Control<'_> {
    async fn read_file(&self) -> Result<SecretsFile, ControlError> {
        Ok(SecretsFile::parse(&self.sink.read().await?)?)
    }

    /// Make Catena sign `row`'s deliveries with `secret` (already loaded by every relay), and
    /// record it: the registry's fingerprint is what sync never retires.
    async fn switch_secret(
        &self,
        actor: &str,
        row: &registry::Registered,
        secret: &str,
        detail: &str,
    ) -> Result<(), ControlError> {
        let patch = crate::catena::model::PatchWebhook {
            secret: Some(secret.to_owned()),
            ..Default::default()
        };
        self.catena.patch(&row.webhook_id, &patch).await?;
        let fp = secrets_file::fingerprint(secret);
        registry::set_secret(self.db, &row.webhook_id, &fp, row.secret_fp.as_deref()).await?;
        registry::log(
            self.db,
            actor,
            "patch_secret",
            Some(&row.webhook_id),
            Some(&row.event_name),
            "ok",
            detail,
        )
        .await?;
        Ok(())
    }

    /// Write, then wait until every relay reports having loaded exactly this.
    async fn write_and_wait(&self, file: &SecretsFile) -> Result<(), ControlError> {
        let version = self.sink.write(&file.render()).await?;
        let fallback = self
            .barrier
            .propagation_wait
            .unwrap_or_else(|| self.sink.default_propagation());
        sink::barrier(
            &self.barrier.relay_admins,
            &version,
            fallback,
            self.barrier.timeout,
        )
        .await?;
        Ok(())
    }
}
