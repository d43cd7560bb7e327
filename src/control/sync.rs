//! `subscriptions sync`: make Catena hold exactly one subscription of ours per desired event
//! name, each signed with a secret we generated and every relay loaded first
//! (catena-control-plane.md §2.1). Every step is idempotent and safe to rerun after a crash:
//!
//! - a missing name gets a secret written as a pending `*` entry, the barrier, then the create;
//!   the id is recorded and the entry re-keyed to it;
//! - a create that fails for any reason (409 on a hand-made duplicate, a lost answer) re-lists:
//!   exactly one unregistered candidate with that name, our URL and no filters is adopted by
//!   giving it our pending secret; several are drift (`--adopt ID` picks one);
//! - a registered subscription Catena no longer has is created again;
//! - one whose secret we lost is given a new one (the barrier first, as always);
//! - rotation overlaps that have passed are retired; `--prune` deletes our own subscriptions
//!   outside the set. Subscriptions we never created or adopted are never touched.

use std::collections::HashSet;

use chrono::Utc;
use serde::Serialize;

use super::registry::{self, Registered};
use super::secrets_file::{Entry, SecretsFile, fingerprint, generate_secret};
use super::{Control, ControlError, Mutation};
use crate::catena::model::{CreateWebhook, PatchWebhook, Webhook, WebhookStatus, mask_url};

/// What to sync to.
#[derive(Debug, Clone)]
pub struct SyncPlan {
    pub public_url: String,
    pub events: Vec<String>,
    pub dry_run: bool,
    pub adopt: Vec<String>,
    pub prune: bool,
}

/// What one sync did (or, with `--dry-run`, would do). `--json` prints it.
#[derive(Debug, Default, Serialize)]
pub struct SyncReport {
    pub dry_run: bool,
    pub unchanged: Vec<String>,
    pub created: Vec<Change>,
    pub adopted: Vec<Change>,
    pub recreated: Vec<Change>,
    pub new_secret: Vec<Change>,
    pub pruned: Vec<Change>,
    pub retired_secrets: usize,
    pub drift: Vec<Drift>,
    pub warnings: Vec<String>,
    /// POST, PATCH and DELETE calls made at Catena.
    pub mutating_calls: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Change {
    pub event_name: String,
    pub webhook_id: Option<String>,
}

/// Something sync could not settle by itself: exit code 2.
#[derive(Debug, Clone, Serialize)]
pub struct Drift {
    pub event_name: String,
    pub reason: String,
    pub candidates: Vec<String>,
}

impl SyncReport {
    pub fn exit_code(&self) -> i32 {
        let changes = self.created.len()
            + self.adopted.len()
            + self.recreated.len()
            + self.new_secret.len()
            + self.pruned.len();
        if !self.drift.is_empty() || (self.dry_run && changes > 0) {
            2
        } else {
            0
        }
    }
}

const ACTOR: &str = "sync";

pub async fn sync(control: &Control<'_>, plan: &SyncPlan) -> Result<SyncReport, ControlError> {
    let mut report = SyncReport {
        dry_run: plan.dry_run,
        ..SyncReport::default()
    };
    control.catena.authenticate().await?;
    if let Some(scope) = control.catena.granted_scope()
        && !scope.split_whitespace().any(|s| s.starts_with("webhook:"))
    {
        report.warnings.push(format!(
            "the token's scope `{scope}` has no webhook:* scope; ask Catena support to grant webhook:create, webhook:read, webhook:update and webhook:delete"
        ));
    }
    let mut remote = control.catena.list_all().await?;
    let mut file = control.read_file().await?;
    let ever_registered: HashSet<String> =
        registry::all_ids(control.db).await?.into_iter().collect();
    let mut live = registry::live(control.db).await?;

    // Registered subscriptions Catena no longer has (404 or deleted): to be created again.
    let mut gone = Vec::new();
    for row in &live {
        match remote.iter().find(|w| w.id == row.webhook_id) {
            Some(w) if w.status != WebhookStatus::Deleted => {
                registry::observe_status(control.db, row, w.status).await?;
            }
            _ => gone.push(row.clone()),
        }
    }
    for row in &gone {
        if plan.dry_run {
            continue;
        }
        registry::mark_deleted(control.db, &row.webhook_id).await?;
        registry::log(
            control.db,
            ACTOR,
            "forget",
            Some(&row.webhook_id),
            Some(&row.event_name),
            "ok",
            "gone at Catena",
        )
        .await?;
    }
    if !plan.dry_run {
        live.retain(|row| !gone.iter().any(|g| g.webhook_id == row.webhook_id));
    }

    // Every missing name's secret is written (a pending `*` entry, reused after a crash) and
    // loaded by every relay in one barrier, before any create: a sync of 22 names waits for the
    // relays once, not 22 times.
    let missing: Vec<&String> = plan
        .events
        .iter()
        .filter(|name| {
            !live
                .iter()
                .any(|r| &&r.event_name == name && r.url == plan.public_url)
        })
        .collect();
    if !plan.dry_run {
        let mut added = false;
        for event_name in &missing {
            if file.pending(event_name).is_none() {
                file.add(Entry {
                    id: "*".into(),
                    secret: generate_secret(),
                    event_name: event_name.to_string(),
                    retire_after: None,
                });
                added = true;
            }
        }
        if added {
            control.write_and_wait(&file).await?;
        }
    }

    for event_name in &plan.events {
        let mine = live
            .iter()
            .find(|r| &r.event_name == event_name && r.url == plan.public_url)
            .cloned();
        match mine {
            Some(row) if gone.iter().any(|g| g.webhook_id == row.webhook_id) => {
                // dry run only: it would be created again
                report.recreated.push(Change {
                    event_name: event_name.clone(),
                    webhook_id: None,
                });
            }
            Some(row) => {
                let has_secret = row
                    .secret_fp
                    .as_deref()
                    .is_some_and(|fp| file.secret_of(&row.webhook_id, fp).is_some());
                if has_secret {
                    report.unchanged.push(event_name.clone());
                } else {
                    give_new_secret(control, plan, &mut file, &row, &mut report).await?;
                }
            }
            None => {
                let was_registered = gone.iter().any(|g| &g.event_name == event_name);
                create_or_adopt(
                    control,
                    plan,
                    &mut file,
                    &mut remote,
                    &ever_registered,
                    event_name,
                    was_registered,
                    &mut report,
                )
                .await?;
            }
        }
    }

    // Ours, but outside the set (or for another public URL).
    for row in &live {
        if plan.events.contains(&row.event_name) && row.url == plan.public_url {
            continue;
        }
        if !plan.prune {
            report.warnings.push(format!(
                "{} ({}) is ours but outside the set: `--prune` deletes it",
                row.webhook_id, row.event_name
            ));
            continue;
        }
        if !plan.dry_run {
            match control.catena.delete(&row.webhook_id).await {
                Ok(()) => {}
                Err(error) if error.is(reqwest::StatusCode::NOT_FOUND) => {}
                Err(error) => return Err(error.into()),
            }
            report.mutating_calls += 1;
            registry::mark_deleted(control.db, &row.webhook_id).await?;
            registry::log(
                control.db,
                ACTOR,
                "delete",
                Some(&row.webhook_id),
                Some(&row.event_name),
                "ok",
                "pruned",
            )
            .await?;
            file.remove_where(|e| e.id == row.webhook_id);
        }
        report.pruned.push(Change {
            event_name: row.event_name.clone(),
            webhook_id: Some(row.webhook_id.clone()),
        });
    }

    // Secrets nothing signs with any more: rotation overlaps that have passed, and the entries
    // of subscriptions that are gone. Never the one Catena signs with per the registry.
    let live = registry::live(control.db).await?;
    let now = Utc::now();
    let retired = file.remove_where(|entry| {
        if entry.is_pending() {
            return false;
        }
        let Some(row) = live.iter().find(|r| r.webhook_id == entry.id) else {
            return ever_registered.contains(&entry.id)
                || gone.iter().any(|g| g.webhook_id == entry.id);
        };
        let current = row.secret_fp.as_deref() == Some(&*entry.fingerprint());
        !current && entry.retire_after.is_some_and(|at| at <= now)
    });
    report.retired_secrets = retired;
    if retired > 0 && !plan.dry_run {
        // Removing a secret needs no barrier: nothing signs with it.
        control.sink.write(&file.render()).await?;
        registry::log(
            control.db,
            ACTOR,
            "retire_secret",
            None,
            None,
            "ok",
            &format!("{retired} retired"),
        )
        .await?;
    }
    Ok(report)
}

/// A missing name: pending secret, barrier, create; on any failure, re-list and adopt.
#[allow(clippy::too_many_arguments)]
async fn create_or_adopt(
    control: &Control<'_>,
    plan: &SyncPlan,
    file: &mut SecretsFile,
    remote: &mut Vec<Webhook>,
    ever_registered: &HashSet<String>,
    event_name: &str,
    was_registered: bool,
    report: &mut SyncReport,
) -> Result<(), ControlError> {
    let change = Change {
        event_name: event_name.to_owned(),
        webhook_id: None,
    };
    if plan.dry_run {
        if was_registered {
            report.recreated.push(change);
        } else {
            report.created.push(change);
        }
        return Ok(());
    }
    // Written and loaded by every relay before this (or left by a crash, when Catena may
    // already sign with it).
    let secret = file
        .pending(event_name)
        .expect("every missing name has a pending secret")
        .secret
        .clone();
    let created = control
        .catena
        .create(&CreateWebhook {
            url: plan.public_url.clone(),
            event_name: event_name.to_owned(),
            filters: None,
            secret: Some(secret.clone()),
        })
        .await;
    report.mutating_calls += 1;
    let (webhook_id, action) = match created {
        Ok(webhook) => (
            webhook.id,
            if was_registered {
                Mutation::Recreated
            } else {
                Mutation::Created
            },
        ),
        Err(error) if error.is(reqwest::StatusCode::UNPROCESSABLE_ENTITY) => {
            // An older event-name enum: a warning and drift, not an error.
            file.remove_where(|e| e.is_pending() && e.event_name == event_name);
            control.sink.write(&file.render()).await?;
            report.drift.push(Drift {
                event_name: event_name.to_owned(),
                reason: format!("Catena refused the name: {error}"),
                candidates: vec![],
            });
            return Ok(());
        }
        Err(error) => {
            // A duplicate (409), or an answer that may have been lost after Catena created it.
            tracing::info!(event_name, %error, "create failed, looking for a subscription to adopt");
            *remote = control.catena.list_all().await?;
            let masked = mask_url(&plan.public_url);
            let mut candidates: Vec<&Webhook> = remote
                .iter()
                .filter(|w| {
                    w.event_name == event_name
                        && w.url == masked
                        && w.filters
                            .as_ref()
                            .is_none_or(|f| f.fleet_ids.is_none() && f.fleet_refs.is_none())
                        && w.status != WebhookStatus::Deleted
                        && !ever_registered.contains(&w.id)
                })
                .collect();
            if candidates.len() > 1 && !plan.adopt.is_empty() {
                candidates.retain(|w| plan.adopt.contains(&w.id));
            }
            match candidates[..] {
                [one] => {
                    let id = one.id.clone();
                    control
                        .catena
                        .patch(
                            &id,
                            &PatchWebhook {
                                secret: Some(secret.clone()),
                                ..PatchWebhook::default()
                            },
                        )
                        .await?;
                    report.mutating_calls += 1;
                    (id, Mutation::Adopted)
                }
                [] => return Err(error.into()),
                _ => {
                    report.drift.push(Drift {
                        event_name: event_name.to_owned(),
                        reason: "several subscriptions could be ours: pick one with --adopt".into(),
                        candidates: candidates.iter().map(|w| w.id.clone()).collect(),
                    });
                    return Ok(());
                }
            }
        }
    };
    registry::record(
        control.db,
        &webhook_id,
        event_name,
        &plan.public_url,
        &fingerprint(&secret),
    )
    .await?;
    registry::log(
        control.db,
        ACTOR,
        action.as_str(),
        Some(&webhook_id),
        Some(event_name),
        "ok",
        "",
    )
    .await?;
    // The `*` entry already verifies this id; the re-keyed one takes over in the same write.
    file.rekey(event_name, &secret, &webhook_id);
    control.sink.write(&file.render()).await?;
    tracing::info!(
        event_name,
        webhook_id,
        action = action.as_str(),
        "subscription in place"
    );
    let change = Change {
        event_name: event_name.to_owned(),
        webhook_id: Some(webhook_id),
    };
    match action {
        Mutation::Created => report.created.push(change),
        Mutation::Recreated => report.recreated.push(change),
        Mutation::Adopted => report.adopted.push(change),
    }
    Ok(())
}

/// Ours at Catena, but its secret is not in the sink (lost, or a sink replaced): a rotation
/// without an old secret to overlap with.
async fn give_new_secret(
    control: &Control<'_>,
    plan: &SyncPlan,
    file: &mut SecretsFile,
    row: &Registered,
    report: &mut SyncReport,
) -> Result<(), ControlError> {
    report.new_secret.push(Change {
        event_name: row.event_name.clone(),
        webhook_id: Some(row.webhook_id.clone()),
    });
    if plan.dry_run {
        return Ok(());
    }
    report.warnings.push(format!(
        "{} ({}): its secret is not in the sink; it gets a new one",
        row.webhook_id, row.event_name
    ));
    let secret = generate_secret();
    file.add(Entry {
        id: row.webhook_id.clone(),
        secret: secret.clone(),
        event_name: row.event_name.clone(),
        retire_after: None,
    });
    control.write_and_wait(file).await?;
    control
        .switch_secret(ACTOR, row, &secret, "secret not in the sink")
        .await?;
    report.mutating_calls += 1;
    Ok(())
}
