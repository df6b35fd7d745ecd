-- The change history: every decision-changing write (key revoked, rotated,
-- updated, added or rehashed; tenant plan, status or overrides changed)
-- records a row here in its own transaction. NOTIFY is only the wake-up; a
-- replica that was disconnected applies the rows after the last sequence it
-- saw instead of flushing its cache. Pruned by age (the newest row is kept,
-- so a replica can tell "nothing happened" from "history gone").
CREATE TABLE changes (
    seq       bigserial PRIMARY KEY,
    kind      text NOT NULL CHECK (kind IN ('key', 'key_added', 'tenant')),
    key_id    uuid,
    digest    bytea,
    tenant_id text,
    at        timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE INDEX changes_at ON changes (at);
