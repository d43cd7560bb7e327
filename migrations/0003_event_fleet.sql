-- Which fleet an event concerned (when its records say), for `catena-ingest fleet show`.
ALTER TABLE webhook_events ADD COLUMN fleet_id uuid;
CREATE INDEX webhook_events_fleet ON webhook_events (fleet_id, event_time DESC) WHERE fleet_id IS NOT NULL;
