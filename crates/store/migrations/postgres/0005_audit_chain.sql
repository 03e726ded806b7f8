-- Each account's audit events form a hash chain (src/chain.rs).
-- account_seq numbers an account's events 1, 2, 3, ... and is the event id
-- the API shows (event_id stays the row's internal id); hash covers the
-- event's content and prev_hash, its predecessor's hash. The migration
-- runner chains the events already stored right after this file, in
-- event_id order per account, in the same transaction.
ALTER TABLE audit_events ADD COLUMN account_seq BIGINT;
ALTER TABLE audit_events ADD COLUMN prev_hash BYTEA;
ALTER TABLE audit_events ADD COLUMN hash BYTEA;
CREATE UNIQUE INDEX audit_events_by_account_seq ON audit_events (account_id, account_seq);
CREATE INDEX audit_events_by_key_seq ON audit_events (account_id, key_id, account_seq);
DROP INDEX audit_events_by_key;

-- Each account's newest event, written (row locked) in the transaction that
-- writes it: it serializes an account's events, and deleting the newest
-- events leaves it pointing past the end. The service's role needs
-- INSERT, SELECT and UPDATE here; on audit_events only INSERT and SELECT
-- (docs/SECURITY.md).
CREATE TABLE audit_heads (
    account_id TEXT PRIMARY KEY,
    last_seq   BIGINT NOT NULL,
    last_hash  BYTEA NOT NULL
);
