//! The bulk import on Postgres ([`crate::Store::import_keys`]): one
//! statement per table per call, the rows passed as arrays and unnested.
//! `WITH ORDINALITY ... ORDER BY ord` keeps the input order, so `keys.seq`,
//! event ids and change sequence numbers follow it.

use deadpool_postgres::GenericClient;
use time::OffsetDateTime;
use tokio_postgres::types::Json;
use vilvik_keys_domain::AuditAction;

use super::{CHANGE_LOG_LOCK, execute, map_err, query};
use crate::chain::{self, GENESIS, Head};
use crate::rules::ChangeRecord;
use crate::{Actor, NewKey, Result};

const IMPORT_ACCOUNTS: &str = "INSERT INTO accounts (account_id, tier, created_at) \
     SELECT account_id, 'free', MIN(created_at) \
     FROM UNNEST($1::text[], $2::timestamptz[]) AS n (account_id, created_at) \
     GROUP BY account_id ORDER BY account_id \
     ON CONFLICT DO NOTHING";
/// Scopes travel space-separated (a scope never holds a space):
/// Postgres arrays cannot nest arrays of different lengths.
const IMPORT_KEYS: &str = "INSERT INTO keys \
         (key_id, account_id, name, description, scopes, prefix, created_at, expires_at) \
     SELECT key_id, account_id, name, description, string_to_array(scopes, ' '), prefix, \
         created_at, expires_at \
     FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], \
         $7::timestamptz[], $8::timestamptz[]) WITH ORDINALITY \
         AS n (key_id, account_id, name, description, scopes, prefix, created_at, expires_at, ord) \
     ORDER BY ord";
const IMPORT_SECRETS: &str = "INSERT INTO key_secrets (prefix, key_id, hash, pepper_id, created_at) \
     SELECT prefix, key_id, hash, pepper_id, created_at \
     FROM UNNEST($1::text[], $2::text[], $3::bytea[], $4::bigint[], $5::timestamptz[]) \
         WITH ORDINALITY AS n (prefix, key_id, hash, pepper_id, created_at, ord) \
     ORDER BY ord";
const IMPORT_AUDIT: &str = "INSERT INTO audit_events \
         (account_id, account_seq, key_id, action, actor, actor_ip, at, changes, prev_hash, hash) \
     SELECT account_id, account_seq, key_id, $1, $2, $3, at, changes, prev_hash, hash \
     FROM UNNEST($4::text[], $5::bigint[], $6::text[], $7::timestamptz[], $8::jsonb[], \
         $9::bytea[], $10::bytea[]) WITH ORDINALITY \
         AS n (account_id, account_seq, key_id, at, changes, prev_hash, hash, ord) \
     ORDER BY ord";
/// Creates the heads of accounts new to the audit log and locks every one
/// (in account order, so that two imports cannot deadlock), returning each.
const IMPORT_LOCK_HEADS: &str = "INSERT INTO audit_heads (account_id, last_seq, last_hash) \
     SELECT account_id, 0, $2 FROM UNNEST($1::text[]) AS n (account_id) ORDER BY account_id \
     ON CONFLICT (account_id) DO UPDATE SET account_id = excluded.account_id \
     RETURNING account_id, last_seq, last_hash";
const IMPORT_HEADS: &str = "UPDATE audit_heads h SET last_seq = n.seq, last_hash = n.hash \
     FROM UNNEST($1::text[], $2::bigint[], $3::bytea[]) AS n (account_id, seq, hash) \
     WHERE h.account_id = n.account_id";

const IMPORT_CHANGES: &str = "INSERT INTO key_changes (prefix, at) \
     SELECT prefix, at FROM UNNEST($1::text[], $2::timestamptz[]) WITH ORDINALITY \
         AS n (prefix, at, ord) \
     ORDER BY ord";

/// One statement per table, the rows passed as arrays (10,000 keys take
/// about half a second). No `NOTIFY`, not even one per call: imported keys
/// are new prefixes that no node holds as valid, so nothing needs evicting
/// at once. Followers catch up through the sequence: the next change's
/// notification carries a sequence number past the import, and
/// `changes_since` from the last one seen returns the imported prefixes.
/// Until then a node may still answer from a negative cache entry for an
/// imported prefix (at most its negative TTL).
pub(super) async fn import_keys(
    c: &impl GenericClient,
    keys: &[NewKey],
    actor: &Actor,
) -> Result<()> {
    let key_ids: Vec<&str> = keys.iter().map(|k| k.key_id.as_str()).collect();
    let account_ids: Vec<&str> = keys.iter().map(|k| k.account_id.as_str()).collect();
    let names: Vec<&str> = keys.iter().map(|k| k.name.as_str()).collect();
    let descriptions: Vec<&str> = keys.iter().map(|k| k.description.as_str()).collect();
    let scopes: Vec<String> = keys
        .iter()
        .map(|k| k.scopes.to_strings().join(" "))
        .collect();
    let prefixes: Vec<&str> = keys.iter().map(|k| k.prefix.as_str()).collect();
    let created: Vec<OffsetDateTime> = keys.iter().map(|k| k.created_at).collect();
    let expires: Vec<Option<OffsetDateTime>> = keys.iter().map(|k| k.expires_at).collect();
    let hashes: Vec<&[u8]> = keys.iter().map(|k| &k.hash.as_bytes()[..]).collect();
    let peppers: Vec<i64> = keys.iter().map(|k| k.pepper_id.to_stored()).collect();

    execute(c, IMPORT_ACCOUNTS, &[&account_ids, &created]).await?;
    execute(
        c,
        IMPORT_KEYS,
        &[
            &key_ids,
            &account_ids,
            &names,
            &descriptions,
            &scopes,
            &prefixes,
            &created,
            &expires,
        ],
    )
    .await?;
    execute(
        c,
        IMPORT_SECRETS,
        &[&prefixes, &key_ids, &hashes, &peppers, &created],
    )
    .await?;
    // Each account's events chain on from its head, in input order.
    let mut accounts = account_ids.clone();
    accounts.sort_unstable();
    accounts.dedup();
    let mut heads = std::collections::HashMap::with_capacity(accounts.len());
    for row in query(c, IMPORT_LOCK_HEADS, &[&accounts, &&GENESIS[..]]).await? {
        let account: String = row.try_get(0).map_err(map_err)?;
        let head = Head::stored(
            row.try_get(1).map_err(map_err)?,
            row.try_get::<_, &[u8]>(2).map_err(map_err)?,
        )?;
        heads.insert(account, head);
    }
    let links: Vec<chain::Link> = keys
        .iter()
        .map(|key| {
            let head = heads
                .get_mut(key.account_id.as_str())
                .expect("every account's head was locked");
            let link = chain::append(*head, &ChangeRecord::created(key, actor));
            *head = link.head();
            link
        })
        .collect();
    let seqs: Vec<i64> = links.iter().map(|l| l.seq).collect();
    let ats: Vec<OffsetDateTime> = links.iter().map(|l| l.at).collect();
    let changes: Vec<Json<&serde_json::Value>> = links.iter().map(|l| Json(&l.changes)).collect();
    let prevs: Vec<&[u8]> = links.iter().map(|l| &l.prev_hash[..]).collect();
    let hashes_of_events: Vec<&[u8]> = links.iter().map(|l| &l.hash[..]).collect();
    execute(
        c,
        IMPORT_AUDIT,
        &[
            &AuditAction::Created.as_str(),
            &actor.name,
            &actor.ip,
            &account_ids,
            &seqs,
            &key_ids,
            &ats,
            &changes,
            &prevs,
            &hashes_of_events,
        ],
    )
    .await?;
    let head_accounts: Vec<&str> = heads.keys().map(String::as_str).collect();
    let head_seqs: Vec<i64> = heads.values().map(|h| h.seq).collect();
    let head_hashes: Vec<&[u8]> = heads.values().map(|h| &h.hash[..]).collect();
    execute(c, IMPORT_HEADS, &[&head_accounts, &head_seqs, &head_hashes]).await?;
    // Last, as in `publish_change`: sequence numbers commit in order.
    execute(c, "SELECT pg_advisory_xact_lock($1)", &[&CHANGE_LOG_LOCK]).await?;
    execute(c, IMPORT_CHANGES, &[&prefixes, &created]).await?;
    Ok(())
}
