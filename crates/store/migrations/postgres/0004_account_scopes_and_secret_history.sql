-- The scope patterns an account's keys may be granted; NULL: the server's
-- `allowed_scopes`.
ALTER TABLE accounts ADD COLUMN grantable_scopes TEXT[];

-- Rotated-away secrets are pruned: per key beyond the newest few at each
-- rotation, and everywhere after the retention. `seq` orders
-- secrets superseded in the same microsecond (SQLite uses its rowid).
ALTER TABLE key_secrets ADD COLUMN seq BIGSERIAL;
CREATE INDEX key_secrets_by_key ON key_secrets (key_id, superseded_at);
CREATE INDEX key_secrets_superseded ON key_secrets (superseded_at) WHERE superseded_at IS NOT NULL;
