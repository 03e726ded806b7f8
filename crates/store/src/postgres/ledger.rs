//! The migration ledger on Postgres, on a transaction that holds the
//! migration lock: replicas starting together apply each migration once.

use std::collections::BTreeMap;

use deadpool_postgres::Transaction;
use tokio_postgres::types::Json;

use super::map_err;
use crate::chain::{self, Head};
use crate::migrate::{self, Applied, CREATE_LEDGER, Migration, POSTGRES};
use crate::rules::corrupt;
use crate::{Result, StoredAuditEvent};

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

    /// A thousand rows at a time in `event_id` order, each batch written
    /// with one statement, each account's running head in memory (one per
    /// account, not one per event).
    async fn chain_audit_events(&mut self) -> Result<u64> {
        let tx = self.0;
        let mut heads: BTreeMap<String, Head> = BTreeMap::new();
        let (mut after, mut chained) = (0_i64, 0_u64);
        loop {
            let rows = tx
                .query(
                    "SELECT event_id, account_id, key_id, action, actor, actor_ip, at, changes \
                     FROM audit_events WHERE event_id > $1 AND hash IS NULL \
                     ORDER BY event_id LIMIT 1000",
                    &[&after],
                )
                .await
                .map_err(map_err)?;
            if rows.is_empty() {
                break;
            }
            let (mut ids, mut seqs, mut prevs, mut hashes) = (vec![], vec![], vec![], vec![]);
            for row in &rows {
                let Json(changes) = row
                    .try_get::<_, Json<serde_json::Value>>(7)
                    .map_err(|e| corrupt("audit changes")(e.to_string()))?;
                let event = StoredAuditEvent {
                    row_id: row.try_get(0).map_err(map_err)?,
                    account_id: row.try_get(1).map_err(map_err)?,
                    seq: None,
                    key_id: row.try_get(2).map_err(map_err)?,
                    action: row.try_get(3).map_err(map_err)?,
                    actor: row.try_get(4).map_err(map_err)?,
                    actor_ip: row.try_get(5).map_err(map_err)?,
                    at: row.try_get(6).map_err(map_err)?,
                    changes: None,
                    prev_hash: None,
                    hash: None,
                };
                let head = heads.entry(event.account_id.clone()).or_insert(Head::EMPTY);
                let next = chain::chain_stored(*head, &event, &changes);
                ids.push(event.row_id);
                seqs.push(next.seq);
                prevs.push(head.hash.to_vec());
                hashes.push(next.hash.to_vec());
                *head = next;
                after = event.row_id;
            }
            chained += ids.len() as u64;
            tx.execute(
                "UPDATE audit_events e SET account_seq = n.seq, prev_hash = n.prev, hash = n.hash \
                 FROM UNNEST($1::bigint[], $2::bigint[], $3::bytea[], $4::bytea[]) \
                     AS n (id, seq, prev, hash) \
                 WHERE e.event_id = n.id",
                &[&ids, &seqs, &prevs, &hashes],
            )
            .await
            .map_err(map_err)?;
        }
        let accounts: Vec<&str> = heads.keys().map(String::as_str).collect();
        let seqs: Vec<i64> = heads.values().map(|h| h.seq).collect();
        let hashes: Vec<&[u8]> = heads.values().map(|h| &h.hash[..]).collect();
        tx.execute(
            "INSERT INTO audit_heads (account_id, last_seq, last_hash) \
             SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::bytea[])",
            &[&accounts, &seqs, &hashes],
        )
        .await
        .map_err(map_err)?;
        Ok(chained)
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
