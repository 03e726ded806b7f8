//! The migration ledger on SQLite, in the writer's `BEGIN IMMEDIATE`
//! transaction: another process starting at the same time waits for it.

use std::collections::BTreeMap;

use rusqlite::params;

use super::{Sqlite, complete, from_micros, map_err};
use crate::chain::{self, Head};
use crate::migrate::{self, Applied, CREATE_LEDGER, Migration, SQLITE};
use crate::rules::corrupt;
use crate::{Result, StoredAuditEvent};

/// [`crate::Store::migrate`]. The runner is shared with Postgres and
/// async; nothing here waits, so it completes on this thread.
pub(super) fn migrate(tx: &mut Sqlite<'_>) -> Result<usize> {
    complete(migrate::run(&mut Ledger(tx), SQLITE))
}

struct Ledger<'a, 'c>(&'a Sqlite<'c>);

impl migrate::Ledger for Ledger<'_, '_> {
    async fn prepare(&mut self) -> Result<()> {
        self.0.execute(CREATE_LEDGER, []).map_err(map_err)?;
        // SQLite has no ADD COLUMN IF NOT EXISTS.
        let has_checksum: bool = self
            .0
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM pragma_table_info('schema_migrations') \
                 WHERE name = 'checksum')",
                [],
                |r| r.get(0),
            )
            .map_err(map_err)?;
        if !has_checksum {
            self.0
                .execute("ALTER TABLE schema_migrations ADD COLUMN checksum TEXT", [])
                .map_err(map_err)?;
        }
        Ok(())
    }

    async fn applied(&mut self) -> Result<Vec<Applied>> {
        let mut stmt = self
            .0
            .prepare("SELECT version, checksum FROM schema_migrations ORDER BY version")
            .map_err(map_err)?;
        let rows = stmt
            .query_map([], |r| {
                Ok(Applied {
                    version: r.get(0)?,
                    checksum: r.get(1)?,
                })
            })
            .map_err(map_err)?;
        rows.map(|r| r.map_err(map_err)).collect()
    }

    async fn record_checksum(&mut self, version: i64, checksum: &str) -> Result<()> {
        self.0
            .execute(
                "UPDATE schema_migrations SET checksum = ?1 WHERE version = ?2",
                params![checksum, version],
            )
            .map_err(map_err)?;
        Ok(())
    }

    /// A thousand rows at a time in `event_id` order, each account's
    /// running head in memory (one per account, not one per event).
    async fn chain_audit_events(&mut self) -> Result<u64> {
        let tx = self.0;
        let mut heads: BTreeMap<String, Head> = BTreeMap::new();
        let (mut after, mut chained) = (0_i64, 0_u64);
        loop {
            let rows: Vec<StoredAuditEvent> = {
                let mut stmt = tx
                    .prepare(
                        "SELECT event_id, account_id, key_id, action, actor, actor_ip, at, changes \
                         FROM audit_events WHERE event_id > ?1 AND hash IS NULL \
                         ORDER BY event_id LIMIT 1000",
                    )
                    .map_err(map_err)?;
                let mut rows = stmt.query([after]).map_err(map_err)?;
                let mut out = Vec::new();
                while let Some(row) = rows.next().map_err(map_err)? {
                    let changes: String = row.get(7).map_err(map_err)?;
                    out.push(StoredAuditEvent {
                        row_id: row.get(0).map_err(map_err)?,
                        account_id: row.get(1).map_err(map_err)?,
                        seq: None,
                        key_id: row.get(2).map_err(map_err)?,
                        action: row.get(3).map_err(map_err)?,
                        actor: row.get(4).map_err(map_err)?,
                        actor_ip: row.get(5).map_err(map_err)?,
                        at: from_micros(row.get(6).map_err(map_err)?)?,
                        changes: Some(
                            serde_json::from_str(&changes)
                                .map_err(|e| corrupt("audit changes")(e.to_string()))?,
                        ),
                        prev_hash: None,
                        hash: None,
                    });
                }
                out
            };
            let Some(last) = rows.last() else { break };
            after = last.row_id;
            let mut update = tx
                .prepare_cached(
                    "UPDATE audit_events SET account_seq = ?1, prev_hash = ?2, hash = ?3 \
                     WHERE event_id = ?4",
                )
                .map_err(map_err)?;
            for event in &rows {
                let head = heads.entry(event.account_id.clone()).or_insert(Head::EMPTY);
                let changes = event.changes.as_ref().expect("parsed above");
                let next = chain::chain_stored(*head, event, changes);
                update
                    .execute(params![
                        next.seq,
                        &head.hash[..],
                        &next.hash[..],
                        event.row_id
                    ])
                    .map_err(map_err)?;
                *head = next;
                chained += 1;
            }
        }
        for (account, head) in &heads {
            super::audit::write_head(tx, account, *head)?;
        }
        Ok(chained)
    }

    async fn apply(&mut self, m: &Migration, checksum: &str, at: &str) -> Result<()> {
        self.0
            .execute_batch(m.sql)
            .map_err(|e| migrate::failed(m, e))?;
        self.0
            .execute(
                "INSERT INTO schema_migrations (version, name, applied_at, checksum) \
                 VALUES (?1, ?2, ?3, ?4)",
                params![m.version, m.name, at, checksum],
            )
            .map_err(map_err)?;
        Ok(())
    }
}
