//! PostgreSQL: the connection pool, error classification and embedded migrations.

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;
use tokio_postgres::error::SqlState;

use crate::tls::{self, PostgresTarget};

/// Versioned migrations, applied in order, each once, each in its own transaction.
const MIGRATIONS: &[(i32, &str, &str)] = &[
    (
        1,
        "read_model",
        include_str!("../migrations/0001_read_model.sql"),
    ),
    (
        2,
        "notifications",
        include_str!("../migrations/0002_notifications.sql"),
    ),
    (
        3,
        "event_fleet",
        include_str!("../migrations/0003_event_fleet.sql"),
    ),
    (4, "indexes", include_str!("../migrations/0004_indexes.sql")),
];

/// Serialises concurrent `migrate` runs (any 64-bit constant unique to this app).
const MIGRATION_LOCK: i64 = 0x6361_7465_6e61_0001;

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

fn target(database_url: &str) -> Result<PostgresTarget, DbError> {
    tls::postgres_target(database_url).map_err(|e| DbError::Config(e.to_string()))
}

/// One connection outside the pool (migrations, CREATE DATABASE), with its driver task.
async fn connect(
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

/// Create the database named in `database_url` if it does not exist.
pub async fn create_database_if_missing(database_url: &str) -> Result<(), DbError> {
    let mut admin = target(database_url)?;
    let name = admin
        .config
        .get_dbname()
        .ok_or_else(|| DbError::Config("DATABASE_URL names no database".into()))?
        .to_owned();
    admin.config.dbname("postgres");
    let (client, driver) = connect(admin).await?;
    let exists = client
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .await?
        .is_some();
    if !exists {
        let sql = format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\""));
        match client.batch_execute(&sql).await {
            Ok(()) => tracing::info!(database = %name, "database created"),
            // Another process created it between our check and our CREATE.
            Err(e) if e.code() == Some(&SqlState::DUPLICATE_DATABASE) => {}
            Err(e) => return Err(e.into()),
        }
    }
    drop(client);
    let _ = driver.await;
    Ok(())
}

/// Create the database if needed and apply pending migrations. Re-running is a no-op; concurrent
/// runs serialise on an advisory lock.
pub async fn migrate(database_url: &str) -> Result<Vec<i32>, DbError> {
    create_database_if_missing(database_url).await?;
    let (mut client, driver) = connect(target(database_url)?).await?;
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    let applied = apply_pending(&mut client).await;
    let _ = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await;
    drop(client);
    let _ = driver.await;
    applied
}

async fn apply_pending(client: &mut tokio_postgres::Client) -> Result<Vec<i32>, DbError> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                version integer PRIMARY KEY,
                name text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now())",
        )
        .await?;
    let done: Vec<i32> = client
        .query("SELECT version FROM schema_migrations", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut applied = Vec::new();
    for (version, name, sql) in MIGRATIONS {
        if done.contains(version) {
            continue;
        }
        let tx = client.transaction().await?;
        tx.batch_execute(sql).await?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
            &[version, name],
        )
        .await?;
        tx.commit().await?;
        tracing::info!(version, name, "migration applied");
        applied.push(*version);
    }
    Ok(applied)
}
