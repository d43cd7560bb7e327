-- Events whose name this version does not handle are recorded and acked (forward compatible);
-- their bodies are kept here, so a version that understands them can apply them later
-- (`catena-ingest ignored reapply`), even though their dedup keys are already taken. Pruned
-- with the dedup keys.
CREATE TABLE ignored_events (
    event_key   text PRIMARY KEY REFERENCES webhook_events (event_key) ON DELETE CASCADE,
    event_name  text NOT NULL,
    body        bytea NOT NULL,
    ignored_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX ignored_events_name ON ignored_events (event_name);
