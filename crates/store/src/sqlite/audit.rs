//! The audit log on SQLite: the primitives of [`AuditRows`], and the
//! rows of [`crate::Store::stream_audit_chain`]. The write lock `BEGIN
//! IMMEDIATE` took keeps anyone else from appending to a chain meanwhile.

use rusqlite::{OptionalExtension, params};
use vilvik_keys_domain::{AccountId, KeyId};

use super::{Sqlite, map_err, to_micros};
use crate::chain::{Head, Link};
use crate::db::{AuditRows, EventPage, Events};
use crate::rules::ChangeRecord;
use crate::{Result, rows};

/// Every event, head, key and account row, or one account's (`?1`), in
/// [`rows::chain_row`]'s columns, as [`crate::Store::stream_audit_chain`]
/// hands them out: one statement, so one snapshot of them all.
pub(super) const AUDIT_CHAIN: &str = "SELECT 0 AS kind, account_id, account_seq, event_id, key_id, \
         action, actor, actor_ip, at, changes, prev_hash, hash, \
         NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL \
     FROM audit_events WHERE ?1 IS NULL OR account_id = ?1 \
     UNION ALL \
     SELECT 1, account_id, last_seq, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, last_hash, \
         NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL \
     FROM audit_heads WHERE ?1 IS NULL OR account_id = ?1 \
     UNION ALL \
     SELECT 2, k.account_id, NULL, NULL, k.key_id, NULL, NULL, NULL, NULL, NULL, NULL, NULL, \
         k.name, k.description, k.scopes, k.prefix, k.expires_at, k.revoked_at, k.revoke_reason, \
         (SELECT group_concat(s.prefix, ' ') FROM key_secrets s \
          WHERE s.key_id = k.key_id AND s.superseded_at IS NULL), \
         NULL, NULL \
     FROM keys k WHERE ?1 IS NULL OR k.account_id = ?1 \
     UNION ALL \
     SELECT 3, account_id, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, \
         NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, tier, grantable_scopes \
     FROM accounts WHERE ?1 IS NULL OR account_id = ?1 \
     ORDER BY account_id, kind, account_seq NULLS FIRST, event_id, key_id";

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
    async fn list_events(&mut self, page: &EventPage<'_>) -> Result<Events> {
        let mut stmt = self
            .prepare_cached(
                "SELECT account_seq, key_id, action, actor, actor_ip, at, changes \
                 FROM audit_events WHERE account_id = ?1 AND (?2 IS NULL OR key_id = ?2) \
                 AND account_seq > ?3 ORDER BY account_seq LIMIT ?4",
            )
            .map_err(map_err)?;
        let (account, at) = (page.account, page.at);
        let key_id = page.key_id.map(KeyId::as_str);
        let mut found = stmt
            .query(params![account.as_str(), key_id, at.after, at.fetch()])
            .map_err(map_err)?;
        let mut items = Vec::new();
        while let Some(row) = found.next().map_err(map_err)? {
            items.push(rows::event(row, account)?);
        }
        Ok(items)
    }

    async fn lock_head(&mut self, account: &AccountId) -> Result<Head> {
        self.prepare_cached("SELECT last_seq, last_hash FROM audit_heads WHERE account_id = ?1")
            .map_err(map_err)?
            .query_row([account.as_str()], |row| Ok(rows::head(row)))
            .optional()
            .map_err(map_err)?
            .unwrap_or(Ok(Head::EMPTY))
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
