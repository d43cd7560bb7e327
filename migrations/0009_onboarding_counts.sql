-- The onboarding view (README, "Onboarding gauges"): counts over every fleet and invitation,
-- refreshed by one worker at a time into a small table that every replica reads, so the gauges
-- are identical on all replicas and a 1M-fleet count runs once a minute, not per replica per
-- scrape. The indexes make the counts index-only scans.
CREATE INDEX fleets_onboarding_status ON fleets (onboarding_status);
CREATE INDEX invitations_status ON invitations (status, status_at);
CREATE INDEX connections_active_fleet ON connections (fleet_id) WHERE status = 'active';

CREATE TABLE onboarding_counts (
    metric  text NOT NULL,
    label   text NOT NULL,
    n       bigint NOT NULL,
    PRIMARY KEY (metric, label)
);
CREATE TABLE onboarding_counts_refreshed (
    singleton    boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    refreshed_at timestamptz NOT NULL
);

-- Whether a fleet's time from invitation to connected was measured (catena_onboarding_duration_
-- seconds is fed once, when a fleet reaches connected). Fleets connected before this migration
-- count as measured, so an upgrade does not observe them all at once.
ALTER TABLE fleets ADD COLUMN onboarding_measured boolean NOT NULL DEFAULT true;
ALTER TABLE fleets ALTER COLUMN onboarding_measured SET DEFAULT false;
