-- The change log is pruned (Store::prune_changes). Followers that are
-- behind the last pruned sequence number cannot catch up entry by entry and
-- must forget their whole cache; this row tells them so.
CREATE TABLE change_log_floor (
    id             INTEGER PRIMARY KEY CHECK (id = 1),
    pruned_through BIGINT NOT NULL
);
INSERT INTO change_log_floor (id, pruned_through) VALUES (1, 0);
CREATE INDEX key_changes_at ON key_changes (at);
