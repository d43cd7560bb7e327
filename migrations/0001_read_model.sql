-- The public read model (architecture.md, "Fleet state"). Columns named there are a contract;
-- the *_at/_key/_rank columns beside them are the version guards that make every upsert
-- order-independent: a change applies only when its (rank, event time, event key) is greater
-- than what the row already holds.

CREATE TABLE webhook_events (
    event_key     text PRIMARY KEY,          -- envelope id, else sha256 of the body sans delivery_attempt
    event_id      uuid,
    event_name    text NOT NULL,
    webhook_id    text,
    event_time    timestamptz,
    outcome       text NOT NULL CHECK (outcome IN ('applied', 'ignored')),
    received_at   timestamptz,                -- relay receive time
    processed_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX webhook_events_processed_at ON webhook_events (processed_at);

CREATE TABLE invitations (
    invitation_id   uuid PRIMARY KEY,
    fleet_ref       text,
    fleet_id        uuid,
    status          text NOT NULL CHECK (status IN
                      ('created','sent','viewed','accepted','declined','rejected','expired','deleted')),
    status_rank     smallint NOT NULL,
    status_at       timestamptz NOT NULL,
    status_key      text NOT NULL,
    decline_reason  text,
    expires_at      timestamptz,
    magic_link      text,                     -- a secret: shown to the fleet, never logged
    created_at      timestamptz,
    accepted_at     timestamptz,
    declined_at     timestamptz,
    updated_at      timestamptz NOT NULL,     -- event time of the newest record applied
    version_key     text NOT NULL
);
CREATE INDEX invitations_fleet_ref ON invitations (fleet_ref);
CREATE INDEX invitations_fleet_id ON invitations (fleet_id);

CREATE TABLE share_agreements (
    share_agreement_id uuid PRIMARY KEY,
    fleet_id        uuid NOT NULL,
    invitation_id   uuid,
    fleet_ref       text,
    status          text NOT NULL,
    scopes          jsonb,
    effective_date  timestamptz,
    expiration_date timestamptz,
    updated_at      timestamptz NOT NULL,
    version_key     text NOT NULL
);
CREATE INDEX share_agreements_fleet_id ON share_agreements (fleet_id);

CREATE TABLE fleets (
    fleet_id            uuid PRIMARY KEY,
    fleet_ref           text,
    invitation_id       uuid,
    share_agreement_id  uuid,
    share_status        text,
    share_at            timestamptz,
    share_key           text,
    onboarding_status   text NOT NULL CHECK (onboarding_status IN
                          ('invited','viewed','accepted','declined','expired','deleted','share_agreed','connected')),
    onboarding_rank     smallint NOT NULL,
    onboarding_at       timestamptz NOT NULL,
    onboarding_key      text NOT NULL,
    first_seen_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX fleets_fleet_ref ON fleets (fleet_ref);

CREATE TABLE connections (
    connection_id   uuid PRIMARY KEY,
    fleet_id        uuid,
    tsp_id          uuid,
    source_name     text,
    status          text NOT NULL CHECK (status IN ('active', 'stale')),
    staled_at       timestamptz,
    updated_at      timestamptz,              -- NULL: only known through a reference (reuse)
    version_key     text
);
CREATE INDEX connections_fleet_id ON connections (fleet_id);

CREATE TABLE fleet_connections (
    fleet_connection_id uuid PRIMARY KEY,
    fleet_id        uuid NOT NULL,
    connection_id   uuid NOT NULL,
    created_at      timestamptz NOT NULL
);
CREATE INDEX fleet_connections_fleet_id ON fleet_connections (fleet_id);
CREATE INDEX fleet_connections_connection_id ON fleet_connections (connection_id);

CREATE TABLE schedules (
    schedule_id     uuid PRIMARY KEY,
    connection_id   uuid,
    resource        text,
    status          text NOT NULL CHECK (status IN ('active', 'deactivated')),
    consecutive_error_threshold integer,
    execution_interval_seconds  integer,
    failed_executions integer NOT NULL DEFAULT 0,
    last_failed_at  timestamptz,
    deactivated_at  timestamptz
);
CREATE INDEX schedules_connection_id ON schedules (connection_id);

-- One row per distinct failed execution, so failed_executions counts executions, not deliveries.
CREATE TABLE failed_executions (
    execution_id    uuid PRIMARY KEY,
    schedule_id     uuid NOT NULL,
    connection_id   uuid,
    fleet_id        uuid,
    source_name     text,
    resource        text,
    failed_at       timestamptz NOT NULL
);
CREATE INDEX failed_executions_schedule ON failed_executions (schedule_id, failed_at);

CREATE TABLE alerts (
    alert_id        uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    kind            text NOT NULL CHECK (kind IN ('connection_stale', 'schedule_deactivated')),
    subject_id      uuid NOT NULL,
    fleet_id        uuid,
    fleet_ref       text,
    state           text NOT NULL CHECK (state IN ('open', 'resolved')),
    opened_at       timestamptz NOT NULL,     -- event time of the event that opened it
    resolved_at     timestamptz,
    resolution      text,
    details         jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at      timestamptz NOT NULL DEFAULT now()
);
-- At most one open alert per subject.
CREATE UNIQUE INDEX alerts_one_open ON alerts (kind, subject_id) WHERE state = 'open';
CREATE INDEX alerts_missing_fleet ON alerts (alert_id) WHERE fleet_ref IS NULL;
CREATE INDEX alerts_fleet_id ON alerts (fleet_id);

-- Transactional outbox: written in the same transaction as the alert change it announces.
CREATE TABLE alert_outbox (
    id              bigserial PRIMARY KEY,
    alert_id        uuid REFERENCES alerts (alert_id),   -- NULL for warnings that are not alert rows
    payload         jsonb,
    action          text NOT NULL CHECK (action IN ('open', 'resolve', 'refire', 'warning')),
    created_at      timestamptz NOT NULL DEFAULT now(),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    delivered_at    timestamptz,
    last_error      text
);
CREATE INDEX alert_outbox_pending ON alert_outbox (next_attempt_at) WHERE delivered_at IS NULL;
CREATE INDEX fleets_missing_ref ON fleets (fleet_id) WHERE fleet_ref IS NULL;
