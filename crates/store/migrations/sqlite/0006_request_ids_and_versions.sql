-- Optimistic concurrency: every change of a key (update, rotation,
-- revocation, not its use) raises its version, which the API hands out as
-- the key's etag.
ALTER TABLE keys ADD COLUMN version INTEGER NOT NULL DEFAULT 1;

-- Request ids: what a create or rotation made under one, kept for its
-- retries until `expires_at`. The id is kept only as a digest and
-- the secret only sealed (crates/domain/src/request.rs). Times in
-- microseconds since the epoch, as everywhere in this file.
CREATE TABLE requests (
    account_id     TEXT NOT NULL,
    request_digest BLOB NOT NULL,
    method         TEXT NOT NULL,
    params_digest  BLOB NOT NULL,
    key_id         TEXT NOT NULL,
    sealed_secret  BLOB NOT NULL,
    pepper_id      INTEGER NOT NULL,
    expires_at     INTEGER NOT NULL,
    PRIMARY KEY (account_id, request_digest)
);
CREATE INDEX requests_by_expiry ON requests (expires_at);
