//! Accounts on SQLite: the primitives of [`AccountRows`]. A catalogue of
//! grantable scopes is a JSON array of strings.

use rusqlite::{OptionalExtension, params};
use time::OffsetDateTime;
use vilvik_keys_domain::AccountId;

use super::{Sqlite, map_err, to_micros};
use crate::db::AccountRows;
use crate::{Account, Result, rows, rules};

impl AccountRows for Sqlite<'_> {
    async fn load_account(&mut self, account: &AccountId) -> Result<Account> {
        let sql = "SELECT tier, grantable_scopes FROM accounts WHERE account_id = ?1";
        self.query_row(sql, [account.as_str()], |row| Ok(rows::account(row)))
            .optional()
            .map_err(map_err)?
            .unwrap_or_else(|| rules::account(None))
    }

    /// The write lock `BEGIN IMMEDIATE` took covers the row.
    async fn lock_account(&mut self, account: &AccountId, now: OffsetDateTime) -> Result<Account> {
        self.execute(
            "INSERT INTO accounts (account_id, tier, created_at) VALUES (?1, 'free', ?2) \
             ON CONFLICT DO NOTHING",
            params![account.as_str(), to_micros(now)],
        )
        .map_err(map_err)?;
        self.load_account(account).await
    }

    async fn update_account(&mut self, account: &AccountId, stored: &Account) -> Result<()> {
        let grantable = stored.grantable.as_ref().map(|catalogue| {
            serde_json::to_string(&catalogue.to_strings()).expect("strings serialize")
        });
        self.execute(
            "UPDATE accounts SET tier = ?1, grantable_scopes = ?2 WHERE account_id = ?3",
            params![stored.tier.as_str(), grantable, account.as_str()],
        )
        .map_err(map_err)?;
        Ok(())
    }

    async fn accounts_differing_in_case(&mut self, account: &AccountId) -> Result<Vec<AccountId>> {
        let mut stmt = self
            .prepare(
                "SELECT account_id FROM accounts \
                 WHERE lower(account_id) = lower(?1) AND account_id <> ?1 ORDER BY account_id",
            )
            .map_err(map_err)?;
        let mut found = stmt.query([account.as_str()]).map_err(map_err)?;
        let mut ids = Vec::new();
        while let Some(row) = found.next().map_err(map_err)? {
            ids.push(rows::account_id(row)?);
        }
        Ok(ids)
    }
}
