//! `vilvik-keys audit verify [--account A]`: checks every account's audit
//! hash chain, and every stored key and account against what its events
//! say (docs/SECURITY.md). Like `bootstrap` it opens the configured store
//! directly, which must exist (applying pending migrations first, as every
//! command that opens the store does), and changes nothing else. Rows are
//! streamed in (account, event number) order, never all in memory. An
//! empty store, or an account without events or keys, is an error (exit 1):
//! there was nothing to check.

use std::path::PathBuf;

use anyhow::Context;
use vilvik_keys_domain::AccountId;
use vilvik_keys_store::{AuditCheck, ChainSummary};

use crate::config::Config;
use crate::startup::{open_existing_store, store_description};

/// Rows handed over per batch.
const BATCH: usize = 1_000;

#[derive(Debug, clap::Subcommand)]
pub enum AuditCommand {
    /// Check that every account's audit events are intact and that every stored key and account is what its events say (exit 0), or name what was tampered with (exit 4).
    Verify {
        /// Check only this account.
        #[arg(long)]
        account: Option<String>,
        #[arg(long, env = "VILVIK_KEYS_CONFIG")]
        config: Option<PathBuf>,
    },
}

/// The audit log was tampered with: `audit verify` exits with
/// [`Tampered::EXIT_CODE`].
#[derive(Debug, thiserror::Error)]
#[error("the audit log was tampered with:\n{}", lines.join("\n"))]
pub struct Tampered {
    /// What was found, a line each.
    pub lines: Vec<String>,
}

impl Tampered {
    /// Distinct from 1 (could not check: configuration, database).
    pub const EXIT_CODE: u8 = 4;
}

/// Checks the chains and every stored key and account against its events,
/// and prints what was checked; anything found is a [`Tampered`] error.
pub async fn audit_verify(config: &Config, account: Option<&str>) -> anyhow::Result<()> {
    let account = account
        .map(AccountId::from_caller)
        .transpose()
        .context("--account")?;
    let store = open_existing_store(config).await?;
    let shown = store_description(config);
    eprintln!("store: {shown}");
    let mut check = AuditCheck::new();
    store
        .stream_audit_chain(account.as_ref(), BATCH, &mut |rows| {
            rows.into_iter().for_each(|row| check.push(row))
        })
        .await
        .context("cannot read the audit log")?;
    let report = check.finish();
    if let (true, Ok(ChainSummary { accounts, events })) = (report.intact(), &report.chain) {
        let (accounts, events) = (*accounts, *events);
        if accounts == 0 {
            // Nothing to check is not "intact": most likely the wrong store
            // or a mistyped account (ids are case-sensitive).
            match &account {
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
                        "account '{a}' has no audit events and no keys in the {shown}: no such \
                         account (account ids are case-sensitive{hint}), or not the service's store"
                    )
                }
                None => anyhow::bail!(
                    "the {shown} holds no audit events and no keys: nothing to check. Is it the \
                     service's store? Point this command at it with the service's settings \
                     (sqlite_path or DATABASE_URL)"
                ),
            }
        }
        let checked = format!(
            "{} and {} checked",
            count(events, "event"),
            count(report.keys, "key")
        );
        let scope = match &account {
            Some(a) => format!("account '{a}': {checked}"),
            None => format!("{}, {checked}", count(accounts, "account")),
        };
        println!("audit log intact: {scope}");
        return Ok(());
    }
    let mut lines = Vec::new();
    if let Err(link) = &report.chain {
        lines.push(format!("{link}"));
    }
    lines.extend(report.differences.iter().map(ToString::to_string));
    let more = report.found - report.differences.len() as u64;
    if more > 0 {
        lines.push(format!("and {} more", count(more, "difference")));
    }
    Err(Tampered { lines }.into())
}

fn count(n: u64, what: &str) -> String {
    match n {
        1 => format!("1 {what}"),
        n => format!("{n} {what}s"),
    }
}
