//! Accounts: their tier and the scopes their keys may be granted. Any
//! admitted caller reads its own account; only the platform operator
//! changes one.

use vilvik_keys_domain::{AccountId, ScopeCatalogue, Tier};
use vilvik_keys_store::Account;

use super::admin::Admin;
use super::caller::Caller;
use super::error::ApiError;

/// An account as the API shows it: its tier, what the tier allows, and
/// the scopes its keys may be granted (its own catalogue, or the
/// server's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountView {
    pub account_id: AccountId,
    pub tier: Tier,
    pub active_key_limit: u32,
    pub grantable: ScopeCatalogue,
    /// Whether `grantable` is the server's default rather than the
    /// account's own.
    pub grantable_default: bool,
}

/// What only the platform operator may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OperatorOnly {
    ChangeTier,
    SetGrantableScopes,
}

impl OperatorOnly {
    fn what(self) -> &'static str {
        match self {
            OperatorOnly::ChangeTier => "change an account's tier",
            OperatorOnly::SetGrantableScopes => "set which scopes an account's keys may be granted",
        }
    }
}

/// A caller with the operator token. The operations only it may call
/// take one, and [`Caller::operator`] makes one, before the call's fields
/// are validated.
#[derive(Debug, Clone, Copy)]
pub struct Operator<'a>(&'a Caller);

impl Caller {
    /// This caller as the operator, for `what` only the operator may do;
    /// a management key is refused, naming it.
    pub fn operator(&self, what: OperatorOnly) -> Result<Operator<'_>, ApiError> {
        if self.is_operator() {
            Ok(Operator(self))
        } else {
            Err(ApiError::PermissionDenied(format!(
                "only the platform operator can {}; a management key cannot",
                what.what()
            )))
        }
    }
}

impl Admin {
    /// The caller's own account.
    pub async fn get_account(&self, caller: &Caller) -> Result<AccountView, ApiError> {
        let account = self.store.get_account(&caller.account).await?;
        Ok(self.view(caller.account.clone(), account))
    }

    /// Puts `account` on `tier`; this node's admin rate limits apply the
    /// new tier's rate at once.
    pub async fn set_account_tier(
        &self,
        operator: Operator<'_>,
        account: AccountId,
        tier: Tier,
    ) -> Result<AccountView, ApiError> {
        let caller = operator.0;
        let updated = self
            .store
            .set_tier(&account, tier, &caller.actor, caller.now())
            .await?;
        self.rate_limits.tier_set(&account, updated.tier);
        tracing::info!(account = %account, tier = %tier, actor = %caller.actor.name, "account tier set");
        Ok(self.view(account, updated))
    }

    /// Sets the scope patterns `account`'s keys may be granted; `None`:
    /// the server's.
    pub async fn set_account_scopes(
        &self,
        operator: Operator<'_>,
        account: AccountId,
        grantable: Option<ScopeCatalogue>,
    ) -> Result<AccountView, ApiError> {
        let caller = operator.0;
        let updated = self
            .store
            .set_grantable_scopes(&account, grantable.as_ref(), &caller.actor, caller.now())
            .await?;
        tracing::info!(account = %account, grantable_scopes = %grantable.as_ref().map_or_else(|| "server default".to_owned(), ToString::to_string), actor = %caller.actor.name, "account grantable scopes set");
        Ok(self.view(account, updated))
    }

    fn view(&self, account_id: AccountId, account: Account) -> AccountView {
        AccountView {
            active_key_limit: self.policy.tiers.for_tier(account.tier),
            grantable_default: account.grantable.is_none(),
            grantable: account
                .grantable
                .unwrap_or_else(|| self.policy.grantable.clone()),
            tier: account.tier,
            account_id,
        }
    }
}
