//! The audit log on Postgres: the primitives of [`AuditRows`], and the
//! rows of [`crate::Store::stream_audit_chain`].

use deadpool_postgres::GenericClient;
use tokio_postgres::types::Json;
use vilvik_keys_domain::{AccountId, KeyId};

use super::{Pg, execute, query, query_one};
use crate::chain::{GENESIS, Head, Link};
use crate::db::{AuditRows, EventPage, Events};
use crate::rules::ChangeRecord;
use crate::{Result, rows};

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

/// Every event, head, key and account row, or one account's (`$1`), in
/// [`rows::chain_row`]'s columns, as [`crate::Store::stream_audit_chain`]
/// hands them out: one statement, so one snapshot of them all.
pub(super) const AUDIT_CHAIN: &str = "SELECT 0 AS kind, account_id, account_seq, event_id, key_id, \
         action, actor, actor_ip, at, changes, prev_hash, hash, \
         NULL::text AS name, NULL::text AS description, NULL::text[] AS scopes, \
         NULL::text AS prefix, NULL::timestamptz AS expires_at, NULL::timestamptz AS revoked_at, \
         NULL::text AS revoke_reason, NULL::text AS current, NULL::text AS tier, \
         NULL::text[] AS grantable \
     FROM audit_events WHERE $1::text IS NULL OR account_id = $1::text \
     UNION ALL \
     SELECT 1, account_id, last_seq, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, last_hash, \
         NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL \
     FROM audit_heads WHERE $1::text IS NULL OR account_id = $1::text \
     UNION ALL \
     SELECT 2, k.account_id, NULL, NULL, k.key_id, NULL, NULL, NULL, NULL, NULL, NULL, NULL, \
         k.name, k.description, k.scopes, k.prefix, k.expires_at, k.revoked_at, k.revoke_reason, \
         (SELECT string_agg(s.prefix, ' ') FROM key_secrets s \
          WHERE s.key_id = k.key_id AND s.superseded_at IS NULL), \
         NULL, NULL \
     FROM keys k WHERE $1::text IS NULL OR k.account_id = $1::text \
     UNION ALL \
     SELECT 3, account_id, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, \
         NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, tier, grantable_scopes \
     FROM accounts WHERE $1::text IS NULL OR account_id = $1::text \
     ORDER BY account_id, kind, account_seq NULLS FIRST, event_id, key_id";

impl<C: GenericClient + Send> AuditRows for Pg<C> {
    async fn list_events(&mut self, page: &EventPage<'_>) -> Result<Events> {
        let found = query(
            &self.0,
            "SELECT account_seq, key_id, action, actor, actor_ip, at, changes FROM audit_events \
             WHERE account_id = $1 AND ($2::text IS NULL OR key_id = $2::text) \
             AND account_seq > $3 ORDER BY account_seq LIMIT $4",
            &[
                &page.account.as_str(),
                &page.key_id.map(KeyId::as_str),
                &page.at.after,
                &page.at.fetch(),
            ],
        )
        .await?;
        found
            .iter()
            .map(|row| rows::event(row, page.account))
            .collect()
    }

    async fn lock_head(&mut self, account: &AccountId) -> Result<Head> {
        rows::head(&query_one(&self.0, LOCK_HEAD, &[&account.as_str(), &&GENESIS[..]]).await?)
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
