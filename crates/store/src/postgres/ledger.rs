//! The migration ledger on Postgres, on a transaction that holds the
//! migration lock: replicas starting together apply each migration once.

use std::collections::BTreeMap;

use deadpool_postgres::Transaction;

use super::map_err;
use crate::chain::Head;
use crate::migrate::{
    self, Applied, CHAIN_BATCH, CREATE_LEDGER, ChainedEvent, Migration, POSTGRES,
};
use crate::rows::{self, CHAIN_EVENT_COLUMNS};
use crate::{AuditChainRow, Result, StoredAuditEvent};

/// Brings the schema up to date on `tx`, which holds the migration lock;
/// returns how many migrations ran.
pub(super) async fn run(tx: &Transaction<'_>) -> Result<usize> {
    migrate::run(&mut Ledger(tx), POSTGRES).await
}

struct Ledger<'a, 'c>(&'a Transaction<'c>);

impl migrate::Ledger for Ledger<'_, '_> {
    /// Looks before it creates or alters: `CREATE TABLE IF NOT EXISTS`
    /// needs CREATE on the schema and `ADD COLUMN IF NOT EXISTS` ownership
    /// even when there is nothing to do, and the service may run as a role
    /// with neither once the database is migrated (docs/SECURITY.md).
    async fn prepare(&mut self) -> Result<()> {
        let row = self
            .0
            .query_one(
                "SELECT to_regclass('schema_migrations') IS NOT NULL, EXISTS ( \
                     SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass('schema_migrations') \
                     AND attname = 'checksum' AND NOT attisdropped)",
                &[],
            )
            .await
            .map_err(map_err)?;
        let (exists, has_checksum): (bool, bool) = (
            row.try_get(0).map_err(map_err)?,
            row.try_get(1).map_err(map_err)?,
        );
        if !exists {
            self.0.batch_execute(CREATE_LEDGER).await.map_err(map_err)?;
        } else if !has_checksum {
            self.0
                .batch_execute(
                    "ALTER TABLE schema_migrations ADD COLUMN IF NOT EXISTS checksum TEXT",
                )
                .await
                .map_err(map_err)?;
        }
        Ok(())
    }

    async fn applied(&mut self) -> Result<Vec<Applied>> {
        // Not prepared for the cache: the ledger's statements run once a start.
        let rows = self
            .0
            .query(
                "SELECT version, checksum FROM schema_migrations ORDER BY version",
                &[],
            )
            .await
            .map_err(map_err)?;
        rows.iter()
            .map(|row| {
                Ok(Applied {
                    version: row.try_get(0).map_err(map_err)?,
                    checksum: row.try_get(1).map_err(map_err)?,
                })
            })
            .collect()
    }

    async fn record_checksum(&mut self, version: i64, checksum: &str) -> Result<()> {
        self.0
            .execute(
                "UPDATE schema_migrations SET checksum = $1 WHERE version = $2",
                &[&checksum, &version],
            )
            .await
            .map_err(map_err)?;
        Ok(())
    }

    async fn unchained_events(&mut self, after: i64) -> Result<Vec<StoredAuditEvent>> {
        let sql = format!(
            "{CHAIN_EVENT_COLUMNS} WHERE event_id > $1 AND hash IS NULL ORDER BY event_id LIMIT $2"
        );
        let found = self
            .0
            .query(&sql, &[&after, &CHAIN_BATCH])
            .await
            .map_err(map_err)?;
        let mut events = Vec::with_capacity(found.len());
        for row in &found {
            if let AuditChainRow::Event(event) = rows::chain_row(row)? {
                events.push(event);
            }
        }
        Ok(events)
    }

    /// One statement per batch.
    async fn chain_events(&mut self, links: &[ChainedEvent]) -> Result<()> {
        let ids: Vec<i64> = links.iter().map(|l| l.row_id).collect();
        let seqs: Vec<i64> = links.iter().map(|l| l.seq).collect();
        let prevs: Vec<&[u8]> = links.iter().map(|l| &l.prev_hash[..]).collect();
        let hashes: Vec<&[u8]> = links.iter().map(|l| &l.hash[..]).collect();
        self.0
            .execute(
                "UPDATE audit_events e SET account_seq = n.seq, prev_hash = n.prev, hash = n.hash \
                 FROM UNNEST($1::bigint[], $2::bigint[], $3::bytea[], $4::bytea[]) \
                     AS n (id, seq, prev, hash) \
                 WHERE e.event_id = n.id",
                &[&ids, &seqs, &prevs, &hashes],
            )
            .await
            .map_err(map_err)?;
        Ok(())
    }

    /// One statement: the table is new, so every head is too.
    async fn write_heads(&mut self, heads: &BTreeMap<String, Head>) -> Result<()> {
        let accounts: Vec<&str> = heads.keys().map(String::as_str).collect();
        let seqs: Vec<i64> = heads.values().map(|h| h.seq).collect();
        let hashes: Vec<&[u8]> = heads.values().map(|h| &h.hash[..]).collect();
        self.0
            .execute(
                "INSERT INTO audit_heads (account_id, last_seq, last_hash) \
                 SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::bytea[])",
                &[&accounts, &seqs, &hashes],
            )
            .await
            .map_err(map_err)?;
        Ok(())
    }

    async fn apply(&mut self, m: &Migration, checksum: &str, at: &str) -> Result<()> {
        self.0
            .batch_execute(m.sql)
            .await
            .map_err(|e| migrate::failed(m, e))?;
        self.0
            .execute(
                "INSERT INTO schema_migrations (version, name, applied_at, checksum) \
                 VALUES ($1, $2, $3, $4)",
                &[&m.version, &m.name, &at, &checksum],
            )
            .await
            .map_err(map_err)?;
        Ok(())
    }
}
