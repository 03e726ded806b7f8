//! `vilvik-keys audit verify [--account A]`: checks every account's audit
//! hash chain (docs/SECURITY.md). Like `bootstrap` it opens the configured
//! store directly, which must exist (applying pending migrations first, as
//! every command that opens the store does), and changes nothing else. Rows
//! are streamed in (account, event number) order, never all in memory. An
//! empty store, or an account without events, is an error (exit 1): there
//! was nothing to check.

use std::path::PathBuf;

use anyhow::Context;
use vilvik_keys_domain::AccountId;
use vilvik_keys_store::{BrokenLink, ChainCheck, ChainSummary};

use crate::config::Config;
use crate::startup::{open_existing_store, store_description};

/// Rows handed over per batch.
const BATCH: usize = 1_000;

#[derive(Debug, clap::Subcommand)]
pub enum AuditCommand {
    /// Check that every account's audit events are intact (exit 0), or name the first broken link (exit 4).
    Verify {
        /// Check only this account.
        #[arg(long)]
        account: Option<String>,
        #[arg(long, env = "VILVIK_KEYS_CONFIG")]
        config: Option<PathBuf>,
    },
}

/// A chain is broken: `audit verify` exits with [`ChainBroken::EXIT_CODE`].
#[derive(Debug, thiserror::Error)]
#[error("the audit log was tampered with: {link} ({checked} events checked up to it)")]
pub struct ChainBroken {
    pub link: BrokenLink,
    pub checked: u64,
}

impl ChainBroken {
    /// Distinct from 1 (could not check: configuration, database).
    pub const EXIT_CODE: u8 = 4;
}

/// Checks the chains and prints what was checked; a broken chain is a
/// [`ChainBroken`] error.
pub async fn audit_verify(config: &Config, account: Option<&str>) -> anyhow::Result<()> {
    let account = account
        .map(AccountId::from_caller)
        .transpose()
        .context("--account")?;
    let store = open_existing_store(config).await?;
    let shown = store_description(config);
    eprintln!("store: {shown}");
    let mut check = ChainCheck::new();
    let mut events = 0_u64;
    store
        .stream_audit_chain(account.as_ref(), BATCH, &mut |rows| {
            for row in rows {
                if check.broken().is_none()
                    && matches!(row, vilvik_keys_store::AuditChainRow::Event(_))
                {
                    events += 1;
                }
                check.push(row);
            }
        })
        .await
        .context("cannot read the audit log")?;
    match check.finish() {
        // Nothing to check is not "intact": most likely the wrong store or
        // a mistyped account (ids are case-sensitive).
        Ok(ChainSummary { accounts: 0, .. }) => match &account {
            Some(a) => {
                let like = store
                    .accounts_differing_in_case(a)
                    .await
                    .unwrap_or_default();
                let hint = match like.first() {
                    Some(other) => format!(" (did you mean '{other}'?)"),
                    None => String::new(),
                };
                anyhow::bail!(
                    "account '{a}' has no audit events in the {shown}: no such account (account \
                     ids are case-sensitive{hint}), or not the service's store"
                )
            }
            None => anyhow::bail!(
                "the {shown} holds no audit events: nothing to check. Is it the service's store? \
                 Point this command at it with the service's settings (sqlite_path or DATABASE_URL)"
            ),
        },
        Ok(ChainSummary { accounts, events }) => {
            let scope = match &account {
                Some(a) => format!("account '{a}': {} checked", count(events, "event")),
                None => format!(
                    "{}, {} checked",
                    count(accounts, "account"),
                    count(events, "event")
                ),
            };
            println!("audit log intact: {scope}");
            Ok(())
        }
        Err(link) => Err(ChainBroken {
            link,
            checked: events,
        }
        .into()),
    }
}

fn count(n: u64, what: &str) -> String {
    match n {
        1 => format!("1 {what}"),
        n => format!("{n} {what}s"),
    }
}
