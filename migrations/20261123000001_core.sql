-- Tenants, plans live in the profile; the tenant row names its plan.
CREATE TABLE tenants (
    tenant_id            TEXT PRIMARY KEY CHECK (tenant_id ~ '^[A-Za-z0-9_-]{1,64}$'),
    name                 TEXT NOT NULL,
    plan                 TEXT NOT NULL,
    subscription_status  TEXT NOT NULL CHECK (subscription_status IN
                             ('active', 'trialing', 'past_due', 'canceled', 'suspended')),
    overrides            JSONB NOT NULL DEFAULT '{}'::jsonb,
    created_at           TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at           TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- API keys: only HMAC-SHA256(pepper, key) is stored, never the key.
CREATE TABLE api_keys (
    key_id          UUID PRIMARY KEY,
    tenant_id       TEXT NOT NULL REFERENCES tenants (tenant_id),
    name            TEXT NOT NULL,
    environment     TEXT NOT NULL,
    scopes          TEXT[] NOT NULL DEFAULT '{}',
    hint            TEXT NOT NULL,
    digest          BYTEA NOT NULL UNIQUE CHECK (length(digest) = 32),
    pepper_version  INTEGER NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL,
    expires_at      TIMESTAMPTZ,
    revoked_at      TIMESTAMPTZ,
    revoke_reason   TEXT,
    last_used_at    TIMESTAMPTZ,
    replaced_by     UUID REFERENCES api_keys (key_id)
);

CREATE INDEX api_keys_by_tenant ON api_keys (tenant_id, key_id);
