//! How the admin CLI shows API results: aligned tables and key/value blocks
//! for people, `serde_json` values for scripts.
//!
//! prost types do not derive `Serialize`, so the JSON is built by hand here:
//! field names as in the proto, times as RFC 3339 strings (`null` when
//! unset), enums as lowercase words (`active`, `rotated`, `premium`).
//! Nothing in this module ever sees a credential; a key's secret is printed
//! only by `keys create` and `keys rotate`, by their own code.

use std::fmt::Write as _;
use std::io::Write as _;

use anyhow::Context;

use prost_types::Timestamp;
use serde_json::{Value, json};
use vilvik_keys_domain::format_time;

use crate::proto;

/// What an empty cell shows.
const EMPTY: &str = "-";

/// RFC 3339, or `None` for an unset timestamp.
pub fn time_text(ts: Option<&Timestamp>) -> Option<String> {
    ts.map(|ts| match proto::datetime(ts) {
        Some(at) => format_time(at),
        None => format!("(invalid timestamp {}s {}ns)", ts.seconds, ts.nanos),
    })
}

/// `KEY_STATE_ACTIVE` -> `active`: an enum value as a lowercase word.
fn enum_word(name: &str, prefix: &str) -> String {
    name.strip_prefix(prefix)
        .unwrap_or(name)
        .to_ascii_lowercase()
}

pub fn key_state(value: i32) -> String {
    match proto::KeyState::try_from(value) {
        Ok(state) => enum_word(state.as_str_name(), "KEY_STATE_"),
        Err(_) => format!("unknown({value})"),
    }
}

pub fn audit_action(value: i32) -> String {
    match proto::AuditAction::try_from(value) {
        Ok(action) => enum_word(action.as_str_name(), "AUDIT_ACTION_"),
        Err(_) => format!("unknown({value})"),
    }
}

pub fn tier(value: i32) -> String {
    match proto::Tier::try_from(value) {
        Ok(tier) => enum_word(tier.as_str_name(), "TIER_"),
        Err(_) => format!("unknown({value})"),
    }
}

/// Text from the server, made safe to print on a terminal: control
/// characters (escape sequences, newlines) are shown escaped, not obeyed.
pub fn printable(text: &str) -> String {
    if !text.chars().any(char::is_control) {
        return text.to_owned();
    }
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// A table cell: printable text, or `-` when empty.
fn cell(text: &str) -> String {
    if text.is_empty() {
        EMPTY.to_owned()
    } else {
        printable(text)
    }
}

fn opt_cell(text: Option<String>) -> String {
    text.map_or_else(|| EMPTY.to_owned(), |t| cell(&t))
}

/// Columns aligned on the widest cell; the last column is not padded.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, value) in widths.iter_mut().zip(row) {
            *width = (*width).max(value.chars().count());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = headers.iter().map(|h| (*h).to_owned()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, value) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(value);
            } else {
                let pad = widths[i] - value.chars().count();
                line.push_str(value);
                line.push_str(&" ".repeat(pad + 2));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `label  value` lines with the values aligned.
fn block(pairs: &[(&str, String)]) -> String {
    let width = pairs
        .iter()
        .map(|(label, _)| label.len())
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    for (label, value) in pairs {
        let _ = writeln!(out, "{label:<width$}  {value}");
    }
    out
}

pub fn key_block(key: &proto::Key) -> String {
    let mut pairs = vec![
        ("key id", cell(&key.key_id)),
        ("account", cell(&key.account_id)),
        ("name", cell(&key.name)),
        ("description", cell(&key.description)),
        ("scopes", cell(&key.scopes.join(" "))),
        ("prefix", cell(&key.prefix)),
        ("state", key_state(key.state)),
        ("created", opt_cell(time_text(key.created_at.as_ref()))),
        (
            "expires",
            time_text(key.expires_at.as_ref()).unwrap_or_else(|| "never".to_owned()),
        ),
        ("rotated", opt_cell(time_text(key.rotated_at.as_ref()))),
        ("last used", opt_cell(time_text(key.last_used_at.as_ref()))),
        ("used from", seen_from(key)),
        ("claimed ip", cell(&key.last_used_claimed_ip)),
        ("uses", uses(key)),
        ("last refused", last_rejected(key)),
        ("etag", cell(&key.etag)),
    ];
    if key.revoked_at.is_some() {
        pairs.push(("revoked", opt_cell(time_text(key.revoked_at.as_ref()))));
        pairs.push(("revoke reason", cell(&key.revoke_reason)));
    }
    block(&pairs)
}

/// Where the last valid use came from as the service saw it. A key last
/// used before the service told the two apart shows the address it kept,
/// marked: it may be the caller's or the one it claimed.
fn seen_from(key: &proto::Key) -> String {
    match (
        key.last_used_observed_ip.as_str(),
        key.last_used_ip.as_str(),
    ) {
        ("", "") => EMPTY.to_owned(),
        ("", kept) => format!("{} (observed or claimed)", printable(kept)),
        (observed, _) => printable(observed),
    }
}

/// `12 valid, 3 rejected`.
fn uses(key: &proto::Key) -> String {
    format!(
        "{} valid, {} rejected",
        key.valid_use_count, key.rejected_use_count
    )
}

/// When and from where (observed) the key was last refused.
fn last_rejected(key: &proto::Key) -> String {
    match time_text(key.last_rejected_at.as_ref()) {
        None => EMPTY.to_owned(),
        Some(at) if key.last_rejected_ip.is_empty() => at,
        Some(at) => format!("{at} from {}", printable(&key.last_rejected_ip)),
    }
}

pub fn keys_table(keys: &[proto::Key]) -> String {
    let rows: Vec<Vec<String>> = keys
        .iter()
        .map(|key| {
            vec![
                cell(&key.key_id),
                cell(&key.name),
                cell(&key.prefix),
                key_state(key.state),
                cell(&key.scopes.join(",")),
                opt_cell(time_text(key.expires_at.as_ref())),
                opt_cell(time_text(key.last_used_at.as_ref())),
                seen_from(key),
                cell(&key.last_used_claimed_ip),
                key.valid_use_count.to_string(),
                key.rejected_use_count.to_string(),
            ]
        })
        .collect();
    table(
        &[
            "KEY ID",
            "NAME",
            "PREFIX",
            "STATE",
            "SCOPES",
            "EXPIRES",
            "LAST USED",
            "FROM",
            "CLAIMED IP",
            "USES",
            "REJECTED",
        ],
        &rows,
    )
}

/// One change as `field: "old" -> "new"`; `(none)` stands for an unset value.
pub fn render_change(change: &proto::FieldChange) -> String {
    let value = |v: &Option<String>| {
        v.as_deref()
            .map_or_else(|| "(none)".to_owned(), |v| format!("{v:?}"))
    };
    let field = printable(&change.field);
    match (&change.old_value, &change.new_value) {
        (None, None) => format!("{field}: (none)"),
        (None, new) => format!("{field}: {}", value(new)),
        (old, new) => format!("{field}: {} -> {}", value(old), value(new)),
    }
}

/// Every change of an event, `; `-separated.
pub fn render_changes(changes: &[proto::FieldChange]) -> String {
    changes
        .iter()
        .map(render_change)
        .collect::<Vec<_>>()
        .join("; ")
}

pub fn audit_table(events: &[proto::AuditEvent]) -> String {
    let rows: Vec<Vec<String>> = events
        .iter()
        .map(|event| {
            vec![
                opt_cell(time_text(event.at.as_ref())),
                cell(&event.key_id),
                audit_action(event.action),
                cell(&event.actor),
                cell(&event.actor_ip),
                cell(&render_changes(&event.changes)),
            ]
        })
        .collect();
    table(
        &["AT", "KEY ID", "ACTION", "ACTOR", "ACTOR IP", "CHANGES"],
        &rows,
    )
}

pub fn account_block(account: &proto::Account) -> String {
    block(&[
        ("account", cell(&account.account_id)),
        ("tier", tier(account.tier)),
        ("active key limit", account.active_key_limit.to_string()),
        ("grantable scopes", grantable_scopes(account)),
    ])
}

/// The account's catalogue as one line, saying where it comes from.
fn grantable_scopes(account: &proto::Account) -> String {
    let patterns = if account.grantable_scopes.is_empty() {
        "none".to_owned()
    } else {
        account
            .grantable_scopes
            .iter()
            .map(|p| cell(p))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if account.grantable_scopes_default {
        format!("{patterns} (the server's allowed_scopes)")
    } else {
        format!("{patterns} (this account's own)")
    }
}

fn time_json(ts: Option<&Timestamp>) -> Value {
    time_text(ts).map_or(Value::Null, Value::String)
}

/// An empty string as `null`, for fields where empty means "none".
fn opt_string_json(text: &str) -> Value {
    if text.is_empty() {
        Value::Null
    } else {
        Value::String(text.to_owned())
    }
}

pub fn key_json(key: &proto::Key) -> Value {
    json!({
        "key_id": key.key_id,
        "account_id": key.account_id,
        "name": key.name,
        "description": key.description,
        "scopes": key.scopes,
        "prefix": key.prefix,
        "state": key_state(key.state),
        "created_at": time_json(key.created_at.as_ref()),
        "expires_at": time_json(key.expires_at.as_ref()),
        "revoked_at": time_json(key.revoked_at.as_ref()),
        "rotated_at": time_json(key.rotated_at.as_ref()),
        "last_used_at": time_json(key.last_used_at.as_ref()),
        "last_used_ip": opt_string_json(&key.last_used_ip),
        "last_used_observed_ip": opt_string_json(&key.last_used_observed_ip),
        "last_used_claimed_ip": opt_string_json(&key.last_used_claimed_ip),
        "valid_use_count": key.valid_use_count,
        "rejected_use_count": key.rejected_use_count,
        "last_rejected_at": time_json(key.last_rejected_at.as_ref()),
        "last_rejected_ip": opt_string_json(&key.last_rejected_ip),
        "revoke_reason": opt_string_json(&key.revoke_reason),
        "etag": key.etag,
    })
}

pub fn audit_event_json(event: &proto::AuditEvent) -> Value {
    let changes: Vec<Value> = event
        .changes
        .iter()
        .map(|c| {
            json!({
                "field": c.field,
                "old_value": c.old_value,
                "new_value": c.new_value,
            })
        })
        .collect();
    json!({
        "event_id": event.event_id,
        "account_id": event.account_id,
        "key_id": opt_string_json(&event.key_id),
        "action": audit_action(event.action),
        "actor": event.actor,
        "actor_ip": opt_string_json(&event.actor_ip),
        "at": time_json(event.at.as_ref()),
        "changes": changes,
    })
}

pub fn account_json(account: &proto::Account) -> Value {
    json!({
        "account_id": account.account_id,
        "tier": tier(account.tier),
        "active_key_limit": account.active_key_limit,
        "grantable_scopes": account.grantable_scopes,
        "grantable_scopes_default": account.grantable_scopes_default,
    })
}

/// Pretty JSON followed by a newline, for stdout.
pub fn json_text(value: &Value) -> String {
    let mut text = serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string());
    text.push('\n');
    text
}

/// Writes to stdout; a closed pipe (`| head`) is not an error.
pub fn emit(text: &str) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(e).context("cannot write to stdout")
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(field: &str, old: Option<&str>, new: Option<&str>) -> proto::FieldChange {
        proto::FieldChange {
            field: field.to_owned(),
            old_value: old.map(str::to_owned),
            new_value: new.map(str::to_owned),
        }
    }

    #[test]
    fn changes_render_old_and_new_values_quoted() {
        assert_eq!(
            render_change(&change("scopes", Some("a:read"), Some("a:read a:write"))),
            r#"scopes: "a:read" -> "a:read a:write""#
        );
        assert_eq!(
            render_change(&change("expires_at", Some("2030-01-01T00:00:00Z"), None)),
            r#"expires_at: "2030-01-01T00:00:00Z" -> (none)"#
        );
        assert_eq!(
            render_change(&change("name", None, Some("ci"))),
            r#"name: "ci""#
        );
        assert_eq!(
            render_change(&change("expires_at", None, None)),
            "expires_at: (none)"
        );
        assert_eq!(
            render_changes(&[
                change("name", Some("a"), Some("b")),
                change("description", Some(""), Some("x")),
            ]),
            r#"name: "a" -> "b"; description: "" -> "x""#
        );
    }

    #[test]
    fn changes_escape_quotes_and_control_characters() {
        assert_eq!(
            render_change(&change(
                "description",
                Some("say \"hi\""),
                Some("a\u{1b}[31mb\n")
            )),
            r#"description: "say \"hi\"" -> "a\u{1b}[31mb\n""#
        );
        assert_eq!(printable("ok\u{1b}[2J"), "ok\\u{1b}[2J");
    }

    #[test]
    fn tables_align_columns_and_show_dashes_for_empty_cells() {
        let text = table(
            &["ID", "NAME", "IP"],
            &[
                vec!["k1".into(), "a-long-name".into(), cell("")],
                vec!["key-22".into(), "b".into(), cell("10.0.0.1")],
            ],
        );
        assert_eq!(
            text,
            "ID      NAME         IP\n\
             k1      a-long-name  -\n\
             key-22  b            10.0.0.1\n"
        );
    }

    #[test]
    fn enums_print_as_lowercase_words() {
        assert_eq!(key_state(proto::KeyState::Revoked.into()), "revoked");
        assert_eq!(
            audit_action(proto::AuditAction::TierChanged.into()),
            "tier_changed"
        );
        assert_eq!(tier(proto::Tier::Premium.into()), "premium");
        assert_eq!(key_state(42), "unknown(42)");
    }

    #[test]
    fn timestamps_round_trip_and_print_as_rfc3339() {
        let ts = Timestamp {
            seconds: 1_800_000_000,
            nanos: 0,
        };
        assert_eq!(
            time_text(Some(&ts)).as_deref(),
            Some("2027-01-15T08:00:00Z")
        );
        assert_eq!(proto::timestamp(proto::datetime(&ts).unwrap()), ts);
        assert_eq!(time_json(None), Value::Null);
    }

    #[test]
    fn key_json_uses_proto_field_names() {
        let key = proto::Key {
            key_id: "k1".into(),
            scopes: vec!["a:read".into()],
            state: proto::KeyState::Active.into(),
            ..Default::default()
        };
        let v = key_json(&key);
        assert_eq!(v["key_id"], "k1");
        assert_eq!(v["state"], "active");
        assert_eq!(v["scopes"], json!(["a:read"]));
        assert_eq!(v["expires_at"], Value::Null);
        assert_eq!(v["last_used_ip"], Value::Null);
        assert_eq!(v["valid_use_count"], 0);
    }

    #[test]
    fn a_key_shows_the_observed_and_the_claimed_address_and_its_counts() {
        let key = proto::Key {
            last_used_ip: "203.0.113.66".into(),
            last_used_observed_ip: "127.0.0.1".into(),
            last_used_claimed_ip: "203.0.113.66".into(),
            valid_use_count: 12,
            rejected_use_count: 3,
            last_rejected_at: Some(Timestamp {
                seconds: 1_800_000_000,
                nanos: 0,
            }),
            last_rejected_ip: "192.0.2.9".into(),
            ..Default::default()
        };
        let block = key_block(&key);
        for line in [
            "used from     127.0.0.1\n",
            "claimed ip    203.0.113.66\n",
            "uses          12 valid, 3 rejected\n",
            "last refused  2027-01-15T08:00:00Z from 192.0.2.9\n",
        ] {
            assert!(block.contains(line), "{line:?} in\n{block}");
        }
        let table = keys_table(std::slice::from_ref(&key));
        assert!(
            table.contains("FROM       CLAIMED IP    USES  REJECTED"),
            "{table}"
        );
        assert!(
            table.contains("127.0.0.1  203.0.113.66  12    3"),
            "{table}"
        );
        let v = key_json(&key);
        assert_eq!(v["last_used_observed_ip"], "127.0.0.1");
        assert_eq!(v["last_used_claimed_ip"], "203.0.113.66");
        assert_eq!(v["rejected_use_count"], 3);
        assert_eq!(v["last_rejected_ip"], "192.0.2.9");

        // Last used before the two were told apart: the kept address, marked.
        let legacy = proto::Key {
            last_used_ip: "198.51.100.4".into(),
            ..Default::default()
        };
        assert!(key_block(&legacy).contains("used from     198.51.100.4 (observed or claimed)\n"));
    }
}
