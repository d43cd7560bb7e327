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
    /// The work did not finish in time; its connection was dropped.
    #[error("database work did not finish within {0:?}; its connection was dropped")]
    Deadline(Duration),
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
            DbError::Pool(_) | DbError::Deadline(_) => Failure::Unavailable,
            DbError::Postgres(e) => classify_pg(e),
        }
    }
}

fn classify_pg(error: &tokio_postgres::Error) -> Failure {
    let Some(code) = error.code() else {
        // No SQLSTATE: I/O, closed connection, protocol trouble.
        return Failure::Unavailable;
    };
    // A statement cancelled by `statement_timeout` (57014) is about this work, not about the
    // server: it is worth retrying later, and isolating the batch finds what is slow.
    if *code == SqlState::QUERY_CANCELED {
        return Failure::Transient;
    }
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

/// How quickly a dead peer is noticed on an idle or a busy connection: keepalive probes after
/// 10 s idle, every 5 s, 3 of them; unacknowledged data for 10 s. Without them a black-holed
/// PostgreSQL holds a connection for the kernel's ~15 minutes of retransmits.
fn detect_dead_peers(config: &mut tokio_postgres::Config) {
    config
        .connect_timeout(Duration::from_secs(5))
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(10))
        .keepalives_interval(Duration::from_secs(5))
        .keepalives_retries(3)
        .tcp_user_timeout(Duration::from_secs(10));
}

/// Whether the server answers `SELECT 1` on a fresh connection within `timeout`: tells "the
/// database is down" from "this work fails" when a batch's connection broke.
pub async fn probe(database_url: &str, timeout: Duration) -> bool {
    let work = async {
        let mut target = target(database_url)?;
        target.config.connect_timeout(timeout);
        let (client, driver) = connect(target).await?;
        client.simple_query("SELECT 1").await?;
        drop(client);
        let _ = driver.await;
        Ok::<_, DbError>(())
    };
    matches!(tokio::time::timeout(timeout, work).await, Ok(Ok(())))
}

/// A pool whose connections are checked before reuse, so a restarted server is noticed.
pub fn pool(database_url: &str, size: usize) -> Result<Pool, DbError> {
    let target = target(database_url)?;
    let mut config = target.config;
    config.application_name("catena-ingest");
    detect_dead_peers(&mut config);
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

/// Forward every notification on `channel` as a wake-up until shutdown, reconnecting after a
/// lost connection (notifications sent meanwhile are missed: a listener must not depend on them
/// for correctness, only for promptness).
pub fn spawn_listener(
    database_url: String,
    channel: &'static str,
    wake: tokio::sync::mpsc::Sender<()>,
    shutdown: crate::shutdown::Shutdown,
) {
    tokio::spawn(async move {
        while !shutdown.is_triggered() {
            let listened = async {
                let target = target(&database_url)?;
                match target.tls {
                    Some(tls) => {
                        let (client, connection) = target.config.connect(tls).await?;
                        listen_on(client, connection, channel, &wake).await
                    }
                    None => {
                        let (client, connection) = target.config.connect(NoTls).await?;
                        listen_on(client, connection, channel, &wake).await
                    }
                }
            };
            tokio::select! {
                _ = shutdown.wait() => return,
                result = listened => if let Err(error) = result {
                    tracing::debug!(%error, channel, "LISTEN connection lost");
                },
            }
            tokio::select! {
                _ = shutdown.wait() => return,
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
        }
    });
}

async fn listen_on<S, T>(
    client: tokio_postgres::Client,
    mut connection: tokio_postgres::Connection<S, T>,
    channel: &str,
    wake: &tokio::sync::mpsc::Sender<()>,
) -> Result<(), DbError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures::StreamExt;
    let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
    let statement = format!("LISTEN {channel}");
    let listen = client.batch_execute(&statement);
    tokio::pin!(listen);
    let mut listening = false;
    loop {
        tokio::select! {
            done = &mut listen, if !listening => { done?; listening = true; }
            message = messages.next() => match message {
                Some(Ok(tokio_postgres::AsyncMessage::Notification(_))) => {
                    let _ = wake.try_send(());
                }
                Some(Ok(_)) => {}
                Some(Err(error)) => return Err(error.into()),
                None => return Ok(()),
            },
        }
    }
}
