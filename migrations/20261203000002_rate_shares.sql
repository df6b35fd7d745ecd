-- Demand-weighted rate-limit shares (ARCHITECTURE.md, "Rate limits under
-- skew"). A replica publishes a row for a rate cell (a limit of one key
-- lineage or tenant) only while the cell is hot somewhere in the fleet:
-- its recent demand and the fraction of the cell's rate it claims. Rows
-- are replaced by one exchange per interval, taken under a table lock so
-- the claims of live replicas never sum above 1. A replica without a row
-- claims the even share 1/N.
CREATE TABLE rate_shares (
    cell        TEXT NOT NULL,              -- '<period>|<environment>|k:<key id>' or '…|t:<tenant id>'
    replica_id  UUID NOT NULL REFERENCES replicas (replica_id) ON DELETE CASCADE,
    demand      DOUBLE PRECISION NOT NULL CHECK (demand >= 0),  -- attempts, as a fraction of the rate
    claim       DOUBLE PRECISION NOT NULL CHECK (claim >= 0 AND claim <= 1),
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (cell, replica_id)
);
CREATE INDEX rate_shares_replica ON rate_shares (replica_id);
