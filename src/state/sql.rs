//! The statements of a batch, one per statement kind. Each takes column arrays and applies every
//! row with one `INSERT .. SELECT FROM unnest(..) ON CONFLICT ..`, and every column merges with
//! an operation that ignores arrival order: the greater version wins (event time, then event
//! key; lifecycle rank first for stages), `LEAST`/`GREATEST` (which skip NULLs) for identity
//! fields and first/last times, sums of distinct rows for counts. So the statements commute,
//! and the read model is a function of the set of events applied.

/// Latest-wins fields carry their own version (migration 0006): a late older event fills a gap
/// but never overwrites a newer value of the same field.
pub(super) const INVITATIONS: &str = "
INSERT INTO invitations AS i (invitation_id, fleet_ref, fleet_id, status, status_rank, status_at, status_key,
    decline_reason, decline_reason_version, expires_at, expires_at_version, magic_link, magic_link_version,
    created_at, accepted_at, declined_at, updated_at, version_key)
SELECT r.id, LEAST(r.fleet_ref, m.fleet_ref), LEAST(r.fleet_id, m.fleet_id), r.status, r.rank, r.status_at, r.status_key,
       r.decline_reason, r.decline_reason_v, r.expires_at, r.expires_at_v, r.magic_link, r.magic_link_v,
       r.created_at, r.accepted_at, r.declined_at, r.t, r.k
FROM unnest($1::uuid[], $2::text[], $3::uuid[], $4::text[], $5::int2[], $6::timestamptz[], $7::text[],
            $8::text[], $9::text[], $10::timestamptz[], $11::text[], $12::text[], $13::text[],
            $14::timestamptz[], $15::timestamptz[], $16::timestamptz[], $17::timestamptz[], $18::text[])
     AS r(id, fleet_ref, fleet_id, status, rank, status_at, status_key, decline_reason, decline_reason_v,
          expires_at, expires_at_v, magic_link, magic_link_v, created_at, accepted_at, declined_at, t, k)
-- A share agreement that arrived first already says which fleet this invitation became.
LEFT JOIN LATERAL (
    SELECT (array_agg(s.fleet_id ORDER BY s.fleet_id))[1] AS fleet_id, min(s.fleet_ref) AS fleet_ref
    FROM share_agreements s WHERE s.invitation_id = r.id
) m ON true
ON CONFLICT (invitation_id) DO UPDATE SET
    fleet_ref = LEAST(i.fleet_ref, EXCLUDED.fleet_ref),
    fleet_id = LEAST(i.fleet_id, EXCLUDED.fleet_id),
    status = CASE WHEN (EXCLUDED.status_rank, EXCLUDED.status_at, EXCLUDED.status_key) > (i.status_rank, i.status_at, i.status_key)
                  THEN EXCLUDED.status ELSE i.status END,
    status_key = CASE WHEN (EXCLUDED.status_rank, EXCLUDED.status_at, EXCLUDED.status_key) > (i.status_rank, i.status_at, i.status_key)
                  THEN EXCLUDED.status_key ELSE i.status_key END,
    status_at = CASE WHEN (EXCLUDED.status_rank, EXCLUDED.status_at, EXCLUDED.status_key) > (i.status_rank, i.status_at, i.status_key)
                  THEN EXCLUDED.status_at ELSE i.status_at END,
    status_rank = GREATEST(i.status_rank, EXCLUDED.status_rank),
    decline_reason = CASE WHEN EXCLUDED.decline_reason_version > COALESCE(i.decline_reason_version, '')
                  THEN EXCLUDED.decline_reason ELSE i.decline_reason END,
    decline_reason_version = GREATEST(i.decline_reason_version, EXCLUDED.decline_reason_version),
    expires_at = CASE WHEN EXCLUDED.expires_at_version > COALESCE(i.expires_at_version, '')
                  THEN EXCLUDED.expires_at ELSE i.expires_at END,
    expires_at_version = GREATEST(i.expires_at_version, EXCLUDED.expires_at_version),
    magic_link = CASE WHEN EXCLUDED.magic_link_version > COALESCE(i.magic_link_version, '')
                  THEN EXCLUDED.magic_link ELSE i.magic_link END,
    magic_link_version = GREATEST(i.magic_link_version, EXCLUDED.magic_link_version),
    created_at = LEAST(i.created_at, EXCLUDED.created_at),
    accepted_at = LEAST(i.accepted_at, EXCLUDED.accepted_at),
    declined_at = GREATEST(i.declined_at, EXCLUDED.declined_at),
    version_key = CASE WHEN (EXCLUDED.updated_at, EXCLUDED.version_key) > (i.updated_at, i.version_key)
                  THEN EXCLUDED.version_key ELSE i.version_key END,
    updated_at = GREATEST(i.updated_at, EXCLUDED.updated_at)";

/// Raise a fleet's onboarding stage if this one ranks higher (never lowering it).
pub(super) const FLEET_STAGES: &str = "
INSERT INTO fleets AS f (fleet_id, fleet_ref, invitation_id, onboarding_status, onboarding_rank, onboarding_at, onboarding_key)
SELECT * FROM unnest($1::uuid[], $2::text[], $3::uuid[], $4::text[], $5::int2[], $6::timestamptz[], $7::text[])
ON CONFLICT (fleet_id) DO UPDATE SET
    fleet_ref = LEAST(f.fleet_ref, EXCLUDED.fleet_ref),
    invitation_id = LEAST(f.invitation_id, EXCLUDED.invitation_id),
    onboarding_status = CASE WHEN (EXCLUDED.onboarding_rank, EXCLUDED.onboarding_at, EXCLUDED.onboarding_key) > (f.onboarding_rank, f.onboarding_at, f.onboarding_key)
                  THEN EXCLUDED.onboarding_status ELSE f.onboarding_status END,
    onboarding_key = CASE WHEN (EXCLUDED.onboarding_rank, EXCLUDED.onboarding_at, EXCLUDED.onboarding_key) > (f.onboarding_rank, f.onboarding_at, f.onboarding_key)
                  THEN EXCLUDED.onboarding_key ELSE f.onboarding_key END,
    onboarding_at = CASE WHEN (EXCLUDED.onboarding_rank, EXCLUDED.onboarding_at, EXCLUDED.onboarding_key) > (f.onboarding_rank, f.onboarding_at, f.onboarding_key)
                  THEN EXCLUDED.onboarding_at ELSE f.onboarding_at END,
    onboarding_rank = GREATEST(f.onboarding_rank, EXCLUDED.onboarding_rank)";

/// A share agreement's record is whole in every event: the newest record wins as a whole.
pub(super) const SHARE_AGREEMENTS: &str = "
INSERT INTO share_agreements AS s (share_agreement_id, fleet_id, invitation_id, fleet_ref, status, scopes,
    effective_date, expiration_date, updated_at, version_key)
SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::text[], $6::jsonb[], $7::timestamptz[],
                     $8::timestamptz[], $9::timestamptz[], $10::text[])
ON CONFLICT (share_agreement_id) DO UPDATE SET
    fleet_id = LEAST(s.fleet_id, EXCLUDED.fleet_id),
    invitation_id = LEAST(s.invitation_id, EXCLUDED.invitation_id),
    fleet_ref = LEAST(s.fleet_ref, EXCLUDED.fleet_ref),
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
    fleet_ref = LEAST(f.fleet_ref, EXCLUDED.fleet_ref),
    invitation_id = LEAST(f.invitation_id, EXCLUDED.invitation_id),
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

/// A share agreement tells which fleet an invitation became (an invitation that arrives later
/// looks it up itself, in [`INVITATIONS`]).
pub(super) const INVITATION_MAPPINGS: &str = "
UPDATE invitations i SET fleet_id = LEAST(i.fleet_id, m.fleet_id), fleet_ref = LEAST(i.fleet_ref, m.fleet_ref)
FROM (SELECT invitation_id, (array_agg(fleet_id ORDER BY fleet_id))[1] AS fleet_id, min(fleet_ref) AS fleet_ref
      FROM unnest($1::uuid[], $2::uuid[], $3::text[]) AS r(invitation_id, fleet_id, fleet_ref)
      GROUP BY invitation_id) m
WHERE i.invitation_id = m.invitation_id
  AND (i.fleet_id IS DISTINCT FROM LEAST(i.fleet_id, m.fleet_id) OR i.fleet_ref IS DISTINCT FROM LEAST(i.fleet_ref, m.fleet_ref))";

/// `status` is Catena's own (newest wins); `staled_at` the newest stale observation (of the
/// batch's rows merged per connection, [`super::plan::Merged`]).
pub(super) const CONNECTIONS: &str = "
INSERT INTO connections AS c (connection_id, fleet_id, tsp_id, source_name, status, staled_at, updated_at, version_key)
SELECT r.id, r.fleet_id, r.tsp_id, r.source_name, r.status, r.staled_at, r.t, r.k
FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::text[], $6::timestamptz[], $7::text[], $8::timestamptz[])
     AS r(id, fleet_id, tsp_id, source_name, status, t, k, staled_at)
ON CONFLICT (connection_id) DO UPDATE SET
    fleet_id = LEAST(c.fleet_id, EXCLUDED.fleet_id),
    tsp_id = LEAST(c.tsp_id, EXCLUDED.tsp_id),
    source_name = LEAST(c.source_name, EXCLUDED.source_name),
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
    fleet_id = LEAST(c.fleet_id, EXCLUDED.fleet_id),
    source_name = LEAST(c.source_name, EXCLUDED.source_name)
WHERE c.fleet_id IS DISTINCT FROM LEAST(c.fleet_id, EXCLUDED.fleet_id)
   OR c.source_name IS DISTINCT FROM LEAST(c.source_name, EXCLUDED.source_name)";

pub(super) const FLEET_CONNECTIONS: &str = "
INSERT INTO fleet_connections (fleet_connection_id, fleet_id, connection_id, created_at)
SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::timestamptz[])
ON CONFLICT (fleet_connection_id) DO UPDATE SET created_at = LEAST(fleet_connections.created_at, EXCLUDED.created_at)";

/// Every status observation of the batch, for the alert episodes ([`super::episodes`]).
pub(super) const STATUS_OBSERVATIONS: &str = "
INSERT INTO status_observations (kind, subject_id, observed_at, event_key, status)
SELECT * FROM unnest($1::text[], $2::uuid[], $3::timestamptz[], $4::text[], $5::text[])
ON CONFLICT DO NOTHING";

/// Count distinct failed executions per schedule; a schedule first seen here is `active`.
pub(super) const EXECUTIONS_FAILED: &str = "
WITH inserted AS (
    INSERT INTO failed_executions (execution_id, schedule_id, connection_id, fleet_id, source_name, resource, failed_at)
    SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::uuid[], $5::text[], $6::text[], $7::timestamptz[])
    ON CONFLICT (execution_id) DO NOTHING
    RETURNING schedule_id, connection_id, resource, failed_at
), per_schedule AS (
    SELECT schedule_id,
           (array_agg(connection_id ORDER BY connection_id) FILTER (WHERE connection_id IS NOT NULL))[1] AS connection_id,
           min(resource) AS resource,
           count(*)::int AS failures, max(failed_at) AS last_failed_at
    FROM inserted GROUP BY schedule_id
)
INSERT INTO schedules AS s (schedule_id, connection_id, resource, status, failed_executions, last_failed_at)
SELECT schedule_id, connection_id, resource, 'active', failures, last_failed_at FROM per_schedule
ON CONFLICT (schedule_id) DO UPDATE SET
    failed_executions = s.failed_executions + EXCLUDED.failed_executions,
    last_failed_at = GREATEST(s.last_failed_at, EXCLUDED.last_failed_at),
    connection_id = LEAST(s.connection_id, EXCLUDED.connection_id),
    resource = LEAST(s.resource, EXCLUDED.resource)";

/// Escalate schedules with more than the threshold of failed executions in one fixed window
/// (`date_bin` of the window length): one `warning` outbox row per schedule and window, the
/// first time its count crosses. Fixed windows, so which windows warn does not depend on
/// which failure arrived last; every window a new failure falls in is recounted.
pub(super) const FAILURE_WARNINGS: &str = "
WITH windows AS (
    SELECT DISTINCT schedule_id, date_bin($3::interval, failed_at, TIMESTAMPTZ '2000-01-01') AS window_start
    FROM unnest($1::uuid[], $2::timestamptz[]) AS e(schedule_id, failed_at)
), counted AS (
    SELECT w.schedule_id, w.window_start,
           (SELECT count(*) FROM failed_executions fe
             WHERE fe.schedule_id = w.schedule_id AND fe.failed_at >= w.window_start
               AND fe.failed_at < w.window_start + $3::interval)::int AS failures
    FROM windows w
), raised AS (
    INSERT INTO failure_warnings AS fw (schedule_id, window_start, failures)
    SELECT schedule_id, window_start, failures FROM counted WHERE failures > $4
    ON CONFLICT (schedule_id, window_start) DO UPDATE SET failures = GREATEST(fw.failures, EXCLUDED.failures)
    RETURNING schedule_id, window_start, failures, xmax = 0 AS first
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
WHERE r.first
RETURNING id";

/// Deactivation is final (no event reactivates a schedule); its settings: the newest record's.
pub(super) const SCHEDULE_DEACTIVATIONS: &str = "
INSERT INTO schedules AS s (schedule_id, connection_id, resource, status, consecutive_error_threshold,
    execution_interval_seconds, settings_version, deactivated_at)
SELECT r.id, r.connection_id, r.resource, 'deactivated', r.threshold, r.interval, r.v, r.t
FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::int4[], $5::int4[], $6::text[], $7::timestamptz[])
     AS r(id, connection_id, resource, threshold, interval, v, t)
ON CONFLICT (schedule_id) DO UPDATE SET
    status = 'deactivated',
    connection_id = LEAST(s.connection_id, EXCLUDED.connection_id),
    resource = LEAST(s.resource, EXCLUDED.resource),
    consecutive_error_threshold = CASE WHEN EXCLUDED.settings_version > COALESCE(s.settings_version, '')
                  THEN EXCLUDED.consecutive_error_threshold ELSE s.consecutive_error_threshold END,
    execution_interval_seconds = CASE WHEN EXCLUDED.settings_version > COALESCE(s.settings_version, '')
                  THEN EXCLUDED.execution_interval_seconds ELSE s.execution_interval_seconds END,
    settings_version = GREATEST(s.settings_version, EXCLUDED.settings_version),
    deactivated_at = GREATEST(s.deactivated_at, EXCLUDED.deactivated_at)";

/// The timelines of the subjects a batch touched (after its own observations are in).
pub(super) const ALERT_TIMELINES: &str = "
SELECT o.kind, o.subject_id, o.observed_at, o.event_key, o.status
FROM status_observations o
JOIN unnest($1::text[], $2::uuid[]) AS s(kind, subject_id) ON o.kind = s.kind AND o.subject_id = s.subject_id";

/// The alert rows of those subjects.
pub(super) const ALERT_ROWS: &str = "
SELECT alert_id, kind, subject_id, opened_at, opened_key, resolved_at, resolution = 'manual' AS manual, paged
FROM alerts WHERE subject_id = ANY($1::uuid[])";

/// Move rows to their episodes (in alert_id order, the order every batch locks them in), and
/// announce the ends of those that paged.
pub(super) const ALERTS_UPDATE: &str = "
WITH moved AS (
    UPDATE alerts a SET opened_at = u.opened_at, opened_key = u.opened_key, resolved_at = u.resolved_at,
           state = CASE WHEN u.resolved_at IS NULL THEN 'open' ELSE 'resolved' END,
           resolution = CASE WHEN u.resolved_at IS NULL THEN NULL ELSE u.resolution END
    FROM unnest($1::uuid[], $2::timestamptz[], $3::text[], $4::timestamptz[], $5::text[], $6::bool[])
         AS u(alert_id, opened_at, opened_key, resolved_at, resolution, announce)
    WHERE a.alert_id = u.alert_id
    RETURNING a.alert_id, u.announce
)
INSERT INTO alert_outbox (alert_id, action) SELECT alert_id, 'resolve' FROM moved WHERE announce
RETURNING alert_id";

/// New rows, one per new episode; those still going on page.
pub(super) const ALERTS_INSERT: &str = "
WITH opened AS (
    INSERT INTO alerts (alert_id, kind, subject_id, state, opened_at, opened_key, resolved_at, resolution, paged)
    SELECT n.alert_id, n.kind, n.subject_id, CASE WHEN n.resolved_at IS NULL THEN 'open' ELSE 'resolved' END,
           n.opened_at, n.opened_key, n.resolved_at, n.resolution, n.page
    FROM unnest($1::uuid[], $2::text[], $3::uuid[], $4::timestamptz[], $5::text[], $6::timestamptz[], $7::text[], $8::bool[])
         AS n(alert_id, kind, subject_id, opened_at, opened_key, resolved_at, resolution, page)
    RETURNING alert_id, paged
)
INSERT INTO alert_outbox (alert_id, action) SELECT alert_id, 'open' FROM opened WHERE paged
RETURNING alert_id";

/// Fleet and details of the given alerts (those of the subjects a batch touched), and of any
/// alert still missing them (raised before the mapping or the connection's record arrived),
/// from the current rows.
pub(super) const ALERTS_REFRESH: &str = "
WITH target AS (
    -- The given ids, then one scan of the partial index alerts_incomplete: an OR of the two in
    -- one WHERE reads every alert.
    SELECT alert_id FROM alerts
    WHERE alert_id = ANY (ARRAY(
            SELECT unnest($1::uuid[])
            UNION ALL
            SELECT alert_id FROM alerts WHERE $2 AND (fleet_ref IS NULL OR NOT (details ? 'source_name'))))
      AND kind IN ('connection_stale', 'schedule_deactivated')
    ORDER BY alert_id FOR UPDATE
), found AS (
    SELECT a.alert_id, COALESCE(c.fleet_id, a.fleet_id) AS fleet_id, COALESCE(f.fleet_ref, a.fleet_ref) AS fleet_ref,
           CASE a.kind
             WHEN 'connection_stale' THEN jsonb_strip_nulls(jsonb_build_object('source_name', c.source_name))
             ELSE jsonb_strip_nulls(jsonb_build_object('resource', s.resource, 'connection_id', s.connection_id,
                      'source_name', c.source_name, 'consecutive_error_threshold', s.consecutive_error_threshold))
           END AS details
    FROM target t JOIN alerts a ON a.alert_id = t.alert_id
    LEFT JOIN schedules s ON a.kind = 'schedule_deactivated' AND s.schedule_id = a.subject_id
    LEFT JOIN connections c ON c.connection_id = CASE WHEN a.kind = 'connection_stale' THEN a.subject_id ELSE s.connection_id END
    LEFT JOIN fleets f ON f.fleet_id = COALESCE(c.fleet_id, a.fleet_id)
)
UPDATE alerts a SET fleet_id = found.fleet_id, fleet_ref = found.fleet_ref, details = found.details
FROM found
WHERE a.alert_id = found.alert_id
  AND (a.fleet_id, a.fleet_ref, a.details) IS DISTINCT FROM (found.fleet_id, found.fleet_ref, found.details)";

pub(super) const BACKFILL_FLEET_REFS: &str = "
UPDATE fleets f SET fleet_ref = i.fleet_ref
FROM invitations i
WHERE f.fleet_ref IS NULL AND i.invitation_id = f.invitation_id AND i.fleet_ref IS NOT NULL";

/// The bodies of events this version ignores, for a later version to apply.
pub(super) const IGNORED_EVENTS: &str = "
INSERT INTO ignored_events (event_key, event_name, body)
SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[])
ON CONFLICT DO NOTHING";

pub(super) const DEDUP_INSERT: &str = "
INSERT INTO webhook_events (event_key, event_id, event_name, webhook_id, event_time, outcome, received_at, fleet_id)
SELECT * FROM unnest($1::text[], $2::uuid[], $3::text[], $4::text[], $5::timestamptz[], $6::text[], $7::timestamptz[], $8::uuid[])
ON CONFLICT (event_key) DO NOTHING
RETURNING event_key";

/// Every statement of a batch is keyed by the batch's own ids, so a sequential scan in one is
/// always a planner mistake, made when statistics are missing or behind (autovacuum off, or
/// not caught up after a bulk load): it turns a statement that costs O(batch) into one that
/// costs O(table), every batch. Bitmap scans go too: unlike plain index scans they never mark
/// the entries of dead rows, so a partial index such as `alerts_incomplete` that rows leave by
/// update would be read in full, dead entries and all, until a vacuum. The batch's
/// transaction rules both out; its statements are written to need neither (no ORs across
/// indexes).
pub(super) const KEYED_PLANS: &str =
    "SET LOCAL enable_seqscan = off; SET LOCAL enable_bitmapscan = off";

/// Takes the advisory locks in array order (the caller sorts them).
pub(super) const ENTITY_LOCKS: &str =
    "SELECT count(pg_advisory_xact_lock(k)) FROM unnest($1::int8[]) WITH ORDINALITY AS l(k, n)";

/// `webhook.*` news about our subscriptions (others are ignored), newest per subscription by
/// (event time, status) so the outcome is the same in any order, then a wake-up for the
/// reconciler, delivered at commit.
pub(super) const WEBHOOK_EVENT_STATUS: &str = "
WITH incoming AS (
    SELECT DISTINCT ON (id) id, status, at
    FROM unnest($1::text[], $2::text[], $3::timestamptz[]) AS n(id, status, at)
    ORDER BY id, at DESC, status DESC
), updated AS (
    UPDATE catena_subscriptions s SET event_status = i.status, event_status_at = i.at
    FROM incoming i
    WHERE s.webhook_id = i.id
      AND (s.event_status_at IS NULL OR (s.event_status_at, s.event_status) < (i.at, i.status))
    RETURNING s.webhook_id
)
SELECT pg_notify('catena_control', webhook_id) FROM updated";

/// The fleets of this batch that reached `connected` and were not measured yet: marked, and
/// their time from invitation (its `created_at`; NULL when the invitation is not known yet) to
/// connected (event times), for `catena_onboarding_duration_seconds`.
pub(super) const ONBOARDING_MEASURED: &str = "
WITH batch AS MATERIALIZED (
    -- Materialised so the fleets are found by key whatever the statistics say: without them the
    -- planner ANDs in the onboarding_status index, a bitmap of every connected fleet.
    SELECT fleet_id, invitation_id, onboarding_status, onboarding_at, onboarding_measured
    FROM fleets WHERE fleet_id = ANY($1::uuid[])
), reached AS (
    SELECT f.fleet_id,
           EXTRACT(EPOCH FROM f.onboarding_at - LEAST(
                (SELECT min(i.created_at) FROM invitations i WHERE i.invitation_id = f.invitation_id),
                (SELECT min(i.created_at) FROM invitations i WHERE i.fleet_id = f.fleet_id)))::float8 AS seconds
    FROM batch f
    WHERE f.onboarding_status = 'connected' AND NOT f.onboarding_measured
)
UPDATE fleets f SET onboarding_measured = true FROM reached r
WHERE f.fleet_id = r.fleet_id
RETURNING r.seconds";
