-- Found by profiling a 100k-event drain (log_min_duration_statement):
-- * the "no newer alert for this subject" guards scanned every alert: index them;
-- * webhook_events is append-only in processed_at order, so a BRIN index serves the 14-day
--   retention purge at a fraction of a b-tree's insert cost.
CREATE INDEX alerts_subject ON alerts (subject_id, kind, opened_at);
DROP INDEX webhook_events_processed_at;
CREATE INDEX webhook_events_processed_at ON webhook_events USING brin (processed_at);
