-- Retention (src/retention.rs, README "Retention"): every table that grows per event is pruned
-- in small batches, and each needs a cheap way to find its oldest rows.
--
-- * webhook_events and failed_executions, written per event, use BRIN indexes (0004's
--   webhook_events_processed_at, failed_executions_failed_at here): nearly free to maintain
--   while a table is appended to in time order.
-- * A BRIN summary only ever widens. Once the purge has deleted a block range and vacuum has
--   given its space to new rows, its summary spans from the oldest row it ever held to the
--   newest, and the index selects the range for every purge after it: measured, after one
--   purge-and-reuse cycle a query for rows older than anything left read 8,351 of 19,231 heap
--   blocks. So the purge re-summarizes the ranges it emptied. That needs the index's owner,
--   which the worker's role is not (deploy/sql/least-privilege.sql): hence the function below,
--   owned by whoever runs migrations, which can do nothing but that to BRIN indexes in public.
-- * The low-volume tables get plain b-tree indexes on their retention column.

-- BRIN ranges a sweep deleted from, to be summarized afresh once no snapshot can see the deleted
-- rows any more (a summary built while they are visible still spans them): the next sweep, by
-- whichever worker, re-summarizes these and forgets them. Written in the deleting transaction.
CREATE TABLE retention_brin_pending (
    index_name  text NOT NULL,
    range_start bigint NOT NULL,
    PRIMARY KEY (index_name, range_start)
);

CREATE INDEX failed_executions_failed_at ON failed_executions USING brin (failed_at);
CREATE INDEX failure_warnings_window_start ON failure_warnings (window_start);
CREATE INDEX alert_outbox_delivered_at ON alert_outbox (delivered_at) WHERE delivered_at IS NOT NULL;
-- An alert's outbox rows (pruned together).
CREATE INDEX alert_outbox_alert_id ON alert_outbox (alert_id);

-- Re-summarize the given block ranges of a BRIN index in public: drop each range's summary and
-- build it again from the rows now in it. Returns the ranges summarized.
CREATE FUNCTION retention_resummarize(brin_index regclass, range_starts bigint[])
RETURNS integer
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    range_start bigint;
    summarized integer := 0;
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM pg_class c JOIN pg_am am ON am.oid = c.relam
        WHERE c.oid = brin_index AND am.amname = 'brin' AND c.relnamespace = 'public'::regnamespace
    ) THEN
        RAISE EXCEPTION 'retention_resummarize: % is not a BRIN index in schema public', brin_index;
    END IF;
    FOREACH range_start IN ARRAY range_starts LOOP
        PERFORM brin_desummarize_range(brin_index, range_start);
        summarized := summarized + brin_summarize_range(brin_index, range_start);
    END LOOP;
    RETURN summarized;
END
$$;
