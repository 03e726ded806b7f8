-- Optimistic concurrency: every change of a key (update, rotation,
-- revocation, not its use) raises its version, which the API hands out as
-- the key's etag.
ALTER TABLE keys ADD COLUMN version BIGINT NOT NULL DEFAULT 1;

-- Request ids: what a create or rotation made under one, kept for its
-- retries until `expires_at`. The id is kept only as a digest and
-- the secret only sealed (crates/domain/src/request.rs).
CREATE TABLE requests (
    account_id     TEXT NOT NULL,
    request_digest BYTEA NOT NULL,
    method         TEXT NOT NULL,
    params_digest  BYTEA NOT NULL,
    key_id         TEXT NOT NULL,
    sealed_secret  BYTEA NOT NULL,
    pepper_id      BIGINT NOT NULL,
    expires_at     TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (account_id, request_digest)
);
CREATE INDEX requests_by_expiry ON requests (expires_at);
