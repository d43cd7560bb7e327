//! `subscriptions rotate`: a new secret for each chosen subscription without a moment in which a
//! delivery fails. Catena has no overlap of its own (once it switches, the old secret fails), so
//! we make one: both secrets go to the sink and every relay loads them, then Catena switches,
//! and the old one stays for `--overlap` (longer than Catena's retries, a breaker's grace and
//! any lag in its signers) before `sync` retires it. A crash before the switch leaves an extra
//! secret; after it, a rerun switches again.

use std::time::Duration;

use chrono::Utc;
use serde::Serialize;

use super::registry;
use super::secrets_file::{Entry, generate_secret};
use super::{Control, ControlError};

/// Which subscriptions: all of ours, or these ids.
#[derive(Debug, Clone)]
pub enum Targets {
    All,
    Ids(Vec<String>),
}

#[derive(Debug, Default, Serialize)]
pub struct RotateReport {
    pub rotated: Vec<String>,
    pub unknown: Vec<String>,
}

const ACTOR: &str = "rotate";

pub async fn rotate(
    control: &Control<'_>,
    targets: &Targets,
    overlap: Duration,
) -> Result<RotateReport, ControlError> {
    let mut report = RotateReport::default();
    let live = registry::live(control.db).await?;
    let chosen: Vec<_> = match targets {
        Targets::All => live.clone(),
        Targets::Ids(ids) => {
            for id in ids {
                if !live.iter().any(|r| &r.webhook_id == id) {
                    report.unknown.push(id.clone());
                }
            }
            live.iter()
                .filter(|r| ids.contains(&r.webhook_id))
                .cloned()
                .collect()
        }
    };
    if chosen.is_empty() {
        return Ok(report);
    }
    control.catena.authenticate().await?;
    let mut file = control.read_file().await?;
    let retire_after =
        Utc::now() + chrono::Duration::from_std(overlap).unwrap_or(chrono::Duration::hours(1));
    let mut new_secrets = Vec::new();
    for row in &chosen {
        for entry in file.entries.iter_mut().filter(|e| e.id == row.webhook_id) {
            // Every older secret of this id now has an end; the one Catena signs with is kept
            // past it until the registry says Catena switched (sync checks).
            entry.retire_after.get_or_insert(retire_after);
        }
        let secret = generate_secret();
        file.add(Entry {
            id: row.webhook_id.clone(),
            secret: secret.clone(),
            event_name: row.event_name.clone(),
            retire_after: None,
        });
        new_secrets.push((row, secret));
    }
    // 1. Both secrets in every relay.
    control.write_and_wait(&file).await?;
    // 2. Then Catena switches, one subscription at a time.
    for (row, secret) in new_secrets {
        control
            .switch_secret(
                ACTOR,
                row,
                &secret,
                &format!("old secret kept until {retire_after}"),
            )
            .await?;
        tracing::info!(webhook_id = %row.webhook_id, event_name = %row.event_name, "secret rotated");
        report.rotated.push(row.webhook_id.clone());
    }
    Ok(report)
}
