-- Notification bookkeeping: which sinks already have an outbox row, and the once-per-window
-- execution.failed escalations.

ALTER TABLE alert_outbox ADD COLUMN delivered_sinks text[] NOT NULL DEFAULT '{}';
ALTER TABLE alerts ADD COLUMN resolution_note text;

CREATE TABLE failure_warnings (
    schedule_id     uuid NOT NULL,
    window_start    timestamptz NOT NULL,
    failures        integer NOT NULL,
    raised_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (schedule_id, window_start)
);
