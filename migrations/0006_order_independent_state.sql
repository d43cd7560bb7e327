-- The read model as a function of the set of events (README, "Design"): every derived value is
-- merged with an operation that ignores arrival order.
--
-- A "version" text below is `<event time as 20-digit Unix microseconds>|<event key>`: it sorts
-- as (event time, event key), the order every upsert already uses.

-- Status timelines: every status observation an event carried, per subject. Alert rows are the
-- episodes of these timelines (src/state/episodes.rs).
CREATE TABLE status_observations (
    kind        text NOT NULL CHECK (kind IN ('connection', 'schedule')),
    subject_id  uuid NOT NULL,
    observed_at timestamptz NOT NULL,         -- event time
    event_key   text NOT NULL,
    status      text NOT NULL,                -- Catena's status (schedules: 'deactivated')
    PRIMARY KEY (kind, subject_id, observed_at, event_key, status)
);

-- An alert row names the observation that opened it, so a late event can be matched to the
-- episode it belongs to; `paged` says whether an `open` notification went out for it.
ALTER TABLE alerts ADD COLUMN opened_key text NOT NULL DEFAULT '';
ALTER TABLE alerts ADD COLUMN paged boolean NOT NULL DEFAULT true;
-- Alerts whose fleet or details are still unknown, for the back-fill.
CREATE INDEX alerts_incomplete ON alerts (alert_id)
    WHERE fleet_ref IS NULL OR NOT (details ? 'source_name');
DROP INDEX alerts_missing_fleet;

-- Seed the timelines from what the tables already know, so alerts raised before this migration
-- keep their episodes.
INSERT INTO status_observations (kind, subject_id, observed_at, event_key, status)
SELECT 'connection', connection_id, updated_at, coalesce(version_key, ''), status
FROM connections WHERE updated_at IS NOT NULL
ON CONFLICT DO NOTHING;
INSERT INTO status_observations (kind, subject_id, observed_at, event_key, status)
SELECT 'connection', subject_id, opened_at, '', 'stale'
FROM alerts WHERE kind = 'connection_stale'
ON CONFLICT DO NOTHING;
INSERT INTO status_observations (kind, subject_id, observed_at, event_key, status)
SELECT 'connection', subject_id, resolved_at, '', 'active'
FROM alerts WHERE kind = 'connection_stale' AND resolution = 'connection active again'
ON CONFLICT DO NOTHING;
INSERT INTO status_observations (kind, subject_id, observed_at, event_key, status)
SELECT 'schedule', schedule_id, deactivated_at, '', 'deactivated'
FROM schedules WHERE deactivated_at IS NOT NULL
ON CONFLICT DO NOTHING;
INSERT INTO status_observations (kind, subject_id, observed_at, event_key, status)
SELECT 'schedule', subject_id, opened_at, '', 'deactivated'
FROM alerts WHERE kind = 'schedule_deactivated'
ON CONFLICT DO NOTHING;

-- Connections keep Catena's own status: only `active` resolves a stale alert.
ALTER TABLE connections DROP CONSTRAINT connections_status_check;

-- Latest-wins fields with a version of their own, so a late older event cannot overwrite a
-- newer value of one field because it is older than another field's newest value.
ALTER TABLE invitations ADD COLUMN decline_reason_version text;
ALTER TABLE invitations ADD COLUMN expires_at_version text;
ALTER TABLE invitations ADD COLUMN magic_link_version text;
UPDATE invitations SET
    decline_reason_version = CASE WHEN decline_reason IS NOT NULL THEN '' END,
    expires_at_version = CASE WHEN expires_at IS NOT NULL THEN '' END,
    magic_link_version = CASE WHEN magic_link IS NOT NULL THEN '' END;
ALTER TABLE schedules ADD COLUMN settings_version text;
UPDATE schedules SET settings_version = ''
WHERE consecutive_error_threshold IS NOT NULL OR execution_interval_seconds IS NOT NULL;

-- An invitation that arrives after the share agreement that maps it finds its fleet there.
CREATE INDEX share_agreements_invitation_id ON share_agreements (invitation_id);

-- Execution-failure warnings count fixed windows; `failures` is the window's count so far.
COMMENT ON TABLE failure_warnings IS
    'One row per schedule and fixed window (date_bin of EXECUTION_FAILURE_WINDOW) that crossed EXECUTION_FAILURE_THRESHOLD';
