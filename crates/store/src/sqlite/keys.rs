//! Keys and their secrets on SQLite: the primitives of
//! [`KeyRows`], and the decoding of key and secret rows. Scopes are a
//! JSON array of strings, times INTEGER microseconds.

use std::collections::BTreeMap;

use rusqlite::{OptionalExtension, Row, params};
use time::OffsetDateTime;
use vilvik_keys_domain::{AccountId, KeyId, KeyPrefix, ScopeSet, SecretHash};

use super::{Sqlite, from_micros, map_err, opt_from_micros, to_micros};
use crate::db::{KeyRows, Keys, Window};
use crate::rules::{self, RawKey, corrupt};
use crate::{Actor, KeyRecord, NewKey, NewSecret, Result, SecretEntry, SecretRecord, ops, stream};

const KEY_COLUMNS: &str = key_columns!();

/// Deletes a key's rotated-away secrets but the newest `?2`; the rowid
/// orders secrets superseded in the same microsecond.
const PRUNE_KEY_SECRETS: &str = "DELETE FROM key_secrets WHERE key_id = ?1 AND superseded_at IS NOT NULL \
     AND prefix NOT IN (SELECT prefix FROM key_secrets WHERE key_id = ?1 AND superseded_at IS NOT NULL \
     ORDER BY superseded_at DESC, rowid DESC LIMIT ?2) RETURNING prefix";

/// Reads the columns of [`KEY_COLUMNS`] starting at `offset`.
fn key_from_row(row: &Row<'_>, offset: usize) -> Result<KeyRecord> {
    let get_text = |i: usize| row.get::<_, String>(offset + i).map_err(map_err);
    let get_time = |i: usize| opt_from_micros(row.get(offset + i).map_err(map_err)?);
    let scopes_json = get_text(4)?;
    RawKey {
        key_id: get_text(0)?,
        account_id: get_text(1)?,
        name: get_text(2)?,
        description: get_text(3)?,
        scopes: parse_json_list("scopes", &scopes_json)?,
        prefix: get_text(5)?,
        created_at: from_micros(row.get(offset + 6).map_err(map_err)?)?,
        expires_at: get_time(7)?,
        revoked_at: get_time(8)?,
        revoke_reason: row.get(offset + 9).map_err(map_err)?,
        rotated_at: get_time(10)?,
        last_used_at: get_time(11)?,
        last_used_ip: row.get(offset + 12).map_err(map_err)?,
        version: row.get(offset + 13).map_err(map_err)?,
    }
    .parse()
}

/// A JSON array of strings as stored (scopes, a catalogue).
pub(super) fn parse_json_list(what: &str, json: &str) -> Result<Vec<String>> {
    serde_json::from_str(json).map_err(|e| corrupt(what)(e.to_string()))
}

fn scopes_json(scopes: &ScopeSet) -> String {
    serde_json::to_string(&scopes.to_strings()).expect("a list of strings serializes")
}

/// Reads `s.hash, s.superseded_at, s.pepper_id` and then [`KEY_COLUMNS`].
fn secret_from_row(row: &Row<'_>) -> Result<SecretRecord> {
    let hash: Vec<u8> = row.get(0).map_err(map_err)?;
    Ok(SecretRecord {
        hash: SecretHash::from_slice(&hash)
            .ok_or_else(|| corrupt("hash")("not 32 bytes".into()))?,
        superseded_at: opt_from_micros(row.get(1).map_err(map_err)?)?,
        pepper_id: stream::pepper_id(row.get(2).map_err(map_err)?)?,
        key: key_from_row(row, 3)?,
    })
}

/// [`crate::KeySource::find_secret`] on the reader.
pub(super) fn find_secret(conn: &Sqlite<'_>, prefix: &KeyPrefix) -> Result<Option<SecretRecord>> {
    conn.prepare_cached(&format!(
        "SELECT s.hash, s.superseded_at, s.pepper_id, {KEY_COLUMNS} FROM key_secrets s \
         JOIN keys k ON k.key_id = s.key_id WHERE s.prefix = ?1"
    ))
    .map_err(map_err)?
    .query_row([prefix.as_str()], |row| Ok(secret_from_row(row)))
    .optional()
    .map_err(map_err)?
    .transpose()
}

/// Decodes a row of [`stream::STREAM_PREFIXES`], or of a `DELETE …
/// RETURNING prefix`.
pub(super) fn prefix_from_row(row: &Row<'_>) -> Result<KeyPrefix> {
    let prefix = row
        .get_ref(0)
        .and_then(|v| Ok(v.as_str()?))
        .map_err(map_err)?;
    rules::field("secret prefix", prefix.parse())
}

/// Decodes a row of [`stream::STREAM_SECRETS`], borrowing its text until parsed.
pub(super) fn entry_from_row(row: &Row<'_>) -> Result<SecretEntry> {
    let text = |i: usize| -> Result<&str> {
        row.get_ref(i)
            .map_err(map_err)?
            .as_str()
            .map_err(|e| crate::StoreError::internal_from("SQLite column is not text", e))
    };
    let hash = row
        .get_ref(1)
        .map_err(map_err)?
        .as_blob()
        .map_err(|e| crate::StoreError::internal_from("SQLite column is not a blob", e))?;
    // Scopes never hold a character JSON escapes, so they borrow.
    let scopes: Vec<&str> =
        serde_json::from_str(text(8)?).map_err(|e| corrupt("scopes")(e.to_string()))?;
    stream::RawEntry {
        prefix: text(0)?,
        hash,
        superseded: row.get(2).map_err(map_err)?,
        revoked: row.get(3).map_err(map_err)?,
        expires_at: opt_from_micros(row.get(4).map_err(map_err)?)?,
        key_id: text(5)?,
        account_id: text(6)?,
        name: text(7)?,
        scopes: &scopes,
        pepper_id: row.get(9).map_err(map_err)?,
    }
    .parse()
}

impl Sqlite<'_> {
    /// The prefixes a `DELETE … RETURNING prefix` of secrets returned.
    fn deleted_prefixes(&self, sql: &str, params: impl rusqlite::Params) -> Result<Vec<KeyPrefix>> {
        let mut stmt = self.prepare_cached(sql).map_err(map_err)?;
        let mut rows = stmt.query(params).map_err(map_err)?;
        let mut prefixes = Vec::new();
        while let Some(row) = rows.next().map_err(map_err)? {
            prefixes.push(prefix_from_row(row)?);
        }
        Ok(prefixes)
    }

    fn count(&self, sql: &str, params: impl rusqlite::Params) -> Result<u32> {
        self.query_row(sql, params, |r| r.get(0)).map_err(map_err)
    }
}

impl KeyRows for Sqlite<'_> {
    async fn load_key(&mut self, account: &AccountId, key_id: &KeyId) -> Result<Option<KeyRecord>> {
        self.prepare_cached(&format!(
            "SELECT {KEY_COLUMNS} FROM keys k WHERE k.account_id = ?1 AND k.key_id = ?2"
        ))
        .map_err(map_err)?
        .query_row(params![account.as_str(), key_id.as_str()], |row| {
            Ok(key_from_row(row, 0))
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
                |row| Ok(row.get::<_, i64>(0).map(|seq| (seq, key_from_row(row, 1)))),
            )
            .map_err(map_err)?;
        let mut items = Vec::new();
        for row in rows {
            let (seq, key) = row.map_err(map_err)?.map_err(map_err)?;
            items.push((seq, key?));
        }
        Ok(items)
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

    async fn other_active_scopes(
        &mut self,
        key: &KeyRecord,
        now: OffsetDateTime,
    ) -> Result<Vec<Vec<String>>> {
        let mut stmt = self
            .prepare_cached(
                "SELECT scopes FROM keys WHERE account_id = ?1 AND key_id <> ?2 \
                 AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > ?3)",
            )
            .map_err(map_err)?;
        stmt.query_map(
            params![key.account_id.as_str(), key.key_id.as_str(), to_micros(now)],
            |r| r.get::<_, String>(0),
        )
        .map_err(map_err)?
        .map(|json| parse_json_list("scopes", &json.map_err(map_err)?))
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

    async fn update_key_row(&mut self, after: &KeyRecord) -> Result<()> {
        self.execute(
            "UPDATE keys SET name = ?1, description = ?2, scopes = ?3, expires_at = ?4, \
             version = ?5 WHERE key_id = ?6",
            params![
                after.name.as_str(),
                after.description.as_str(),
                scopes_json(&after.scopes),
                after.expires_at.map(to_micros),
                after.version,
                after.key_id.as_str()
            ],
        )
        .map_err(map_err)?;
        Ok(())
    }

    async fn rotate_key_row(
        &mut self,
        key_id: &KeyId,
        prefix: &KeyPrefix,
        at: OffsetDateTime,
    ) -> Result<()> {
        self.execute(
            "UPDATE keys SET prefix = ?1, rotated_at = ?2, version = version + 1 WHERE key_id = ?3",
            params![prefix.as_str(), to_micros(at), key_id.as_str()],
        )
        .map_err(map_err)?;
        Ok(())
    }

    async fn revoke_key_row(
        &mut self,
        key_id: &KeyId,
        reason: &str,
        at: OffsetDateTime,
    ) -> Result<()> {
        self.execute(
            "UPDATE keys SET revoked_at = ?1, revoke_reason = ?2, version = version + 1 \
             WHERE key_id = ?3",
            params![to_micros(at), reason, key_id.as_str()],
        )
        .map_err(map_err)?;
        Ok(())
    }

    async fn insert_secret(
        &mut self,
        key_id: &KeyId,
        secret: &NewSecret,
        at: OffsetDateTime,
    ) -> Result<()> {
        self.prepare_cached(
            "INSERT INTO key_secrets (prefix, key_id, hash, pepper_id, created_at) \
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )
        .map_err(map_err)?
        .execute(params![
            secret.prefix.as_str(),
            key_id.as_str(),
            &secret.hash.as_bytes()[..],
            secret.pepper_id.to_stored(),
            to_micros(at)
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
