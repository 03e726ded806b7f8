//! What the columns of each query mean, written once for both backends.
//! A backend says only how to read one cell of each kind ([`Cells`]):
//! SQLite keeps times as INTEGER microseconds and lists as JSON text,
//! Postgres as `TIMESTAMPTZ`, `TEXT[]` and `JSONB`. A value that does not
//! parse into its domain type is a corrupt row ([`crate::rules::corrupt`]).

use time::OffsetDateTime;
use vilvik_keys_domain::{AccountId, KeyPrefix, PepperId, ScopeSet, SecretHash};

use crate::chain::Head;
use crate::rules::{StoredRequest, corrupt, field};
use crate::{
    Account, AuditChainRow, AuditEvent, FieldChange, KeyRecord, KeyUsage, PepperUse, Result,
    SecretEntry, SecretRecord, StoreError, StoredAccount, StoredAuditEvent, StoredAuditHead,
    StoredKey,
};

/// One row of a query's result, as a backend reads its cells: each kind
/// of cell as nullable; the non-null readers follow. Text and bytes borrow
/// from the row.
pub(crate) trait Cells {
    fn opt_text(&self, i: usize) -> Result<Option<&str>>;
    fn opt_int(&self, i: usize) -> Result<Option<i64>>;
    fn flag(&self, i: usize) -> Result<bool>;
    fn opt_time(&self, i: usize) -> Result<Option<OffsetDateTime>>;
    fn opt_bytes(&self, i: usize) -> Result<Option<&[u8]>>;
    /// A list of strings: a key's scopes, an account's catalogue.
    fn opt_strings(&self, i: usize) -> Result<Option<Vec<&str>>>;
    /// A JSON document; an error when the cell holds none.
    fn json(&self, i: usize) -> Result<serde_json::Value>;

    fn text(&self, i: usize) -> Result<&str> {
        self.opt_text(i)?.ok_or_else(|| null(i))
    }

    fn int(&self, i: usize) -> Result<i64> {
        self.opt_int(i)?.ok_or_else(|| null(i))
    }

    fn time(&self, i: usize) -> Result<OffsetDateTime> {
        self.opt_time(i)?.ok_or_else(|| null(i))
    }

    fn bytes(&self, i: usize) -> Result<&[u8]> {
        self.opt_bytes(i)?.ok_or_else(|| null(i))
    }

    fn strings(&self, i: usize) -> Result<Vec<&str>> {
        self.opt_strings(i)?.ok_or_else(|| null(i))
    }
}

/// A column the schema says is never NULL read as NULL.
fn null(i: usize) -> StoreError {
    StoreError::internal(format!("column {i} of a row is NULL"))
}

/// A count, which the caps compare as a `u32`.
pub(crate) fn count(row: &impl Cells) -> Result<u32> {
    Ok(u32::try_from(row.int(0)?).unwrap_or(u32::MAX))
}

/// The columns of `key_columns!()`, from `at`.
pub(crate) fn key(row: &impl Cells, at: usize) -> Result<KeyRecord> {
    let owned = |i: usize| row.opt_text(at + i).map(|t| t.map(str::to_owned));
    Ok(KeyRecord {
        key_id: field("key id", row.text(at)?.parse())?,
        account_id: field("account id", row.text(at + 1)?.parse())?,
        name: field("name", row.text(at + 2)?.parse())?,
        description: field("description", row.text(at + 3)?.parse())?,
        scopes: field("scopes", ScopeSet::from_stored(&row.strings(at + 4)?))?,
        prefix: field("prefix", row.text(at + 5)?.parse())?,
        created_at: row.time(at + 6)?,
        expires_at: row.opt_time(at + 7)?,
        revoked_at: row.opt_time(at + 8)?,
        revoke_reason: owned(9)?,
        rotated_at: row.opt_time(at + 10)?,
        last_used_at: row.opt_time(at + 11)?,
        last_used_ip: owned(12)?,
        version: row.int(at + 13)?,
        usage: KeyUsage {
            last_used_observed_ip: owned(14)?,
            last_used_claimed_ip: owned(15)?,
            valid_uses: u64::try_from(row.int(at + 16)?).unwrap_or(0),
            rejected_uses: u64::try_from(row.int(at + 17)?).unwrap_or(0),
            last_rejected_at: row.opt_time(at + 18)?,
            last_rejected_ip: owned(19)?,
        },
    })
}

/// `k.seq`, the listing's cursor, then the key's columns.
pub(crate) fn listed_key(row: &impl Cells) -> Result<(i64, KeyRecord)> {
    Ok((row.int(0)?, key(row, 1)?))
}

/// A stored secret hash; one that is not 32 bytes is a corrupt row.
fn hash(row: &impl Cells, i: usize) -> Result<SecretHash> {
    SecretHash::from_slice(row.bytes(i)?).ok_or_else(|| corrupt("hash")("not 32 bytes".into()))
}

/// A stored pepper id: NULL is a legacy unkeyed hash; 0 is no pepper's id.
pub(crate) fn pepper_id(stored: Option<i64>) -> Result<Option<PepperId>> {
    stored
        .map(|id| PepperId::from_stored(id).ok_or_else(|| corrupt("pepper id")("0".into())))
        .transpose()
}

/// `s.hash, s.superseded_at, s.pepper_id`, then the key's columns.
pub(crate) fn secret(row: &impl Cells) -> Result<SecretRecord> {
    Ok(SecretRecord {
        hash: hash(row, 0)?,
        superseded_at: row.opt_time(1)?,
        pepper_id: pepper_id(row.opt_int(2)?)?,
        key: key(row, 3)?,
    })
}

/// A row of [`crate::stream::STREAM_SECRETS`].
pub(crate) fn entry(row: &impl Cells) -> Result<SecretEntry> {
    Ok(SecretEntry {
        prefix: field("secret prefix", row.text(0)?.parse())?,
        hash: hash(row, 1)?,
        superseded: row.flag(2)?,
        revoked: row.flag(3)?,
        expires_at: row.opt_time(4)?,
        key_id: field("key id", row.text(5)?.parse())?,
        account_id: field("account id", row.text(6)?.parse())?,
        name: field("name", row.text(7)?.parse())?,
        scopes: field(
            "scopes",
            ScopeSet::parse(&row.strings(8)?).map_err(|(_, e)| e),
        )?,
        pepper_id: pepper_id(row.opt_int(9)?)?,
    })
}

/// A row whose first column is a secret's prefix: [`crate::stream::STREAM_PREFIXES`],
/// or a `DELETE … RETURNING prefix`.
pub(crate) fn prefix(row: &impl Cells) -> Result<KeyPrefix> {
    field("secret prefix", row.text(0)?.parse())
}

/// A row whose first column is a list of strings, owned.
pub(crate) fn strings(row: &impl Cells) -> Result<Vec<String>> {
    Ok(row.strings(0)?.into_iter().map(str::to_owned).collect())
}

/// `seq, prefix` of the change log.
pub(crate) fn change(row: &impl Cells) -> Result<(i64, KeyPrefix)> {
    Ok((row.int(0)?, field("change prefix", row.text(1)?.parse())?))
}

/// `tier, grantable_scopes` of an account.
pub(crate) fn account(row: &impl Cells) -> Result<Account> {
    let tier = row.text(0)?.to_owned();
    let grantable = row
        .opt_strings(1)?
        .map(|list| list.into_iter().map(str::to_owned).collect());
    crate::rules::account(Some((tier, grantable)))
}

/// `last_seq, last_hash` of an account's audit head.
pub(crate) fn head(row: &impl Cells) -> Result<Head> {
    Head::stored(row.int(0)?, row.bytes(1)?)
}

/// `method, params_digest, key_id, sealed_secret, pepper_id, caller` of a
/// request id's record.
pub(crate) fn request(row: &impl Cells) -> Result<StoredRequest> {
    Ok(StoredRequest {
        method: row.text(0)?.to_owned(),
        params: row.bytes(1)?.to_vec(),
        key_id: row.text(2)?.to_owned(),
        sealed: row.bytes(3)?.to_vec(),
        pepper_id: row.int(4)?,
        caller: row.text(5)?.to_owned(),
    })
}

/// `scopes, expires_at` of another active key of an account.
pub(crate) fn other_key(row: &impl Cells) -> Result<(Vec<String>, Option<OffsetDateTime>)> {
    Ok((strings(row)?, row.opt_time(1)?))
}

/// A row of [`crate::stream::SECRETS_BY_PEPPER`].
/// An account id in the first column.
pub(crate) fn account_id(row: &impl Cells) -> Result<AccountId> {
    field("account id", row.text(0)?.parse())
}

pub(crate) fn pepper_use(row: &impl Cells) -> Result<PepperUse> {
    Ok(PepperUse {
        pepper_id: pepper_id(row.opt_int(0)?)?,
        live: row.int(1)? as u64,
        total: row.int(2)? as u64,
    })
}

/// `account_seq, key_id, action, actor, actor_ip, at, changes` of an event
/// of `account`, with its number as cursor.
pub(crate) fn event(row: &impl Cells, account: &AccountId) -> Result<(i64, AuditEvent)> {
    let event_id = row.int(0)?;
    let key_id = row.opt_text(1)?.map(str::parse).transpose();
    let changes = serde_json::from_value::<Vec<FieldChange>>(row.json(6)?);
    let event = AuditEvent {
        event_id,
        account_id: account.clone(),
        key_id: field("audit key id", key_id)?,
        action: field("audit action", row.text(2)?.parse())?,
        actor: row.text(3)?.to_owned(),
        actor_ip: row.opt_text(4)?.map(str::to_owned),
        at: row.time(5)?,
        changes: field("audit changes", changes)?,
    };
    Ok((event_id, event))
}

/// The columns every event row of the audit chain is read with, as
/// [`crate::Store::stream_audit_chain`] and the migration that chains old
/// events select them: `kind, account_id, account_seq, event_id, key_id,
/// action, actor, actor_ip, at, changes, prev_hash, hash`, where `kind` is
/// 0 for an event and 1 for a head (`account_seq` then being its last
/// number and `hash` its hash).
///
/// Rows are read as stored, not parsed: changes that are not JSON are
/// `None`, so that a damaged row is a broken link rather than an error.
///
/// [`crate::Store::stream_audit_chain`] adds kind 2, a key row (`key_id`
/// in column 4, then from column 12 `name, description, scopes, prefix,
/// expires_at, revoked_at, revoke_reason` and its current secrets'
/// prefixes, space-separated), and kind 3, an account row (`tier,
/// grantable` in columns 20 and 21).
pub(crate) fn chain_row(row: &impl Cells) -> Result<AuditChainRow> {
    let account_id = row.text(1)?.to_owned();
    let seq = row.opt_int(2)?;
    let owned = |i: usize| row.opt_text(i).map(|t| t.map(str::to_owned));
    let list = |i: usize| {
        row.opt_strings(i)
            .map(|l| l.map(|l| l.into_iter().map(str::to_owned).collect::<Vec<_>>()))
            .map_err(|e| e.to_string())
    };
    match row.int(0)? {
        1 => {
            return Ok(AuditChainRow::Head(StoredAuditHead {
                account_id,
                seq: seq.unwrap_or_default(),
                hash: row.bytes(11)?.to_vec(),
            }));
        }
        2 => {
            let mut current: Vec<String> = row
                .opt_text(19)?
                .unwrap_or_default()
                .split_whitespace()
                .map(str::to_owned)
                .collect();
            current.sort();
            return Ok(AuditChainRow::Key(StoredKey {
                account_id,
                key_id: row.text(4)?.to_owned(),
                name: row.text(12)?.to_owned(),
                description: row.text(13)?.to_owned(),
                scopes: list(14).map(Option::unwrap_or_default),
                prefix: row.text(15)?.to_owned(),
                expires_at: row.opt_time(16)?,
                revoked_at: row.opt_time(17)?,
                revoke_reason: owned(18)?,
                current,
            }));
        }
        3 => {
            return Ok(AuditChainRow::Account(StoredAccount {
                account_id,
                tier: row.text(20)?.to_owned(),
                grantable: list(21),
            }));
        }
        _ => {}
    }
    let bytes = |i: usize| row.opt_bytes(i).map(|b| b.map(<[u8]>::to_vec));
    Ok(AuditChainRow::Event(StoredAuditEvent {
        row_id: row.int(3)?,
        account_id,
        seq,
        key_id: owned(4)?,
        action: row.text(5)?.to_owned(),
        actor: row.text(6)?.to_owned(),
        actor_ip: owned(7)?,
        at: row.time(8)?,
        changes: row.json(9).ok(),
        prev_hash: bytes(10)?,
        hash: bytes(11)?,
    }))
}

/// The start of a query reading event rows in [`chain_row`]'s columns.
pub(crate) const CHAIN_EVENT_COLUMNS: &str = "SELECT 0 AS kind, account_id, account_seq, event_id, \
     key_id, action, actor, actor_ip, at, changes, prev_hash, hash FROM audit_events";
