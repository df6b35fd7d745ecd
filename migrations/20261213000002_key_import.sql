-- issue 15: key import (cut-over). Imported keys are stored under their
-- legacy digest, HMAC(pepper, "legacy-sha256:" || SHA-256(key)), and marked
-- 'legacy'; keys issued by Tollgate are 'tollgate'.
ALTER TABLE api_keys ADD COLUMN format TEXT NOT NULL DEFAULT 'tollgate'
    CHECK (format IN ('tollgate', 'legacy'));
