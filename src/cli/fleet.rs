//! `catena-ingest fleet show`

use anyhow::bail;
use clap::{Args, Subcommand};
use serde_json::Value;

use catena_ingest::config::DatabaseSettings;
use catena_ingest::ops::fleet::{self, FleetView};

#[derive(Args, Debug)]
pub struct Fleet {
    #[command(flatten)]
    database: DatabaseSettings,
    #[command(subcommand)]
    command: FleetCommand,
}

#[derive(Subcommand, Debug)]
enum FleetCommand {
    /// Show a fleet by fleet_ref or fleet_id.
    Show {
        ref_or_id: String,
        #[arg(long)]
        json: bool,
    },
}

impl Fleet {
    pub async fn run(self) -> anyhow::Result<()> {
        let FleetCommand::Show { ref_or_id, json } = self.command;
        let client = super::db_client(&self.database).await?;
        match fleet::show(&client, &ref_or_id).await? {
            Some(view) if json => println!("{}", serde_json::to_string_pretty(&view)?),
            Some(view) => print(&view),
            None => bail!("no fleet or invitation matches `{ref_or_id}`"),
        }
        Ok(())
    }
}

fn print(view: &FleetView) {
    let field = |v: &Value, k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("-").to_owned();
    if !view.fleet.is_null() {
        println!(
            "fleet {} ({})  onboarding={}  share={}",
            field(&view.fleet, "fleet_ref"),
            field(&view.fleet, "fleet_id"),
            field(&view.fleet, "onboarding_status"),
            field(&view.fleet, "share_status")
        );
    }
    if !view.invitation.is_null() {
        println!(
            "invitation {}  status={}  expires_at={}  decline_reason={}",
            field(&view.invitation, "invitation_id"),
            field(&view.invitation, "status"),
            field(&view.invitation, "expires_at"),
            field(&view.invitation, "decline_reason")
        );
    }
    println!("connections:");
    for c in &view.connections {
        println!(
            "  {}  {:<16} {:<7} staled_at={}",
            field(c, "connection_id"),
            field(c, "source_name"),
            field(c, "status"),
            field(c, "staled_at")
        );
    }
    println!("schedules:");
    for s in &view.schedules {
        println!(
            "  {}  {:<18} {:<12} failed_executions={} last_failed_at={}",
            field(s, "schedule_id"),
            field(s, "resource"),
            field(s, "status"),
            field(s, "failed_executions"),
            field(s, "last_failed_at")
        );
    }
    println!("open alerts:");
    for a in &view.open_alerts {
        println!(
            "  {}  {:<20} subject={} opened_at={}",
            field(a, "alert_id"),
            field(a, "kind"),
            field(a, "subject_id"),
            field(a, "opened_at")
        );
    }
    println!("last events:");
    for e in &view.last_events {
        println!(
            "  {:<26} {}  {}",
            field(e, "event_name"),
            field(e, "event_time"),
            field(e, "outcome")
        );
    }
}
