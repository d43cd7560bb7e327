//! The statements of a batch, one per statement kind. Each takes column arrays and applies every
//! row with one `INSERT .. SELECT FROM unnest(..) ON CONFLICT ..`, guarded by event time (ties
//! broken by the event key) or by lifecycle rank, so the statements commute.

pub(super) const INVITATIONS: &str = "
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
pub(super) const FLEET_STAGES: &str = "
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

pub(super) const SHARE_AGREEMENTS: &str = "
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
pub(super) const FLEET_SHARES: &str = "
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
pub(super) const INVITATION_MAPPINGS: &str = "
UPDATE invitations i SET fleet_id = COALESCE(i.fleet_id, m.fleet_id), fleet_ref = COALESCE(i.fleet_ref, m.fleet_ref)
FROM (SELECT DISTINCT ON (invitation_id) * FROM unnest($1::uuid[], $2::uuid[], $3::text[]) AS r(invitation_id, fleet_id, fleet_ref)
      ORDER BY invitation_id, fleet_ref NULLS LAST) m
WHERE i.invitation_id = m.invitation_id AND (i.fleet_id IS NULL OR i.fleet_ref IS NULL)";

pub(super) const CONNECTIONS: &str = "
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
pub(super) const CONNECTION_REFERENCES: &str = "
INSERT INTO connections AS c (connection_id, fleet_id, source_name, status)
SELECT r.id, r.fleet_id, r.source_name, 'active'
FROM unnest($1::uuid[], $2::uuid[], $3::text[]) AS r(id, fleet_id, source_name)
ON CONFLICT (connection_id) DO UPDATE SET
    fleet_id = COALESCE(c.fleet_id, EXCLUDED.fleet_id),
    source_name = COALESCE(c.source_name, EXCLUDED.source_name)
WHERE c.fleet_id IS NULL OR c.source_name IS NULL";

pub(super) const FLEET_CONNECTIONS: &str = "
INSERT INTO fleet_connections (fleet_connection_id, fleet_id, connection_id, created_at)
SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::timestamptz[])
ON CONFLICT (fleet_connection_id) DO UPDATE SET created_at = LEAST(fleet_connections.created_at, EXCLUDED.created_at)";

pub(super) const CONNECTION_ALERTS_OPEN: &str = "
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

pub(super) const CONNECTION_ALERTS_RESOLVE: &str = "
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
pub(super) const EXECUTIONS_FAILED: &str = "
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
pub(super) const FAILURE_WARNINGS: &str = "
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

pub(super) const SCHEDULE_DEACTIVATIONS: &str = "
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

pub(super) const SCHEDULE_ALERTS_OPEN: &str = "
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
pub(super) const BACKFILL_ALERTS: &str = "
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

pub(super) const BACKFILL_FLEET_REFS: &str = "
UPDATE fleets f SET fleet_ref = i.fleet_ref
FROM invitations i
WHERE f.fleet_ref IS NULL AND i.invitation_id = f.invitation_id AND i.fleet_ref IS NOT NULL";

pub(super) const DEDUP_INSERT: &str = "
INSERT INTO webhook_events (event_key, event_id, event_name, webhook_id, event_time, outcome, received_at, fleet_id)
SELECT * FROM unnest($1::text[], $2::uuid[], $3::text[], $4::text[], $5::timestamptz[], $6::text[], $7::timestamptz[], $8::uuid[])
ON CONFLICT (event_key) DO NOTHING
RETURNING event_key";

/// Takes the advisory locks in array order (the caller sorts them).
pub(super) const ENTITY_LOCKS: &str =
    "SELECT count(pg_advisory_xact_lock(k)) FROM unnest($1::int8[]) WITH ORDINALITY AS l(k, n)";
