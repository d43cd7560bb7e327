//! Applying events to the fleet state: exactly-once effect, in any order.
//!
//! A batch is one transaction: one multi-row insert of the dedup keys (`RETURNING` says which
//! are new), then the state statements of every new event, pipelined in a single network flight,
//! then commit. Every statement is an upsert guarded by event time (ties broken by the event
//! key) or by lifecycle rank, so applying any permutation of the same events, with any
//! duplicates, converges on the same state.
//!
//! [`plan`] turns an event into statements without touching the database, which keeps the
//! state rules readable in one place and testable.

use chrono::{DateTime, Utc};
use deadpool_postgres::Transaction;
use futures::future::try_join_all;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use crate::db::DbError;
use crate::envelope::{Change, Event, Onboarding};

type Param = Box<dyn ToSql + Sync + Send>;

/// One statement to run for an event.
pub struct Op {
    pub sql: &'static str,
    pub params: Vec<Param>,
    /// Rows returned by this statement are alerts opened of this kind.
    pub opens_alert: Option<&'static str>,
}

impl Op {
    fn new(sql: &'static str, params: Vec<Param>) -> Self {
        Self {
            sql,
            params,
            opens_alert: None,
        }
    }

    fn opening(mut self, kind: &'static str) -> Self {
        self.opens_alert = Some(kind);
        self
    }
}

fn p<T: ToSql + Sync + Send + 'static>(value: T) -> Param {
    Box::new(value)
}

const INVITATION_UPSERT: &str = "
INSERT INTO invitations AS i (invitation_id, fleet_ref, fleet_id, status, status_rank, status_at, status_key,
    decline_reason, expires_at, magic_link, created_at, accepted_at, declined_at, updated_at, version_key)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $6, $7)
ON CONFLICT (invitation_id) DO UPDATE SET
    fleet_ref = COALESCE(i.fleet_ref, EXCLUDED.fleet_ref),
    fleet_id = COALESCE(i.fleet_id, EXCLUDED.fleet_id),
    status = CASE WHEN (EXCLUDED.status_rank, EXCLUDED.status_at, EXCLUDED.status_key) > (i.status_rank, i.status_at, i.status_key)
                  THEN EXCLUDED.status ELSE i.status END,
    status_key = CASE WHEN (EXCLUDED.status_rank, EXCLUDED.status_at, EXCLUDED.status_key) > (i.status_rank, i.status_at, i.status_key)
                  THEN EXCLUDED.status_key ELSE i.status_key END,
    status_at = CASE WHEN (EXCLUDED.status_rank, EXCLUDED.status_at, EXCLUDED.status_key) > (i.status_rank, i.status_at, i.status_key)
                  THEN EXCLUDED.status_at ELSE i.status_at END,
    status_rank = GREATEST(i.status_rank, EXCLUDED.status_rank),
    decline_reason = CASE WHEN (EXCLUDED.updated_at, EXCLUDED.version_key) > (i.updated_at, i.version_key) AND EXCLUDED.decline_reason IS NOT NULL
                  THEN EXCLUDED.decline_reason ELSE COALESCE(i.decline_reason, EXCLUDED.decline_reason) END,
    expires_at = CASE WHEN (EXCLUDED.updated_at, EXCLUDED.version_key) > (i.updated_at, i.version_key) AND EXCLUDED.expires_at IS NOT NULL
                  THEN EXCLUDED.expires_at ELSE COALESCE(i.expires_at, EXCLUDED.expires_at) END,
    magic_link = CASE WHEN (EXCLUDED.updated_at, EXCLUDED.version_key) > (i.updated_at, i.version_key) AND EXCLUDED.magic_link IS NOT NULL
                  THEN EXCLUDED.magic_link ELSE COALESCE(i.magic_link, EXCLUDED.magic_link) END,
    created_at = LEAST(i.created_at, EXCLUDED.created_at),
    accepted_at = COALESCE(i.accepted_at, EXCLUDED.accepted_at),
    declined_at = GREATEST(i.declined_at, EXCLUDED.declined_at),
    version_key = CASE WHEN (EXCLUDED.updated_at, EXCLUDED.version_key) > (i.updated_at, i.version_key)
                  THEN EXCLUDED.version_key ELSE i.version_key END,
    updated_at = GREATEST(i.updated_at, EXCLUDED.updated_at)";

/// Upsert a fleet, raising its onboarding stage if this one ranks higher (never lowering it).
const FLEET_STAGE: &str = "
INSERT INTO fleets AS f (fleet_id, fleet_ref, invitation_id, onboarding_status, onboarding_rank, onboarding_at, onboarding_key)
VALUES ($1, $2, $3, $4, $5, $6, $7)
ON CONFLICT (fleet_id) DO UPDATE SET
    fleet_ref = COALESCE(f.fleet_ref, EXCLUDED.fleet_ref),
    invitation_id = COALESCE(f.invitation_id, EXCLUDED.invitation_id),
    onboarding_status = CASE WHEN (EXCLUDED.onboarding_rank, EXCLUDED.onboarding_at, EXCLUDED.onboarding_key) > (f.onboarding_rank, f.onboarding_at, f.onboarding_key)
                  THEN EXCLUDED.onboarding_status ELSE f.onboarding_status END,
    onboarding_key = CASE WHEN (EXCLUDED.onboarding_rank, EXCLUDED.onboarding_at, EXCLUDED.onboarding_key) > (f.onboarding_rank, f.onboarding_at, f.onboarding_key)
                  THEN EXCLUDED.onboarding_key ELSE f.onboarding_key END,
    onboarding_at = CASE WHEN (EXCLUDED.onboarding_rank, EXCLUDED.onboarding_at, EXCLUDED.onboarding_key) > (f.onboarding_rank, f.onboarding_at, f.onboarding_key)
                  THEN EXCLUDED.onboarding_at ELSE f.onboarding_at END,
    onboarding_rank = GREATEST(f.onboarding_rank, EXCLUDED.onboarding_rank)";

const SHARE_AGREEMENT_UPSERT: &str = "
INSERT INTO share_agreements AS s (share_agreement_id, fleet_id, invitation_id, fleet_ref, status, scopes,
    effective_date, expiration_date, updated_at, version_key)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
ON CONFLICT (share_agreement_id) DO UPDATE SET
    invitation_id = COALESCE(s.invitation_id, EXCLUDED.invitation_id),
    fleet_ref = COALESCE(s.fleet_ref, EXCLUDED.fleet_ref),
    status = CASE WHEN (EXCLUDED.updated_at, EXCLUDED.version_key) > (s.updated_at, s.version_key) THEN EXCLUDED.status ELSE s.status END,
    scopes = CASE WHEN (EXCLUDED.updated_at, EXCLUDED.version_key) > (s.updated_at, s.version_key) THEN EXCLUDED.scopes ELSE s.scopes END,
    effective_date = CASE WHEN (EXCLUDED.updated_at, EXCLUDED.version_key) > (s.updated_at, s.version_key) THEN EXCLUDED.effective_date ELSE s.effective_date END,
    expiration_date = CASE WHEN (EXCLUDED.updated_at, EXCLUDED.version_key) > (s.updated_at, s.version_key) THEN EXCLUDED.expiration_date ELSE s.expiration_date END,
    version_key = CASE WHEN (EXCLUDED.updated_at, EXCLUDED.version_key) > (s.updated_at, s.version_key) THEN EXCLUDED.version_key ELSE s.version_key END,
    updated_at = GREATEST(s.updated_at, EXCLUDED.updated_at)";

/// The fleet side of a share agreement: mapping, share status (newest wins), stage share_agreed.
const FLEET_SHARE: &str = "
INSERT INTO fleets AS f (fleet_id, fleet_ref, invitation_id, share_agreement_id, share_status, share_at, share_key,
    onboarding_status, onboarding_rank, onboarding_at, onboarding_key)
VALUES ($1, $2, $3, $4, $5, $6, $7, 'share_agreed', 4, $6, $7)
ON CONFLICT (fleet_id) DO UPDATE SET
    fleet_ref = COALESCE(f.fleet_ref, EXCLUDED.fleet_ref),
    invitation_id = COALESCE(f.invitation_id, EXCLUDED.invitation_id),
    share_agreement_id = CASE WHEN f.share_at IS NULL OR (EXCLUDED.share_at, EXCLUDED.share_key) > (f.share_at, f.share_key)
                  THEN EXCLUDED.share_agreement_id ELSE f.share_agreement_id END,
    share_status = CASE WHEN f.share_at IS NULL OR (EXCLUDED.share_at, EXCLUDED.share_key) > (f.share_at, f.share_key)
                  THEN EXCLUDED.share_status ELSE f.share_status END,
    share_key = CASE WHEN f.share_at IS NULL OR (EXCLUDED.share_at, EXCLUDED.share_key) > (f.share_at, f.share_key)
                  THEN EXCLUDED.share_key ELSE f.share_key END,
    share_at = GREATEST(f.share_at, EXCLUDED.share_at),
    onboarding_status = CASE WHEN (EXCLUDED.onboarding_rank, EXCLUDED.onboarding_at, EXCLUDED.onboarding_key) > (f.onboarding_rank, f.onboarding_at, f.onboarding_key)
                  THEN EXCLUDED.onboarding_status ELSE f.onboarding_status END,
    onboarding_key = CASE WHEN (EXCLUDED.onboarding_rank, EXCLUDED.onboarding_at, EXCLUDED.onboarding_key) > (f.onboarding_rank, f.onboarding_at, f.onboarding_key)
                  THEN EXCLUDED.onboarding_key ELSE f.onboarding_key END,
    onboarding_at = CASE WHEN (EXCLUDED.onboarding_rank, EXCLUDED.onboarding_at, EXCLUDED.onboarding_key) > (f.onboarding_rank, f.onboarding_at, f.onboarding_key)
                  THEN EXCLUDED.onboarding_at ELSE f.onboarding_at END,
    onboarding_rank = GREATEST(f.onboarding_rank, EXCLUDED.onboarding_rank)";

/// A share agreement tells which fleet an invitation became.
const INVITATION_MAPPING: &str = "
UPDATE invitations SET fleet_id = COALESCE(fleet_id, $2), fleet_ref = COALESCE(fleet_ref, $3)
WHERE invitation_id = $1 AND (fleet_id IS NULL OR fleet_ref IS NULL)";

const CONNECTION_UPSERT: &str = "
INSERT INTO connections AS c (connection_id, fleet_id, tsp_id, source_name, status, staled_at, updated_at, version_key)
VALUES ($1, $2, $3, $4, $5::text, CASE WHEN $5::text = 'stale' THEN $6::timestamptz END, $6, $7)
ON CONFLICT (connection_id) DO UPDATE SET
    fleet_id = COALESCE(c.fleet_id, EXCLUDED.fleet_id),
    tsp_id = CASE WHEN (c.updated_at IS NULL OR (EXCLUDED.updated_at, EXCLUDED.version_key) > (c.updated_at, c.version_key)) AND EXCLUDED.tsp_id IS NOT NULL
                  THEN EXCLUDED.tsp_id ELSE COALESCE(c.tsp_id, EXCLUDED.tsp_id) END,
    source_name = CASE WHEN (c.updated_at IS NULL OR (EXCLUDED.updated_at, EXCLUDED.version_key) > (c.updated_at, c.version_key)) AND EXCLUDED.source_name IS NOT NULL
                  THEN EXCLUDED.source_name ELSE COALESCE(c.source_name, EXCLUDED.source_name) END,
    status = CASE WHEN c.updated_at IS NULL OR (EXCLUDED.updated_at, EXCLUDED.version_key) > (c.updated_at, c.version_key)
                  THEN EXCLUDED.status ELSE c.status END,
    version_key = CASE WHEN c.updated_at IS NULL OR (EXCLUDED.updated_at, EXCLUDED.version_key) > (c.updated_at, c.version_key)
                  THEN EXCLUDED.version_key ELSE c.version_key END,
    staled_at = GREATEST(c.staled_at, EXCLUDED.staled_at),
    updated_at = GREATEST(c.updated_at, EXCLUDED.updated_at)";

/// A connection known only by reference (connection reuse: no connection.created for us).
/// `updated_at` stays NULL so the first real connection event overrides the assumed status.
const CONNECTION_REFERENCE: &str = "
INSERT INTO connections AS c (connection_id, fleet_id, source_name, status)
VALUES ($1, $2, $3, 'active')
ON CONFLICT (connection_id) DO UPDATE SET
    fleet_id = COALESCE(c.fleet_id, EXCLUDED.fleet_id),
    source_name = COALESCE(c.source_name, EXCLUDED.source_name)
WHERE c.fleet_id IS NULL OR c.source_name IS NULL";

const CONNECTION_ALERT_OPEN: &str = "
WITH subject AS (
    SELECT c.connection_id, c.fleet_id, f.fleet_ref, c.source_name
    FROM connections c LEFT JOIN fleets f ON f.fleet_id = c.fleet_id
    WHERE c.connection_id = $1 AND c.status = 'stale'
      AND NOT EXISTS (SELECT 1 FROM alerts a WHERE a.kind = 'connection_stale' AND a.subject_id = $1 AND a.opened_at >= $2)
), opened AS (
    INSERT INTO alerts (kind, subject_id, fleet_id, fleet_ref, state, opened_at, details)
    SELECT 'connection_stale', connection_id, fleet_id, fleet_ref, 'open', $2,
           jsonb_strip_nulls(jsonb_build_object('source_name', source_name))
    FROM subject
    ON CONFLICT (kind, subject_id) WHERE state = 'open' DO NOTHING
    RETURNING alert_id
)
INSERT INTO alert_outbox (alert_id, action) SELECT alert_id, 'open' FROM opened RETURNING alert_id";

const CONNECTION_ALERT_RESOLVE: &str = "
WITH resolved AS (
    UPDATE alerts a SET state = 'resolved', resolved_at = $2, resolution = 'connection active again'
    FROM connections c
    WHERE a.kind = 'connection_stale' AND a.subject_id = $1 AND a.state = 'open'
      AND c.connection_id = $1 AND c.status = 'active'
    RETURNING a.alert_id
)
INSERT INTO alert_outbox (alert_id, action) SELECT alert_id, 'resolve' FROM resolved RETURNING alert_id";

const FLEET_CONNECTION_INSERT: &str = "
INSERT INTO fleet_connections (fleet_connection_id, fleet_id, connection_id, created_at)
VALUES ($1, $2, $3, $4)
ON CONFLICT (fleet_connection_id) DO UPDATE SET created_at = LEAST(fleet_connections.created_at, EXCLUDED.created_at)";

/// Count distinct failed executions per schedule; a schedule first seen here is `active`.
const EXECUTION_FAILED: &str = "
WITH inserted AS (
    INSERT INTO failed_executions (execution_id, schedule_id, connection_id, fleet_id, source_name, resource, failed_at)
    VALUES ($1, $2, $3, $4, $5, $6, $7)
    ON CONFLICT (execution_id) DO NOTHING
    RETURNING schedule_id, connection_id, resource, failed_at
)
INSERT INTO schedules AS s (schedule_id, connection_id, resource, status, failed_executions, last_failed_at)
SELECT schedule_id, connection_id, resource, 'active', 1, failed_at FROM inserted
ON CONFLICT (schedule_id) DO UPDATE SET
    failed_executions = s.failed_executions + 1,
    last_failed_at = GREATEST(s.last_failed_at, EXCLUDED.last_failed_at),
    connection_id = COALESCE(s.connection_id, EXCLUDED.connection_id),
    resource = COALESCE(s.resource, EXCLUDED.resource)";

/// Escalate a schedule whose failures inside the window exceed the threshold: one `warning`
/// outbox row per schedule and window (not an alert row).
const FAILURE_WARNING: &str = "
WITH counted AS (
    SELECT count(*)::int AS failures FROM failed_executions
    WHERE schedule_id = $1 AND failed_at > $2::timestamptz - $3::interval AND failed_at <= $2::timestamptz
), raised AS (
    INSERT INTO failure_warnings (schedule_id, window_start, failures)
    SELECT $1, date_bin($3::interval, $2::timestamptz, TIMESTAMPTZ '2000-01-01'), failures
    FROM counted WHERE failures > $4
    ON CONFLICT DO NOTHING
    RETURNING schedule_id, window_start, failures
)
INSERT INTO alert_outbox (alert_id, action, payload)
SELECT NULL, 'warning', jsonb_strip_nulls(jsonb_build_object(
    'kind', 'execution_failures', 'schedule_id', r.schedule_id, 'window_start', r.window_start,
    'failures', r.failures, 'window_seconds', extract(epoch FROM $3::interval)::int,
    'connection_id', s.connection_id, 'resource', s.resource, 'fleet_id', c.fleet_id,
    'fleet_ref', f.fleet_ref, 'source_name', c.source_name))
FROM raised r
LEFT JOIN schedules s ON s.schedule_id = r.schedule_id
LEFT JOIN connections c ON c.connection_id = s.connection_id
LEFT JOIN fleets f ON f.fleet_id = c.fleet_id
RETURNING id";

const SCHEDULE_DEACTIVATE: &str = "
INSERT INTO schedules AS s (schedule_id, connection_id, resource, status, consecutive_error_threshold,
    execution_interval_seconds, deactivated_at)
VALUES ($1, $2, $3, 'deactivated', $4, $5, $6)
ON CONFLICT (schedule_id) DO UPDATE SET
    status = 'deactivated',
    connection_id = COALESCE(s.connection_id, EXCLUDED.connection_id),
    resource = COALESCE(s.resource, EXCLUDED.resource),
    consecutive_error_threshold = COALESCE(EXCLUDED.consecutive_error_threshold, s.consecutive_error_threshold),
    execution_interval_seconds = COALESCE(EXCLUDED.execution_interval_seconds, s.execution_interval_seconds),
    deactivated_at = GREATEST(s.deactivated_at, EXCLUDED.deactivated_at)";

const SCHEDULE_ALERT_OPEN: &str = "
WITH subject AS (
    SELECT s.schedule_id, c.fleet_id, f.fleet_ref, s.resource, s.connection_id, c.source_name,
           s.consecutive_error_threshold
    FROM schedules s
    LEFT JOIN connections c ON c.connection_id = s.connection_id
    LEFT JOIN fleets f ON f.fleet_id = c.fleet_id
    WHERE s.schedule_id = $1 AND s.status = 'deactivated'
      AND NOT EXISTS (SELECT 1 FROM alerts a WHERE a.kind = 'schedule_deactivated' AND a.subject_id = $1 AND a.opened_at >= $2)
), opened AS (
    INSERT INTO alerts (kind, subject_id, fleet_id, fleet_ref, state, opened_at, details)
    SELECT 'schedule_deactivated', schedule_id, fleet_id, fleet_ref, 'open', $2,
           jsonb_strip_nulls(jsonb_build_object('resource', resource, 'connection_id', connection_id,
               'source_name', source_name, 'consecutive_error_threshold', consecutive_error_threshold))
    FROM subject
    ON CONFLICT (kind, subject_id) WHERE state = 'open' DO NOTHING
    RETURNING alert_id
)
INSERT INTO alert_outbox (alert_id, action) SELECT alert_id, 'open' FROM opened RETURNING alert_id";

/// Fill `fleet_id`/`fleet_ref` on alerts raised before the mapping was known. Cheap: it only
/// looks at alerts still missing a fleet_ref (partial index).
const BACKFILL_ALERTS: &str = "
WITH found AS (
    SELECT a.alert_id, COALESCE(a.fleet_id, c.fleet_id) AS fleet_id, f.fleet_ref
    FROM alerts a
    LEFT JOIN schedules s ON a.kind = 'schedule_deactivated' AND s.schedule_id = a.subject_id
    LEFT JOIN connections c ON c.connection_id = CASE WHEN a.kind = 'connection_stale' THEN a.subject_id ELSE s.connection_id END
    LEFT JOIN fleets f ON f.fleet_id = COALESCE(a.fleet_id, c.fleet_id)
    WHERE a.fleet_ref IS NULL
)
UPDATE alerts a SET fleet_id = found.fleet_id, fleet_ref = found.fleet_ref
FROM found
WHERE a.alert_id = found.alert_id
  AND (found.fleet_id IS DISTINCT FROM a.fleet_id OR found.fleet_ref IS NOT NULL)";

const BACKFILL_FLEET_REFS: &str = "
UPDATE fleets f SET fleet_ref = i.fleet_ref
FROM invitations i
WHERE f.fleet_ref IS NULL AND i.invitation_id = f.invitation_id AND i.fleet_ref IS NOT NULL";

const DEDUP_INSERT: &str = "
INSERT INTO webhook_events (event_key, event_id, event_name, webhook_id, event_time, outcome, received_at, fleet_id)
SELECT * FROM unnest($1::text[], $2::uuid[], $3::text[], $4::text[], $5::timestamptz[], $6::text[], $7::timestamptz[], $8::uuid[])
ON CONFLICT (event_key) DO NOTHING
RETURNING event_key";

fn stage(
    fleet_id: Uuid,
    fleet_ref: Option<String>,
    invitation_id: Option<Uuid>,
    onboarding: Onboarding,
    event: &Event,
) -> Op {
    Op::new(
        FLEET_STAGE,
        vec![
            p(fleet_id),
            p(fleet_ref),
            p(invitation_id),
            p(onboarding.as_str()),
            p(onboarding.rank()),
            p(event.event_time),
            p(event.key.clone()),
        ],
    )
}

/// Tunable state rules.
#[derive(Debug, Clone, Copy)]
pub struct Rules {
    /// More than this many distinct failed executions of one schedule inside `failure_window`
    /// raise one `warning` notification per window.
    pub failure_threshold: i32,
    pub failure_window: std::time::Duration,
}

impl Default for Rules {
    fn default() -> Self {
        Self {
            failure_threshold: 3,
            failure_window: std::time::Duration::from_secs(3600),
        }
    }
}

/// The statements that apply one event. Empty for ignored events.
pub fn plan(event: &Event, rules: &Rules) -> Vec<Op> {
    let t = event.event_time;
    let key = || p(event.key.clone());
    let mut ops = Vec::new();
    match &event.change {
        Change::Invitation(status, records) => {
            for r in records {
                ops.push(Op::new(
                    INVITATION_UPSERT,
                    vec![
                        p(r.id),
                        p(r.fleet_ref.clone()),
                        p(r.fleet_id),
                        p(status.as_str()),
                        p(status.rank()),
                        p(t),
                        key(),
                        p(r.decline_reason.clone()),
                        p(r.expires_at),
                        p(r.magic_link.clone()),
                        p(r.created_at),
                        p(r.accepted_at),
                        p(r.declined_at),
                    ],
                ));
                if let Some(fleet_id) = r.fleet_id {
                    ops.push(stage(
                        fleet_id,
                        r.fleet_ref.clone(),
                        Some(r.id),
                        status.onboarding(),
                        event,
                    ));
                }
            }
        }
        Change::ShareAgreement(records) => {
            for r in records {
                ops.push(Op::new(
                    SHARE_AGREEMENT_UPSERT,
                    vec![
                        p(r.id),
                        p(r.fleet_id),
                        p(r.invitation_id),
                        p(r.fleet_ref.clone()),
                        p(r.status.clone()),
                        p(r.scopes.clone()),
                        p(r.effective_date),
                        p(r.expiration_date),
                        p(t),
                        key(),
                    ],
                ));
                ops.push(Op::new(
                    FLEET_SHARE,
                    vec![
                        p(r.fleet_id),
                        p(r.fleet_ref.clone()),
                        p(r.invitation_id),
                        p(r.id),
                        p(r.status.clone()),
                        p(t),
                        key(),
                    ],
                ));
                if let Some(invitation_id) = r.invitation_id {
                    ops.push(Op::new(
                        INVITATION_MAPPING,
                        vec![p(invitation_id), p(r.fleet_id), p(r.fleet_ref.clone())],
                    ));
                }
            }
        }
        Change::Connection { staled, records } => {
            for r in records {
                let stale = *staled || r.status.as_deref() == Some("stale");
                ops.push(Op::new(
                    CONNECTION_UPSERT,
                    vec![
                        p(r.id),
                        p(r.fleet_id),
                        p(r.tsp_id),
                        p(r.source_name.clone()),
                        p(if stale { "stale" } else { "active" }),
                        p(t),
                        key(),
                    ],
                ));
                if stale {
                    ops.push(
                        Op::new(CONNECTION_ALERT_OPEN, vec![p(r.id), p(t)])
                            .opening("connection_stale"),
                    );
                } else {
                    ops.push(Op::new(CONNECTION_ALERT_RESOLVE, vec![p(r.id), p(t)]));
                }
            }
        }
        Change::FleetConnection(records) => {
            for r in records {
                ops.push(Op::new(
                    FLEET_CONNECTION_INSERT,
                    vec![p(r.id), p(r.fleet_id), p(r.connection_id), p(t)],
                ));
                ops.push(Op::new(
                    CONNECTION_REFERENCE,
                    vec![p(r.connection_id), p(Some(r.fleet_id)), p(None::<String>)],
                ));
                ops.push(stage(r.fleet_id, None, None, Onboarding::Connected, event));
            }
        }
        Change::ExecutionFailed(records) => {
            for r in records {
                if let Some(connection_id) = r.connection_id {
                    ops.push(Op::new(
                        CONNECTION_REFERENCE,
                        vec![p(connection_id), p(r.fleet_id), p(r.source_name.clone())],
                    ));
                }
                let failed_at = r.updated_at.or(r.created_at).unwrap_or(t);
                ops.push(Op::new(
                    EXECUTION_FAILED,
                    vec![
                        p(r.id),
                        p(r.schedule_id),
                        p(r.connection_id),
                        p(r.fleet_id),
                        p(r.source_name.clone()),
                        p(r.resource.clone()),
                        p(failed_at),
                    ],
                ));
                ops.push(Op::new(
                    FAILURE_WARNING,
                    vec![
                        p(r.schedule_id),
                        p(failed_at),
                        p(PgInterval(rules.failure_window)),
                        p(rules.failure_threshold),
                    ],
                ));
            }
        }
        Change::ScheduleDeactivated(records) => {
            for r in records {
                ops.push(Op::new(
                    CONNECTION_REFERENCE,
                    vec![p(r.connection_id), p(None::<Uuid>), p(None::<String>)],
                ));
                ops.push(Op::new(
                    SCHEDULE_DEACTIVATE,
                    vec![
                        p(r.id),
                        p(r.connection_id),
                        p(r.resource.clone()),
                        p(r.consecutive_error_threshold),
                        p(r.execution_interval_seconds),
                        p(t),
                    ],
                ));
                ops.push(
                    Op::new(SCHEDULE_ALERT_OPEN, vec![p(r.id), p(t)])
                        .opening("schedule_deactivated"),
                );
            }
        }
        Change::Ignored => {}
    }
    ops
}

/// What happened to one event of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Applied,
    Duplicate,
    Ignored,
}

impl Applied {
    pub fn outcome(self) -> &'static str {
        match self {
            Applied::Applied => "applied",
            Applied::Duplicate => "duplicate",
            Applied::Ignored => "ignored",
        }
    }
}

/// An event ready to apply, with the relay's receive time.
pub struct Incoming<'a> {
    pub event: &'a Event,
    pub received_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Default)]
pub struct BatchResult {
    pub applied: Vec<Applied>,
    /// Kinds of alerts opened in this batch (for `catena_alerts_raised_total`).
    pub alerts_opened: Vec<&'static str>,
}

/// Apply a batch inside `tx` (the caller commits). Duplicates, both against earlier batches and
/// inside this one, are recorded as such and change nothing.
pub async fn apply_batch(
    tx: &Transaction<'_>,
    batch: &[Incoming<'_>],
    rules: &Rules,
) -> Result<BatchResult, DbError> {
    let mut result = BatchResult {
        applied: vec![Applied::Duplicate; batch.len()],
        alerts_opened: Vec::new(),
    };
    // First occurrence of each key inside the batch; later ones are duplicates.
    let mut first: std::collections::HashMap<&str, usize> =
        std::collections::HashMap::with_capacity(batch.len());
    for (i, incoming) in batch.iter().enumerate() {
        first.entry(incoming.event.key.as_str()).or_insert(i);
    }
    let mut unique: Vec<usize> = first.values().copied().collect();
    unique.sort_unstable();

    let mut fleets = Vec::with_capacity(unique.len());
    let (mut keys, mut ids, mut names, mut webhooks, mut times, mut outcomes, mut received) = (
        Vec::with_capacity(unique.len()),
        Vec::with_capacity(unique.len()),
        Vec::with_capacity(unique.len()),
        Vec::with_capacity(unique.len()),
        Vec::with_capacity(unique.len()),
        Vec::with_capacity(unique.len()),
        Vec::with_capacity(unique.len()),
    );
    for &i in &unique {
        let e = batch[i].event;
        keys.push(e.key.as_str());
        ids.push(e.event_id);
        names.push(e.event_name.as_str());
        webhooks.push(e.webhook_id.as_deref());
        times.push(e.event_time);
        outcomes.push(if e.change == Change::Ignored {
            "ignored"
        } else {
            "applied"
        });
        received.push(batch[i].received_at);
        fleets.push(e.fleet_id());
    }
    let dedup = tx.prepare_cached(DEDUP_INSERT).await?;
    let fresh: std::collections::HashSet<String> = tx
        .query(
            &dedup,
            &[
                &keys, &ids, &names, &webhooks, &times, &outcomes, &received, &fleets,
            ],
        )
        .await?
        .into_iter()
        .map(|row| row.get::<_, String>(0))
        .collect();

    let mut ops = Vec::new();
    for &i in &unique {
        let event = batch[i].event;
        if !fresh.contains(&event.key) {
            continue;
        }
        if event.change == Change::Ignored {
            result.applied[i] = Applied::Ignored;
            continue;
        }
        result.applied[i] = Applied::Applied;
        ops.extend(plan(event, rules));
    }
    if ops.is_empty() {
        return Ok(result);
    }
    ops.push(Op::new(BACKFILL_FLEET_REFS, Vec::new()));
    ops.push(Op::new(BACKFILL_ALERTS, Vec::new()));

    // Prepare (cached per connection), then send every statement in one pipelined flight.
    let mut statements = Vec::with_capacity(ops.len());
    for op in &ops {
        statements.push(tx.prepare_cached(op.sql).await?);
    }
    let params: Vec<Vec<&(dyn ToSql + Sync)>> = ops
        .iter()
        .map(|op| {
            op.params
                .iter()
                .map(|b| b.as_ref() as &(dyn ToSql + Sync))
                .collect()
        })
        .collect();
    let rows = try_join_all(
        statements
            .iter()
            .zip(&params)
            .map(|(statement, params)| tx.query(statement, params)),
    )
    .await?;
    for (op, rows) in ops.iter().zip(rows) {
        if let Some(kind) = op.opens_alert {
            result
                .alerts_opened
                .extend(std::iter::repeat_n(kind, rows.len()));
        }
    }
    Ok(result)
}

/// A `std::time::Duration` sent as a PostgreSQL `interval` (microseconds, no days or months).
#[derive(Debug, Clone, Copy)]
pub struct PgInterval(pub std::time::Duration);

impl ToSql for PgInterval {
    fn to_sql(
        &self,
        _ty: &tokio_postgres::types::Type,
        out: &mut bytes::BytesMut,
    ) -> Result<tokio_postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        use bytes::BufMut;
        out.put_i64(self.0.as_micros() as i64);
        out.put_i32(0); // days
        out.put_i32(0); // months
        Ok(tokio_postgres::types::IsNull::No)
    }

    tokio_postgres::types::accepts!(INTERVAL);
    tokio_postgres::types::to_sql_checked!();
}
