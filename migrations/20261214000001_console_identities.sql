-- Sign in with an identity provider (issue 15): a console account can have
-- a password, a provider identity, or both.

-- Provider-only accounts have no password (login with a password fails for
-- them exactly as for a wrong password).
ALTER TABLE console_users ALTER COLUMN password_hash DROP NOT NULL;

-- One row per (issuer, subject) an OpenID Connect provider vouched for; the
-- subject is the provider's stable id of the person (never the email).
CREATE TABLE console_identities (
    issuer      TEXT NOT NULL,
    subject     TEXT NOT NULL,
    user_id     UUID NOT NULL REFERENCES console_users (user_id) ON DELETE CASCADE,
    -- The verified email the provider gave when the identity was linked.
    email       TEXT NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (issuer, subject)
);

CREATE INDEX console_identities_by_user ON console_identities (user_id);
