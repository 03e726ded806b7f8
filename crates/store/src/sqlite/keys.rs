//! Keys and their secrets on SQLite: the primitives of [`KeyRows`]. Scopes
//! are a JSON array of strings, times INTEGER microseconds.

use std::collections::BTreeMap;

use rusqlite::{OptionalExtension, params};
use time::OffsetDateTime;
use vilvik_keys_domain::{AccountId, KeyId, KeyPrefix, ScopeSet};

use super::{Sqlite, map_err, to_micros};
use crate::db::{KeyRows, Keys, OtherKeys, SecretRow, Window};
use crate::{Actor, KeyRecord, NewKey, Result, SecretRecord, ops, rows};

const KEY_COLUMNS: &str = key_columns!();

/// Deletes a key's rotated-away secrets but the newest `?2`; the rowid
/// orders secrets superseded in the same microsecond.
const PRUNE_KEY_SECRETS: &str = "DELETE FROM key_secrets WHERE key_id = ?1 AND superseded_at IS NOT NULL \
     AND prefix NOT IN (SELECT prefix FROM key_secrets WHERE key_id = ?1 AND superseded_at IS NOT NULL \
     ORDER BY superseded_at DESC, rowid DESC LIMIT ?2) RETURNING prefix";

fn scopes_json(scopes: &ScopeSet) -> String {
    serde_json::to_string(&scopes.to_strings()).expect("a list of strings serializes")
}

/// [`crate::KeySource::find_secret`] on the reader.
pub(super) fn find_secret(conn: &Sqlite<'_>, prefix: &KeyPrefix) -> Result<Option<SecretRecord>> {
    conn.prepare_cached(&format!(
        "SELECT s.hash, s.superseded_at, s.pepper_id, {KEY_COLUMNS} FROM key_secrets s \
         JOIN keys k ON k.key_id = s.key_id WHERE s.prefix = ?1"
    ))
    .map_err(map_err)?
    .query_row([prefix.as_str()], |row| Ok(rows::secret(row)))
    .optional()
    .map_err(map_err)?
    .transpose()
}

impl Sqlite<'_> {
    /// The prefixes a `DELETE … RETURNING prefix` of secrets returned.
    fn deleted_prefixes(&self, sql: &str, params: impl rusqlite::Params) -> Result<Vec<KeyPrefix>> {
        let mut stmt = self.prepare_cached(sql).map_err(map_err)?;
        let mut rows = stmt.query(params).map_err(map_err)?;
        let mut prefixes = Vec::new();
        while let Some(row) = rows.next().map_err(map_err)? {
            prefixes.push(rows::prefix(row)?);
        }
        Ok(prefixes)
    }

    fn count(&self, sql: &str, params: impl rusqlite::Params) -> Result<u32> {
        self.query_row(sql, params, |row| Ok(rows::count(row)))
            .map_err(map_err)?
    }
}

impl KeyRows for Sqlite<'_> {
    async fn load_key(&mut self, account: &AccountId, key_id: &KeyId) -> Result<Option<KeyRecord>> {
        self.prepare_cached(&format!(
            "SELECT {KEY_COLUMNS} FROM keys k WHERE k.account_id = ?1 AND k.key_id = ?2"
        ))
        .map_err(map_err)?
        .query_row(params![account.as_str(), key_id.as_str()], |row| {
            Ok(rows::key(row, 0))
        })
        .optional()
        .map_err(map_err)?
        .transpose()
    }

    /// The write lock `BEGIN IMMEDIATE` took covers the row.
    async fn lock_key(&mut self, account: &AccountId, key_id: &KeyId) -> Result<Option<KeyRecord>> {
        self.load_key(account, key_id).await
    }

    async fn list_keys(&mut self, account: &AccountId, revoked: bool, at: Window) -> Result<Keys> {
        let mut stmt = self
            .prepare_cached(&format!(
                "SELECT k.seq, {KEY_COLUMNS} FROM keys k WHERE k.account_id = ?1 AND k.seq > ?2 \
                 AND (?3 OR k.revoked_at IS NULL) ORDER BY k.seq LIMIT ?4"
            ))
            .map_err(map_err)?;
        let rows = stmt
            .query_map(
                params![account.as_str(), at.after, revoked, at.fetch()],
                |row| Ok(rows::listed_key(row)),
            )
            .map_err(map_err)?;
        rows.map(|row| row.map_err(map_err)?).collect()
    }

    async fn count_keys(&mut self, account: &AccountId) -> Result<u32> {
        self.count(
            "SELECT COUNT(*) FROM keys WHERE account_id = ?1",
            [account.as_str()],
        )
    }

    async fn count_active(&mut self, account: &AccountId, now: OffsetDateTime) -> Result<u32> {
        self.count(
            "SELECT COUNT(*) FROM keys WHERE account_id = ?1 AND revoked_at IS NULL \
             AND (expires_at IS NULL OR expires_at > ?2)",
            params![account.as_str(), to_micros(now)],
        )
    }

    async fn other_active_keys(
        &mut self,
        key: &KeyRecord,
        now: OffsetDateTime,
    ) -> Result<OtherKeys> {
        let mut stmt = self
            .prepare_cached(
                "SELECT scopes, expires_at FROM keys WHERE account_id = ?1 AND key_id <> ?2 \
                 AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > ?3)",
            )
            .map_err(map_err)?;
        stmt.query_map(
            params![key.account_id.as_str(), key.key_id.as_str(), to_micros(now)],
            |row| Ok(rows::other_key(row)),
        )
        .map_err(map_err)?
        .map(|scopes| scopes.map_err(map_err)?)
        .collect()
    }

    /// Statements are cached: an import runs this per key.
    async fn insert_key(&mut self, new: &NewKey) -> Result<()> {
        self.prepare_cached(
            "INSERT INTO keys (key_id, account_id, name, description, scopes, prefix, \
             created_at, expires_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )
        .map_err(map_err)?
        .execute(params![
            new.key_id.as_str(),
            new.account_id.as_str(),
            new.name.as_str(),
            new.description.as_str(),
            scopes_json(&new.scopes),
            new.prefix.as_str(),
            to_micros(new.created_at),
            new.expires_at.map(to_micros),
        ])
        .map_err(map_err)?;
        Ok(())
    }

    async fn write_key(&mut self, key: &KeyRecord) -> Result<()> {
        self.prepare_cached(
            "UPDATE keys SET name = ?1, description = ?2, scopes = ?3, expires_at = ?4, \
             prefix = ?5, rotated_at = ?6, revoked_at = ?7, revoke_reason = ?8, version = ?9 \
             WHERE key_id = ?10",
        )
        .map_err(map_err)?
        .execute(params![
            key.name.as_str(),
            key.description.as_str(),
            scopes_json(&key.scopes),
            key.expires_at.map(to_micros),
            key.prefix.as_str(),
            key.rotated_at.map(to_micros),
            key.revoked_at.map(to_micros),
            key.revoke_reason,
            key.version,
            key.key_id.as_str()
        ])
        .map_err(map_err)?;
        Ok(())
    }

    async fn insert_secret(&mut self, row: &SecretRow<'_>) -> Result<()> {
        let secret = row.secret;
        self.prepare_cached(
            "INSERT INTO key_secrets (prefix, key_id, hash, pepper_id, created_at) \
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )
        .map_err(map_err)?
        .execute(params![
            secret.prefix.as_str(),
            row.key_id.as_str(),
            &secret.hash.as_bytes()[..],
            secret.pepper_id.to_stored(),
            to_micros(row.created_at)
        ])
        .map_err(map_err)?;
        Ok(())
    }

    async fn supersede_secret(&mut self, prefix: &KeyPrefix, at: OffsetDateTime) -> Result<()> {
        self.execute(
            "UPDATE key_secrets SET superseded_at = ?1 WHERE prefix = ?2",
            params![to_micros(at), prefix.as_str()],
        )
        .map_err(map_err)?;
        Ok(())
    }

    async fn prune_key_secrets(&mut self, key_id: &KeyId, kept: u32) -> Result<Vec<KeyPrefix>> {
        self.deleted_prefixes(PRUNE_KEY_SECRETS, params![key_id.as_str(), kept])
    }

    async fn prune_superseded(&mut self, before: OffsetDateTime) -> Result<Vec<KeyPrefix>> {
        self.deleted_prefixes(
            "DELETE FROM key_secrets WHERE superseded_at IS NOT NULL \
             AND superseded_at < ?1 RETURNING prefix",
            params![to_micros(before)],
        )
    }

    /// Each account created once, as of its earliest imported key; then
    /// each key as a create writes it (cached statements), minus the cap
    /// check.
    async fn import_keys(&mut self, keys: &[NewKey], actor: &Actor) -> Result<()> {
        let mut accounts: BTreeMap<&str, OffsetDateTime> = BTreeMap::new();
        for key in keys {
            accounts
                .entry(key.account_id.as_str())
                .and_modify(|at| *at = (*at).min(key.created_at))
                .or_insert(key.created_at);
        }
        {
            let mut stmt = self
                .prepare_cached(
                    "INSERT INTO accounts (account_id, tier, created_at) VALUES (?1, 'free', ?2) \
                     ON CONFLICT DO NOTHING",
                )
                .map_err(map_err)?;
            for (account, at) in accounts {
                stmt.execute(params![account, to_micros(at)])
                    .map_err(map_err)?;
            }
        }
        for key in keys {
            ops::insert_new_key(self, key, actor).await?;
        }
        Ok(())
    }
}
