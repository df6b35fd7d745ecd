-- issue 15: key labels (a small bounded map per key, validated by the
-- service: at most 16 names of [a-z][a-z0-9_-]{0,62}, values of 1..=128
-- printable ASCII characters). ListKeys filters with `labels @> selector`.
ALTER TABLE api_keys ADD COLUMN labels JSONB NOT NULL DEFAULT '{}'::jsonb;
ALTER TABLE api_keys ADD CONSTRAINT api_keys_labels_object CHECK (jsonb_typeof(labels) = 'object');
CREATE INDEX api_keys_labels ON api_keys USING gin (labels jsonb_path_ops);
