//! The audit log on SQLite: the primitives of [`AuditRows`], and the
//! rows of [`crate::Store::stream_audit_chain`]. The write lock `BEGIN
//! IMMEDIATE` took keeps anyone else from appending to a chain meanwhile.

use rusqlite::{OptionalExtension, Row, params};
use vilvik_keys_domain::{AccountId, KeyId};

use super::{Sqlite, from_micros, map_err, to_micros};
use crate::chain::{Head, Link};
use crate::db::{AuditRows, Events, Window};
use crate::rules::{ChangeRecord, RawEvent};
use crate::{AuditChainRow, Result, StoredAuditEvent, StoredAuditHead};

/// Every event and head, or one account's (`?1`), as
/// [`crate::Store::stream_audit_chain`] hands them out.
pub(super) const AUDIT_CHAIN: &str = "SELECT 0 AS kind, account_id, account_seq, event_id, key_id, \
         action, actor, actor_ip, at, changes, prev_hash, hash \
     FROM audit_events WHERE ?1 IS NULL OR account_id = ?1 \
     UNION ALL \
     SELECT 1, account_id, last_seq, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, last_hash \
     FROM audit_heads WHERE ?1 IS NULL OR account_id = ?1 \
     ORDER BY account_id, kind, account_seq NULLS FIRST, event_id";

/// Decodes a row of [`AUDIT_CHAIN`]: an event (kind 0) or a head (kind 1).
pub(super) fn chain_row_from_row(row: &Row<'_>) -> Result<AuditChainRow> {
    let kind: i64 = row.get(0).map_err(map_err)?;
    let account_id: String = row.get(1).map_err(map_err)?;
    let seq: Option<i64> = row.get(2).map_err(map_err)?;
    if kind == 1 {
        return Ok(AuditChainRow::Head(StoredAuditHead {
            account_id,
            seq: seq.unwrap_or_default(),
            hash: row.get(11).map_err(map_err)?,
        }));
    }
    // Text that is not JSON (or not text) is an edited row, not an error.
    let changes = row.get::<_, String>(9).ok();
    Ok(AuditChainRow::Event(StoredAuditEvent {
        row_id: row.get(3).map_err(map_err)?,
        account_id,
        seq,
        key_id: row.get(4).map_err(map_err)?,
        action: row.get(5).map_err(map_err)?,
        actor: row.get(6).map_err(map_err)?,
        actor_ip: row.get(7).map_err(map_err)?,
        at: from_micros(row.get(8).map_err(map_err)?)?,
        changes: changes.and_then(|c| serde_json::from_str(&c).ok()),
        prev_hash: row.get(10).map_err(map_err)?,
        hash: row.get(11).map_err(map_err)?,
    }))
}

/// Moves (or creates) the account's head.
pub(super) fn write_head(conn: &Sqlite<'_>, account: &str, head: Head) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO audit_heads (account_id, last_seq, last_hash) VALUES (?1, ?2, ?3) \
         ON CONFLICT (account_id) DO UPDATE SET last_seq = excluded.last_seq, \
         last_hash = excluded.last_hash",
    )
    .map_err(map_err)?
    .execute(params![account, head.seq, &head.hash[..]])
    .map_err(map_err)?;
    Ok(())
}

impl AuditRows for Sqlite<'_> {
    async fn list_events(
        &mut self,
        account: &AccountId,
        key_id: Option<&KeyId>,
        at: Window,
    ) -> Result<Events> {
        let mut stmt = self
            .prepare_cached(
                "SELECT account_seq, key_id, action, actor, actor_ip, at, changes \
                 FROM audit_events WHERE account_id = ?1 AND (?2 IS NULL OR key_id = ?2) \
                 AND account_seq > ?3 ORDER BY account_seq LIMIT ?4",
            )
            .map_err(map_err)?;
        let key_id = key_id.map(KeyId::as_str);
        let mut rows = stmt
            .query(params![account.as_str(), key_id, at.after, at.fetch()])
            .map_err(map_err)?;
        let mut items = Vec::new();
        while let Some(row) = rows.next().map_err(map_err)? {
            let changes: String = row.get(6).map_err(map_err)?;
            let event = RawEvent {
                event_id: row.get(0).map_err(map_err)?,
                key_id: row.get(1).map_err(map_err)?,
                action: row.get(2).map_err(map_err)?,
                actor: row.get(3).map_err(map_err)?,
                actor_ip: row.get(4).map_err(map_err)?,
                at: from_micros(row.get(5).map_err(map_err)?)?,
                changes: serde_json::from_str(&changes),
            };
            items.push(event.parse(account)?);
        }
        Ok(items)
    }

    async fn lock_head(&mut self, account: &AccountId) -> Result<Head> {
        self.prepare_cached("SELECT last_seq, last_hash FROM audit_heads WHERE account_id = ?1")
            .map_err(map_err)?
            .query_row([account.as_str()], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?))
            })
            .optional()
            .map_err(map_err)?
            .map(|(seq, hash)| Head::stored(seq, &hash))
            .transpose()
            .map(|head| head.unwrap_or(Head::EMPTY))
    }

    async fn append_event(&mut self, record: &ChangeRecord<'_>, link: &Link) -> Result<()> {
        self.prepare_cached(
            "INSERT INTO audit_events \
             (account_id, account_seq, key_id, action, actor, actor_ip, at, changes, prev_hash, hash) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        )
        .map_err(map_err)?
        .execute(params![
            record.account.as_str(),
            link.seq,
            record.key_id.map(KeyId::as_str),
            record.action.as_str(),
            record.actor.name,
            record.actor.ip,
            to_micros(link.at),
            link.changes.to_string(),
            &link.prev_hash[..],
            &link.hash[..],
        ])
        .map_err(map_err)?;
        write_head(self, record.account.as_str(), link.head())
    }
}
