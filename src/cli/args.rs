//! The arguments of `keys …` and `accounts …` (clap): where the admin API
//! is, how to reach it over TLS, and each command's flags, with the value
//! parsers for times and durations.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::proto;

/// Where the admin API is and how to talk to it. The credential is read
/// from `VILVIK_KEYS_TOKEN` only.
#[derive(Debug, Args)]
#[command(next_help_heading = "Connection")]
pub struct ClientArgs {
    /// The admin API's address, e.g. http://127.0.0.1:50051, host:port, or https://host:port for TLS.
    #[arg(
        long,
        env = "VILVIK_KEYS_ADDR",
        default_value = crate::config::CLI_DEFAULT_ADDR,
        global = true
    )]
    pub addr: String,
    /// Print machine-readable JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    /// The account to act on (sent as x-vilvik-account; needed with the operator token).
    #[arg(long, env = "VILVIK_KEYS_ACCOUNT", global = true)]
    pub account: Option<String>,
    /// The person acting, for the audit log (sent as x-vilvik-actor; needed with the operator token).
    #[arg(long, env = "VILVIK_KEYS_ACTOR", global = true)]
    pub actor: Option<String>,
    #[command(flatten)]
    pub tls: ClientTlsArgs,
}

/// TLS to the admin API, for an `https://` address.
#[derive(Debug, Args)]
pub struct ClientTlsArgs {
    /// The CA (PEM) the admin API's certificate must be signed by (default: the system's CAs).
    #[arg(long, env = "VILVIK_KEYS_CA_FILE", global = true)]
    pub ca_file: Option<PathBuf>,
    /// A client certificate (PEM), for an admin API that demands one (mutual TLS).
    #[arg(
        long,
        env = "VILVIK_KEYS_CLIENT_CERT_FILE",
        global = true,
        requires = "client_key_file"
    )]
    pub client_cert_file: Option<PathBuf>,
    /// The private key (PEM) of --client-cert-file.
    #[arg(
        long,
        env = "VILVIK_KEYS_CLIENT_KEY_FILE",
        global = true,
        requires = "client_cert_file"
    )]
    pub client_key_file: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key and print its secret: the only time it is ever shown.
    Create(CreateArgs),
    /// List the account's keys (every page).
    List {
        /// Include revoked keys.
        #[arg(long)]
        include_revoked: bool,
        /// Keys fetched per request, 1 to 100 (default: the server's, 50).
        #[arg(long, value_parser = clap::value_parser!(i32).range(1..=100))]
        page_size: Option<i32>,
    },
    /// Show one key.
    Show {
        /// The key's id, as printed by `keys create` or `keys list`.
        key_id: String,
    },
    /// Change a key's name, description, scopes or expiry.
    Update(UpdateArgs),
    /// Issue a new secret (and prefix); the old secret stops working at once.
    Rotate {
        /// The key's id.
        key_id: String,
        /// The request id to send, a UUID (default: a new one). To retry a
        /// rotation whose outcome is unknown, give the id it printed.
        #[arg(long)]
        request_id: Option<String>,
        /// Rotate only if the key's etag (`keys show`) is still this.
        #[arg(long)]
        etag: Option<String>,
    },
    /// Disable a key for good.
    Revoke {
        /// The key's id.
        key_id: String,
        /// Why, for the audit log (at most 500 characters).
        #[arg(long)]
        reason: Option<String>,
        /// Revoke only if the key's etag (`keys show`) is still this.
        #[arg(long)]
        etag: Option<String>,
    },
    /// Show the audit log of one key, or of the whole account (every page).
    Audit {
        /// The key's id; without it, every event of the account.
        key_id: Option<String>,
        /// Events fetched per request, 1 to 100 (default: the server's, 50).
        #[arg(long, value_parser = clap::value_parser!(i32).range(1..=100))]
        page_size: Option<i32>,
    },
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// A name for the key, 1 to 64 characters, e.g. ci-runner.
    #[arg(long)]
    pub name: String,
    /// What the key is for.
    #[arg(long)]
    pub description: Option<String>,
    /// A scope to grant, resource:action (e.g. datasets:read); repeat for more.
    #[arg(long = "scope", value_name = "SCOPE")]
    pub scopes: Vec<String>,
    /// When the key expires, RFC 3339 (e.g. 2030-01-31T00:00:00Z).
    #[arg(long, value_parser = parse_rfc3339, conflicts_with = "expires_in")]
    pub expires_at: Option<OffsetDateTime>,
    /// How long the key lives from now, e.g. 30d, 12h, 90m.
    #[arg(long, value_parser = parse_duration)]
    pub expires_in: Option<Duration>,
    /// The request id to send, a UUID (default: a new one). To retry a
    /// create whose outcome is unknown, give the id it printed: within 24
    /// hours that returns the same key and secret instead of a second key.
    #[arg(long)]
    pub request_id: Option<String>,
}

#[derive(Debug, Args)]
pub struct UpdateArgs {
    /// The key's id.
    pub key_id: String,
    /// A new name.
    #[arg(long)]
    pub name: Option<String>,
    /// A new description ("" clears it).
    #[arg(long)]
    pub description: Option<String>,
    /// The new scopes, replacing all current ones; repeat for more.
    #[arg(long = "scope", value_name = "SCOPE", conflicts_with = "clear_scopes")]
    pub scopes: Vec<String>,
    /// Remove every scope.
    #[arg(long)]
    pub clear_scopes: bool,
    /// A new expiry, RFC 3339.
    #[arg(long, value_parser = parse_rfc3339, conflicts_with_all = ["expires_in", "no_expiry"])]
    pub expires_at: Option<OffsetDateTime>,
    /// A new expiry, this long from now, e.g. 30d, 12h, 90m.
    #[arg(long, value_parser = parse_duration, conflicts_with = "no_expiry")]
    pub expires_in: Option<Duration>,
    /// Remove the expiry: the key stays valid until revoked.
    #[arg(long)]
    pub no_expiry: bool,
    /// Update only if the key's etag (`keys show`) is still this (default:
    /// the etag the key has when this command reads it first).
    #[arg(long)]
    pub etag: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum AccountsCommand {
    /// Show the calling account's tier and active key limit.
    Show,
    /// Change an account's tier (operator token and --actor needed; --account
    /// defaults to ACCOUNT).
    SetTier {
        /// The account, e.g. ACME.
        #[arg(id = "target_account", value_name = "ACCOUNT")]
        account: String,
        /// The new tier.
        tier: TierArg,
    },
    /// Set which scopes the account's keys may be granted, as patterns such
    /// as `datasets:*` or `reports:read` (operator token and --actor
    /// needed). With --default, use the server's `allowed_scopes` again.
    SetScopes {
        /// The account, e.g. ACME.
        #[arg(id = "target_account", value_name = "ACCOUNT")]
        account: String,
        /// Scope patterns: resource:action, either part may be `*`.
        #[arg(
            value_name = "PATTERN",
            required_unless_present = "default",
            conflicts_with = "default"
        )]
        patterns: Vec<String>,
        /// Drop the account's own patterns and use the server's.
        #[arg(long)]
        default: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TierArg {
    Free,
    Premium,
}

impl From<TierArg> for proto::Tier {
    fn from(tier: TierArg) -> Self {
        match tier {
            TierArg::Free => proto::Tier::Free,
            TierArg::Premium => proto::Tier::Premium,
        }
    }
}

fn parse_rfc3339(text: &str) -> Result<OffsetDateTime, String> {
    OffsetDateTime::parse(text, &Rfc3339)
        .map_err(|e| format!("'{text}' is not an RFC 3339 time such as 2030-01-31T00:00:00Z ({e})"))
}

/// A duration such as `30d`, `12h`, `90m`, `45s`, `2w`, or a sum like `1d12h`.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let invalid = || {
        format!(
            "'{text}' is not a duration: use a number and a unit, e.g. 30d, 12h or 90m (units: s, m, h, d, w)"
        )
    };
    let mut total: u64 = 0;
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err(invalid());
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(invalid());
        }
        let number: u64 = rest[..digits].parse().map_err(|_| invalid())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let seconds_per_unit = match &rest[..unit_len] {
            "s" => 1,
            "m" => 60,
            "h" => 60 * 60,
            "d" => 24 * 60 * 60,
            "w" => 7 * 24 * 60 * 60,
            _ => return Err(invalid()),
        };
        rest = &rest[unit_len..];
        total = number
            .checked_mul(seconds_per_unit)
            .and_then(|s| total.checked_add(s))
            .ok_or_else(|| format!("'{text}' is too long a duration"))?;
    }
    if total == 0 {
        return Err(format!("'{text}' is zero: an expiry must be in the future"));
    }
    Ok(Duration::from_secs(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_a_number_and_a_unit() {
        assert_eq!(parse_duration("30d"), Ok(Duration::from_secs(30 * 86_400)));
        assert_eq!(parse_duration("12h"), Ok(Duration::from_secs(12 * 3_600)));
        assert_eq!(parse_duration("90m"), Ok(Duration::from_secs(90 * 60)));
        assert_eq!(parse_duration("45s"), Ok(Duration::from_secs(45)));
        assert_eq!(parse_duration("2w"), Ok(Duration::from_secs(14 * 86_400)));
        assert_eq!(parse_duration("1d12h"), Ok(Duration::from_secs(36 * 3_600)));
    }

    #[test]
    fn durations_reject_what_they_cannot_read() {
        for bad in [
            "", "30", "d", "30x", "1.5d", "-1d", "30 d", "1d2", "h12", "30D",
        ] {
            let err = parse_duration(bad).unwrap_err();
            assert!(err.contains("not a duration"), "{bad:?}: {err}");
        }
        assert!(parse_duration("0d").unwrap_err().contains("zero"));
        assert!(parse_duration("99999999999999999999d").is_err());
        assert!(
            parse_duration("9999999999999999w")
                .unwrap_err()
                .contains("too long")
        );
    }

    #[test]
    fn the_cli_definition_is_consistent() {
        use clap::CommandFactory;
        #[derive(Debug, clap::Parser)]
        struct Cli {
            #[command(flatten)]
            client: ClientArgs,
            #[command(subcommand)]
            command: KeysCommand,
        }
        Cli::command().debug_assert();
    }
}
