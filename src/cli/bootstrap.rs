//! `vilvik-keys bootstrap --account ACME`: the first management key of an
//! account, made directly in the store because nothing can call the admin
//! API before it exists.

use std::sync::Arc;

use anyhow::Context;
use vilvik_keys_domain::{
    ADMIN_SCOPE, AccountId, Clock, GeneratedKey, KeyId, KeyName, Pepper, ScopeSet, SystemClock,
};
use vilvik_keys_store::{Actor, KeyRecord, NewKey, Policy, Store, StoreError};

use crate::config::Config;
use crate::startup::open_store;

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

/// The `bootstrap` command: prints the secret alone on stdout (so that
/// `TOKEN=$(vilvik-keys bootstrap …)` works) and the explanation on stderr.
pub async fn bootstrap(config: &Config, account: &str, name: &str) -> anyhow::Result<()> {
    let account = AccountId::from_caller(account).context("--account")?;
    let name = name.parse().context("--name")?;
    let store = open_store(config).await?;
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
    println!("{}", secret.expose_secret());
    Ok(())
}

/// How long nodes on this store may take to learn a new prefix: two polls
/// of SQLite, or a generous allowance for a Postgres notification.
fn feed_delay(config: &Config) -> std::time::Duration {
    match config.database_url() {
        Some(_) => std::time::Duration::from_millis(50),
        None => 2 * config.change_poll_interval,
    }
}
