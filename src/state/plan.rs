//! The pure half of applying a batch: what each event changes, gathered per statement kind into
//! rows, merged where the SQL's own rules allow, and turned into statements ([`Op`]s). No I/O,
//! so the state rules can be unit-tested here.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::hash::Hash;

use chrono::{DateTime, Utc};
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use super::alerts::AlertSubjects;
use super::sql::*;
use super::{PgInterval, Rules};
use crate::envelope::{Change, Event, Onboarding};

pub(super) type Param = Box<dyn ToSql + Sync + Send>;

/// One statement with its (array) parameters.
pub(super) struct Op {
    pub sql: &'static str,
    pub params: Vec<Param>,
}

pub(super) fn p<T: ToSql + Sync + Send + 'static>(value: T) -> Param {
    Box::new(value)
}

/// An event's version as sortable text, `<20-digit Unix microseconds>|<event key>`: it orders
/// like (event time, event key), for the columns that keep one (migration 0006).
pub(super) fn version(t: DateTime<Utc>, k: &str) -> String {
    format!("{:020}|{k}", t.timestamp_micros().max(0))
}

/// A latest-wins field: the newest non-null value seen, with its version.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Latest<T> {
    value: Option<T>,
    version: Option<String>,
}

impl<T> Latest<T> {
    fn new(value: Option<T>, version: &str) -> Self {
        let version = value.as_ref().map(|_| version.to_owned());
        Self { value, version }
    }

    /// The same rule as the SQL's: a non-null value with a greater version wins.
    fn merge(&mut self, other: Self) {
        if other.version > self.version {
            *self = other;
        }
    }
}

impl<T: Clone> Latest<T> {
    fn value(&self) -> Option<T> {
        self.value.clone()
    }
}

/// The smaller of two optional values, ignoring `None` (SQL's `LEAST`): an order-free merge for
/// identity fields that every event should carry alike.
fn least<T: Ord>(a: Option<T>, b: Option<T>) -> Option<T> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Split rows so that no key appears twice in one round.
fn rounds<T, K: Hash + Eq>(rows: &[T], key: impl Fn(&T) -> K) -> Vec<Vec<&T>> {
    let mut seen: HashMap<K, usize> = HashMap::with_capacity(rows.len());
    let mut out: Vec<Vec<&T>> = Vec::new();
    for row in rows {
        let n = seen.entry(key(row)).or_insert(0);
        if out.len() <= *n {
            out.push(Vec::new());
        }
        out[*n].push(row);
        *n += 1;
    }
    out
}

/// The rows of one statement kind, one per key of its `ON CONFLICT`, each merged on arrival by
/// the rules the statement itself applies. Those rules commute and associate, so one merged row
/// has the effect of the rounds it replaces ([`rounds`]): one statement, and one row to upsert
/// and lock, per key rather than per event (the executions of one connection reference it
/// dozens of times a batch).
pub(super) struct Merged<K, R> {
    rows: Vec<R>,
    index: HashMap<K, usize>,
}

impl<K, R> Default for Merged<K, R> {
    fn default() -> Self {
        Self {
            rows: Vec::new(),
            index: HashMap::new(),
        }
    }
}

impl<K: Hash + Eq, R> Merged<K, R> {
    fn add(&mut self, key: K, row: R, merge: impl FnOnce(&mut R, R)) {
        match self.index.entry(key) {
            Entry::Occupied(at) => merge(&mut self.rows[*at.get()], row),
            Entry::Vacant(slot) => {
                slot.insert(self.rows.len());
                self.rows.push(row);
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    fn all(&self) -> Vec<&R> {
        self.rows.iter().collect()
    }
}

/// Collect one column of a round.
fn col<T, V: ToSql + Sync + Send + 'static>(rows: &[&T], f: impl Fn(&T) -> V) -> Param {
    p(rows.iter().map(|r| f(r)).collect::<Vec<V>>())
}

/// One invitation's changes in a batch, already merged by the same rules the SQL applies (so
/// a lifecycle arriving in one batch is one row, not one statement round per event).
struct InvitationRow {
    id: Uuid,
    fleet_ref: Option<String>,
    fleet_id: Option<Uuid>,
    status: &'static str,
    rank: i16,
    status_at: DateTime<Utc>,
    status_key: String,
    /// Newest event time and key.
    t: DateTime<Utc>,
    k: String,
    decline_reason: Latest<String>,
    expires_at: Latest<DateTime<Utc>>,
    magic_link: Latest<String>,
    created_at: Option<DateTime<Utc>>,
    accepted_at: Option<DateTime<Utc>>,
    declined_at: Option<DateTime<Utc>>,
}

impl InvitationRow {
    /// [`INVITATIONS`]' rules: the status of the highest (rank, time, key), each latest-wins
    /// field by its own version, `LEAST`/`GREATEST` for the rest.
    fn merge(&mut self, row: Self) {
        if (row.rank, row.status_at, &row.status_key)
            > (self.rank, self.status_at, &self.status_key)
        {
            self.status = row.status;
            self.rank = row.rank;
            self.status_at = row.status_at;
            self.status_key = row.status_key;
        }
        let newer = (row.t, &row.k) > (self.t, &self.k);
        self.decline_reason.merge(row.decline_reason);
        self.expires_at.merge(row.expires_at);
        self.magic_link.merge(row.magic_link);
        self.fleet_ref = least(self.fleet_ref.take(), row.fleet_ref);
        self.fleet_id = least(self.fleet_id, row.fleet_id);
        self.created_at = least(self.created_at, row.created_at);
        self.accepted_at = least(self.accepted_at, row.accepted_at);
        self.declined_at = self.declined_at.max(row.declined_at);
        if newer {
            self.t = row.t;
            self.k = row.k;
        }
    }
}

struct StageRow {
    fleet_id: Uuid,
    fleet_ref: Option<String>,
    invitation_id: Option<Uuid>,
    stage: Onboarding,
    t: DateTime<Utc>,
    k: String,
}

impl StageRow {
    /// [`FLEET_STAGES`]' rules: the stage of the highest (rank, time, key), `LEAST` identities.
    fn merge(&mut self, row: Self) {
        self.fleet_ref = least(self.fleet_ref.take(), row.fleet_ref);
        self.invitation_id = least(self.invitation_id, row.invitation_id);
        if (row.stage.rank(), row.t, &row.k) > (self.stage.rank(), self.t, &self.k) {
            self.stage = row.stage;
            self.t = row.t;
            self.k = row.k;
        }
    }
}

struct ShareRow {
    id: Uuid,
    fleet_id: Uuid,
    invitation_id: Option<Uuid>,
    fleet_ref: Option<String>,
    status: String,
    scopes: Option<serde_json::Value>,
    effective_date: Option<DateTime<Utc>>,
    expiration_date: Option<DateTime<Utc>>,
    t: DateTime<Utc>,
    k: String,
}

impl ShareRow {
    /// [`SHARE_AGREEMENTS`]' rules: the newest record (time, key) as a whole, `LEAST` identities.
    fn merge(&mut self, mut row: Self) {
        row.fleet_id = self.fleet_id.min(row.fleet_id);
        row.invitation_id = least(self.invitation_id, row.invitation_id);
        row.fleet_ref = least(self.fleet_ref.take(), row.fleet_ref);
        if (row.t, &row.k) > (self.t, &self.k) {
            *self = row;
        } else {
            self.fleet_id = row.fleet_id;
            self.invitation_id = row.invitation_id;
            self.fleet_ref = row.fleet_ref;
        }
    }
}

/// The fleet side of a share agreement ([`FLEET_SHARES`]), one per fleet.
struct FleetShareRow {
    fleet_id: Uuid,
    fleet_ref: Option<String>,
    invitation_id: Option<Uuid>,
    /// The share agreement.
    id: Uuid,
    status: String,
    t: DateTime<Utc>,
    k: String,
}

impl FleetShareRow {
    /// [`FLEET_SHARES`]' rules: the newest share agreement (time, key) names the share and
    /// raises the stage to share_agreed at its time; `LEAST` identities.
    fn merge(&mut self, row: Self) {
        self.fleet_ref = least(self.fleet_ref.take(), row.fleet_ref);
        self.invitation_id = least(self.invitation_id, row.invitation_id);
        if (row.t, &row.k) > (self.t, &self.k) {
            self.id = row.id;
            self.status = row.status;
            self.t = row.t;
            self.k = row.k;
        }
    }
}

struct ConnectionRow {
    id: Uuid,
    fleet_id: Option<Uuid>,
    tsp_id: Option<Uuid>,
    source_name: Option<String>,
    /// Catena's status (`connection.staled` is `stale` whatever its record says).
    status: String,
    /// The newest `stale` observation's time (merged rows keep it when a newer one is not stale).
    staled_at: Option<DateTime<Utc>>,
    t: DateTime<Utc>,
    k: String,
}

impl ConnectionRow {
    /// [`CONNECTIONS`]' rules: the status of the newest (time, key), `LEAST` identities, the
    /// newest stale time.
    fn merge(&mut self, row: Self) {
        self.fleet_id = least(self.fleet_id, row.fleet_id);
        self.tsp_id = least(self.tsp_id, row.tsp_id);
        self.source_name = least(self.source_name.take(), row.source_name);
        self.staled_at = self.staled_at.max(row.staled_at);
        if (row.t, &row.k) > (self.t, &self.k) {
            self.status = row.status;
            self.t = row.t;
            self.k = row.k;
        }
    }
}

/// One entry of a subject's status timeline (see [`super::episodes`]).
struct ObservationRow {
    kind: &'static str,
    subject: Uuid,
    t: DateTime<Utc>,
    k: String,
    status: String,
}

struct ReferenceRow {
    id: Uuid,
    fleet_id: Option<Uuid>,
    source_name: Option<String>,
}

struct FleetConnectionRow {
    id: Uuid,
    fleet_id: Uuid,
    connection_id: Uuid,
    t: DateTime<Utc>,
}

struct ExecutionRow {
    id: Uuid,
    schedule_id: Uuid,
    connection_id: Option<Uuid>,
    fleet_id: Option<Uuid>,
    source_name: Option<String>,
    resource: Option<String>,
    failed_at: DateTime<Utc>,
}

struct DeactivationRow {
    id: Uuid,
    connection_id: Uuid,
    resource: Option<String>,
    threshold: Option<i32>,
    interval: Option<i32>,
    /// The version of `threshold` and `interval` (`None` when the record has neither).
    settings_version: Option<String>,
    t: DateTime<Utc>,
}

/// Every change a batch asks for, by statement kind.
#[derive(Default)]
pub(super) struct Plan {
    invitations: Merged<Uuid, InvitationRow>,
    stages: Merged<Uuid, StageRow>,
    shares: Merged<Uuid, ShareRow>,
    fleet_shares: Merged<Uuid, FleetShareRow>,
    /// Which fleet each share agreement's invitation became (not merged: [`INVITATION_MAPPINGS`]
    /// takes every pair).
    mappings: Vec<(Uuid, Uuid, Option<String>)>,
    connections: Merged<Uuid, ConnectionRow>,
    references: Merged<Uuid, ReferenceRow>,
    fleet_connections: Vec<FleetConnectionRow>,
    executions: Vec<ExecutionRow>,
    deactivations: Vec<DeactivationRow>,
    observations: Vec<ObservationRow>,
    webhooks: Vec<WebhookRow>,
}

/// A `webhook.*` event's word on one subscription.
struct WebhookRow {
    id: String,
    status: String,
    t: DateTime<Utc>,
}

/// Observation kinds, as `status_observations.kind`.
pub(super) const CONNECTION: &str = "connection";
pub(super) const SCHEDULE: &str = "schedule";

impl Plan {
    /// Gather what one event changes. Pure: the state rules, in one place.
    pub(super) fn add(&mut self, event: &Event) {
        let t = event.event_time;
        let k = || event.key.clone();
        let v = version(t, &event.key);
        match &event.change {
            Change::Invitation(status, records) => {
                for r in records {
                    self.invitations.add(
                        r.id,
                        InvitationRow {
                            id: r.id,
                            fleet_ref: r.fleet_ref.clone(),
                            fleet_id: r.fleet_id,
                            status: status.as_str(),
                            rank: status.rank(),
                            status_at: t,
                            status_key: k(),
                            t,
                            k: k(),
                            decline_reason: Latest::new(r.decline_reason.clone(), &v),
                            expires_at: Latest::new(r.expires_at, &v),
                            magic_link: Latest::new(r.magic_link.clone(), &v),
                            created_at: r.created_at,
                            accepted_at: r.accepted_at,
                            declined_at: r.declined_at,
                        },
                        InvitationRow::merge,
                    );
                    if let Some(fleet_id) = r.fleet_id {
                        let stage = StageRow {
                            fleet_id,
                            fleet_ref: r.fleet_ref.clone(),
                            invitation_id: Some(r.id),
                            stage: status.onboarding(),
                            t,
                            k: k(),
                        };
                        self.stages.add(fleet_id, stage, StageRow::merge);
                    }
                }
            }
            Change::ShareAgreement(records) => {
                for r in records {
                    self.fleet_shares.add(
                        r.fleet_id,
                        FleetShareRow {
                            fleet_id: r.fleet_id,
                            fleet_ref: r.fleet_ref.clone(),
                            invitation_id: r.invitation_id,
                            id: r.id,
                            status: r.status.clone(),
                            t,
                            k: k(),
                        },
                        FleetShareRow::merge,
                    );
                    if let Some(invitation_id) = r.invitation_id {
                        self.mappings
                            .push((invitation_id, r.fleet_id, r.fleet_ref.clone()));
                    }
                    let share = ShareRow {
                        id: r.id,
                        fleet_id: r.fleet_id,
                        invitation_id: r.invitation_id,
                        fleet_ref: r.fleet_ref.clone(),
                        status: r.status.clone(),
                        scopes: r.scopes.clone(),
                        effective_date: r.effective_date,
                        expiration_date: r.expiration_date,
                        t,
                        k: k(),
                    };
                    self.shares.add(r.id, share, ShareRow::merge);
                }
            }
            Change::Connection { staled, records } => {
                for r in records {
                    let status = match (staled, r.status.as_deref()) {
                        (true, _) => "stale".to_owned(),
                        (false, Some(status)) => status.to_ascii_lowercase(),
                        (false, None) => "active".to_owned(),
                    };
                    self.observations.push(ObservationRow {
                        kind: CONNECTION,
                        subject: r.id,
                        t,
                        k: k(),
                        status: status.clone(),
                    });
                    let connection = ConnectionRow {
                        id: r.id,
                        fleet_id: r.fleet_id,
                        tsp_id: r.tsp_id,
                        source_name: r.source_name.clone(),
                        staled_at: (status == "stale").then_some(t),
                        status,
                        t,
                        k: k(),
                    };
                    self.connections.add(r.id, connection, ConnectionRow::merge);
                }
            }
            Change::FleetConnection(records) => {
                for r in records {
                    self.fleet_connections.push(FleetConnectionRow {
                        id: r.id,
                        fleet_id: r.fleet_id,
                        connection_id: r.connection_id,
                        t,
                    });
                    self.reference(r.connection_id, Some(r.fleet_id), None);
                    let stage = StageRow {
                        fleet_id: r.fleet_id,
                        fleet_ref: None,
                        invitation_id: None,
                        stage: Onboarding::Connected,
                        t,
                        k: k(),
                    };
                    self.stages.add(r.fleet_id, stage, StageRow::merge);
                }
            }
            Change::ExecutionFailed(records) => {
                for r in records {
                    if let Some(connection_id) = r.connection_id {
                        self.reference(connection_id, r.fleet_id, r.source_name.clone());
                    }
                    self.executions.push(ExecutionRow {
                        id: r.id,
                        schedule_id: r.schedule_id,
                        connection_id: r.connection_id,
                        fleet_id: r.fleet_id,
                        source_name: r.source_name.clone(),
                        resource: r.resource.clone(),
                        failed_at: r.updated_at.or(r.created_at).unwrap_or(t),
                    });
                }
            }
            Change::ScheduleDeactivated(records) => {
                for r in records {
                    self.reference(r.connection_id, None, None);
                    let has_settings = r.consecutive_error_threshold.is_some()
                        || r.execution_interval_seconds.is_some();
                    self.observations.push(ObservationRow {
                        kind: SCHEDULE,
                        subject: r.id,
                        t,
                        k: k(),
                        status: "deactivated".into(),
                    });
                    self.deactivations.push(DeactivationRow {
                        id: r.id,
                        connection_id: r.connection_id,
                        resource: r.resource.clone(),
                        threshold: r.consecutive_error_threshold,
                        interval: r.execution_interval_seconds,
                        settings_version: has_settings.then(|| v.clone()),
                        t,
                    });
                }
            }
            Change::Webhook(changes) => {
                for c in changes {
                    self.webhooks.push(WebhookRow {
                        id: c.webhook_id.clone(),
                        status: c.status.clone(),
                        t,
                    });
                }
            }
            Change::Ignored => {}
        }
    }

    /// A connection named by another record (connection reuse: no `connection.created` for us).
    fn reference(&mut self, id: Uuid, fleet_id: Option<Uuid>, source_name: Option<String>) {
        let row = ReferenceRow {
            id,
            fleet_id,
            source_name,
        };
        self.references.add(id, row, |cur, row| {
            cur.fleet_id = least(cur.fleet_id, row.fleet_id);
            cur.source_name = least(cur.source_name.take(), row.source_name);
        });
    }

    /// The connections and schedules whose status timelines this batch extends: their alert
    /// episodes are reconciled after the batch's upserts.
    pub(super) fn alert_subjects(&self) -> AlertSubjects {
        let mut subjects = AlertSubjects::default();
        for o in &self.observations {
            match o.kind {
                CONNECTION => subjects.connections.push(o.subject),
                _ => subjects.schedules.push(o.subject),
            }
        }
        for ids in [&mut subjects.connections, &mut subjects.schedules] {
            ids.sort_unstable();
            ids.dedup();
        }
        subjects
    }

    pub(super) fn is_empty(&self) -> bool {
        self.invitations.is_empty()
            && self.stages.is_empty()
            && self.shares.is_empty()
            && self.connections.is_empty()
            && self.references.is_empty()
            && self.fleet_connections.is_empty()
            && self.executions.is_empty()
            && self.deactivations.is_empty()
            && self.webhooks.is_empty()
    }

    /// The statements, in dependency order (mappings after the rows they map, alerts after the
    /// state they read, back-fills last).
    pub(super) fn ops(&self, rules: &Rules) -> Vec<Op> {
        let mut ops = Vec::new();
        let mut push = |sql: &'static str, params: Vec<Param>| ops.push(Op { sql, params });
        if !self.invitations.is_empty() {
            let round = self.invitations.all();
            push(
                INVITATIONS,
                vec![
                    col(&round, |r| r.id),
                    col(&round, |r| r.fleet_ref.clone()),
                    col(&round, |r| r.fleet_id),
                    col(&round, |r| r.status),
                    col(&round, |r| r.rank),
                    col(&round, |r| r.status_at),
                    col(&round, |r| r.status_key.clone()),
                    col(&round, |r| r.decline_reason.value()),
                    col(&round, |r| r.decline_reason.version.clone()),
                    col(&round, |r| r.expires_at.value()),
                    col(&round, |r| r.expires_at.version.clone()),
                    col(&round, |r| r.magic_link.value()),
                    col(&round, |r| r.magic_link.version.clone()),
                    col(&round, |r| r.created_at),
                    col(&round, |r| r.accepted_at),
                    col(&round, |r| r.declined_at),
                    col(&round, |r| r.t),
                    col(&round, |r| r.k.clone()),
                ],
            );
        }
        if !self.shares.is_empty() {
            let round = self.shares.all();
            push(
                SHARE_AGREEMENTS,
                vec![
                    col(&round, |r| r.id),
                    col(&round, |r| r.fleet_id),
                    col(&round, |r| r.invitation_id),
                    col(&round, |r| r.fleet_ref.clone()),
                    col(&round, |r| r.status.clone()),
                    col(&round, |r| r.scopes.clone()),
                    col(&round, |r| r.effective_date),
                    col(&round, |r| r.expiration_date),
                    col(&round, |r| r.t),
                    col(&round, |r| r.k.clone()),
                ],
            );
            let round = self.fleet_shares.all();
            push(
                FLEET_SHARES,
                vec![
                    col(&round, |r| r.fleet_id),
                    col(&round, |r| r.fleet_ref.clone()),
                    col(&round, |r| r.invitation_id),
                    col(&round, |r| r.id),
                    col(&round, |r| r.status.clone()),
                    col(&round, |r| r.t),
                    col(&round, |r| r.k.clone()),
                ],
            );
            if !self.mappings.is_empty() {
                let m = &self.mappings;
                push(
                    INVITATION_MAPPINGS,
                    vec![
                        p(m.iter().map(|r| r.0).collect::<Vec<_>>()),
                        p(m.iter().map(|r| r.1).collect::<Vec<_>>()),
                        p(m.iter().map(|r| r.2.clone()).collect::<Vec<_>>()),
                    ],
                );
            }
        }
        if !self.stages.is_empty() {
            let round = self.stages.all();
            push(
                FLEET_STAGES,
                vec![
                    col(&round, |r| r.fleet_id),
                    col(&round, |r| r.fleet_ref.clone()),
                    col(&round, |r| r.invitation_id),
                    col(&round, |r| r.stage.as_str()),
                    col(&round, |r| r.stage.rank()),
                    col(&round, |r| r.t),
                    col(&round, |r| r.k.clone()),
                ],
            );
        }
        // Connected ranks highest, so a fleet's merged stage is connected if any of its was.
        let mut connected: Vec<Uuid> = self
            .stages
            .rows
            .iter()
            .filter(|r| r.stage == Onboarding::Connected)
            .map(|r| r.fleet_id)
            .collect();
        if !connected.is_empty() {
            connected.sort_unstable();
            push(ONBOARDING_MEASURED, vec![p(connected)]);
        }
        if !self.connections.is_empty() {
            let round = self.connections.all();
            push(
                CONNECTIONS,
                vec![
                    col(&round, |r| r.id),
                    col(&round, |r| r.fleet_id),
                    col(&round, |r| r.tsp_id),
                    col(&round, |r| r.source_name.clone()),
                    col(&round, |r| r.status.clone()),
                    col(&round, |r| r.t),
                    col(&round, |r| r.k.clone()),
                    col(&round, |r| r.staled_at),
                ],
            );
        }
        if !self.references.is_empty() {
            let round = self.references.all();
            push(
                CONNECTION_REFERENCES,
                vec![
                    col(&round, |r| r.id),
                    col(&round, |r| r.fleet_id),
                    col(&round, |r| r.source_name.clone()),
                ],
            );
        }
        for round in rounds(&self.fleet_connections, |r| r.id) {
            push(
                FLEET_CONNECTIONS,
                vec![
                    col(&round, |r| r.id),
                    col(&round, |r| r.fleet_id),
                    col(&round, |r| r.connection_id),
                    col(&round, |r| r.t),
                ],
            );
        }
        if !self.webhooks.is_empty() {
            let all: Vec<&WebhookRow> = self.webhooks.iter().collect();
            push(
                WEBHOOK_EVENT_STATUS,
                vec![
                    col(&all, |r| r.id.clone()),
                    col(&all, |r| r.status.clone()),
                    col(&all, |r| r.t),
                ],
            );
        }
        if !self.observations.is_empty() {
            let all: Vec<&ObservationRow> = self.observations.iter().collect();
            push(
                STATUS_OBSERVATIONS,
                vec![
                    col(&all, |r| r.kind),
                    col(&all, |r| r.subject),
                    col(&all, |r| r.t),
                    col(&all, |r| r.k.clone()),
                    col(&all, |r| r.status.clone()),
                ],
            );
        }
        if !self.executions.is_empty() {
            let all: Vec<&ExecutionRow> = self.executions.iter().collect();
            push(
                EXECUTIONS_FAILED,
                vec![
                    col(&all, |r| r.id),
                    col(&all, |r| r.schedule_id),
                    col(&all, |r| r.connection_id),
                    col(&all, |r| r.fleet_id),
                    col(&all, |r| r.source_name.clone()),
                    col(&all, |r| r.resource.clone()),
                    col(&all, |r| r.failed_at),
                ],
            );
            push(
                FAILURE_WARNINGS,
                vec![
                    col(&all, |r| r.schedule_id),
                    col(&all, |r| r.failed_at),
                    p(PgInterval(rules.failure_window)),
                    p(rules.failure_threshold),
                ],
            );
        }
        for round in rounds(&self.deactivations, |r| r.id) {
            push(
                SCHEDULE_DEACTIVATIONS,
                vec![
                    col(&round, |r| r.id),
                    col(&round, |r| r.connection_id),
                    col(&round, |r| r.resource.clone()),
                    col(&round, |r| r.threshold),
                    col(&round, |r| r.interval),
                    col(&round, |r| r.settings_version.clone()),
                    col(&round, |r| r.t),
                ],
            );
        }
        push(BACKFILL_FLEET_REFS, Vec::new());
        ops
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::envelope::decode;

    pub(crate) const INVITATION: &str = "6513270e-269e-4d37-b2a7-4de452e6b438";
    const FLEET: &str = "3f0c7d2e-8a4b-4c1d-9e6f-2a5b7c9d1e3f";

    /// An envelope of `event_name` with one record, its id a UUIDv7 at `minute` past 10:00.
    pub(crate) fn event(event_name: &str, minute: u32, record: serde_json::Value) -> Event {
        let id = format!("019abf9b-{:04x}-7000-8000-000000000000", minute * 0x3c);
        let body = serde_json::json!({
            "version": "1.0", "event_name": event_name, "webhook_id": "w",
            "id": id, "data": [record],
        });
        decode(&serde_json::to_vec(&body).unwrap(), Utc::now()).unwrap()
    }

    fn invitation(status: &str, minute: u32, extra: serde_json::Value) -> Event {
        let mut record = serde_json::json!({
            "id": INVITATION, "fleet_ref": "FLEET-42",
            "created_at": format!("2025-11-26T10:{minute:02}:00Z"),
        });
        record
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        event(&format!("invitation.{status}"), minute, record)
    }

    fn plan_of(events: &[&Event]) -> Plan {
        let mut plan = Plan::default();
        for event in events {
            plan.add(event);
        }
        plan
    }

    #[test]
    fn rounds_never_put_one_key_twice_in_a_statement() {
        let rows = [1, 2, 1, 3, 1, 2];
        let rounds = rounds(&rows, |r| *r);
        assert_eq!(rounds.len(), 3, "key 1 appears three times");
        for round in &rounds {
            let mut keys: Vec<_> = round.iter().map(|r| **r).collect();
            keys.sort_unstable();
            keys.dedup();
            assert_eq!(keys.len(), round.len());
        }
        assert_eq!(rounds.iter().map(Vec::len).sum::<usize>(), rows.len());
    }

    #[test]
    fn one_invitations_lifecycle_in_a_batch_merges_into_one_row_in_any_order() {
        let created = invitation(
            "created",
            0,
            serde_json::json!({"magic_link": "https://l/1", "expires_at": "2025-11-27T10:00:00Z"}),
        );
        let viewed = invitation(
            "viewed",
            1,
            serde_json::json!({"magic_link": "https://l/2"}),
        );
        let declined = invitation(
            "declined",
            2,
            serde_json::json!({"decline_reason": "not now", "declined_at": "2025-11-26T10:02:00Z"}),
        );
        let orders = [
            [&created, &viewed, &declined],
            [&declined, &viewed, &created],
            [&viewed, &declined, &created],
        ];
        let merged: Vec<_> = orders
            .iter()
            .map(|order| {
                let plan = plan_of(order);
                assert_eq!(plan.invitations.rows.len(), 1, "one row per invitation");
                let r = &plan.invitations.rows[0];
                (
                    r.status,
                    r.rank,
                    r.magic_link.value(),
                    r.decline_reason.value(),
                    r.expires_at.value(),
                    r.created_at,
                    r.declined_at,
                    r.k.clone(),
                )
            })
            .collect();
        assert!(merged.windows(2).all(|w| w[0] == w[1]), "{merged:#?}");
        let (status, _, link, reason, expires, created_at, ..) = &merged[0];
        assert_eq!(*status, "declined");
        assert_eq!(link.as_deref(), Some("https://l/2"), "the newest link wins");
        assert_eq!(reason.as_deref(), Some("not now"));
        assert!(expires.is_some(), "an older value fills a gap");
        assert_eq!(
            created_at.unwrap().to_rfc3339(),
            "2025-11-26T10:00:00+00:00"
        );
    }

    #[test]
    fn a_fleet_connection_references_its_connection_and_raises_the_stage() {
        let fc = event(
            "fleet_connection.created",
            5,
            serde_json::json!({
                "id": "8d1f0a3b-2c4e-4f6a-8b9c-0d1e2f3a4b5c", "fleet_id": FLEET,
                "connection_id": "1a2b3c4d-5e6f-4a7b-8c9d-0e1f2a3b4c5d",
            }),
        );
        let plan = plan_of(&[&fc]);
        assert_eq!(plan.fleet_connections.len(), 1);
        assert_eq!(plan.references.rows.len(), 1);
        assert_eq!(plan.stages.rows.len(), 1);
        assert_eq!(plan.stages.rows[0].stage, Onboarding::Connected);
    }

    #[test]
    fn statements_come_in_dependency_order_and_timelines_name_their_subjects() {
        let connection = |name: &str, minute, status: &str| {
            event(
                name,
                minute,
                serde_json::json!({
                    "id": "1a2b3c4d-5e6f-4a7b-8c9d-0e1f2a3b4c5d", "fleet_id": FLEET,
                    "source_name": "samsara", "status": status,
                }),
            )
        };
        let created = connection("connection.created", 1, "active");
        let staled = connection("connection.staled", 2, "active");
        let plan = plan_of(&[&created, &staled]);
        let statuses: Vec<_> = plan
            .observations
            .iter()
            .map(|o| o.status.as_str())
            .collect();
        assert_eq!(
            statuses,
            ["active", "stale"],
            "connection.staled is stale whatever it says"
        );
        let subjects = plan.alert_subjects();
        assert_eq!(
            subjects.connections.len(),
            1,
            "one subject, two observations"
        );
        assert!(subjects.schedules.is_empty());

        let ops = plan.ops(&Rules::default());
        let position = |sql: &str| ops.iter().position(|op| op.sql == sql).unwrap();
        assert_eq!(
            ops.iter().filter(|op| op.sql == CONNECTIONS).count(),
            1,
            "two events of one connection merge into one row"
        );
        assert!(position(CONNECTIONS) < position(STATUS_OBSERVATIONS));
        assert_eq!(
            ops.last().unwrap().sql,
            BACKFILL_FLEET_REFS,
            "back-fills last"
        );
        for op in &ops {
            let placeholders = (1..=op.params.len()).all(|n| op.sql.contains(&format!("${n}")));
            assert!(placeholders, "every parameter is used: {}", op.sql);
        }
    }

    /// A connection's events in one batch, in any order, merge into the row the statements
    /// would leave after applying them one by one: the newest status, and the stale time of
    /// a stale observation that a newer `active` one follows.
    #[test]
    fn one_connections_events_merge_into_one_row_in_any_order() {
        let connection = |name: &str, minute, fleet: Option<&str>, source: Option<&str>| {
            let mut record = serde_json::json!({"id": "1a2b3c4d-5e6f-4a7b-8c9d-0e1f2a3b4c5d"});
            if let Some(fleet) = fleet {
                record["fleet_id"] = fleet.into();
            }
            if let Some(source) = source {
                record["source_name"] = source.into();
            }
            event(name, minute, record)
        };
        let created = connection("connection.created", 1, None, Some("samsara"));
        let staled = connection("connection.staled", 2, Some(FLEET), None);
        let recovered = connection("connection.created", 3, None, Some("motive"));
        for order in [
            [&created, &staled, &recovered],
            [&recovered, &staled, &created],
            [&staled, &recovered, &created],
        ] {
            let plan = plan_of(&order);
            assert_eq!(plan.connections.rows.len(), 1);
            let row = &plan.connections.rows[0];
            assert_eq!(row.status, "active", "the newest status");
            assert_eq!(row.t, recovered.event_time);
            assert_eq!(row.k, recovered.key);
            assert_eq!(
                row.staled_at,
                Some(staled.event_time),
                "kept from an older row"
            );
            assert_eq!(row.fleet_id, Some(FLEET.parse().unwrap()));
            assert_eq!(row.source_name.as_deref(), Some("motive"), "LEAST");
            assert_eq!(
                plan.observations.len(),
                3,
                "the timeline keeps every observation"
            );
        }
    }

    /// The executions of one connection and the fleet connections of one fleet in a batch:
    /// one reference row per connection, one stage row per fleet (the highest stage).
    #[test]
    fn references_and_stages_merge_per_key() {
        let failed = |minute, execution: &str, source: &str| {
            event(
                "execution.failed",
                minute,
                serde_json::json!({
                    "id": execution, "schedule_id": "5b6c7d8e-9f0a-4b1c-8d2e-3f4a5b6c7d8e",
                    "connection_id": "1a2b3c4d-5e6f-4a7b-8c9d-0e1f2a3b4c5d",
                    "fleet_id": FLEET, "source_name": source,
                }),
            )
        };
        let first = failed(1, "0d1e2f3a-4b5c-4d6e-8f7a-9b0c1d2e3f4a", "zonar");
        let second = failed(2, "1e2f3a4b-5c6d-4e7f-8a9b-0c1d2e3f4a5b", "azuga");
        let fc = event(
            "fleet_connection.created",
            3,
            serde_json::json!({
                "id": "8d1f0a3b-2c4e-4f6a-8b9c-0d1e2f3a4b5c", "fleet_id": FLEET,
                "connection_id": "1a2b3c4d-5e6f-4a7b-8c9d-0e1f2a3b4c5d",
            }),
        );
        let accepted = event(
            "invitation.accepted",
            4,
            serde_json::json!({"id": INVITATION, "fleet_ref": "FLEET-42", "fleet_id": FLEET}),
        );
        for order in [
            [&first, &second, &fc, &accepted],
            [&accepted, &fc, &second, &first],
        ] {
            let plan = plan_of(&order);
            assert_eq!(plan.references.rows.len(), 1, "one row per connection");
            let reference = &plan.references.rows[0];
            assert_eq!(reference.source_name.as_deref(), Some("azuga"), "LEAST");
            assert_eq!(reference.fleet_id, Some(FLEET.parse().unwrap()));
            assert_eq!(plan.stages.rows.len(), 1, "one row per fleet");
            let stage = &plan.stages.rows[0];
            assert_eq!(
                stage.stage,
                Onboarding::Connected,
                "the highest rank, not the newest"
            );
            assert_eq!(stage.k, fc.key);
            assert_eq!(stage.fleet_ref.as_deref(), Some("FLEET-42"));
            assert_eq!(stage.invitation_id, Some(INVITATION.parse().unwrap()));
            let ops = plan.ops(&Rules::default());
            for sql in [CONNECTION_REFERENCES, FLEET_STAGES] {
                assert_eq!(ops.iter().filter(|op| op.sql == sql).count(), 1);
            }
        }
    }

    /// Updates of one share agreement merge into its newest record; two agreements of one
    /// fleet into one fleet row naming the newer; every agreement still maps its invitation.
    #[test]
    fn share_agreements_merge_per_agreement_and_per_fleet() {
        let share = |name: &str, minute, id: &str, status: &str| {
            event(
                name,
                minute,
                serde_json::json!({
                    "id": id, "fleet_id": FLEET, "invitation_id": INVITATION,
                    "fleet_ref": "FLEET-42", "status": status,
                }),
            )
        };
        let (first, second) = (
            "2b3c4d5e-6f7a-4b8c-9d0e-1f2a3b4c5d6e",
            "3c4d5e6f-7a8b-4c9d-8e1f-2a3b4c5d6e7f",
        );
        let created = share("share_agreement.created", 1, first, "active");
        let paused = share("share_agreement.updated", 2, first, "paused");
        let other = share("share_agreement.created", 3, second, "active");
        for order in [[&created, &paused, &other], [&other, &paused, &created]] {
            let plan = plan_of(&order);
            let mut statuses: Vec<_> = plan
                .shares
                .rows
                .iter()
                .map(|r| (r.id.to_string(), r.status.as_str()))
                .collect();
            statuses.sort();
            assert_eq!(
                statuses,
                [(first.to_owned(), "paused"), (second.to_owned(), "active")]
            );
            assert_eq!(plan.fleet_shares.rows.len(), 1, "one row per fleet");
            assert_eq!(plan.fleet_shares.rows[0].id.to_string(), second);
            assert_eq!(plan.mappings.len(), 3, "every record maps its invitation");
        }
    }

    #[test]
    fn latest_wins_fields_keep_their_own_version() {
        // The newest event says nothing of the reason: an older one's reason must not lose to
        // a still older one just because it arrived after the newest.
        let (oldest, older, newest) = (
            invitation("viewed", 1, serde_json::json!({"decline_reason": "a"})),
            invitation("declined", 2, serde_json::json!({"decline_reason": "b"})),
            invitation("declined", 3, serde_json::json!({})),
        );
        for order in [[&newest, &oldest, &older], [&oldest, &older, &newest]] {
            let plan = plan_of(&order);
            assert_eq!(
                plan.invitations.rows[0].decline_reason.value().as_deref(),
                Some("b")
            );
        }
    }

    #[test]
    fn ignored_events_plan_nothing() {
        let unknown = event("vehicle.added", 1, serde_json::json!({"anything": 1}));
        assert!(plan_of(&[&unknown]).is_empty());
        assert!(!plan_of(&[&invitation("created", 0, serde_json::json!({}))]).is_empty());
    }
}
