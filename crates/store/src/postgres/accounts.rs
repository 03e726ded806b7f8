//! Accounts on Postgres: the primitives of [`AccountRows`]. A catalogue
//! of grantable scopes is `TEXT[]`.

use deadpool_postgres::GenericClient;
use time::OffsetDateTime;
use vilvik_keys_domain::{AccountId, ScopeCatalogue};

use super::{Pg, execute, query, query_one, query_opt};
use crate::db::AccountRows;
use crate::{Account, Result, rows, rules};

impl<C: GenericClient + Send> AccountRows for Pg<C> {
    async fn load_account(&mut self, account: &AccountId) -> Result<Account> {
        let sql = "SELECT tier, grantable_scopes FROM accounts WHERE account_id = $1";
        match query_opt(&self.0, sql, &[&account.as_str()]).await? {
            Some(row) => rows::account(&row),
            None => rules::account(None),
        }
    }

    async fn lock_account(&mut self, account: &AccountId, now: OffsetDateTime) -> Result<Account> {
        execute(
            &self.0,
            "INSERT INTO accounts (account_id, tier, created_at) VALUES ($1, 'free', $2) \
             ON CONFLICT DO NOTHING",
            &[&account.as_str(), &now],
        )
        .await?;
        let sql = "SELECT tier, grantable_scopes FROM accounts WHERE account_id = $1 FOR UPDATE";
        rows::account(&query_one(&self.0, sql, &[&account.as_str()]).await?)
    }

    async fn update_account(&mut self, account: &AccountId, stored: &Account) -> Result<()> {
        let grantable = stored.grantable.as_ref().map(ScopeCatalogue::to_strings);
        execute(
            &self.0,
            "UPDATE accounts SET tier = $1, grantable_scopes = $2 WHERE account_id = $3",
            &[&stored.tier.as_str(), &grantable, &account.as_str()],
        )
        .await?;
        Ok(())
    }

    async fn accounts_differing_in_case(&mut self, account: &AccountId) -> Result<Vec<AccountId>> {
        let sql = "SELECT account_id FROM accounts \
                   WHERE lower(account_id) = lower($1) AND account_id <> $1 ORDER BY account_id";
        query(&self.0, sql, &[&account.as_str()])
            .await?
            .iter()
            .map(rows::account_id)
            .collect()
    }
}
