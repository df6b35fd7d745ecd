-- Who holds the units of a quota counter (issue 12, item 4). `quota_usage.used`
-- still counts every unit leased to any replica (the conditional lease keeps
-- it <= limit); a row here is what one replica holds of it and has not yet
-- reported as consumed or given back. So consumed = used - sum(units).
--
-- A replica's row is written in the lease's own statement, lowered by its
-- periodic report (units consumed, units returned), and deleted once the
-- replica's heartbeat has expired: its units then count as consumed (it may
-- have admitted them before it died), never as free. Units become free only
-- when their holder gives them back (idle, limit lowered, shutdown).
CREATE TABLE quota_leases (
    subject       TEXT NOT NULL,
    limit_name    TEXT NOT NULL,
    period_start  TIMESTAMPTZ NOT NULL,
    replica_id    UUID NOT NULL,
    units         BIGINT NOT NULL CHECK (units >= 0),
    updated_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (subject, limit_name, period_start, replica_id)
);

CREATE INDEX quota_leases_replica ON quota_leases (replica_id);
