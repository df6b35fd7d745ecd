-- Dashboard surface: console users, their single-use tokens, and the
-- append-only audit log of management changes.

CREATE TABLE console_users (
    user_id            UUID PRIMARY KEY,
    tenant_id          TEXT NOT NULL REFERENCES tenants (tenant_id),
    email              TEXT NOT NULL UNIQUE CHECK (email = lower(email)),
    role               TEXT NOT NULL CHECK (role IN ('owner', 'admin', 'developer', 'viewer')),
    -- argon2id PHC string; never the password.
    password_hash      TEXT NOT NULL,
    email_verified_at  TIMESTAMPTZ,
    created_at         TIMESTAMPTZ NOT NULL,
    updated_at         TIMESTAMPTZ NOT NULL
);

CREATE INDEX console_users_by_tenant ON console_users (tenant_id, created_at);

-- Refresh, email-verification and password-reset tokens: only SHA-256 of
-- the token is stored. Single use: `used_at` is set when it is spent.
CREATE TABLE console_tokens (
    digest      BYTEA PRIMARY KEY CHECK (length(digest) = 32),
    kind        TEXT NOT NULL CHECK (kind IN ('refresh', 'email_verification', 'password_reset')),
    user_id     UUID NOT NULL REFERENCES console_users (user_id),
    -- Refresh tokens: the session; rotation keeps it, replay revokes it whole.
    family      UUID,
    created_at  TIMESTAMPTZ NOT NULL,
    expires_at  TIMESTAMPTZ NOT NULL,
    used_at     TIMESTAMPTZ
);

CREATE INDEX console_tokens_by_user ON console_tokens (user_id, kind);
CREATE INDEX console_tokens_by_family ON console_tokens (family) WHERE family IS NOT NULL;

-- Every management change, written in the change's own transaction.
CREATE TABLE audit_events (
    event_id    UUID PRIMARY KEY,          -- v7: ordered by time
    at          TIMESTAMPTZ NOT NULL,
    tenant_id   TEXT NOT NULL,
    actor       TEXT NOT NULL,             -- operator | user:<id> | system
    action      TEXT NOT NULL,             -- key.created, tenant.updated, ...
    target      TEXT NOT NULL,
    request_id  TEXT NOT NULL,
    details     JSONB NOT NULL DEFAULT '{}'::jsonb
);

CREATE INDEX audit_events_by_tenant ON audit_events (tenant_id, event_id);

-- Append-only: rows can be added, never changed or removed.
CREATE FUNCTION audit_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_events is append-only';
END;
$$;

CREATE TRIGGER audit_events_no_update_or_delete
    BEFORE UPDATE OR DELETE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION audit_events_append_only();

CREATE TRIGGER audit_events_no_truncate
    BEFORE TRUNCATE ON audit_events
    FOR EACH STATEMENT EXECUTE FUNCTION audit_events_append_only();
