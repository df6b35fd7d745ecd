-- Key lineage: every key of a rotation chain carries the id of the chain's
-- first key. Key-scoped quota counters and rate cells are kept per lineage,
-- so rotating a key never hands out a fresh quota.
ALTER TABLE api_keys ADD COLUMN lineage_id UUID;

WITH RECURSIVE chain (key_id, lineage_id) AS (
    SELECT k.key_id, k.key_id FROM api_keys k
    WHERE NOT EXISTS (SELECT 1 FROM api_keys p WHERE p.replaced_by = k.key_id)
  UNION ALL
    SELECT k.replaced_by, c.lineage_id FROM chain c
    JOIN api_keys k ON k.key_id = c.key_id
    WHERE k.replaced_by IS NOT NULL
)
UPDATE api_keys a SET lineage_id = c.lineage_id FROM chain c WHERE a.key_id = c.key_id;

UPDATE api_keys SET lineage_id = key_id WHERE lineage_id IS NULL;
ALTER TABLE api_keys ALTER COLUMN lineage_id SET NOT NULL;
CREATE INDEX api_keys_by_lineage ON api_keys (lineage_id);

-- Counters of later keys in a chain ('k:<key id>[:<environment>]') are added
-- to their lineage's counter.
WITH moved AS (
    DELETE FROM quota_usage q USING api_keys a
    WHERE q.subject LIKE 'k:%' AND substr(q.subject, 3, 36) = a.key_id::text
      AND a.lineage_id <> a.key_id
    RETURNING 'k:' || a.lineage_id::text || substr(q.subject, 39) AS subject,
              q.limit_name, q.period_start, q.used
)
INSERT INTO quota_usage AS q (subject, limit_name, period_start, used)
SELECT subject, limit_name, period_start, sum(used)::bigint FROM moved
GROUP BY subject, limit_name, period_start
ON CONFLICT (subject, limit_name, period_start) DO UPDATE SET used = q.used + EXCLUDED.used;
