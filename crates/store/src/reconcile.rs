//! The second half of `vilvik-keys audit verify`: each account's events
//! replayed into what they say its keys and its account row are, and
//! compared with the rows the service reads. The chain ([`ChainCheck`])
//! proves the events were not edited, reordered or cut short; this proves
//! the keys were not changed without an event: a key un-revoked, given a
//! scope, an expiry or an old secret back, moved to another account,
//! inserted or deleted by SQL is named, with the field and both values.
//!
//! Every event the service writes records the new value of each field it
//! changes (`rules.rs`: `created` every initial value, `updated` each
//! changed field's old and new value, `rotated` the prefix, `revoked` the
//! reason at the event's time, `tier_changed` and
//! `grantable_scopes_changed` the account's); the format has not changed
//! since the first version, so events from before the chain replay like
//! new ones. An event the replay cannot follow (a field no such event
//! records, an old value that is not what the events before it left, a
//! change after the key's revocation, which is final) was not written by
//! the service: it is named as such and that key is not compared further.
//!
//! What this cannot see: the secret hashes (no event records one; a
//! rotation records only the new prefix), usage (`last_used_*`), and
//! versions.

use std::collections::{HashMap, HashSet};

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use vilvik_keys_domain::{AuditAction, ScopeSet, Tier, format_time};

use crate::chain::{
    AuditChainRow, BrokenLink, ChainCheck, ChainSummary, StoredAuditEvent, stored_time,
};
use crate::{FieldChange, rules};

/// A key row as stored, read back for comparing: only what an event
/// records (and the current secrets), nothing parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredKey {
    pub account_id: String,
    pub key_id: String,
    pub name: String,
    pub description: String,
    /// `Err`: the stored list cannot be read.
    pub scopes: Result<Vec<String>, String>,
    pub prefix: String,
    pub expires_at: Option<OffsetDateTime>,
    pub revoked_at: Option<OffsetDateTime>,
    pub revoke_reason: Option<String>,
    /// The prefixes of the key's secrets that are not superseded, sorted:
    /// exactly its current one when untouched.
    pub current: Vec<String>,
}

/// An account row as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredAccount {
    pub account_id: String,
    pub tier: String,
    /// `Ok(None)`: the server's catalogue; `Err`: unreadable.
    pub grantable: Result<Option<Vec<String>>, String>,
}

/// A stored row that is not what the audit log says, or an event that
/// cannot be replayed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("account '{account}', {problem}")]
pub struct Difference {
    pub account: String,
    pub problem: Mismatch,
}

/// How a stored row and the audit log disagree.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Mismatch {
    #[error("key {key}: {field} is '{stored}' in the store but '{audited}' by the audit log")]
    KeyField {
        key: String,
        field: &'static str,
        stored: String,
        audited: String,
    },
    #[error(
        "key {key} is stored but no event of this account created it (inserted or moved here \
         outside the service)"
    )]
    Unaudited { key: String },
    #[error(
        "key {key}, created by event {created}, is not stored (deleted, or moved to another \
         account, outside the service)"
    )]
    NotStored { key: String, created: i64 },
    #[error("key {key}: event {seq} ('{action}') cannot be replayed: {why}")]
    KeyEvent {
        key: String,
        seq: i64,
        action: String,
        why: String,
    },
    #[error("event {seq} ('{action}') cannot be replayed: {why}")]
    AccountEvent {
        seq: i64,
        action: String,
        why: String,
    },
    #[error("the account's {field} is '{stored}' in the store but '{audited}' by the audit log")]
    AccountField {
        field: &'static str,
        stored: String,
        audited: String,
    },
}

/// What the events of a key say it is.
#[derive(Debug)]
struct Audited {
    created: i64,
    name: String,
    description: String,
    scopes: String,
    expires_at: Option<OffsetDateTime>,
    prefix: String,
    /// When and why.
    revoked: Option<(OffsetDateTime, String)>,
    /// An event the replay could not follow was met (and named).
    lost: bool,
}

/// The account being replayed.
#[derive(Debug)]
struct Walk {
    account: String,
    events: u64,
    keys: HashMap<String, Audited>,
    /// Every prefix its events gave a key.
    prefixes: HashSet<String>,
    tier: String,
    grantable: String,
    /// An account event the replay could not follow was met (and named).
    account_lost: bool,
    account_row: bool,
}

/// The catalogue an account without one of its own has, as events name it.
fn server_catalogue() -> String {
    rules::format_catalogue(None)
}

impl Walk {
    fn new(account: &str) -> Self {
        Self {
            account: account.to_owned(),
            events: 0,
            keys: HashMap::new(),
            prefixes: HashSet::new(),
            tier: Tier::default().to_string(),
            grantable: server_catalogue(),
            account_lost: false,
            account_row: false,
        }
    }
}

/// Most differences kept for the report; the rest are only counted.
pub const DIFFERENCES_KEPT: usize = 100;

/// Replays rows as [`crate::Store::stream_audit_chain`] hands them out,
/// one account at a time (memory: one account's keys), and keeps every
/// difference (the first [`DIFFERENCES_KEPT`]).
#[derive(Debug, Default)]
pub struct StateCheck {
    walk: Option<Walk>,
    differences: Vec<Difference>,
    found: u64,
    keys: u64,
}

impl StateCheck {
    pub fn push(&mut self, row: &AuditChainRow) {
        if self.walk.as_ref().map(|w| w.account.as_str()) != Some(row.account_id()) {
            self.close();
            self.walk = Some(Walk::new(row.account_id()));
        }
        let mut walk = self.walk.take().expect("set above");
        match row {
            AuditChainRow::Event(event) => {
                walk.events += 1;
                self.replay(&mut walk, event);
            }
            AuditChainRow::Head(_) => {}
            AuditChainRow::Key(key) => self.compare_key(&mut walk, key),
            AuditChainRow::Account(account) => self.compare_account(&mut walk, account),
        }
        self.walk = Some(walk);
    }

    fn differ(&mut self, account: &str, problem: Mismatch) {
        self.found += 1;
        if self.differences.len() < DIFFERENCES_KEPT {
            self.differences.push(Difference {
                account: account.to_owned(),
                problem,
            });
        }
    }

    fn replay(&mut self, walk: &mut Walk, event: &StoredAuditEvent) {
        let seq = event.seq.unwrap_or_default();
        let action = event.action.clone();
        let changes = event
            .changes
            .clone()
            .and_then(|c| serde_json::from_value::<Vec<FieldChange>>(c).ok());
        let parsed = event.action.parse::<AuditAction>().ok();
        // Every secret the service makes has a new random prefix: one
        // used before is an old secret brought back.
        let gives_prefix = matches!(parsed, Some(AuditAction::Created | AuditAction::Rotated));
        let reused = changes
            .iter()
            .flatten()
            .filter(|c| gives_prefix && c.field == "prefix")
            .filter_map(|c| c.new.clone())
            .find(|prefix| !walk.prefixes.insert(prefix.clone()));
        let outcome = match (&event.key_id, parsed, changes) {
            (_, None, _) => Err("no version of the service writes this action".to_owned()),
            (_, _, None) => Err("its changes are not a list of field changes".to_owned()),
            (_, _, _) if reused.is_some() => Err(format!(
                "its prefix {} was used before in this account (an old secret brought back)",
                reused.unwrap_or_default()
            )),
            (Some(key), Some(AuditAction::Created), Some(changes)) => {
                match walk.keys.get(key.as_str()) {
                    Some(_) => Err("the key was already created by an earlier event".to_owned()),
                    None => created(seq, &changes).map(|audited| {
                        walk.keys.insert(key.clone(), audited);
                    }),
                }
            }
            (Some(key), Some(action), Some(changes)) => match walk.keys.get_mut(key.as_str()) {
                None => Err("no earlier event of this account created the key".to_owned()),
                Some(audited) if audited.lost => return,
                Some(audited) => change_key(audited, action, event.at, &changes),
            },
            (None, Some(action), Some(changes)) if !walk.account_lost => {
                change_account(walk, action, &changes)
            }
            (None, _, _) => return,
        };
        let Err(why) = outcome else {
            return;
        };
        let account = walk.account.clone();
        match &event.key_id {
            Some(key) => {
                // The key is not compared further: its state is unknown.
                let lost = walk.keys.entry(key.clone()).or_insert_with(|| Audited {
                    created: seq,
                    ..lost_key()
                });
                lost.lost = true;
                let key = key.clone();
                self.differ(
                    &account,
                    Mismatch::KeyEvent {
                        key,
                        seq,
                        action,
                        why,
                    },
                );
            }
            None => {
                walk.account_lost = true;
                self.differ(&account, Mismatch::AccountEvent { seq, action, why });
            }
        }
    }

    fn compare_key(&mut self, walk: &mut Walk, key: &StoredKey) {
        let account = walk.account.clone();
        let Some(audited) = walk.keys.remove(&key.key_id) else {
            // An account with no events at all is named by the chain.
            if walk.events > 0 {
                let key = key.key_id.clone();
                self.differ(&account, Mismatch::Unaudited { key });
            }
            return;
        };
        if audited.lost {
            return;
        }
        self.keys += 1;
        let stored_scopes = match &key.scopes {
            Ok(list) => match ScopeSet::from_stored(list) {
                Ok(set) => set.to_strings().join(" "),
                Err(e) => format!("unreadable ({e})"),
            },
            Err(e) => format!("unreadable ({e})"),
        };
        let stored_revoked = key.revoked_at.map(|at| {
            (
                stored_time(at),
                key.revoke_reason.clone().unwrap_or_default(),
            )
        });
        let current = if key.current.is_empty() {
            "none".to_owned()
        } else {
            key.current.join(" ")
        };
        let fields: [(&'static str, String, String); 7] = [
            ("name", key.name.clone(), audited.name),
            ("description", key.description.clone(), audited.description),
            ("scopes", stored_scopes, audited.scopes),
            (
                "expires_at",
                expiry(key.expires_at.map(stored_time)),
                expiry(audited.expires_at),
            ),
            (
                "revoked",
                revoked(&stored_revoked),
                revoked(&audited.revoked),
            ),
            ("prefix", key.prefix.clone(), audited.prefix.clone()),
            ("current secret", current, audited.prefix),
        ];
        for (field, stored, audited) in fields {
            if stored != audited {
                let key = key.key_id.clone();
                let problem = Mismatch::KeyField {
                    key,
                    field,
                    stored,
                    audited,
                };
                self.differ(&account, problem);
            }
        }
    }

    fn compare_account(&mut self, walk: &mut Walk, account: &StoredAccount) {
        walk.account_row = true;
        if walk.account_lost {
            return;
        }
        let grantable = match &account.grantable {
            Ok(None) => server_catalogue(),
            Ok(Some(list)) => match rules::catalogue(list) {
                Ok(catalogue) => rules::format_catalogue(Some(&catalogue)),
                Err(e) => format!("unreadable ({e})"),
            },
            Err(e) => format!("unreadable ({e})"),
        };
        let fields = [
            ("tier", account.tier.clone(), walk.tier.clone()),
            ("grantable scopes", grantable, walk.grantable.clone()),
        ];
        for (field, stored, audited) in fields {
            if stored != audited {
                let problem = Mismatch::AccountField {
                    field,
                    stored,
                    audited,
                };
                self.differ(&walk.account.clone(), problem);
            }
        }
    }

    /// Ends the account being walked: every key its events created must
    /// have been stored, and a changed account must have its row.
    fn close(&mut self) {
        let Some(walk) = self.walk.take() else {
            return;
        };
        let mut missing: Vec<_> = walk.keys.into_iter().filter(|(_, a)| !a.lost).collect();
        missing.sort_by_key(|(_, a)| a.created);
        for (key, audited) in missing {
            let created = audited.created;
            self.differ(&walk.account, Mismatch::NotStored { key, created });
        }
        let default = Walk::new(&walk.account);
        let changed = walk.tier != default.tier || walk.grantable != default.grantable;
        if !walk.account_row && !walk.account_lost && changed {
            let problem = Mismatch::AccountField {
                field: "row",
                stored: "missing".to_owned(),
                audited: format!("tier {}, grantable scopes {}", walk.tier, walk.grantable),
            };
            self.differ(&walk.account, problem);
        }
    }

    /// The differences found (the first [`DIFFERENCES_KEPT`]), how many
    /// in all, and how many keys matched their events.
    pub fn finish(mut self) -> (Vec<Difference>, u64, u64) {
        self.close();
        (self.differences, self.found, self.keys)
    }
}

fn lost_key() -> Audited {
    Audited {
        created: 0,
        name: String::new(),
        description: String::new(),
        scopes: String::new(),
        expires_at: None,
        prefix: String::new(),
        revoked: None,
        lost: true,
    }
}

fn expiry(at: Option<OffsetDateTime>) -> String {
    at.map_or_else(|| "never".to_owned(), format_time)
}

fn revoked(revoked: &Option<(OffsetDateTime, String)>) -> String {
    match revoked {
        None => "no".to_owned(),
        Some((at, reason)) => format!("yes ({}: {reason})", format_time(*at)),
    }
}

/// An audited expiry (RFC 3339, or none) as the store keeps it.
fn parse_expiry(value: &Option<String>) -> Result<Option<OffsetDateTime>, String> {
    value
        .as_deref()
        .map(|v| {
            OffsetDateTime::parse(v, &Rfc3339)
                .map(stored_time)
                .map_err(|_| format!("expires_at '{v}' is not RFC 3339"))
        })
        .transpose()
}

/// The field `name` of a `created` event: its new value.
fn initial<'c>(changes: &'c [FieldChange], name: &str) -> Result<&'c Option<String>, String> {
    changes
        .iter()
        .find(|c| c.field == name)
        .map(|c| &c.new)
        .ok_or_else(|| format!("it does not record '{name}'"))
}

/// A key as its `created` event (number `seq`) makes it.
fn created(seq: i64, changes: &[FieldChange]) -> Result<Audited, String> {
    let text = |name: &str| {
        initial(changes, name)?
            .clone()
            .ok_or_else(|| format!("it records no initial '{name}'"))
    };
    Ok(Audited {
        created: seq,
        name: text("name")?,
        description: text("description")?,
        scopes: text("scopes")?,
        expires_at: parse_expiry(initial(changes, "expires_at")?)?,
        prefix: text("prefix")?,
        revoked: None,
        lost: false,
    })
}

/// Checks that `change` starts from `current`, the value the events
/// before it leave.
fn follows(change: &FieldChange, current: Option<&str>) -> Result<(), String> {
    if change.old.as_deref() == current {
        return Ok(());
    }
    let shown = |v: Option<&str>| v.map_or_else(|| "nothing".to_owned(), |v| format!("'{v}'"));
    Err(format!(
        "it changes {} from {}, but the events before it leave {}",
        change.field,
        shown(change.old.as_deref()),
        shown(current)
    ))
}

fn new_text(change: &FieldChange) -> Result<String, String> {
    change
        .new
        .clone()
        .ok_or_else(|| format!("it records no new '{}'", change.field))
}

/// Applies a key's event (not `created`) at `at` to what the events
/// before it say.
fn change_key(
    audited: &mut Audited,
    action: AuditAction,
    at: OffsetDateTime,
    changes: &[FieldChange],
) -> Result<(), String> {
    if audited.revoked.is_some() {
        return Err("it follows the key's revocation, which is final".to_owned());
    }
    for change in changes {
        match (action, change.field.as_str()) {
            (AuditAction::Updated, "name") => {
                follows(change, Some(&audited.name))?;
                audited.name = new_text(change)?;
            }
            (AuditAction::Updated, "description") => {
                follows(change, Some(&audited.description))?;
                audited.description = new_text(change)?;
            }
            (AuditAction::Updated, "scopes") => {
                follows(change, Some(&audited.scopes))?;
                audited.scopes = new_text(change)?;
            }
            (AuditAction::Updated, "expires_at") => {
                let old = parse_expiry(&change.old)?;
                if old != audited.expires_at {
                    let current = audited.expires_at.map(format_time);
                    follows(change, current.as_deref())?;
                }
                audited.expires_at = parse_expiry(&change.new)?;
            }
            (AuditAction::Rotated, "prefix") => {
                follows(change, Some(&audited.prefix))?;
                audited.prefix = new_text(change)?;
            }
            (AuditAction::Revoked, "reason") => {
                audited.revoked = Some((stored_time(at), new_text(change)?));
            }
            (_, field) => {
                return Err(format!(
                    "no '{}' event the service writes changes '{field}'",
                    action.as_str()
                ));
            }
        }
    }
    if action == AuditAction::Revoked && audited.revoked.is_none() {
        return Err("it records no reason".to_owned());
    }
    Ok(())
}

/// Applies an account's event to what the events before it say.
fn change_account(
    walk: &mut Walk,
    action: AuditAction,
    changes: &[FieldChange],
) -> Result<(), String> {
    for change in changes {
        match (action, change.field.as_str()) {
            (AuditAction::TierChanged, "tier") => {
                follows(change, Some(&walk.tier))?;
                walk.tier = new_text(change)?;
            }
            (AuditAction::GrantableScopesChanged, "grantable_scopes") => {
                follows(change, Some(&walk.grantable))?;
                walk.grantable = new_text(change)?;
            }
            (_, field) => {
                return Err(format!(
                    "no '{}' event of an account the service writes changes '{field}'",
                    action.as_str()
                ));
            }
        }
    }
    Ok(())
}

/// What `vilvik-keys audit verify` checks, both halves over one stream:
/// the chain, and the stored keys and accounts against their events.
#[derive(Debug, Default)]
pub struct AuditCheck {
    chain: ChainCheck,
    state: StateCheck,
}

/// What an [`AuditCheck`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditReport {
    /// The chain's summary, or its first broken link.
    pub chain: Result<ChainSummary, BrokenLink>,
    /// Keys whose stored row matched their events.
    pub keys: u64,
    /// The first [`DIFFERENCES_KEPT`] differences.
    pub differences: Vec<Difference>,
    /// How many differences in all.
    pub found: u64,
}

impl AuditReport {
    /// Nothing was found: the chain is intact and every row matches.
    pub fn intact(&self) -> bool {
        self.chain.is_ok() && self.found == 0
    }
}

impl AuditCheck {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, row: AuditChainRow) {
        self.state.push(&row);
        self.chain.push(row);
    }

    pub fn finish(self) -> AuditReport {
        let (differences, found, keys) = self.state.finish();
        AuditReport {
            chain: self.chain.finish(),
            keys,
            differences,
            found,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn at(seconds: i64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_800_000_000 + seconds).unwrap()
    }

    const KEY: &str = "key_AAAAAAAAAAAAAAAAAAAA";

    /// An event of `KEY` in ACME (the chain is not this check's concern).
    fn event(seq: i64, action: &str, changes: serde_json::Value) -> AuditChainRow {
        AuditChainRow::Event(StoredAuditEvent {
            row_id: seq,
            account_id: "ACME".into(),
            seq: Some(seq),
            key_id: Some(KEY.into()),
            action: action.into(),
            actor: "operator:alice".into(),
            actor_ip: None,
            at: at(seq),
            changes: Some(changes),
            prev_hash: None,
            hash: None,
        })
    }

    fn created() -> AuditChainRow {
        event(
            1,
            "created",
            json!([
                {"field": "name", "old": null, "new": "ci"},
                {"field": "description", "old": null, "new": ""},
                {"field": "scopes", "old": null, "new": "datasets:read"},
                {"field": "expires_at", "old": null, "new": null},
                {"field": "prefix", "old": null, "new": "vlk_AAAAAAAA"},
            ]),
        )
    }

    fn revoked(seq: i64) -> AuditChainRow {
        event(
            seq,
            "revoked",
            json!([{"field": "reason", "old": null, "new": "leaked"}]),
        )
    }

    /// The key row the events above leave, revoked at `revoked_at`.
    fn stored(revoked_at: Option<i64>) -> AuditChainRow {
        AuditChainRow::Key(StoredKey {
            account_id: "ACME".into(),
            key_id: KEY.into(),
            name: "ci".into(),
            description: String::new(),
            scopes: Ok(vec!["datasets:read".into()]),
            prefix: "vlk_AAAAAAAA".into(),
            expires_at: None,
            revoked_at: revoked_at.map(at),
            revoke_reason: revoked_at.map(|_| "leaked".into()),
            current: vec!["vlk_AAAAAAAA".into()],
        })
    }

    fn found(rows: Vec<AuditChainRow>) -> Vec<String> {
        let mut check = StateCheck::default();
        rows.iter().for_each(|r| check.push(r));
        let (differences, found, _) = check.finish();
        assert_eq!(found as usize, differences.len());
        differences.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn a_key_that_matches_its_events_is_counted() {
        let mut check = StateCheck::default();
        for row in [created(), revoked(2), stored(Some(2))] {
            check.push(&row);
        }
        assert_eq!(check.finish(), (vec![], 0, 1));
    }

    #[test]
    fn no_event_the_service_writes_follows_a_revocation() {
        // Revocation is final: an appended "update" cannot bring it back.
        let unrevoke = event(
            3,
            "updated",
            json!([{"field": "name", "old": "ci", "new": "ci-2"}]),
        );
        assert_eq!(
            found(vec![created(), revoked(2), unrevoke, stored(None)]),
            [format!(
                "account 'ACME', key {KEY}: event 3 ('updated') cannot be replayed: it follows \
                 the key's revocation, which is final"
            )]
        );
    }

    #[test]
    fn a_rotation_back_to_an_old_prefix_is_named() {
        let rotate = |seq, old: &str, new: &str| {
            event(
                seq,
                "rotated",
                json!([{"field": "prefix", "old": old, "new": new}]),
            )
        };
        let rows = vec![
            created(),
            rotate(2, "vlk_AAAAAAAA", "vlk_BBBBBBBB"),
            rotate(3, "vlk_BBBBBBBB", "vlk_AAAAAAAA"),
            stored(None),
        ];
        assert_eq!(
            found(rows),
            [format!(
                "account 'ACME', key {KEY}: event 3 ('rotated') cannot be replayed: its prefix \
                 vlk_AAAAAAAA was used before in this account (an old secret brought back)"
            )]
        );
    }

    #[test]
    fn fields_an_action_never_records_are_named() {
        let forged = event(
            2,
            "updated",
            json!([{"field": "revoked_at", "old": "2026-01-01T00:00:00Z", "new": null}]),
        );
        assert_eq!(
            found(vec![created(), forged, stored(None)]),
            [format!(
                "account 'ACME', key {KEY}: event 2 ('updated') cannot be replayed: no 'updated' \
                 event the service writes changes 'revoked_at'"
            )]
        );
    }

    #[test]
    fn a_change_that_does_not_start_from_the_replayed_value_is_named() {
        let skipped = event(
            2,
            "updated",
            json!([{"field": "scopes", "old": "models:*", "new": "datasets:read"}]),
        );
        assert_eq!(
            found(vec![created(), skipped, stored(None)]),
            [format!(
                "account 'ACME', key {KEY}: event 2 ('updated') cannot be replayed: it changes \
                 scopes from 'models:*', but the events before it leave 'datasets:read'"
            )]
        );
    }

    #[test]
    fn events_without_a_creation_or_with_one_lacking_data_are_named() {
        assert_eq!(
            found(vec![revoked(1), stored(Some(1))]),
            [format!(
                "account 'ACME', key {KEY}: event 1 ('revoked') cannot be replayed: no earlier \
                 event of this account created the key"
            )]
        );
        let thin = event(
            1,
            "created",
            json!([{"field": "name", "old": null, "new": "ci"}]),
        );
        assert_eq!(
            found(vec![thin, stored(None)]),
            [format!(
                "account 'ACME', key {KEY}: event 1 ('created') cannot be replayed: it does not \
                 record 'description'"
            )]
        );
    }

    #[test]
    fn an_account_row_is_compared_with_its_tier_and_catalogue_events() {
        let mut tier = event(
            1,
            "tier_changed",
            json!([{"field": "tier", "old": "free", "new": "premium"}]),
        );
        if let AuditChainRow::Event(e) = &mut tier {
            e.key_id = None;
        }
        let row = |tier: &str| {
            AuditChainRow::Account(StoredAccount {
                account_id: "ACME".into(),
                tier: tier.into(),
                grantable: Ok(None),
            })
        };
        assert_eq!(
            found(vec![tier.clone(), row("premium")]),
            Vec::<String>::new()
        );
        assert_eq!(
            found(vec![tier.clone(), row("free")]),
            [
                "account 'ACME', the account's tier is 'free' in the store but 'premium' by the \
              audit log"
            ]
        );
        // An account never changed may have its row (free) or none.
        assert_eq!(found(vec![row("free")]), Vec::<String>::new());
        assert_eq!(
            found(vec![tier]),
            [
                "account 'ACME', the account's row is 'missing' in the store but 'tier premium, \
              grantable scopes the server's allowed_scopes' by the audit log"
            ]
        );
    }
}
