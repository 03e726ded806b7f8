-- The scope patterns an account's keys may be granted, as a JSON array of
-- strings; NULL: the server's `allowed_scopes`.
ALTER TABLE accounts ADD COLUMN grantable_scopes TEXT;

-- Rotated-away secrets are pruned: per key beyond the newest few at each
-- rotation, and everywhere after the retention. The rowid
-- orders secrets superseded in the same microsecond.
CREATE INDEX key_secrets_by_key ON key_secrets (key_id, superseded_at);
CREATE INDEX key_secrets_superseded ON key_secrets (superseded_at) WHERE superseded_at IS NOT NULL;
