-- Times are INTEGER microseconds since the Unix epoch, UTC.
CREATE TABLE accounts (
    account_id  TEXT PRIMARY KEY,
    tier        TEXT NOT NULL DEFAULT 'free' CHECK (tier IN ('free', 'premium')),
    created_at  INTEGER NOT NULL
);

CREATE TABLE keys (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    key_id        TEXT NOT NULL UNIQUE,
    account_id    TEXT NOT NULL REFERENCES accounts (account_id),
    name          TEXT NOT NULL,
    description   TEXT NOT NULL,
    scopes        TEXT NOT NULL, -- JSON array of strings
    prefix        TEXT NOT NULL UNIQUE, -- the current secret's prefix
    created_at    INTEGER NOT NULL,
    expires_at    INTEGER,
    revoked_at    INTEGER,
    revoke_reason TEXT,
    rotated_at    INTEGER,
    last_used_at  INTEGER,
    last_used_ip  TEXT
);
CREATE INDEX keys_by_account ON keys (account_id, seq);

-- Every secret a key ever had; only the hash is stored.
CREATE TABLE key_secrets (
    prefix        TEXT PRIMARY KEY,
    key_id        TEXT NOT NULL REFERENCES keys (key_id),
    hash          BLOB NOT NULL,
    created_at    INTEGER NOT NULL,
    superseded_at INTEGER
);

CREATE TABLE audit_events (
    event_id   INTEGER PRIMARY KEY AUTOINCREMENT,
    account_id TEXT NOT NULL,
    key_id     TEXT,
    action     TEXT NOT NULL,
    actor      TEXT NOT NULL,
    actor_ip   TEXT,
    at         INTEGER NOT NULL,
    changes    TEXT NOT NULL -- JSON array of {field, old, new}
);
CREATE INDEX audit_events_by_key ON audit_events (account_id, key_id, event_id);

-- The change feed's log: each change appends the prefixes verify nodes must evict.
CREATE TABLE key_changes (
    seq    INTEGER PRIMARY KEY AUTOINCREMENT,
    prefix TEXT NOT NULL,
    at     INTEGER NOT NULL
);
