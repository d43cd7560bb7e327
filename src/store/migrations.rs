//! Embedded, versioned SQL migrations: applied in order, each once, each in its own
//! transaction, serialised across processes by an advisory lock.

use tokio_postgres::error::SqlState;

use super::{DbError, connect, target};

/// Versioned migrations, applied in order, each once, each in its own transaction.
const MIGRATIONS: &[(i32, &str, &str)] = &[
    (
        1,
        "read_model",
        include_str!("../../migrations/0001_read_model.sql"),
    ),
    (
        2,
        "notifications",
        include_str!("../../migrations/0002_notifications.sql"),
    ),
    (
        3,
        "event_fleet",
        include_str!("../../migrations/0003_event_fleet.sql"),
    ),
    (
        4,
        "indexes",
        include_str!("../../migrations/0004_indexes.sql"),
    ),
    (
        5,
        "retention",
        include_str!("../../migrations/0005_retention.sql"),
    ),
    (
        6,
        "order_independent_state",
        include_str!("../../migrations/0006_order_independent_state.sql"),
    ),
    (
        7,
        "ignored_events",
        include_str!("../../migrations/0007_ignored_events.sql"),
    ),
    (
        8,
        "control_plane",
        include_str!("../../migrations/0008_control_plane.sql"),
    ),
    (
        9,
        "onboarding_counts",
        include_str!("../../migrations/0009_onboarding_counts.sql"),
    ),
];

/// Serialises concurrent `migrate` runs (any 64-bit constant unique to this app).
const MIGRATION_LOCK: i64 = 0x6361_7465_6e61_0001;

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
