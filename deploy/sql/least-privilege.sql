-- Least-privilege PostgreSQL roles for catena-ingest.
--
-- Run once per cluster as a superuser (or your managed service's admin role), with psql:
--   psql "postgres://admin@db-host:5432/postgres" -v ON_ERROR_STOP=1 -f deploy/sql/least-privilege.sql
-- It is idempotent: running it again changes nothing, and running it after new migrations
-- re-grants on every table in the schema.
--
-- Roles:
--   catena_migrator  owns the database, the public schema and every table/sequence in it.
--                    Used only by `catena-ingest migrate` (Kubernetes: MIGRATE_DATABASE_URL).
--   catena_app       the relay needs no database at all; the worker and the `parked`, `alerts`
--                    and `fleet` subcommands use this role (DATABASE_URL). It can read and write
--                    rows of the catena tables and use their sequences: no DDL, no TRUNCATE,
--                    no REFERENCES/TRIGGER, no CREATE in any schema, no ownership.
--   catena_readonly  SELECT only, for SREs (RUNBOOK queries), dashboards and reporting.
--
-- Passwords are NOT set here (a LOGIN role without a password cannot log in with password
-- authentication). Set them out of band, e.g. in psql: \password catena_app
--
-- With this setup the database must exist before `catena-ingest migrate` runs (this script
-- creates it), because catena_migrator has no CREATEDB.

\set ON_ERROR_STOP on

-- ---------------------------------------------------------------------------------------
-- Roles (cluster-wide)
-- ---------------------------------------------------------------------------------------
DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'catena_migrator') THEN
    CREATE ROLE catena_migrator LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS;
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'catena_app') THEN
    CREATE ROLE catena_app LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS;
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'catena_readonly') THEN
    CREATE ROLE catena_readonly LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS;
  END IF;
END
$$;

-- Bound the damage of a runaway worker: workers hold a small pool each (KEDA runs up to 20).
ALTER ROLE catena_app CONNECTION LIMIT 400;
-- A batch transaction is short; anything this long is stuck (lock wait, lost client).
ALTER ROLE catena_app SET statement_timeout = '30s';
ALTER ROLE catena_app SET idle_in_transaction_session_timeout = '60s';
ALTER ROLE catena_app SET lock_timeout = '10s';
ALTER ROLE catena_readonly SET statement_timeout = '60s';
ALTER ROLE catena_readonly SET default_transaction_read_only = on;

-- ---------------------------------------------------------------------------------------
-- Database (CREATE DATABASE cannot run inside a DO block or transaction: use \gexec)
-- ---------------------------------------------------------------------------------------
SELECT 'CREATE DATABASE catena OWNER catena_migrator'
WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = 'catena') \gexec

ALTER DATABASE catena OWNER TO catena_migrator;
-- Nobody but the listed roles may connect; nobody may create schemas or temp tables.
REVOKE ALL ON DATABASE catena FROM PUBLIC;
GRANT CONNECT ON DATABASE catena TO catena_app, catena_readonly;
GRANT CONNECT, TEMPORARY ON DATABASE catena TO catena_migrator;
-- If a future worker version stages batches in temporary tables, also grant:
--   GRANT TEMPORARY ON DATABASE catena TO catena_app;

\connect catena

-- ---------------------------------------------------------------------------------------
-- Schema public: owned by the migrator, usable (not creatable) by the others.
-- (PostgreSQL 15+ already revokes CREATE from PUBLIC; this also covers 13 and 14.)
-- ---------------------------------------------------------------------------------------
ALTER SCHEMA public OWNER TO catena_migrator;
REVOKE ALL ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO catena_app, catena_readonly;

-- Tables and sequences that exist now (after a migration ran, or before: then no-ops) ...
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO catena_app;
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO catena_app;
GRANT SELECT ON ALL TABLES IN SCHEMA public TO catena_readonly;
GRANT SELECT ON ALL SEQUENCES IN SCHEMA public TO catena_readonly;

-- ... and every table or sequence catena_migrator creates in later migrations
-- (webhook_events, invitations, fleets, connections, fleet_connections, schedules, alerts
-- and whatever the worker needs next), so a new migration never breaks the worker with
-- "permission denied".
ALTER DEFAULT PRIVILEGES FOR ROLE catena_migrator IN SCHEMA public
  GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO catena_app;
ALTER DEFAULT PRIVILEGES FOR ROLE catena_migrator IN SCHEMA public
  GRANT USAGE, SELECT ON SEQUENCES TO catena_app;
ALTER DEFAULT PRIVILEGES FOR ROLE catena_migrator IN SCHEMA public
  GRANT SELECT ON TABLES TO catena_readonly;
ALTER DEFAULT PRIVILEGES FOR ROLE catena_migrator IN SCHEMA public
  GRANT SELECT ON SEQUENCES TO catena_readonly;
-- Functions created by migrations stay executable by PUBLIC (PostgreSQL's default), which is
-- what triggers and the app need; revoke per function if a migration adds a privileged one.

-- The migration bookkeeping table is not application data. If your migration runner names
-- it differently, adjust; this is a no-op when it does not exist yet (rerun after the first
-- `catena-ingest migrate`).
DO $$
DECLARE t text;
BEGIN
  FOR t IN
    SELECT quote_ident(tablename) FROM pg_tables
    WHERE schemaname = 'public'
      AND tablename IN ('_migrations', 'refinery_schema_history', 'schema_migrations', '_sqlx_migrations')
  LOOP
    EXECUTE format('REVOKE INSERT, UPDATE, DELETE ON public.%s FROM catena_app', t);
  END LOOP;
END
$$;

-- retention_resummarize (migration 0005) runs as its owner (SECURITY DEFINER) because only an
-- index's owner may rebuild BRIN summaries; all it can do is that, to BRIN indexes in public.
-- The worker's retention sweep calls it; nobody else needs it. A no-op before that migration.
DO $$
BEGIN
  IF to_regprocedure('public.retention_resummarize(regclass, bigint[])') IS NOT NULL THEN
    REVOKE EXECUTE ON FUNCTION public.retention_resummarize(regclass, bigint[]) FROM PUBLIC;
    GRANT EXECUTE ON FUNCTION public.retention_resummarize(regclass, bigint[]) TO catena_app;
  END IF;
END
$$;
