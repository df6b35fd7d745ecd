-- Console accounts (issue 11): disabled users, absolute session lifetimes,
-- and purging of expired single-use tokens.

ALTER TABLE console_users ADD COLUMN disabled_at TIMESTAMPTZ;

-- Refresh tokens: the session's absolute end, copied on every rotation.
ALTER TABLE console_tokens ADD COLUMN session_ends_at TIMESTAMPTZ;

-- Purging expired tokens in small batches.
CREATE INDEX console_tokens_by_expiry ON console_tokens (expires_at);
