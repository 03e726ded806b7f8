-- A request id belongs to the caller that made the call (`key:<key_id>`,
-- `operator:<actor>`): only that caller's retry gets its answer. Records
-- made before this column read as nobody's, so no retry replays them.
ALTER TABLE requests ADD COLUMN caller TEXT NOT NULL DEFAULT '';

-- Counting an account's live records (the per-account cap) reads this
-- index only.
CREATE INDEX requests_by_account ON requests (account_id, expires_at);
