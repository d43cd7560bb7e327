-- Catena's side of the loop (catena-control-plane.md §2): the registry of the subscriptions we
-- created or adopted (metadata only: never a plaintext secret, see README "Operator's guide"),
-- an audit log of what sync, rotate and the reconciler did, and the reconciler's alert kinds.
CREATE TABLE catena_subscriptions (
    webhook_id          text PRIMARY KEY,
    event_name          text NOT NULL,
    -- The URL we asked for (Catena shows it masked).
    url                 text NOT NULL,
    -- Catena's status as last polled (observed_at: when a poll saw it change), and as last
    -- announced by a webhook.* event (event time).
    status              text,
    observed_at         timestamptz,
    event_status        text,
    event_status_at     timestamptz,
    -- First 8 hex digits of SHA-256 of the secret Catena signs with, and of the one before it
    -- during a rotation's overlap.
    secret_fp           text,
    prev_secret_fp      text,
    rotation_started_at timestamptz,
    ewma_success_rate   double precision,
    dlq_count           bigint,
    dlq_nonzero_since   timestamptz,
    dlq_last_fell_at    timestamptz,
    last_activate_at    timestamptz,
    activate_attempts   integer NOT NULL DEFAULT 0,
    last_replay_at      timestamptz,
    replay_attempts     integer NOT NULL DEFAULT 0,
    created_at          timestamptz NOT NULL DEFAULT now(),
    deleted_at          timestamptz
);
CREATE UNIQUE INDEX catena_subscriptions_live ON catena_subscriptions (event_name, url)
    WHERE deleted_at IS NULL;

CREATE TABLE catena_control_log (
    id          bigserial PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    actor       text NOT NULL,     -- sync, rotate, reconcile
    action      text NOT NULL,     -- create, adopt, patch_secret, retire_secret, delete, activate, replay, ...
    webhook_id  text,
    event_name  text,
    outcome     text NOT NULL,     -- ok, error, skipped
    detail      text
);
CREATE INDEX catena_control_log_webhook ON catena_control_log (webhook_id, at);

ALTER TABLE alerts DROP CONSTRAINT alerts_kind_check;
ALTER TABLE alerts ADD CONSTRAINT alerts_kind_check CHECK (kind IN
    ('connection_stale', 'schedule_deactivated', 'webhook_stale', 'webhook_dlq_backlog', 'webhook_missing'));
