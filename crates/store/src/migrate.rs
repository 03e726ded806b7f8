//! A small versioned-migration runner serving both backends.
//!
//! Each backend has its own numbered SQL files under `migrations/`; a
//! `schema_migrations` table records which have run. Migrations only ever
//! get appended: never edit one that has shipped.

/// One schema step.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Migration {
    pub version: i64,
    pub name: &'static str,
    pub sql: &'static str,
}

pub(crate) const SQLITE: &[Migration] = &[
    Migration {
        version: 1,
        name: "initial",
        sql: include_str!("../migrations/sqlite/0001_initial.sql"),
    },
    Migration {
        version: 2,
        name: "change_log_floor",
        sql: include_str!("../migrations/sqlite/0002_change_log_floor.sql"),
    },
];

pub(crate) const POSTGRES: &[Migration] = &[
    Migration {
        version: 1,
        name: "initial",
        sql: include_str!("../migrations/postgres/0001_initial.sql"),
    },
    Migration {
        version: 2,
        name: "change_log_floor",
        sql: include_str!("../migrations/postgres/0002_change_log_floor.sql"),
    },
];

/// Shared by both backends: the table that remembers applied versions.
pub(crate) const CREATE_LEDGER: &str = "CREATE TABLE IF NOT EXISTS schema_migrations (
    version    BIGINT PRIMARY KEY,
    name       TEXT NOT NULL,
    applied_at TEXT NOT NULL
)";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_contiguous_and_both_backends_agree() {
        for list in [SQLITE, POSTGRES] {
            for (i, m) in list.iter().enumerate() {
                assert_eq!(m.version, i as i64 + 1);
            }
        }
        assert_eq!(SQLITE.len(), POSTGRES.len());
        for (a, b) in SQLITE.iter().zip(POSTGRES) {
            assert_eq!(a.name, b.name);
        }
    }
}
