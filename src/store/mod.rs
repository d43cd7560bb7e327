//! PostgreSQL: the connection pool, error classification (which drives the worker's retry
//! policy) and the embedded migrations.

mod migrations;

pub use migrations::{create_database_if_missing, migrate};

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;
use tokio_postgres::error::SqlState;

use crate::tls::{self, PostgresTarget};

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("invalid DATABASE_URL: {0}")]
    Config(String),
    #[error("database: {}", redacted(.0))]
    Postgres(#[from] tokio_postgres::Error),
    #[error("database pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
}

/// A PostgreSQL error without DETAIL/HINT, which can quote row values (magic links, tokens).
fn redacted(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => error.to_string(),
    }
}

/// How a failure should be handled by the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The database cannot be reached: hold the work and retry with backoff; no message is at fault.
    Unavailable,
    /// Worth retrying later (serialization failure, deadlock, lock timeout, resource limits).
    Transient,
    /// This input can never apply (data exceptions, constraint violations).
    Permanent,
}

impl DbError {
    pub fn classify(&self) -> Failure {
        match self {
            DbError::Config(_) => Failure::Permanent,
            DbError::Pool(_) => Failure::Unavailable,
            DbError::Postgres(e) => classify_pg(e),
        }
    }
}

fn classify_pg(error: &tokio_postgres::Error) -> Failure {
    let Some(code) = error.code() else {
        // No SQLSTATE: I/O, closed connection, protocol trouble.
        return Failure::Unavailable;
    };
    let class = &code.code()[..2];
    match class {
        "08" | "57" => Failure::Unavailable, // connection exception, operator intervention
        "40" | "53" | "55" | "58" => Failure::Transient, // txn rollback, resources, lock, system
        "22" | "23" => Failure::Permanent,   // data exception, integrity constraint
        _ if *code == SqlState::T_R_SERIALIZATION_FAILURE => Failure::Transient,
        _ => Failure::Transient, // unknown: retry tiers, then the parking lot
    }
}

pub(crate) fn target(database_url: &str) -> Result<PostgresTarget, DbError> {
    tls::postgres_target(database_url).map_err(|e| DbError::Config(e.to_string()))
}

/// One connection outside the pool (migrations, CREATE DATABASE), with its driver task.
pub(crate) async fn connect(
    target: PostgresTarget,
) -> Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>), DbError> {
    Ok(match target.tls {
        Some(tls) => {
            let (client, connection) = target.config.connect(tls).await?;
            (client, tokio::spawn(async move { drop(connection.await) }))
        }
        None => {
            let (client, connection) = target.config.connect(NoTls).await?;
            (client, tokio::spawn(async move { drop(connection.await) }))
        }
    })
}

/// A pool whose connections are checked before reuse, so a restarted server is noticed.
pub fn pool(database_url: &str, size: usize) -> Result<Pool, DbError> {
    let target = target(database_url)?;
    let mut config = target.config;
    config.application_name("catena-ingest");
    config.connect_timeout(Duration::from_secs(5));
    let manager_config = ManagerConfig {
        recycling_method: RecyclingMethod::Fast,
    };
    let manager = match target.tls {
        Some(tls) => Manager::from_config(config, tls, manager_config),
        None => Manager::from_config(config, NoTls, manager_config),
    };
    Pool::builder(manager)
        .max_size(size.max(1))
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(Duration::from_secs(5)))
        .create_timeout(Some(Duration::from_secs(5)))
        .recycle_timeout(Some(Duration::from_secs(5)))
        .build()
        .map_err(|e| DbError::Config(e.to_string()))
}
