//! The audit log on Postgres: the primitives of [`AuditRows`], and the
//! rows of [`crate::Store::stream_audit_chain`].

use deadpool_postgres::GenericClient;
use tokio_postgres::Row;
use tokio_postgres::types::Json;
use vilvik_keys_domain::{AccountId, KeyId};

use super::{Pg, execute, map_err, query, query_one};
use crate::chain::{GENESIS, Head, Link};
use crate::db::{AuditRows, Events, Window};
use crate::rules::{ChangeRecord, RawEvent};
use crate::{AuditChainRow, FieldChange, Result, StoredAuditEvent, StoredAuditHead};

/// Creates the account's head if it has none and locks it until the
/// transaction ends (`DO UPDATE` locks the row, as `FOR UPDATE` would, in
/// one round trip), returning it: an account's events are chained one
/// after the other, so concurrent changes can neither fork its chain nor
/// reuse a number (and `UNIQUE (account_id, account_seq)` would refuse it).
const LOCK_HEAD: &str = "INSERT INTO audit_heads (account_id, last_seq, last_hash) \
     VALUES ($1, 0, $2) \
     ON CONFLICT (account_id) DO UPDATE SET account_id = excluded.account_id \
     RETURNING last_seq, last_hash";

/// Writes the event and moves the head to it.
const INSERT_EVENT: &str = "WITH event AS ( \
         INSERT INTO audit_events \
             (account_id, account_seq, key_id, action, actor, actor_ip, at, changes, prev_hash, hash) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
     ) \
     UPDATE audit_heads SET last_seq = $2, last_hash = $10 WHERE account_id = $1";

/// Every event and head, or one account's (`$1`), as
/// [`crate::Store::stream_audit_chain`] hands them out.
pub(super) const AUDIT_CHAIN: &str = "SELECT 0 AS kind, account_id, account_seq, event_id, key_id, \
         action, actor, actor_ip, at, changes, prev_hash, hash \
     FROM audit_events WHERE $1::text IS NULL OR account_id = $1::text \
     UNION ALL \
     SELECT 1, account_id, last_seq, NULL::bigint, NULL::text, NULL::text, NULL::text, \
         NULL::text, NULL::timestamptz, NULL::jsonb, NULL::bytea, last_hash \
     FROM audit_heads WHERE $1::text IS NULL OR account_id = $1::text \
     ORDER BY account_id, kind, account_seq NULLS FIRST, event_id";

/// Decodes a row of [`AUDIT_CHAIN`]: an event (kind 0) or a head (kind 1).
pub(super) fn chain_row_from_row(row: &Row) -> Result<AuditChainRow> {
    let kind: i32 = row.try_get(0).map_err(map_err)?;
    let account_id: String = row.try_get(1).map_err(map_err)?;
    let seq: Option<i64> = row.try_get(2).map_err(map_err)?;
    if kind == 1 {
        return Ok(AuditChainRow::Head(StoredAuditHead {
            account_id,
            seq: seq.unwrap_or_default(),
            hash: row.try_get(11).map_err(map_err)?,
        }));
    }
    let changes: Option<Json<serde_json::Value>> = row.try_get(9).ok();
    Ok(AuditChainRow::Event(StoredAuditEvent {
        row_id: row.try_get(3).map_err(map_err)?,
        account_id,
        seq,
        key_id: row.try_get(4).map_err(map_err)?,
        action: row.try_get(5).map_err(map_err)?,
        actor: row.try_get(6).map_err(map_err)?,
        actor_ip: row.try_get(7).map_err(map_err)?,
        at: row.try_get(8).map_err(map_err)?,
        changes: changes.map(|Json(c)| c),
        prev_hash: row.try_get(10).map_err(map_err)?,
        hash: row.try_get(11).map_err(map_err)?,
    }))
}

impl<C: GenericClient + Send> AuditRows for Pg<C> {
    async fn list_events(
        &mut self,
        account: &AccountId,
        key_id: Option<&KeyId>,
        at: Window,
    ) -> Result<Events> {
        let rows = query(
            &self.0,
            "SELECT account_seq, key_id, action, actor, actor_ip, at, changes FROM audit_events \
             WHERE account_id = $1 AND ($2::text IS NULL OR key_id = $2::text) \
             AND account_seq > $3 ORDER BY account_seq LIMIT $4",
            &[
                &account.as_str(),
                &key_id.map(KeyId::as_str),
                &at.after,
                &at.fetch(),
            ],
        )
        .await?;
        rows.iter()
            .map(|row| {
                RawEvent {
                    event_id: row.try_get(0).map_err(map_err)?,
                    key_id: row.try_get(1).map_err(map_err)?,
                    action: row.try_get(2).map_err(map_err)?,
                    actor: row.try_get(3).map_err(map_err)?,
                    actor_ip: row.try_get(4).map_err(map_err)?,
                    at: row.try_get(5).map_err(map_err)?,
                    changes: row
                        .try_get::<_, Json<Vec<FieldChange>>>(6)
                        .map(|Json(changes)| changes),
                }
                .parse(account)
            })
            .collect()
    }

    async fn lock_head(&mut self, account: &AccountId) -> Result<Head> {
        let row = query_one(&self.0, LOCK_HEAD, &[&account.as_str(), &&GENESIS[..]]).await?;
        Head::stored(
            row.try_get(0).map_err(map_err)?,
            row.try_get::<_, &[u8]>(1).map_err(map_err)?,
        )
    }

    async fn append_event(&mut self, record: &ChangeRecord<'_>, link: &Link) -> Result<()> {
        execute(
            &self.0,
            INSERT_EVENT,
            &[
                &record.account.as_str(),
                &link.seq,
                &record.key_id.map(KeyId::as_str),
                &record.action.as_str(),
                &record.actor.name,
                &record.actor.ip,
                &link.at,
                &Json(&link.changes),
                &&link.prev_hash[..],
                &&link.hash[..],
            ],
        )
        .await?;
        Ok(())
    }
}
