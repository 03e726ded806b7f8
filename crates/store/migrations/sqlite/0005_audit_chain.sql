-- Each account's audit events form a hash chain (src/chain.rs).
-- account_seq numbers an account's events 1, 2, 3, ... and is the event id
-- the API shows (event_id stays the row's internal id); hash covers the
-- event's content and prev_hash, its predecessor's hash. The migration
-- runner chains the events already stored right after this file, in
-- event_id order per account, in the same transaction.
ALTER TABLE audit_events ADD COLUMN account_seq INTEGER;
ALTER TABLE audit_events ADD COLUMN prev_hash BLOB;
ALTER TABLE audit_events ADD COLUMN hash BLOB;
CREATE UNIQUE INDEX audit_events_by_account_seq ON audit_events (account_id, account_seq);
CREATE INDEX audit_events_by_key_seq ON audit_events (account_id, key_id, account_seq);
DROP INDEX audit_events_by_key;

-- Each account's newest event, written in the transaction that writes it:
-- deleting the newest events leaves it pointing past the end.
CREATE TABLE audit_heads (
    account_id TEXT PRIMARY KEY,
    last_seq   INTEGER NOT NULL,
    last_hash  BLOB NOT NULL
);
