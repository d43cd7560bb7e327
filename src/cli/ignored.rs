//! `catena-ingest ignored list | reapply`

use clap::{Args, Subcommand};

use catena_ingest::config::{DatabaseSettings, Rules};
use catena_ingest::ops::ignored;

#[derive(Args, Debug)]
pub struct Ignored {
    #[command(flatten)]
    database: DatabaseSettings,
    #[command(subcommand)]
    command: IgnoredCommand,
}

#[derive(Subcommand, Debug)]
enum IgnoredCommand {
    /// List stored events this version (or an older one) did not apply, newest first.
    List {
        /// Only this event name.
        #[arg(long = "event")]
        event_name: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: i64,
        #[arg(long)]
        json: bool,
    },
    /// Apply the stored events this version understands (after an upgrade); the rest stay.
    Reapply {
        /// Only this event name.
        #[arg(long = "event")]
        event_name: Option<String>,
        /// At most this many per run (oldest first).
        #[arg(long, default_value_t = 10_000)]
        limit: i64,
        /// Count what would be applied; change nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        rules: Rules,
    },
}

impl Ignored {
    pub async fn run(self) -> anyhow::Result<()> {
        match self.command {
            IgnoredCommand::List {
                event_name,
                limit,
                json,
            } => {
                let client = super::db_client(&self.database).await?;
                let found = ignored::list(&client, event_name.as_deref(), limit).await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&found)?);
                    return Ok(());
                }
                println!(
                    "{:<40}  {:<28}  {:>8}  IGNORED_AT",
                    "EVENT_KEY", "EVENT", "BYTES"
                );
                for i in &found {
                    println!(
                        "{:<40}  {:<28}  {:>8}  {}",
                        i.event_key,
                        i.event_name,
                        i.bytes,
                        i.ignored_at
                            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                    );
                }
                println!("({} events)", found.len());
            }
            IgnoredCommand::Reapply {
                event_name,
                limit,
                dry_run,
                rules,
            } => {
                let report = ignored::reapply(
                    &self.database.database_url,
                    event_name.as_deref(),
                    limit,
                    &rules,
                    dry_run,
                )
                .await?;
                println!(
                    "{}examined={} applied={} still_ignored={} undecodable={}",
                    if dry_run { "dry run: " } else { "" },
                    report.examined,
                    report.applied,
                    report.still_ignored,
                    report.undecodable
                );
            }
        }
        Ok(())
    }
}
