//! The alert rows of the subjects a batch touched: their timelines and rows as read back, turned
//! into the writes that make the rows equal the episodes ([`super::episodes`]).

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use tokio_postgres::Row;
use uuid::Uuid;

use super::episodes::{
    AlertChange, AlertRow, Health, Version, connection_episodes, reconcile as reconcile_rows,
    schedule_episodes,
};
use super::plan::{CONNECTION, Op, SCHEDULE, p};
use super::sql::{ALERTS_INSERT, ALERTS_UPDATE};
use crate::alerts::AlertKind;

/// Why a connection alert ended (`alerts.resolution`).
const CONNECTION_RECOVERED: &str = "connection active again";

/// The connections and schedules whose status timelines a batch extended.
#[derive(Debug, Default)]
pub(super) struct AlertSubjects {
    pub connections: Vec<Uuid>,
    pub schedules: Vec<Uuid>,
}

impl AlertSubjects {
    pub fn is_empty(&self) -> bool {
        self.connections.is_empty() && self.schedules.is_empty()
    }

    /// `status_observations.kind` of each of [`Self::ids`].
    pub fn kinds(&self) -> Vec<&'static str> {
        let connections = std::iter::repeat_n(CONNECTION, self.connections.len());
        connections
            .chain(std::iter::repeat_n(SCHEDULE, self.schedules.len()))
            .collect()
    }

    pub fn ids(&self) -> Vec<Uuid> {
        self.connections
            .iter()
            .chain(&self.schedules)
            .copied()
            .collect()
    }
}

/// A new alert row.
struct Insert {
    alert_id: Uuid,
    kind: AlertKind,
    subject: Uuid,
    opened: Version,
    resolved_at: Option<DateTime<Utc>>,
    page: bool,
}

/// An existing row moved to its episode's bounds.
struct Update {
    alert_id: Uuid,
    kind: AlertKind,
    opened: Version,
    resolved_at: Option<DateTime<Utc>>,
    announce_resolve: bool,
}

/// What one batch writes to `alerts` (and, for pages and announced ends, `alert_outbox`).
#[derive(Default)]
pub(super) struct AlertWrites {
    inserts: Vec<Insert>,
    updates: Vec<Update>,
}

fn resolution(kind: AlertKind, resolved_at: Option<DateTime<Utc>>) -> Option<&'static str> {
    match kind {
        AlertKind::ConnectionStale => resolved_at.map(|_| CONNECTION_RECOVERED),
        // Only a person ends a schedule's episode, and a manual row is never rewritten. The
        // reconciler's kinds are never written here.
        AlertKind::ScheduleDeactivated
        | AlertKind::WebhookStale
        | AlertKind::WebhookDlqBacklog
        | AlertKind::WebhookMissing => None,
    }
}

impl AlertWrites {
    /// Kinds of the rows that page, for `catena_alerts_raised_total`.
    pub fn paged_kinds(&self) -> Vec<AlertKind> {
        self.inserts
            .iter()
            .filter(|i| i.page)
            .map(|i| i.kind)
            .collect()
    }

    /// The ids of the rows this batch creates.
    pub fn inserted(&self) -> impl Iterator<Item = Uuid> + '_ {
        self.inserts.iter().map(|i| i.alert_id)
    }

    /// The statements: moves first (so a row closing and its successor opening never hold
    /// two open rows of one subject at once), then new rows.
    pub fn ops(&self) -> Vec<Op> {
        let mut ops = Vec::new();
        if !self.updates.is_empty() {
            let mut updates: Vec<&Update> = self.updates.iter().collect();
            updates.sort_by_key(|u| u.alert_id);
            ops.push(Op {
                sql: ALERTS_UPDATE,
                params: vec![
                    p(updates.iter().map(|u| u.alert_id).collect::<Vec<_>>()),
                    p(updates.iter().map(|u| u.opened.0).collect::<Vec<_>>()),
                    p(updates
                        .iter()
                        .map(|u| u.opened.1.clone())
                        .collect::<Vec<_>>()),
                    p(updates.iter().map(|u| u.resolved_at).collect::<Vec<_>>()),
                    p(updates
                        .iter()
                        .map(|u| resolution(u.kind, u.resolved_at))
                        .collect::<Vec<_>>()),
                    p(updates
                        .iter()
                        .map(|u| u.announce_resolve)
                        .collect::<Vec<_>>()),
                ],
            });
        }
        if !self.inserts.is_empty() {
            let i = &self.inserts;
            ops.push(Op {
                sql: ALERTS_INSERT,
                params: vec![
                    p(i.iter().map(|n| n.alert_id).collect::<Vec<_>>()),
                    p(i.iter().map(|n| n.kind.as_str()).collect::<Vec<_>>()),
                    p(i.iter().map(|n| n.subject).collect::<Vec<_>>()),
                    p(i.iter().map(|n| n.opened.0).collect::<Vec<_>>()),
                    p(i.iter().map(|n| n.opened.1.clone()).collect::<Vec<_>>()),
                    p(i.iter().map(|n| n.resolved_at).collect::<Vec<_>>()),
                    p(i.iter()
                        .map(|n| resolution(n.kind, n.resolved_at))
                        .collect::<Vec<_>>()),
                    p(i.iter().map(|n| n.page).collect::<Vec<_>>()),
                ],
            });
        }
        ops
    }
}

/// Reconcile every subject from its timeline (`ALERT_TIMELINES` rows) and its alert rows
/// (`ALERT_ROWS` rows).
pub(super) fn reconcile(subjects: &AlertSubjects, timelines: &[Row], rows: &[Row]) -> AlertWrites {
    let mut observed: HashMap<(&str, Uuid), Vec<(Version, String)>> = HashMap::new();
    for row in timelines {
        let key = (row.get::<_, &str>("kind"), row.get::<_, Uuid>("subject_id"));
        let version = (row.get("observed_at"), row.get("event_key"));
        observed
            .entry(key)
            .or_default()
            .push((version, row.get("status")));
    }
    let mut existing: HashMap<(AlertKind, Uuid), Vec<AlertRow>> = HashMap::new();
    for row in rows {
        let Some(kind) = AlertKind::parse(row.get("kind")) else {
            continue;
        };
        existing
            .entry((kind, row.get("subject_id")))
            .or_default()
            .push(AlertRow {
                alert_id: row.get("alert_id"),
                opened: (row.get("opened_at"), row.get("opened_key")),
                resolved_at: row.get("resolved_at"),
                manual: row.get::<_, Option<bool>>("manual").unwrap_or(false),
                paged: row.get("paged"),
            });
    }
    let mut writes = AlertWrites::default();
    let none = Vec::new();
    for (kind, observation_kind, ids) in [
        (
            AlertKind::ConnectionStale,
            CONNECTION,
            &subjects.connections,
        ),
        (
            AlertKind::ScheduleDeactivated,
            SCHEDULE,
            &subjects.schedules,
        ),
    ] {
        for &subject in ids {
            let timeline = observed.get(&(observation_kind, subject)).unwrap_or(&none);
            let rows = existing
                .get(&(kind, subject))
                .map_or(&[][..], Vec::as_slice);
            let episodes = match kind {
                AlertKind::ConnectionStale => {
                    let health: Vec<(Version, Health)> = timeline
                        .iter()
                        .map(|(v, status)| (v.clone(), Health::of(status)))
                        .collect();
                    connection_episodes(&health)
                }
                _ => {
                    let deactivations: Vec<Version> =
                        timeline.iter().map(|(v, _)| v.clone()).collect();
                    schedule_episodes(&deactivations, rows)
                }
            };
            for change in reconcile_rows(&episodes, rows) {
                match change {
                    AlertChange::Insert { episode, page } => writes.inserts.push(Insert {
                        alert_id: Uuid::new_v4(),
                        kind,
                        subject,
                        resolved_at: episode.resolved_at(),
                        opened: episode.opened,
                        page,
                    }),
                    AlertChange::Update {
                        alert_id,
                        episode,
                        announce_resolve,
                    } => writes.updates.push(Update {
                        alert_id,
                        kind,
                        resolved_at: episode.resolved_at(),
                        opened: episode.opened,
                        announce_resolve,
                    }),
                }
            }
        }
    }
    writes
}
