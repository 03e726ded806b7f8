//! Accounts on SQLite: the primitives of [`AccountRows`]. A catalogue of
//! grantable scopes is a JSON array of strings.

use rusqlite::{OptionalExtension, params};
use time::OffsetDateTime;
use vilvik_keys_domain::AccountId;

use super::keys::parse_json_list;
use super::{Sqlite, map_err, to_micros};
use crate::db::AccountRows;
use crate::{Account, Result, rules};

impl AccountRows for Sqlite<'_> {
    async fn load_account(&mut self, account: &AccountId) -> Result<Account> {
        let stored: Option<(String, Option<String>)> = self
            .query_row(
                "SELECT tier, grantable_scopes FROM accounts WHERE account_id = ?1",
                [account.as_str()],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(map_err)?;
        let stored = match stored {
            Some((tier, Some(json))) => {
                Some((tier, Some(parse_json_list("grantable scopes", &json)?)))
            }
            Some((tier, None)) => Some((tier, None)),
            None => None,
        };
        rules::account(stored)
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
}
