//! `accounts …`: show the calling account, and (with the operator token)
//! set an account's tier or grantable scopes, through the admin API.

use super::args::{AccountsCommand, ClientArgs};
use super::errors::api_error;
use super::output::{self, emit};
use super::transport::connect;
use crate::proto;

/// Runs one `accounts` command against the admin API `client` names and
/// prints the account: a block, or JSON with `--json`.
pub async fn run_accounts(mut client: ClientArgs, command: AccountsCommand) -> anyhow::Result<()> {
    let json = client.json;
    if let AccountsCommand::SetTier { account, .. } | AccountsCommand::SetScopes { account, .. } =
        &command
    {
        // The operator token acts on the account it names in x-vilvik-account.
        client.account.get_or_insert_with(|| account.clone());
    }
    let mut api = connect(&client).await?;
    let (account, headline) = match command {
        AccountsCommand::Show => {
            let account = api
                .get_account(proto::GetAccountRequest {})
                .await
                .map_err(api_error)?
                .into_inner();
            (account, None)
        }
        AccountsCommand::SetTier { account, tier } => {
            let account = api
                .set_account_tier(proto::SetAccountTierRequest {
                    account_id: account,
                    tier: proto::Tier::from(tier).into(),
                })
                .await
                .map_err(api_error)?
                .into_inner();
            let headline = format!(
                "Account {} is now on the {} tier.\n\n",
                output::printable(&account.account_id),
                output::tier(account.tier)
            );
            (account, Some(headline))
        }
        AccountsCommand::SetScopes {
            account,
            patterns,
            default,
        } => {
            let account = api
                .set_account_scopes(proto::SetAccountScopesRequest {
                    account_id: account,
                    grantable_scopes: patterns,
                    use_server_default: default,
                })
                .await
                .map_err(api_error)?
                .into_inner();
            let headline = format!(
                "Account {}'s keys may now be granted the scopes below.\n\n",
                output::printable(&account.account_id)
            );
            (account, Some(headline))
        }
    };
    if json {
        emit(&output::json_text(&output::account_json(&account)))
    } else {
        emit(&format!(
            "{}{}",
            headline.unwrap_or_default(),
            output::account_block(&account)
        ))
    }
}
