-- Per-key limits (MessageSmart documents per-key quota and rate limit).
ALTER TABLE api_keys ADD COLUMN limits JSONB;

-- Quota counters: units leased to replicas per (subject, limit, period).
-- A replica leases a chunk with one conditional UPDATE; the sum of leases
-- never passes the limit, so the quota is never exceeded.
CREATE TABLE quota_usage (
    subject       TEXT NOT NULL,          -- 'k:<key id>' or 't:<tenant id>'
    limit_name    TEXT NOT NULL,          -- e.g. 'key_per_month'
    period_start  TIMESTAMPTZ NOT NULL,
    used          BIGINT NOT NULL DEFAULT 0 CHECK (used >= 0),
    last_grant    BIGINT NOT NULL DEFAULT 0,   -- units granted by the latest lease
    updated_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (subject, limit_name, period_start)
);

-- Live replicas, for dividing rate limits among them.
CREATE TABLE replicas (
    replica_id    UUID PRIMARY KEY,
    heartbeat_at  TIMESTAMPTZ NOT NULL
);
