-- The id of the pepper each secret's hash is keyed with. NULL: a legacy
-- unkeyed hash; verify nodes re-hash such a secret with the current pepper
-- the first time it verifies.
ALTER TABLE key_secrets ADD COLUMN pepper_id INTEGER;
