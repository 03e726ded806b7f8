//! `vilvik-keys bootstrap --account ACME`: the first management key of an
//! account, made directly in the store because nothing can call the admin
//! API before it exists.

use std::sync::Arc;

use anyhow::Context;
use vilvik_keys_domain::{
    ADMIN_SCOPE, AccountId, Clock, GeneratedKey, KeyId, KeyName, KeyState, Pepper, ScopeSet,
    SystemClock,
};
use vilvik_keys_store::{Actor, KeyRecord, NewKey, Policy, Store, StoreError};

use super::output;
use crate::config::Config;
use crate::startup::{open_existing_store, store_description};

/// The audit actor of keys made by `bootstrap`: someone with shell access
/// to the service's configuration.
pub const BOOTSTRAP_ACTOR: &str = "bootstrap";

/// Creates a management key (scope `keys:admin`) for `account`, hashed
/// with `pepper` (the current one), counted against its tier like any
/// other key.
pub async fn create_management_key(
    store: &Arc<dyn Store>,
    pepper: &Pepper,
    account: &AccountId,
    name: KeyName,
    policy: &Policy,
) -> anyhow::Result<(KeyRecord, GeneratedKey)> {
    let secret = GeneratedKey::generate(pepper);
    let new = NewKey {
        key_id: KeyId::generate(),
        account_id: account.clone(),
        name,
        description: "created by vilvik-keys bootstrap"
            .parse()
            .expect("a valid description"),
        scopes: ScopeSet::parse(&[ADMIN_SCOPE]).expect("the admin scope is valid"),
        expires_at: None,
        prefix: secret.prefix().clone(),
        hash: secret.hash(),
        pepper_id: secret.pepper_id(),
        created_at: SystemClock.now(),
    };
    let actor = Actor {
        name: BOOTSTRAP_ACTOR.to_owned(),
        ip: None,
        // Whoever can run bootstrap holds the store itself.
        operator: true,
    };
    match store.create_key(new, &actor, policy).await {
        Ok(record) => Ok((record, secret)),
        Err(StoreError::QuotaExceeded { tier, limit, .. }) => anyhow::bail!(
            "account {account} already holds {limit} active keys, the {tier} tier's limit: revoke one first"
        ),
        Err(e) => Err(e).context("cannot create the management key"),
    }
}

/// What `bootstrap` was asked for.
#[derive(Debug)]
pub struct BootstrapArgs<'a> {
    pub account: &'a str,
    pub name: &'a str,
    /// Mint one more management key for an account that has one.
    pub another: bool,
    /// Print `{account_id, key_id, secret, store}` as JSON.
    pub json: bool,
}

/// The `bootstrap` command: prints the secret alone on stdout (so that
/// `TOKEN=$(vilvik-keys bootstrap …)` works), or one JSON object with
/// `--json`, and the store, the account and the explanation on stderr.
///
/// It opens only an existing store, and refuses an account that already
/// has an active management key (unless `--another`) or whose id differs
/// from a stored account's only by case: a script that runs it on every
/// deploy must not pile up admin keys, nor split one account in two. Both
/// are checked before the key is made, not in its transaction: two
/// bootstraps of one account at the same instant may both pass.
pub async fn bootstrap(config: &Config, args: BootstrapArgs<'_>) -> anyhow::Result<()> {
    let account = AccountId::from_caller(args.account).context("--account")?;
    let name = args.name.parse().context("--name")?;
    let store = open_existing_store(config).await?;
    let shown = store_description(config);
    eprintln!("store: {shown}");
    let others = store
        .accounts_differing_in_case(&account)
        .await
        .context("cannot look for accounts whose id differs only by case")?;
    if let Some(other) = others.first() {
        anyhow::bail!(
            "account '{account}' differs from the existing account '{other}' only by case: account \
             ids are case-sensitive, so this would make a second account. Use --account {other}"
        );
    }
    if !args.another
        && let Some(key) = active_management_key(store.as_ref(), &account).await?
    {
        anyhow::bail!(
            "account '{account}' already has an active management key ({} \"{}\", {}): nothing made. \
             Pass --another to mint one more on purpose",
            key.key_id,
            key.name,
            key.prefix
        );
    }
    let peppers = crate::pepper::load(config, store.as_ref()).await?;
    let (record, secret) =
        create_management_key(&store, peppers.current(), &account, name, &config.policy()).await?;
    // Running nodes learn a new prefix from the change feed, not from this
    // process; until then they answer NOT_FOUND for it. Printing the secret
    // only after two polls' time (a millisecond or so suffices on
    // Postgres) means a script that uses it at once is not refused.
    tokio::time::sleep(feed_delay(config)).await;
    eprintln!(
        "Created management key {} ({}) for account {account} with scope {ADMIN_SCOPE}.\n\
         This is the only time its secret is shown: store it in your secret manager,\n\
         and export it as VILVIK_KEYS_TOKEN for the CLI.",
        record.key_id, record.prefix
    );
    if args.json {
        print!(
            "{}",
            output::json_text(&serde_json::json!({
                "account_id": account.as_str(),
                "key_id": record.key_id.as_str(),
                "secret": secret.expose_secret(),
                "store": shown,
            }))
        );
    } else {
        println!("{}", secret.expose_secret());
    }
    Ok(())
}

/// One of the account's active (not revoked, not expired) keys that holds
/// `keys:admin`, if any.
async fn active_management_key(
    store: &dyn Store,
    account: &AccountId,
) -> anyhow::Result<Option<KeyRecord>> {
    let now = SystemClock.now();
    let mut after = None;
    loop {
        let page = store
            .list_keys(account, false, after, PAGE)
            .await
            .context("cannot list the account's keys")?;
        if let Some(key) = page
            .items
            .into_iter()
            .find(|k| k.scopes.is_management() && k.state(now) == KeyState::Active)
        {
            return Ok(Some(key));
        }
        match page.next_cursor {
            Some(next) => after = Some(next),
            None => return Ok(None),
        }
    }
}

/// Keys read per page while looking for a management key.
const PAGE: u32 = 100;

/// How long nodes on this store may take to learn a new prefix: two polls
/// of SQLite, or a generous allowance for a Postgres notification.
fn feed_delay(config: &Config) -> std::time::Duration {
    match config.database_url() {
        Some(_) => std::time::Duration::from_millis(50),
        None => 2 * config.change_poll_interval,
    }
}
