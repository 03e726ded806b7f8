//! Keys and their secrets on Postgres: the primitives of [`KeyRows`], and
//! the bulk statements of the verify engine's writes. Scopes are `TEXT[]`,
//! times `TIMESTAMPTZ`.

use deadpool_postgres::GenericClient;
use time::OffsetDateTime;
use tokio_postgres::types::ToSql;
use vilvik_keys_domain::{AccountId, KeyId, KeyPrefix};

use super::{Pg, execute, import, query, query_one, query_opt};
use crate::db::{KeyRows, Keys, OtherKeys, SecretRow, Window};
use crate::{Actor, KeyRecord, NewKey, Result, SecretRecord, rows};

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
const INSERT_SECRET: &str = "INSERT INTO key_secrets (prefix, key_id, hash, pepper_id, created_at) \
     VALUES ($1, $2, $3, $4, $5)";

/// One statement for a whole batch of usage: per key, the counts add up
/// and the latest valid and latest rejected use each replace the stored
/// one only if newer (a key twice in a batch: the counts summed, the
/// latest of each kind kept); rows are locked in key order so two nodes
/// flushing overlapping batches cannot deadlock. `last_used_ip` keeps its
/// meaning: the claimed address when one was sent, else the observed one.
pub(super) const RECORD_USAGE: &str = "WITH u AS ( \
         SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::bigint[], $4::timestamptz[], \
             $5::text[], $6::text[], $7::timestamptz[], $8::text[]) \
             AS u (key_id, valid_uses, rejected_uses, used_at, observed_ip, claimed_ip, \
                 rejected_at, rejected_ip) \
     ), n AS ( \
         SELECT key_id, SUM(valid_uses)::bigint AS valid_uses, \
             SUM(rejected_uses)::bigint AS rejected_uses FROM u GROUP BY key_id \
     ), v AS ( \
         SELECT DISTINCT ON (key_id) key_id, used_at, observed_ip, claimed_ip \
         FROM u WHERE used_at IS NOT NULL ORDER BY key_id, used_at DESC \
     ), r AS ( \
         SELECT DISTINCT ON (key_id) key_id, rejected_at, rejected_ip \
         FROM u WHERE rejected_at IS NOT NULL ORDER BY key_id, rejected_at DESC \
     ), usage AS ( \
         SELECT * FROM n LEFT JOIN v USING (key_id) LEFT JOIN r USING (key_id) \
     ), locked AS ( \
         SELECT k.key_id FROM keys k JOIN usage USING (key_id) ORDER BY k.key_id FOR UPDATE OF k \
     ) \
     UPDATE keys k SET \
         valid_uses = k.valid_uses + usage.valid_uses, \
         rejected_uses = k.rejected_uses + usage.rejected_uses, \
         last_used_at = CASE WHEN usage.used_at > COALESCE(k.last_used_at, '-infinity') \
             THEN usage.used_at ELSE k.last_used_at END, \
         last_used_ip = CASE WHEN usage.used_at > COALESCE(k.last_used_at, '-infinity') \
             THEN COALESCE(usage.claimed_ip, usage.observed_ip) ELSE k.last_used_ip END, \
         last_used_observed_ip = CASE WHEN usage.used_at > COALESCE(k.last_used_at, '-infinity') \
             THEN usage.observed_ip ELSE k.last_used_observed_ip END, \
         last_used_claimed_ip = CASE WHEN usage.used_at > COALESCE(k.last_used_at, '-infinity') \
             THEN usage.claimed_ip ELSE k.last_used_claimed_ip END, \
         last_rejected_at = CASE WHEN usage.rejected_at > COALESCE(k.last_rejected_at, '-infinity') \
             THEN usage.rejected_at ELSE k.last_rejected_at END, \
         last_rejected_ip = CASE WHEN usage.rejected_at > COALESCE(k.last_rejected_at, '-infinity') \
             THEN usage.rejected_ip ELSE k.last_rejected_ip END \
     FROM usage JOIN locked USING (key_id) \
     WHERE k.key_id = usage.key_id";

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

/// [`crate::KeySource::find_secret`] on a pooled connection.
pub(super) async fn find_secret(
    c: &impl GenericClient,
    prefix: &KeyPrefix,
) -> Result<Option<SecretRecord>> {
    query_opt(c, FIND_SECRET, &[&prefix.as_str()])
        .await?
        .map(|row| rows::secret(&row))
        .transpose()
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
            .map(|row| rows::key(&row, 0))
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
        let params: [&(dyn ToSql + Sync); 4] =
            [&account.as_str(), &at.after, &revoked, &at.fetch()];
        let found = query(&self.0, LIST_KEYS, &params).await?;
        found.iter().map(rows::listed_key).collect()
    }

    async fn count_keys(&mut self, account: &AccountId) -> Result<u32> {
        let sql = "SELECT COUNT(*) FROM keys WHERE account_id = $1";
        rows::count(&query_one(&self.0, sql, &[&account.as_str()]).await?)
    }

    async fn count_active(&mut self, account: &AccountId, now: OffsetDateTime) -> Result<u32> {
        let sql = "SELECT COUNT(*) FROM keys WHERE account_id = $1 AND revoked_at IS NULL \
                   AND (expires_at IS NULL OR expires_at > $2)";
        rows::count(&query_one(&self.0, sql, &[&account.as_str(), &now]).await?)
    }

    async fn other_active_keys(
        &mut self,
        key: &KeyRecord,
        now: OffsetDateTime,
    ) -> Result<OtherKeys> {
        query(
            &self.0,
            "SELECT scopes, expires_at FROM keys WHERE account_id = $1 AND key_id <> $2 \
             AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > $3)",
            &[&key.account_id.as_str(), &key.key_id.as_str(), &now],
        )
        .await?
        .iter()
        .map(rows::other_key)
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

    async fn write_key(&mut self, key: &KeyRecord) -> Result<()> {
        execute(
            &self.0,
            "UPDATE keys SET name = $1, description = $2, scopes = $3, expires_at = $4, \
             prefix = $5, rotated_at = $6, revoked_at = $7, revoke_reason = $8, version = $9 \
             WHERE key_id = $10",
            &[
                &key.name.as_str(),
                &key.description.as_str(),
                &key.scopes.to_strings(),
                &key.expires_at,
                &key.prefix.as_str(),
                &key.rotated_at,
                &key.revoked_at,
                &key.revoke_reason,
                &key.version,
                &key.key_id.as_str(),
            ],
        )
        .await?;
        Ok(())
    }

    async fn insert_secret(&mut self, row: &SecretRow<'_>) -> Result<()> {
        let secret = row.secret;
        let hash = &secret.hash.as_bytes()[..];
        let params: [&(dyn ToSql + Sync); 5] = [
            &secret.prefix.as_str(),
            &row.key_id.as_str(),
            &hash,
            &secret.pepper_id.to_stored(),
            &row.created_at,
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
        .map(rows::prefix)
        .collect()
    }

    async fn prune_superseded(&mut self, before: OffsetDateTime) -> Result<Vec<KeyPrefix>> {
        let sql = "DELETE FROM key_secrets WHERE superseded_at IS NOT NULL \
                   AND superseded_at < $1 RETURNING prefix";
        query(&self.0, sql, &[&before])
            .await?
            .iter()
            .map(rows::prefix)
            .collect()
    }

    async fn import_keys(&mut self, keys: &[NewKey], actor: &Actor) -> Result<()> {
        import::import_keys(&self.0, keys, actor).await
    }
}
