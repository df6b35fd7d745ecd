-- Automatic revocation policies (issue 15): a tenant's override of its
-- profile's `[revocation]` policy (NULL: the profile's value; 0 days: off),
-- and the keys reported leaked (by the GitHub secret-scanning endpoint or
-- ReportLeakedKeys). Never a token: a leaked key is named by its id.
CREATE TABLE revocation_policies (
    tenant_id      TEXT PRIMARY KEY REFERENCES tenants (tenant_id),
    unused_days    INTEGER CHECK (unused_days >= 0),
    max_age_days   INTEGER CHECK (max_age_days >= 0),
    revoke_leaked  BOOLEAN,
    updated_at     TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE leaked_keys (
    key_id       UUID PRIMARY KEY REFERENCES api_keys (key_id),
    tenant_id    TEXT NOT NULL,
    reported_at  TIMESTAMPTZ NOT NULL,
    reporter     TEXT NOT NULL,
    url          TEXT NOT NULL DEFAULT '',
    source       TEXT NOT NULL DEFAULT ''
);

-- The sweeper reads a tenant's live keys only.
CREATE INDEX api_keys_live_by_tenant ON api_keys (tenant_id, key_id) WHERE revoked_at IS NULL;
