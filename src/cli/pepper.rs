//! `vilvik-keys pepper status` and `vilvik-keys pepper new PATH`: the
//! operator's side of rotating the pepper (docs/SECURITY.md). Like
//! `bootstrap`, `status` opens the store directly with the service's
//! settings (it must exist), and names it on stderr; it makes no pepper
//! file and writes nothing, though it applies migrations the store lacks,
//! as every command that opens the store does.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::{Value, json};
use vilvik_keys_domain::PepperId;
use vilvik_keys_store::PepperUse;

use super::output;
use crate::config::Config;
use crate::pepper;
use crate::startup::{open_existing_store, store_description};

#[derive(Debug, clap::Subcommand)]
pub enum PepperCommand {
    /// How many keys each pepper still covers: whether an older pepper can be retired.
    Status {
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
        #[arg(long, env = "VILVIK_KEYS_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Write a new pepper to PATH (mode 0600), for a rotation; refuses to overwrite.
    New {
        /// Where to write it; must not exist.
        path: PathBuf,
    },
}

/// What a pepper id is to this configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// `pepper_file`: new keys, rotations and re-hashes use it.
    Current,
    /// In `pepper_files`: its keys verify and move to the current one.
    Older,
    /// No pepper: hashes from before peppers, moved when they verify.
    Legacy,
    /// Not configured: its keys answer NOT_FOUND.
    Unknown,
}

impl Role {
    fn word(self) -> &'static str {
        match self {
            Role::Current => "current",
            Role::Older => "older",
            Role::Legacy => "legacy",
            Role::Unknown => "unknown",
        }
    }
}

/// One line of the status.
#[derive(Debug)]
struct Line {
    pepper_id: Option<PepperId>,
    role: Role,
    file: Option<PathBuf>,
    live: u64,
    total: u64,
}

/// The status lines: every configured pepper (with its counts, zero when
/// it covers nothing), then the legacy hashes and the unknown ids the
/// store holds.
fn lines(configured: &pepper::Configured, uses: &[PepperUse]) -> Vec<Line> {
    let counts = |id: Option<PepperId>| {
        uses.iter()
            .find(|u| u.pepper_id == id)
            .map_or((0, 0), |u| (u.live, u.total))
    };
    let mut lines = Vec::new();
    let mut known = Vec::new();
    let configured_peppers = configured
        .current
        .iter()
        .map(|c| (c, Role::Current))
        .chain(configured.older.iter().map(|o| (o, Role::Older)));
    for ((file, pepper), role) in configured_peppers {
        let (live, total) = counts(Some(pepper.id()));
        known.push(Some(pepper.id()));
        lines.push(Line {
            pepper_id: Some(pepper.id()),
            role,
            file: Some(file.clone()),
            live,
            total,
        });
    }
    let mut rest: Vec<&PepperUse> = uses
        .iter()
        .filter(|u| !known.contains(&u.pepper_id))
        .collect();
    rest.sort_by_key(|u| u.pepper_id);
    for u in rest {
        lines.push(Line {
            pepper_id: u.pepper_id,
            role: if u.pepper_id.is_none() {
                Role::Legacy
            } else {
                Role::Unknown
            },
            file: None,
            live: u.live,
            total: u.total,
        });
    }
    lines
}

/// What to do about each line, in words.
fn advice(lines: &[Line], current_file: &Path, has_current: bool) -> Vec<String> {
    let mut advice = Vec::new();
    if !has_current {
        advice.push(format!(
            "no pepper file at {} yet: the service generates it at its first start",
            current_file.display()
        ));
    }
    for line in lines {
        let id = line
            .pepper_id
            .map_or_else(|| "(unkeyed)".to_owned(), |id| id.to_string());
        match (line.role, line.live) {
            (Role::Current, _) => {}
            (Role::Older, 0) => advice.push(format!(
                "older pepper {id} covers no live key: it can be retired (remove it from pepper_files \
                 on every node; secrets of revoked or rotated keys under it then answer NOT_FOUND)"
            )),
            (Role::Older, n) => advice.push(format!(
                "older pepper {id} still covers {n} live key(s): keep it until they have verified \
                 once (each then moves to the current pepper), or revoke them"
            )),
            (Role::Legacy, 0) => {}
            (Role::Legacy, n) => advice.push(format!(
                "{n} live key(s) still have a legacy unkeyed hash: each moves to the current pepper \
                 the first time it verifies"
            )),
            (Role::Unknown, 0) => {}
            (Role::Unknown, n) => advice.push(format!(
                "{n} live key(s) are hashed with pepper {id}, which is not configured: they answer \
                 NOT_FOUND until its file is listed in pepper_files again"
            )),
        }
    }
    advice
}

/// The `pepper status` command.
pub async fn pepper_status(config: &Config, json: bool) -> anyhow::Result<()> {
    let configured = pepper::configured(config)?;
    let store = open_existing_store(config).await?;
    eprintln!("store: {}", store_description(config));
    let uses = store
        .secrets_by_pepper()
        .await
        .context("cannot count the secrets per pepper")?;
    let lines = lines(&configured, &uses);
    let advice = advice(
        &lines,
        &configured.current_file,
        configured.current.is_some(),
    );
    if json {
        let peppers: Vec<Value> = lines
            .iter()
            .map(|line| {
                json!({
                    "pepper_id": line.pepper_id.map(|id| id.to_string()),
                    "role": line.role.word(),
                    "file": line.file.as_ref().map(|f| f.display().to_string()),
                    "live_keys": line.live,
                    "all_secrets": line.total,
                })
            })
            .collect();
        print!(
            "{}",
            output::json_text(&json!({ "peppers": peppers, "advice": advice }))
        );
        return Ok(());
    }
    let rows: Vec<Vec<String>> = lines
        .iter()
        .map(|line| {
            vec![
                line.pepper_id
                    .map_or_else(|| "(unkeyed)".to_owned(), |id| id.to_string()),
                line.role.word().to_owned(),
                line.live.to_string(),
                line.total.to_string(),
                line.file.as_ref().map_or_else(
                    || "-".to_owned(),
                    |f| output::printable(&f.display().to_string()),
                ),
            ]
        })
        .collect();
    print!(
        "{}",
        output::table(
            &["PEPPER", "ROLE", "LIVE KEYS", "ALL SECRETS", "FILE"],
            &rows
        )
    );
    for line in advice {
        println!("{line}");
    }
    Ok(())
}

/// The `pepper new PATH` command: the new pepper's id on stdout, what to
/// do with it on stderr.
pub fn pepper_new(path: &Path) -> anyhow::Result<()> {
    let pepper = pepper::create(path)?;
    eprintln!(
        "Wrote a new pepper (id {}) to {} (mode 0600).\n\
         To rotate: give it to every node as an older pepper first (pepper_files), then as the\n\
         current one (pepper_file, the old one moving to pepper_files); see docs/SECURITY.md.",
        pepper.id(),
        path.display()
    );
    println!("{}", pepper.id());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vilvik_keys_domain::Pepper;

    #[test]
    fn every_configured_pepper_is_listed_then_legacy_and_unknown_ids() {
        let (current, older, gone) = (Pepper::generate(), Pepper::generate(), Pepper::generate());
        let configured = pepper::Configured {
            current: Some((PathBuf::from("b.pepper"), current.clone())),
            current_file: PathBuf::from("b.pepper"),
            older: vec![(PathBuf::from("a.pepper"), older.clone())],
        };
        let uses = [
            PepperUse {
                pepper_id: Some(gone.id()),
                live: 1,
                total: 2,
            },
            PepperUse {
                pepper_id: None,
                live: 3,
                total: 3,
            },
            PepperUse {
                pepper_id: Some(current.id()),
                live: 5,
                total: 6,
            },
        ];
        let lines = lines(&configured, &uses);
        let shown: Vec<(Option<PepperId>, Role, u64, u64)> = lines
            .iter()
            .map(|l| (l.pepper_id, l.role, l.live, l.total))
            .collect();
        assert_eq!(
            shown,
            [
                (Some(current.id()), Role::Current, 5, 6),
                (Some(older.id()), Role::Older, 0, 0),
                (None, Role::Legacy, 3, 3),
                (Some(gone.id()), Role::Unknown, 1, 2),
            ]
        );
        let advice = advice(&lines, Path::new("b.pepper"), true).join("\n");
        assert!(advice.contains(&format!("older pepper {} covers no live key", older.id())));
        assert!(advice.contains("3 live key(s) still have a legacy unkeyed hash"));
        assert!(advice.contains(&format!("hashed with pepper {}", gone.id())));
    }
}
