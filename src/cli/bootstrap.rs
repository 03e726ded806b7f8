//! `vilvik-keys bootstrap --account ACME`: the first management key of an
//! account, made directly in the store because nothing can call the admin
//! API before it exists.

use anyhow::Context;
use vilvik_keys_domain::{ADMIN_SCOPE, AccountId, Clock, GeneratedKey, KeyId, ScopeSet, SystemClock};
use vilvik_keys_store::{Actor, NewKey, StoreError};

use crate::config::Config;
use crate::startup::open_store;

pub async fn bootstrap(config: &Config, account: &str, name: &str) -> anyhow::Result<()> {
    let account: AccountId = account.parse().context("--account")?;
    let name = name.parse().context("--name")?;
    let store = open_store(config).await?;
    let secret = GeneratedKey::generate();
    let new = NewKey {
        key_id: KeyId::generate(),
        account_id: account.clone(),
        name,
        description: "created by vilvik-keys bootstrap".parse().expect("a valid description"),
        scopes: ScopeSet::parse(&[ADMIN_SCOPE]).expect("the admin scope is valid"),
        expires_at: None,
        prefix: secret.prefix().clone(),
        hash: secret.hash(),
        created_at: SystemClock.now(),
    };
    let actor = Actor {
        name: "bootstrap".to_owned(),
        ip: None,
    };
    let record = match store.create_key(new, &actor, config.tier_limits).await {
        Ok(record) => record,
        Err(StoreError::QuotaExceeded { tier, limit, .. }) => anyhow::bail!(
            "account {account} already holds {limit} active keys, the {tier} tier's limit: revoke one first"
        ),
        Err(e) => return Err(e).context("cannot create the management key"),
    };
    eprintln!(
        "Created management key {} ({}) for account {account} with scope {ADMIN_SCOPE}.\n\
         This is the only time its secret is shown. Store it in your secret manager, then:\n",
        record.key_id, record.prefix
    );
    eprintln!("  export VILVIK_KEYS_TOKEN=<the secret below>\n");
    println!("{}", secret.expose_secret());
    Ok(())
}
