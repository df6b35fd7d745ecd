-- Room on every page of api_keys for a key's next version. A last-use
-- write (`touch_keys`: every key used, every flush interval, on every
-- replica) then stays on its page as a heap-only update: no new entry in
-- any of the table's six indexes, so the indexes the decision path reads
-- (digest) do not bloat between vacuums. Measured in BENCHMARKS.md §2
-- (run 6): with the default 100, 0.2% of those updates were heap-only.
-- Pages written before this keep their layout until rewritten
-- (VACUUM FULL, or pg_repack online).
ALTER TABLE api_keys SET (fillfactor = 70);
