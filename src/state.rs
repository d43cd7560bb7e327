//! Applying events to the fleet state: exactly-once effect, in any order, set-based.
//!
//! A batch is one transaction: one multi-row insert of the dedup keys (`RETURNING` says which
//! are new), then the state changes of every new event, then commit. The changes are gathered
//! per statement kind into column arrays and applied with one `INSERT .. SELECT FROM unnest(..)
//! ON CONFLICT ..` per kind, all pipelined in a single network flight, so a 500-event batch
//! costs a few dozen statements rather than thousands.
//!
//! Every statement is an upsert guarded by event time (ties broken by the event key) or by
//! lifecycle rank, so applying any permutation of the same events, with any duplicates, in any
//! batch sizes, converges on the same state. One `INSERT .. ON CONFLICT DO UPDATE` may not
//! touch a row twice, so rows sharing a key within a batch are split into rounds (one
//! statement each); since the upserts commute, round order does not matter.

use std::collections::HashMap;
use std::hash::Hash;

use chrono::{DateTime, Utc};
use deadpool_postgres::Transaction;
use futures::future::try_join_all;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use crate::db::DbError;
use crate::envelope::{Change, Event, Onboarding};

type Param = Box<dyn ToSql + Sync + Send>;

/// One statement with its (array) parameters.
pub struct Op {
    pub sql: &'static str,
    pub params: Vec<Param>,
    /// Rows returned by this statement are alerts opened of this kind.
    pub opens_alert: Option<&'static str>,
}

fn p<T: ToSql + Sync + Send + 'static>(value: T) -> Param {
    Box::new(value)
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

/// Collect one column of a round.
fn col<T, V: ToSql + Sync + Send + 'static>(rows: &[&T], f: impl Fn(&T) -> V) -> Param {
    p(rows.iter().map(|r| f(r)).collect::<Vec<V>>())
}

const INVITATIONS: &str = "
INSERT INTO invitations AS i (invitation_id, fleet_ref, fleet_id, status, status_rank, status_at, status_key,
    decline_reason, expires_at, magic_link, created_at, accepted_at, declined_at, updated_at, version_key)
SELECT r.id, r.fleet_ref, r.fleet_id, r.status, r.rank, r.status_at, r.status_key, r.decline_reason, r.expires_at,
       r.magic_link, r.created_at, r.accepted_at, r.declined_at, r.t, r.k
FROM unnest($1::uuid[], $2::text[], $3::uuid[], $4::text[], $5::int2[], $6::timestamptz[], $7::text[],
            $8::text[], $9::timestamptz[], $10::text[], $11::timestamptz[], $12::timestamptz[], $13::timestamptz[],
            $14::timestamptz[], $15::text[])
     AS r(id, fleet_ref, fleet_id, status, rank, status_at, status_key, decline_reason, expires_at, magic_link,
          created_at, accepted_at, declined_at, t, k)
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

/// Raise a fleet's onboarding stage if this one ranks higher (never lowering it).
const FLEET_STAGES: &str = "
INSERT INTO fleets AS f (fleet_id, fleet_ref, invitation_id, onboarding_status, onboarding_rank, onboarding_at, onboarding_key)
SELECT * FROM unnest($1::uuid[], $2::text[], $3::uuid[], $4::text[], $5::int2[], $6::timestamptz[], $7::text[])
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

const SHARE_AGREEMENTS: &str = "
INSERT INTO share_agreements AS s (share_agreement_id, fleet_id, invitation_id, fleet_ref, status, scopes,
    effective_date, expiration_date, updated_at, version_key)
SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::text[], $6::jsonb[], $7::timestamptz[],
                     $8::timestamptz[], $9::timestamptz[], $10::text[])
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
const FLEET_SHARES: &str = "
INSERT INTO fleets AS f (fleet_id, fleet_ref, invitation_id, share_agreement_id, share_status, share_at, share_key,
    onboarding_status, onboarding_rank, onboarding_at, onboarding_key)
SELECT r.fleet_id, r.fleet_ref, r.invitation_id, r.id, r.status, r.t, r.k, 'share_agreed', 4, r.t, r.k
FROM unnest($1::uuid[], $2::text[], $3::uuid[], $4::uuid[], $5::text[], $6::timestamptz[], $7::text[])
     AS r(fleet_id, fleet_ref, invitation_id, id, status, t, k)
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
const INVITATION_MAPPINGS: &str = "
UPDATE invitations i SET fleet_id = COALESCE(i.fleet_id, m.fleet_id), fleet_ref = COALESCE(i.fleet_ref, m.fleet_ref)
FROM (SELECT DISTINCT ON (invitation_id) * FROM unnest($1::uuid[], $2::uuid[], $3::text[]) AS r(invitation_id, fleet_id, fleet_ref)
      ORDER BY invitation_id, fleet_ref NULLS LAST) m
WHERE i.invitation_id = m.invitation_id AND (i.fleet_id IS NULL OR i.fleet_ref IS NULL)";

const CONNECTIONS: &str = "
INSERT INTO connections AS c (connection_id, fleet_id, tsp_id, source_name, status, staled_at, updated_at, version_key)
SELECT r.id, r.fleet_id, r.tsp_id, r.source_name, r.status, CASE WHEN r.status = 'stale' THEN r.t END, r.t, r.k
FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::text[], $6::timestamptz[], $7::text[])
     AS r(id, fleet_id, tsp_id, source_name, status, t, k)
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

/// Connections known only by reference (connection reuse: no connection.created for us).
/// `updated_at` stays NULL so the first real connection event overrides the assumed status.
const CONNECTION_REFERENCES: &str = "
INSERT INTO connections AS c (connection_id, fleet_id, source_name, status)
SELECT r.id, r.fleet_id, r.source_name, 'active'
FROM unnest($1::uuid[], $2::uuid[], $3::text[]) AS r(id, fleet_id, source_name)
ON CONFLICT (connection_id) DO UPDATE SET
    fleet_id = COALESCE(c.fleet_id, EXCLUDED.fleet_id),
    source_name = COALESCE(c.source_name, EXCLUDED.source_name)
WHERE c.fleet_id IS NULL OR c.source_name IS NULL";

const FLEET_CONNECTIONS: &str = "
INSERT INTO fleet_connections (fleet_connection_id, fleet_id, connection_id, created_at)
SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::timestamptz[])
ON CONFLICT (fleet_connection_id) DO UPDATE SET created_at = LEAST(fleet_connections.created_at, EXCLUDED.created_at)";

const CONNECTION_ALERTS_OPEN: &str = "
WITH ev AS (
    SELECT DISTINCT ON (connection_id) connection_id, t
    FROM unnest($1::uuid[], $2::timestamptz[]) AS e(connection_id, t) ORDER BY connection_id, t
), subject AS (
    SELECT c.connection_id, c.fleet_id, f.fleet_ref, c.source_name, ev.t
    FROM ev JOIN connections c ON c.connection_id = ev.connection_id
    LEFT JOIN fleets f ON f.fleet_id = c.fleet_id
    WHERE c.status = 'stale'
      AND NOT EXISTS (SELECT 1 FROM alerts a WHERE a.kind = 'connection_stale' AND a.subject_id = ev.connection_id AND a.opened_at >= ev.t)
), opened AS (
    INSERT INTO alerts (kind, subject_id, fleet_id, fleet_ref, state, opened_at, details)
    SELECT 'connection_stale', connection_id, fleet_id, fleet_ref, 'open', t,
           jsonb_strip_nulls(jsonb_build_object('source_name', source_name))
    FROM subject
    ON CONFLICT (kind, subject_id) WHERE state = 'open' DO NOTHING
    RETURNING alert_id
)
INSERT INTO alert_outbox (alert_id, action) SELECT alert_id, 'open' FROM opened RETURNING alert_id";

const CONNECTION_ALERTS_RESOLVE: &str = "
WITH ev AS (
    SELECT connection_id, max(t) AS t FROM unnest($1::uuid[], $2::timestamptz[]) AS e(connection_id, t) GROUP BY connection_id
), resolved AS (
    UPDATE alerts a SET state = 'resolved', resolved_at = ev.t, resolution = 'connection active again'
    FROM ev
    -- `= ANY($1)` drives an index lookup per connection; a plain join scanned every open alert.
    WHERE a.kind = 'connection_stale' AND a.state = 'open' AND a.subject_id = ANY($1::uuid[])
      AND a.subject_id = ev.connection_id
      AND EXISTS (SELECT 1 FROM connections c WHERE c.connection_id = a.subject_id AND c.status = 'active')
    RETURNING a.alert_id
)
INSERT INTO alert_outbox (alert_id, action) SELECT alert_id, 'resolve' FROM resolved RETURNING alert_id";

/// Count distinct failed executions per schedule; a schedule first seen here is `active`.
const EXECUTIONS_FAILED: &str = "
WITH inserted AS (
    INSERT INTO failed_executions (execution_id, schedule_id, connection_id, fleet_id, source_name, resource, failed_at)
    SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::uuid[], $5::text[], $6::text[], $7::timestamptz[])
    ON CONFLICT (execution_id) DO NOTHING
    RETURNING schedule_id, connection_id, resource, failed_at
), per_schedule AS (
    SELECT schedule_id,
           (array_agg(connection_id) FILTER (WHERE connection_id IS NOT NULL))[1] AS connection_id,
           (array_agg(resource) FILTER (WHERE resource IS NOT NULL))[1] AS resource,
           count(*)::int AS failures, max(failed_at) AS last_failed_at
    FROM inserted GROUP BY schedule_id
)
INSERT INTO schedules AS s (schedule_id, connection_id, resource, status, failed_executions, last_failed_at)
SELECT schedule_id, connection_id, resource, 'active', failures, last_failed_at FROM per_schedule
ON CONFLICT (schedule_id) DO UPDATE SET
    failed_executions = s.failed_executions + EXCLUDED.failed_executions,
    last_failed_at = GREATEST(s.last_failed_at, EXCLUDED.last_failed_at),
    connection_id = COALESCE(s.connection_id, EXCLUDED.connection_id),
    resource = COALESCE(s.resource, EXCLUDED.resource)";

/// Escalate schedules whose failures inside the window exceed the threshold: one `warning`
/// outbox row per schedule and window (not an alert row).
const FAILURE_WARNINGS: &str = "
WITH ev AS (
    SELECT DISTINCT schedule_id, failed_at FROM unnest($1::uuid[], $2::timestamptz[]) AS e(schedule_id, failed_at)
), counted AS (
    SELECT ev.schedule_id, date_bin($3::interval, ev.failed_at, TIMESTAMPTZ '2000-01-01') AS window_start,
           (SELECT count(*) FROM failed_executions fe
             WHERE fe.schedule_id = ev.schedule_id AND fe.failed_at > ev.failed_at - $3::interval
               AND fe.failed_at <= ev.failed_at)::int AS failures
    FROM ev
), raised AS (
    INSERT INTO failure_warnings (schedule_id, window_start, failures)
    SELECT DISTINCT ON (schedule_id, window_start) schedule_id, window_start, failures
    FROM counted WHERE failures > $4
    ORDER BY schedule_id, window_start, failures DESC
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

const SCHEDULE_DEACTIVATIONS: &str = "
INSERT INTO schedules AS s (schedule_id, connection_id, resource, status, consecutive_error_threshold,
    execution_interval_seconds, deactivated_at)
SELECT r.id, r.connection_id, r.resource, 'deactivated', r.threshold, r.interval, r.t
FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::int4[], $5::int4[], $6::timestamptz[])
     AS r(id, connection_id, resource, threshold, interval, t)
ON CONFLICT (schedule_id) DO UPDATE SET
    status = 'deactivated',
    connection_id = COALESCE(s.connection_id, EXCLUDED.connection_id),
    resource = COALESCE(s.resource, EXCLUDED.resource),
    consecutive_error_threshold = COALESCE(EXCLUDED.consecutive_error_threshold, s.consecutive_error_threshold),
    execution_interval_seconds = COALESCE(EXCLUDED.execution_interval_seconds, s.execution_interval_seconds),
    deactivated_at = GREATEST(s.deactivated_at, EXCLUDED.deactivated_at)";

const SCHEDULE_ALERTS_OPEN: &str = "
WITH ev AS (
    SELECT DISTINCT ON (schedule_id) schedule_id, t
    FROM unnest($1::uuid[], $2::timestamptz[]) AS e(schedule_id, t) ORDER BY schedule_id, t
), subject AS (
    SELECT s.schedule_id, c.fleet_id, f.fleet_ref, s.resource, s.connection_id, c.source_name,
           s.consecutive_error_threshold, ev.t
    FROM ev JOIN schedules s ON s.schedule_id = ev.schedule_id
    LEFT JOIN connections c ON c.connection_id = s.connection_id
    LEFT JOIN fleets f ON f.fleet_id = c.fleet_id
    WHERE s.status = 'deactivated'
      AND NOT EXISTS (SELECT 1 FROM alerts a WHERE a.kind = 'schedule_deactivated' AND a.subject_id = ev.schedule_id AND a.opened_at >= ev.t)
), opened AS (
    INSERT INTO alerts (kind, subject_id, fleet_id, fleet_ref, state, opened_at, details)
    SELECT 'schedule_deactivated', schedule_id, fleet_id, fleet_ref, 'open', t,
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

/// Takes the advisory locks in array order (the caller sorts them).
const ENTITY_LOCKS: &str =
    "SELECT count(pg_advisory_xact_lock(k)) FROM unnest($1::int8[]) WITH ORDINALITY AS l(k, n)";

/// Advisory lock keys for the rows an event can write: one per entity, salted per kind so a
/// fleet and a connection with equal ids do not share a key (a collision would only serialise).
fn entity_locks(event: &Event) -> Vec<i64> {
    fn key(kind: u64, id: Uuid) -> i64 {
        let (hi, lo) = id.as_u64_pair();
        (hi ^ lo.rotate_left(17) ^ kind.wrapping_mul(0x9E37_79B9_7F4A_7C15)) as i64
    }
    const INVITATION: u64 = 1;
    const FLEET: u64 = 2;
    const SHARE: u64 = 3;
    const CONNECTION: u64 = 4;
    const FLEET_CONNECTION: u64 = 5;
    const SCHEDULE: u64 = 6;
    const EXECUTION: u64 = 7;
    let mut keys = Vec::new();
    match &event.change {
        Change::Invitation(_, records) => {
            for r in records {
                keys.push(key(INVITATION, r.id));
                keys.extend(r.fleet_id.map(|f| key(FLEET, f)));
            }
        }
        Change::ShareAgreement(records) => {
            for r in records {
                keys.push(key(SHARE, r.id));
                keys.push(key(FLEET, r.fleet_id));
                keys.extend(r.invitation_id.map(|i| key(INVITATION, i)));
            }
        }
        Change::Connection { records, .. } => {
            keys.extend(records.iter().map(|r| key(CONNECTION, r.id)));
        }
        Change::FleetConnection(records) => {
            for r in records {
                keys.push(key(FLEET_CONNECTION, r.id));
                keys.push(key(FLEET, r.fleet_id));
                keys.push(key(CONNECTION, r.connection_id));
            }
        }
        Change::ExecutionFailed(records) => {
            for r in records {
                keys.push(key(EXECUTION, r.id));
                keys.push(key(SCHEDULE, r.schedule_id));
                keys.extend(r.connection_id.map(|c| key(CONNECTION, c)));
            }
        }
        Change::ScheduleDeactivated(records) => {
            for r in records {
                keys.push(key(SCHEDULE, r.id));
                keys.push(key(CONNECTION, r.connection_id));
            }
        }
        Change::Ignored => {}
    }
    keys
}

/// In debug builds, an event with this name panics the handler (see [`apply_batch`]).
pub const TEST_PANIC_EVENT: &str = "catena-ingest.test-panic";

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
    /// Newest event time and key (the version of the latest-wins fields).
    t: DateTime<Utc>,
    k: String,
    decline_reason: Option<String>,
    expires_at: Option<DateTime<Utc>>,
    magic_link: Option<String>,
    created_at: Option<DateTime<Utc>>,
    accepted_at: Option<DateTime<Utc>>,
    declined_at: Option<DateTime<Utc>>,
}

struct StageRow {
    fleet_id: Uuid,
    fleet_ref: Option<String>,
    invitation_id: Option<Uuid>,
    stage: Onboarding,
    t: DateTime<Utc>,
    k: String,
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

struct ConnectionRow {
    id: Uuid,
    fleet_id: Option<Uuid>,
    tsp_id: Option<Uuid>,
    source_name: Option<String>,
    stale: bool,
    t: DateTime<Utc>,
    k: String,
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
    t: DateTime<Utc>,
}

/// Every change a batch asks for, by statement kind.
#[derive(Default)]
struct Plan {
    invitations: Vec<InvitationRow>,
    invitation_index: HashMap<Uuid, usize>,
    stages: Vec<StageRow>,
    shares: Vec<ShareRow>,
    connections: Vec<ConnectionRow>,
    references: Vec<ReferenceRow>,
    fleet_connections: Vec<FleetConnectionRow>,
    executions: Vec<ExecutionRow>,
    deactivations: Vec<DeactivationRow>,
}

impl Plan {
    /// Gather what one event changes. Pure: the state rules, in one place.
    fn add(&mut self, event: &Event) {
        let t = event.event_time;
        let k = || event.key.clone();
        match &event.change {
            Change::Invitation(status, records) => {
                for r in records {
                    self.add_invitation(InvitationRow {
                        id: r.id,
                        fleet_ref: r.fleet_ref.clone(),
                        fleet_id: r.fleet_id,
                        status: status.as_str(),
                        rank: status.rank(),
                        status_at: t,
                        status_key: k(),
                        t,
                        k: k(),
                        decline_reason: r.decline_reason.clone(),
                        expires_at: r.expires_at,
                        magic_link: r.magic_link.clone(),
                        created_at: r.created_at,
                        accepted_at: r.accepted_at,
                        declined_at: r.declined_at,
                    });
                    if let Some(fleet_id) = r.fleet_id {
                        self.stages.push(StageRow {
                            fleet_id,
                            fleet_ref: r.fleet_ref.clone(),
                            invitation_id: Some(r.id),
                            stage: status.onboarding(),
                            t,
                            k: k(),
                        });
                    }
                }
            }
            Change::ShareAgreement(records) => {
                for r in records {
                    self.shares.push(ShareRow {
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
                    });
                }
            }
            Change::Connection { staled, records } => {
                for r in records {
                    self.connections.push(ConnectionRow {
                        id: r.id,
                        fleet_id: r.fleet_id,
                        tsp_id: r.tsp_id,
                        source_name: r.source_name.clone(),
                        stale: *staled || r.status.as_deref() == Some("stale"),
                        t,
                        k: k(),
                    });
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
                    self.references.push(ReferenceRow {
                        id: r.connection_id,
                        fleet_id: Some(r.fleet_id),
                        source_name: None,
                    });
                    self.stages.push(StageRow {
                        fleet_id: r.fleet_id,
                        fleet_ref: None,
                        invitation_id: None,
                        stage: Onboarding::Connected,
                        t,
                        k: k(),
                    });
                }
            }
            Change::ExecutionFailed(records) => {
                for r in records {
                    if let Some(connection_id) = r.connection_id {
                        self.references.push(ReferenceRow {
                            id: connection_id,
                            fleet_id: r.fleet_id,
                            source_name: r.source_name.clone(),
                        });
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
                    self.references.push(ReferenceRow {
                        id: r.connection_id,
                        fleet_id: None,
                        source_name: None,
                    });
                    self.deactivations.push(DeactivationRow {
                        id: r.id,
                        connection_id: r.connection_id,
                        resource: r.resource.clone(),
                        threshold: r.consecutive_error_threshold,
                        interval: r.execution_interval_seconds,
                        t,
                    });
                }
            }
            Change::Ignored => {}
        }
    }

    fn add_invitation(&mut self, row: InvitationRow) {
        let Some(&at) = self.invitation_index.get(&row.id) else {
            self.invitation_index.insert(row.id, self.invitations.len());
            self.invitations.push(row);
            return;
        };
        let cur = &mut self.invitations[at];
        if (row.rank, row.status_at, &row.status_key) > (cur.rank, cur.status_at, &cur.status_key) {
            cur.status = row.status;
            cur.rank = row.rank;
            cur.status_at = row.status_at;
            cur.status_key = row.status_key.clone();
        }
        let newer = (row.t, &row.k) > (cur.t, &cur.k);
        let latest = |cur: &mut Option<_>, new: Option<_>| {
            if newer && new.is_some() || cur.is_none() {
                *cur = new.or(cur.take());
            }
        };
        latest(&mut cur.decline_reason, row.decline_reason);
        latest(&mut cur.magic_link, row.magic_link);
        if newer && row.expires_at.is_some() || cur.expires_at.is_none() {
            cur.expires_at = row.expires_at.or(cur.expires_at);
        }
        cur.fleet_ref = cur.fleet_ref.take().or(row.fleet_ref);
        cur.fleet_id = cur.fleet_id.or(row.fleet_id);
        cur.created_at = match (cur.created_at, row.created_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        cur.accepted_at = cur.accepted_at.or(row.accepted_at);
        cur.declined_at = cur.declined_at.max(row.declined_at);
        if newer {
            cur.t = row.t;
            cur.k = row.k;
        }
    }

    fn is_empty(&self) -> bool {
        self.invitations.is_empty()
            && self.stages.is_empty()
            && self.shares.is_empty()
            && self.connections.is_empty()
            && self.references.is_empty()
            && self.fleet_connections.is_empty()
            && self.executions.is_empty()
            && self.deactivations.is_empty()
    }

    /// The statements, in dependency order (mappings after the rows they map, alerts after the
    /// state they read, back-fills last).
    fn ops(&self, rules: &Rules) -> Vec<Op> {
        let mut ops = Vec::new();
        let mut push =
            |sql: &'static str, params: Vec<Param>, opens_alert: Option<&'static str>| {
                ops.push(Op {
                    sql,
                    params,
                    opens_alert,
                })
            };
        for round in rounds(&self.invitations, |r| r.id) {
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
                    col(&round, |r| r.decline_reason.clone()),
                    col(&round, |r| r.expires_at),
                    col(&round, |r| r.magic_link.clone()),
                    col(&round, |r| r.created_at),
                    col(&round, |r| r.accepted_at),
                    col(&round, |r| r.declined_at),
                    col(&round, |r| r.t),
                    col(&round, |r| r.k.clone()),
                ],
                None,
            );
        }
        if !self.shares.is_empty() {
            for round in rounds(&self.shares, |r| r.id) {
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
                    None,
                );
            }
            for round in rounds(&self.shares, |r| r.fleet_id) {
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
                    None,
                );
            }
            let mapped: Vec<&ShareRow> = self
                .shares
                .iter()
                .filter(|r| r.invitation_id.is_some())
                .collect();
            if !mapped.is_empty() {
                push(
                    INVITATION_MAPPINGS,
                    vec![
                        col(&mapped, |r| r.invitation_id),
                        col(&mapped, |r| r.fleet_id),
                        col(&mapped, |r| r.fleet_ref.clone()),
                    ],
                    None,
                );
            }
        }
        for round in rounds(&self.stages, |r| r.fleet_id) {
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
                None,
            );
        }
        for round in rounds(&self.connections, |r| r.id) {
            push(
                CONNECTIONS,
                vec![
                    col(&round, |r| r.id),
                    col(&round, |r| r.fleet_id),
                    col(&round, |r| r.tsp_id),
                    col(&round, |r| r.source_name.clone()),
                    col(&round, |r| if r.stale { "stale" } else { "active" }),
                    col(&round, |r| r.t),
                    col(&round, |r| r.k.clone()),
                ],
                None,
            );
        }
        for round in rounds(&self.references, |r| r.id) {
            push(
                CONNECTION_REFERENCES,
                vec![
                    col(&round, |r| r.id),
                    col(&round, |r| r.fleet_id),
                    col(&round, |r| r.source_name.clone()),
                ],
                None,
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
                None,
            );
        }
        let (stale, active): (Vec<&ConnectionRow>, Vec<&ConnectionRow>) =
            self.connections.iter().partition(|r| r.stale);
        if !stale.is_empty() {
            push(
                CONNECTION_ALERTS_OPEN,
                vec![col(&stale, |r| r.id), col(&stale, |r| r.t)],
                Some("connection_stale"),
            );
        }
        if !active.is_empty() {
            push(
                CONNECTION_ALERTS_RESOLVE,
                vec![col(&active, |r| r.id), col(&active, |r| r.t)],
                None,
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
                None,
            );
            push(
                FAILURE_WARNINGS,
                vec![
                    col(&all, |r| r.schedule_id),
                    col(&all, |r| r.failed_at),
                    p(PgInterval(rules.failure_window)),
                    p(rules.failure_threshold),
                ],
                None,
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
                    col(&round, |r| r.t),
                ],
                None,
            );
        }
        if !self.deactivations.is_empty() {
            let all: Vec<&DeactivationRow> = self.deactivations.iter().collect();
            push(
                SCHEDULE_ALERTS_OPEN,
                vec![col(&all, |r| r.id), col(&all, |r| r.t)],
                Some("schedule_deactivated"),
            );
        }
        push(BACKFILL_FLEET_REFS, Vec::new(), None);
        push(BACKFILL_ALERTS, Vec::new(), None);
        ops
    }
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
    // Debug builds only: a way for tests to make the handler panic on one message, to prove a
    // poison message is isolated and parked instead of crash-looping the pool.
    #[cfg(debug_assertions)]
    if batch.iter().any(|i| i.event.event_name == TEST_PANIC_EVENT) {
        panic!("test panic requested by a `{TEST_PANIC_EVENT}` event");
    }
    let mut result = BatchResult {
        applied: vec![Applied::Duplicate; batch.len()],
        alerts_opened: Vec::new(),
    };
    // First occurrence of each key inside the batch; later ones are duplicates.
    let mut first: HashMap<&str, usize> = HashMap::with_capacity(batch.len());
    for (i, incoming) in batch.iter().enumerate() {
        first.entry(incoming.event.key.as_str()).or_insert(i);
    }
    let mut unique: Vec<usize> = first.values().copied().collect();
    unique.sort_unstable();

    let n = unique.len();
    let (mut keys, mut ids, mut names, mut webhooks) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut times, mut outcomes, mut received, mut fleets) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
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
    // Lock every entity the batch may touch, in one sorted sweep, before writing anything.
    // Concurrent batches (other consumers, other replicas) then queue on these locks in a
    // single global order instead of taking row locks in different orders and deadlocking,
    // which PostgreSQL only breaks after deadlock_timeout (1 s) and which cost a retry.
    let mut locks: Vec<i64> = unique
        .iter()
        .flat_map(|&i| entity_locks(batch[i].event))
        .collect();
    locks.sort_unstable();
    locks.dedup();
    if !locks.is_empty() {
        let lock = tx.prepare_cached(ENTITY_LOCKS).await?;
        tx.execute(&lock, &[&locks]).await?;
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

    let mut plan = Plan::default();
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
        plan.add(event);
    }
    if plan.is_empty() {
        return Ok(result);
    }
    let ops = plan.ops(rules);

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
