-- Per-key request counts (issue 15, MailSage "Monitor key usage in
-- dashboard"): decisions allowed and denied per key per UTC day (kept 400
-- days) and per hour (kept 48 hours); each flush prunes older rows (the
-- indexes by day and by hour). Written by each replica's periodic flush, one
-- statement per table for the whole batch; replicas add to the same rows.
-- No foreign key: a flush never fails because a key was deleted meanwhile.
CREATE TABLE key_requests_daily (
    key_id   UUID NOT NULL,
    day      TIMESTAMPTZ NOT NULL,
    allowed  BIGINT NOT NULL DEFAULT 0 CHECK (allowed >= 0),
    denied   BIGINT NOT NULL DEFAULT 0 CHECK (denied >= 0),
    PRIMARY KEY (key_id, day)
);

CREATE TABLE key_requests_hourly (
    key_id   UUID NOT NULL,
    hour     TIMESTAMPTZ NOT NULL,
    allowed  BIGINT NOT NULL DEFAULT 0 CHECK (allowed >= 0),
    denied   BIGINT NOT NULL DEFAULT 0 CHECK (denied >= 0),
    PRIMARY KEY (key_id, hour)
);

CREATE INDEX key_requests_hourly_by_hour ON key_requests_hourly (hour);
CREATE INDEX key_requests_daily_by_day ON key_requests_daily (day);
