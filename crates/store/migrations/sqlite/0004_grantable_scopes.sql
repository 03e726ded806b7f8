-- The scope patterns an account's keys may be granted (issue 10), as a
-- JSON array of strings; NULL: the server's `allowed_scopes`.
ALTER TABLE accounts ADD COLUMN grantable_scopes TEXT;
