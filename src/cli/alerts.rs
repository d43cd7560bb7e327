//! `catena-ingest alerts list | resolve`

use clap::{Args, Subcommand};

use catena_ingest::alerts::{Alert, AlertKind};
use catena_ingest::config::DatabaseSettings;
use catena_ingest::ops::alerts::{self, ListFilter};

#[derive(Args, Debug)]
pub struct Alerts {
    #[command(flatten)]
    database: DatabaseSettings,
    #[command(subcommand)]
    command: AlertsCommand,
}

fn parse_kind(text: &str) -> Result<AlertKind, String> {
    AlertKind::parse(text).ok_or_else(|| {
        let known: Vec<_> = AlertKind::ALL.iter().map(|k| k.as_str()).collect();
        format!("unknown alert kind `{text}` (one of {})", known.join(", "))
    })
}

#[derive(Subcommand, Debug)]
enum AlertsCommand {
    /// List alerts, newest first.
    List {
        /// Only open alerts.
        #[arg(long)]
        open: bool,
        /// Only this kind (connection_stale or schedule_deactivated).
        #[arg(long, value_parser = parse_kind)]
        kind: Option<AlertKind>,
        /// Only this fleet_ref.
        #[arg(long)]
        fleet: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: i64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Resolve an open alert by hand.
    Resolve {
        /// The alert_id.
        id: uuid::Uuid,
        /// Why (kept in alerts.resolution_note).
        #[arg(long)]
        note: String,
    },
}

impl Alerts {
    pub async fn run(self) -> anyhow::Result<()> {
        let client = super::db_client(&self.database).await?;
        match self.command {
            AlertsCommand::List {
                open,
                kind,
                fleet,
                limit,
                json,
            } => {
                let filter = ListFilter {
                    open_only: open,
                    kind,
                    fleet_ref: fleet,
                    limit,
                };
                let found = alerts::list(&client, &filter).await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&found)?);
                } else {
                    print_table(&found);
                }
            }
            AlertsCommand::Resolve { id, note } => {
                alerts::resolve(&client, id, &note).await?;
                println!("alert {id} resolved; the sinks will be notified");
            }
        }
        Ok(())
    }
}

/// Print alerts as an aligned table.
fn print_table(alerts: &[Alert]) {
    println!(
        "{:<36}  {:<20}  {:<8}  {:<16}  {:<25}  SUBJECT",
        "ALERT_ID", "KIND", "STATE", "FLEET_REF", "OPENED_AT"
    );
    for a in alerts {
        println!(
            "{:<36}  {:<20}  {:<8}  {:<16}  {:<25}  {}",
            a.alert_id,
            a.kind.as_str(),
            a.state,
            a.fleet_ref.as_deref().unwrap_or("-"),
            a.opened_at
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            a.subject_id
        );
    }
    println!("({} alerts)", alerts.len());
}
