//! Keys and their secrets on Postgres: the primitives of [`KeyRows`],
//! the decoding of key and secret rows, and the bulk statements of the
//! verify engine's writes. Scopes are `TEXT[]`, times `TIMESTAMPTZ`.

use deadpool_postgres::GenericClient;
use time::OffsetDateTime;
use tokio_postgres::Row;
use vilvik_keys_domain::{AccountId, KeyId, KeyPrefix, SecretHash};

use super::{Pg, count, execute, import, map_err, query, query_one, query_opt};
use crate::db::{KeyRows, Keys, Window};
use crate::rules::{self, RawKey, corrupt};
use crate::{Actor, KeyRecord, NewKey, NewSecret, Result, SecretEntry, SecretRecord, stream};

const SELECT_KEY: &str = concat!(
    "SELECT ",
    key_columns!(),
    " FROM keys k WHERE k.account_id = $1 AND k.key_id = $2"
);
const SELECT_KEY_FOR_UPDATE: &str = concat!(
    "SELECT ",
    key_columns!(),
    " FROM keys k WHERE k.account_id = $1 AND k.key_id = $2 FOR UPDATE"
);
const LIST_KEYS: &str = concat!(
    "SELECT k.seq, ",
    key_columns!(),
    " FROM keys k WHERE k.account_id = $1 AND k.seq > $2 \
     AND ($3::boolean OR k.revoked_at IS NULL) ORDER BY k.seq LIMIT $4"
);
const FIND_SECRET: &str = concat!(
    "SELECT s.hash, s.superseded_at, s.pepper_id, ",
    key_columns!(),
    " FROM key_secrets s JOIN keys k ON k.key_id = s.key_id WHERE s.prefix = $1"
);
/// Deletes a key's rotated-away secrets but the newest `$2`; `seq` orders
/// secrets superseded in the same microsecond.
const PRUNE_KEY_SECRETS: &str = "DELETE FROM key_secrets WHERE key_id = $1 AND superseded_at IS NOT NULL \
     AND prefix NOT IN (SELECT prefix FROM key_secrets WHERE key_id = $1 AND superseded_at IS NOT NULL \
     ORDER BY superseded_at DESC, seq DESC LIMIT $2) RETURNING prefix";
pub(super) const INSERT_SECRET: &str = "INSERT INTO key_secrets (prefix, key_id, hash, pepper_id, created_at) \
     VALUES ($1, $2, $3, $4, $5)";

/// One statement for a whole batch of usage. Duplicates of a key keep the
/// latest use; rows are locked in key order so two nodes flushing
/// overlapping batches cannot deadlock; an older time never overwrites a
/// newer one.
pub(super) const RECORD_USAGE: &str = "WITH usage AS ( \
         SELECT DISTINCT ON (key_id) key_id, at, ip \
         FROM UNNEST($1::text[], $2::timestamptz[], $3::text[]) AS u (key_id, at, ip) \
         ORDER BY key_id, at DESC \
     ), locked AS ( \
         SELECT k.key_id FROM keys k JOIN usage USING (key_id) ORDER BY k.key_id FOR UPDATE OF k \
     ) \
     UPDATE keys k SET last_used_at = usage.at, last_used_ip = usage.ip \
     FROM usage JOIN locked USING (key_id) \
     WHERE k.key_id = usage.key_id AND (k.last_used_at IS NULL OR k.last_used_at < usage.at)";

/// One statement for a batch of re-hashes, each applied only if the stored
/// hash and pepper id are still the old ones (`IS NOT DISTINCT FROM`: NULL
/// is a legacy hash). Rows are locked in prefix order, as usage locks keys,
/// so two nodes re-hashing overlapping batches cannot deadlock; a row
/// changed meanwhile is re-checked against the condition once its lock is
/// had (READ COMMITTED), so a concurrent re-hash is never overwritten.
pub(super) const REHASH_SECRETS: &str = "WITH r AS ( \
         SELECT DISTINCT ON (prefix) prefix, old_hash, old_pepper, new_hash, new_pepper \
         FROM UNNEST($1::text[], $2::bytea[], $3::bigint[], $4::bytea[], $5::bigint[]) \
             AS r (prefix, old_hash, old_pepper, new_hash, new_pepper) \
         ORDER BY prefix \
     ), locked AS ( \
         SELECT s.prefix FROM key_secrets s JOIN r USING (prefix) ORDER BY s.prefix FOR UPDATE OF s \
     ) \
     UPDATE key_secrets s SET hash = r.new_hash, pepper_id = r.new_pepper \
     FROM r JOIN locked USING (prefix) \
     WHERE s.prefix = r.prefix AND s.hash = r.old_hash \
         AND s.pepper_id IS NOT DISTINCT FROM r.old_pepper \
     RETURNING s.prefix";

/// Reads the columns of `key_columns!()` starting at `offset`.
fn key_from_row(row: &Row, offset: usize) -> Result<KeyRecord> {
    let get = |i: usize| row.try_get(offset + i).map_err(map_err);
    let get_text = |i: usize| row.try_get::<_, String>(offset + i).map_err(map_err);
    RawKey {
        key_id: get_text(0)?,
        account_id: get_text(1)?,
        name: get_text(2)?,
        description: get_text(3)?,
        scopes: row.try_get(offset + 4).map_err(map_err)?,
        prefix: get_text(5)?,
        created_at: row.try_get(offset + 6).map_err(map_err)?,
        expires_at: get(7)?,
        revoked_at: get(8)?,
        revoke_reason: row.try_get(offset + 9).map_err(map_err)?,
        rotated_at: get(10)?,
        last_used_at: get(11)?,
        last_used_ip: row.try_get(offset + 12).map_err(map_err)?,
        version: row.try_get(offset + 13).map_err(map_err)?,
    }
    .parse()
}

/// Reads `s.hash, s.superseded_at, s.pepper_id` and then the key columns.
fn secret_from_row(row: &Row) -> Result<SecretRecord> {
    let hash: Vec<u8> = row.try_get(0).map_err(map_err)?;
    Ok(SecretRecord {
        hash: SecretHash::from_slice(&hash)
            .ok_or_else(|| corrupt("hash")("not 32 bytes".into()))?,
        superseded_at: row.try_get(1).map_err(map_err)?,
        pepper_id: stream::pepper_id(row.try_get(2).map_err(map_err)?)?,
        key: key_from_row(row, 3)?,
    })
}

/// [`crate::KeySource::find_secret`] on a pooled connection.
pub(super) async fn find_secret(
    c: &impl GenericClient,
    prefix: &KeyPrefix,
) -> Result<Option<SecretRecord>> {
    query_opt(c, FIND_SECRET, &[&prefix.as_str()])
        .await?
        .map(|row| secret_from_row(&row))
        .transpose()
}

/// Decodes a row of [`stream::STREAM_PREFIXES`], or of a statement
/// `RETURNING prefix`.
pub(super) fn prefix_from_row(row: &Row) -> Result<KeyPrefix> {
    rules::field(
        "secret prefix",
        row.try_get::<_, &str>(0).map_err(map_err)?.parse(),
    )
}

/// Decodes a row of [`stream::STREAM_SECRETS`], borrowing its text until parsed.
pub(super) fn entry_from_row(row: &Row) -> Result<SecretEntry> {
    let scopes: Vec<&str> = row.try_get(8).map_err(map_err)?;
    stream::RawEntry {
        prefix: row.try_get(0).map_err(map_err)?,
        hash: row.try_get(1).map_err(map_err)?,
        superseded: row.try_get(2).map_err(map_err)?,
        revoked: row.try_get(3).map_err(map_err)?,
        expires_at: row.try_get(4).map_err(map_err)?,
        key_id: row.try_get(5).map_err(map_err)?,
        account_id: row.try_get(6).map_err(map_err)?,
        name: row.try_get(7).map_err(map_err)?,
        scopes: &scopes,
        pepper_id: row.try_get(9).map_err(map_err)?,
    }
    .parse()
}

impl<C: GenericClient + Send> Pg<C> {
    async fn key(
        &self,
        sql: &str,
        account: &AccountId,
        key_id: &KeyId,
    ) -> Result<Option<KeyRecord>> {
        query_opt(&self.0, sql, &[&account.as_str(), &key_id.as_str()])
            .await?
            .map(|row| key_from_row(&row, 0))
            .transpose()
    }
}

impl<C: GenericClient + Send> KeyRows for Pg<C> {
    async fn load_key(&mut self, account: &AccountId, key_id: &KeyId) -> Result<Option<KeyRecord>> {
        self.key(SELECT_KEY, account, key_id).await
    }

    async fn lock_key(&mut self, account: &AccountId, key_id: &KeyId) -> Result<Option<KeyRecord>> {
        self.key(SELECT_KEY_FOR_UPDATE, account, key_id).await
    }

    async fn list_keys(&mut self, account: &AccountId, revoked: bool, at: Window) -> Result<Keys> {
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
            [&account.as_str(), &at.after, &revoked, &at.fetch()];
        let rows = query(&self.0, LIST_KEYS, &params).await?;
        rows.iter()
            .map(|row| {
                let seq = row.try_get::<_, i64>(0).map_err(map_err)?;
                Ok((seq, key_from_row(row, 1)?))
            })
            .collect()
    }

    async fn count_keys(&mut self, account: &AccountId) -> Result<u32> {
        let sql = "SELECT COUNT(*) FROM keys WHERE account_id = $1";
        count(&query_one(&self.0, sql, &[&account.as_str()]).await?)
    }

    async fn count_active(&mut self, account: &AccountId, now: OffsetDateTime) -> Result<u32> {
        let sql = "SELECT COUNT(*) FROM keys WHERE account_id = $1 AND revoked_at IS NULL \
                   AND (expires_at IS NULL OR expires_at > $2)";
        count(&query_one(&self.0, sql, &[&account.as_str(), &now]).await?)
    }

    async fn other_active_scopes(
        &mut self,
        key: &KeyRecord,
        now: OffsetDateTime,
    ) -> Result<Vec<Vec<String>>> {
        let rows = query(
            &self.0,
            "SELECT scopes FROM keys WHERE account_id = $1 AND key_id <> $2 \
             AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > $3)",
            &[&key.account_id.as_str(), &key.key_id.as_str(), &now],
        )
        .await?;
        rows.iter()
            .map(|row| row.try_get::<_, Vec<String>>(0).map_err(map_err))
            .collect()
    }

    async fn insert_key(&mut self, new: &NewKey) -> Result<()> {
        execute(
            &self.0,
            "INSERT INTO keys (key_id, account_id, name, description, scopes, prefix, \
             created_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            &[
                &new.key_id.as_str(),
                &new.account_id.as_str(),
                &new.name.as_str(),
                &new.description.as_str(),
                &new.scopes.to_strings(),
                &new.prefix.as_str(),
                &new.created_at,
                &new.expires_at,
            ],
        )
        .await?;
        Ok(())
    }

    async fn update_key_row(&mut self, after: &KeyRecord) -> Result<()> {
        execute(
            &self.0,
            "UPDATE keys SET name = $1, description = $2, scopes = $3, expires_at = $4, \
             version = $5 WHERE key_id = $6",
            &[
                &after.name.as_str(),
                &after.description.as_str(),
                &after.scopes.to_strings(),
                &after.expires_at,
                &after.version,
                &after.key_id.as_str(),
            ],
        )
        .await?;
        Ok(())
    }

    async fn rotate_key_row(
        &mut self,
        key_id: &KeyId,
        prefix: &KeyPrefix,
        at: OffsetDateTime,
    ) -> Result<()> {
        let sql = "UPDATE keys SET prefix = $1, rotated_at = $2, version = version + 1 \
                   WHERE key_id = $3";
        execute(&self.0, sql, &[&prefix.as_str(), &at, &key_id.as_str()]).await?;
        Ok(())
    }

    async fn revoke_key_row(
        &mut self,
        key_id: &KeyId,
        reason: &str,
        at: OffsetDateTime,
    ) -> Result<()> {
        let sql = "UPDATE keys SET revoked_at = $1, revoke_reason = $2, version = version + 1 \
                   WHERE key_id = $3";
        execute(&self.0, sql, &[&at, &reason, &key_id.as_str()]).await?;
        Ok(())
    }

    async fn insert_secret(
        &mut self,
        key_id: &KeyId,
        secret: &NewSecret,
        at: OffsetDateTime,
    ) -> Result<()> {
        let hash = &secret.hash.as_bytes()[..];
        let pepper_id = secret.pepper_id.to_stored();
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 5] = [
            &secret.prefix.as_str(),
            &key_id.as_str(),
            &hash,
            &pepper_id,
            &at,
        ];
        execute(&self.0, INSERT_SECRET, &params).await?;
        Ok(())
    }

    async fn supersede_secret(&mut self, prefix: &KeyPrefix, at: OffsetDateTime) -> Result<()> {
        let sql = "UPDATE key_secrets SET superseded_at = $1 WHERE prefix = $2";
        execute(&self.0, sql, &[&at, &prefix.as_str()]).await?;
        Ok(())
    }

    async fn prune_key_secrets(&mut self, key_id: &KeyId, kept: u32) -> Result<Vec<KeyPrefix>> {
        query(
            &self.0,
            PRUNE_KEY_SECRETS,
            &[&key_id.as_str(), &i64::from(kept)],
        )
        .await?
        .iter()
        .map(prefix_from_row)
        .collect()
    }

    async fn prune_superseded(&mut self, before: OffsetDateTime) -> Result<Vec<KeyPrefix>> {
        let sql = "DELETE FROM key_secrets WHERE superseded_at IS NOT NULL \
                   AND superseded_at < $1 RETURNING prefix";
        query(&self.0, sql, &[&before])
            .await?
            .iter()
            .map(prefix_from_row)
            .collect()
    }

    async fn import_keys(&mut self, keys: &[NewKey], actor: &Actor) -> Result<()> {
        import::import_keys(&self.0, keys, actor).await
    }
}
