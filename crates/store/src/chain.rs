//! The audit log's hash chain, written once for both backends and for
//! `vilvik-keys audit verify`.
//!
//! Each account's events are numbered 1, 2, 3, … (`account_seq`, the
//! `event_id` the API shows). Each stores the BLAKE3 hash of its content
//! and its predecessor's hash ([`event_hash`]; the first event's
//! predecessor is [`GENESIS`]), and each account's head (its last number
//! and hash) is kept in `audit_heads`, written in the same transaction as
//! the event. [`ChainCheck`] walks stored rows in (account, number) order
//! and names the first broken link: an edited row no longer matches its
//! hash, a deleted one leaves a gap in the numbers, a row moved elsewhere
//! no longer links to its predecessor, and deleting the newest rows leaves
//! the head pointing past the end.
//!
//! The hash is not keyed: it shows edits made by anyone who did not
//! recompute the chain after them. The service's own database role cannot
//! rewrite history at all (docs/SECURITY.md gives grants of INSERT and
//! SELECT only on `audit_events`); a database owner could recompute every
//! hash, which only a head recorded outside the database reveals.

use time::OffsetDateTime;

use crate::reconcile::{StoredAccount, StoredKey};
use crate::rules::ChangeRecord;

/// The predecessor hash of an account's first event.
pub const GENESIS: [u8; 32] = [0; 32];

/// Keys BLAKE3's derive-key mode, so that no other hash of this service
/// can ever collide with an event's. NEVER CHANGE: every stored hash
/// depends on it.
const CONTEXT: &str = "vilvik-keys 2026-12-03 audit event v1";

/// What an event's hash covers: every column of its row but the row id
/// and the hashes themselves.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EventContent<'a> {
    pub account_id: &'a str,
    pub seq: i64,
    pub key_id: Option<&'a str>,
    pub action: &'a str,
    pub actor: &'a str,
    pub actor_ip: Option<&'a str>,
    /// At the microsecond precision both stores keep (`stored_time`).
    pub at: OffsetDateTime,
    /// The changes as JSON; object keys are hashed in sorted order, so the
    /// key order a store returns them in does not matter.
    pub changes: &'a serde_json::Value,
}

/// `at` as both stores keep it: whole microseconds (truncated).
pub fn stored_time(at: OffsetDateTime) -> OffsetDateTime {
    let nanos = at.unix_timestamp_nanos();
    OffsetDateTime::from_unix_timestamp_nanos(nanos - nanos.rem_euclid(1_000))
        .expect("truncating never leaves the range")
}

/// The hash of `content` chained onto `prev`: BLAKE3 over a length-prefixed
/// encoding of every field (so no two different contents encode alike).
pub fn event_hash(content: &EventContent<'_>, prev: &[u8; 32]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key(CONTEXT);
    text(&mut h, content.account_id);
    h.update(&content.seq.to_le_bytes());
    optional(&mut h, content.key_id);
    text(&mut h, content.action);
    text(&mut h, content.actor);
    optional(&mut h, content.actor_ip);
    h.update(&content.at.unix_timestamp_nanos().to_le_bytes());
    json(&mut h, content.changes);
    h.update(prev);
    *h.finalize().as_bytes()
}

fn text(h: &mut blake3::Hasher, s: &str) {
    h.update(&(s.len() as u64).to_le_bytes());
    h.update(s.as_bytes());
}

fn optional(h: &mut blake3::Hasher, s: Option<&str>) {
    match s {
        None => {
            h.update(&[0]);
        }
        Some(s) => {
            h.update(&[1]);
            text(h, s);
        }
    }
}

/// A tag per JSON type, then the value; arrays and objects lead with their
/// length, objects' members in key order.
fn json(h: &mut blake3::Hasher, value: &serde_json::Value) {
    use serde_json::Value;
    match value {
        Value::Null => {
            h.update(&[0]);
        }
        Value::Bool(b) => {
            h.update(&[1, u8::from(*b)]);
        }
        Value::Number(n) => {
            h.update(&[2]);
            text(h, &n.to_string());
        }
        Value::String(s) => {
            h.update(&[3]);
            text(h, s);
        }
        Value::Array(items) => {
            h.update(&[4]);
            h.update(&(items.len() as u64).to_le_bytes());
            for item in items {
                json(h, item);
            }
        }
        Value::Object(members) => {
            h.update(&[5]);
            h.update(&(members.len() as u64).to_le_bytes());
            let mut sorted: Vec<_> = members.iter().collect();
            sorted.sort_by(|a, b| a.0.cmp(b.0));
            for (key, value) in sorted {
                text(h, key);
                json(h, value);
            }
        }
    }
}

/// An account's last event: its number and hash (0 and [`GENESIS`] before
/// the first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Head {
    pub seq: i64,
    pub hash: [u8; 32],
}

impl Head {
    pub const EMPTY: Head = Head {
        seq: 0,
        hash: GENESIS,
    };

    /// A stored head; a hash that is not 32 bytes is a corrupt row.
    pub fn stored(seq: i64, hash: &[u8]) -> crate::Result<Head> {
        let hash = hash
            .try_into()
            .map_err(|_| crate::rules::corrupt("audit head")("the hash is not 32 bytes".into()))?;
        Ok(Head { seq, hash })
    }
}

/// What a backend writes for one event: its number, its predecessor's
/// hash and its own, its time as stored, and its changes as JSON.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Link {
    pub seq: i64,
    pub prev_hash: [u8; 32],
    pub hash: [u8; 32],
    pub at: OffsetDateTime,
    pub changes: serde_json::Value,
}

impl Link {
    /// The head once this event is written.
    pub fn head(&self) -> Head {
        Head {
            seq: self.seq,
            hash: self.hash,
        }
    }
}

/// The link `record` makes after `head`, its account's current head.
pub(crate) fn append(head: Head, record: &ChangeRecord<'_>) -> Link {
    let changes = serde_json::to_value(&record.changes).expect("field changes serialize");
    let at = stored_time(record.at);
    let seq = head.seq + 1;
    let content = EventContent {
        account_id: record.account.as_str(),
        seq,
        key_id: record.key_id.map(|k| k.as_str()),
        action: record.action.as_str(),
        actor: &record.actor.name,
        actor_ip: record.actor.ip.as_deref(),
        at,
        changes: &changes,
    };
    Link {
        seq,
        prev_hash: head.hash,
        hash: event_hash(&content, &head.hash),
        at,
        changes,
    }
}

/// The head after `event`, a row written before the chain (its number,
/// prev_hash and hash unset), once chained onto `head` by the migration.
/// Its content is hashed as stored, as [`ChainCheck`] reads it back.
pub(crate) fn chain_stored(
    head: Head,
    event: &StoredAuditEvent,
    changes: &serde_json::Value,
) -> Head {
    let seq = head.seq + 1;
    let content = EventContent {
        account_id: &event.account_id,
        seq,
        key_id: event.key_id.as_deref(),
        action: &event.action,
        actor: &event.actor,
        actor_ip: event.actor_ip.as_deref(),
        at: event.at,
        changes,
    };
    Head {
        seq,
        hash: event_hash(&content, &head.hash),
    }
}

/// One row of `audit_events` as stored, read back for checking: nothing
/// is parsed beyond what the hash needs, so that a damaged row is a broken
/// link, not a read error.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredAuditEvent {
    /// The row's internal id (`event_id` column), never shown to tenants.
    pub row_id: i64,
    pub account_id: String,
    /// `None`: a row written without the chain.
    pub seq: Option<i64>,
    pub key_id: Option<String>,
    pub action: String,
    pub actor: String,
    pub actor_ip: Option<String>,
    pub at: OffsetDateTime,
    /// `None`: the stored changes are not JSON.
    pub changes: Option<serde_json::Value>,
    pub prev_hash: Option<Vec<u8>>,
    pub hash: Option<Vec<u8>>,
}

/// One row of `audit_heads`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredAuditHead {
    pub account_id: String,
    pub seq: i64,
    pub hash: Vec<u8>,
}

/// What [`crate::Store::stream_audit_chain`] hands out: each account's
/// events in number order, then its head, then its keys and its account
/// row, which [`crate::AuditCheck`] compares with what the events say.
#[derive(Debug, Clone, PartialEq)]
pub enum AuditChainRow {
    Event(StoredAuditEvent),
    Head(StoredAuditHead),
    Key(StoredKey),
    Account(StoredAccount),
}

impl AuditChainRow {
    pub(crate) fn account_id(&self) -> &str {
        match self {
            AuditChainRow::Event(e) => &e.account_id,
            AuditChainRow::Head(h) => &h.account_id,
            AuditChainRow::Key(k) => &k.account_id,
            AuditChainRow::Account(a) => &a.account_id,
        }
    }
}

/// The first broken link found, and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("account '{account}', {problem}")]
pub struct BrokenLink {
    pub account: String,
    pub problem: Break,
}

/// How a chain is broken. The words in parentheses say what most likely
/// happened to the rows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Break {
    #[error("event {seq}: its content does not match its hash (edited)")]
    Edited { seq: i64 },
    #[error("event {seq} follows {after}: {}", missing(*after, *seq))]
    Missing { seq: i64, after: i64 },
    #[error(
        "event {seq} does not follow event {after}: the hash it links to is not event {after}'s \
         (reordered or replaced)"
    )]
    Unlinked { seq: i64, after: i64 },
    #[error("event {seq} appears more than once (copied)")]
    Repeated { seq: i64 },
    #[error("event {seq} has no hash (inserted without the chain)")]
    Unhashed { seq: i64 },
    #[error(
        "a row without an event number (row id {row_id}) is outside the chain (inserted without \
         it, e.g. by an older version of the service)"
    )]
    Unnumbered { row_id: i64 },
    #[error("no head is recorded for its {found} events (the head was deleted)")]
    NoHead { found: i64 },
    #[error(
        "{keys} stored key{} but no audit events and no head (its audit log was deleted)",
        if *keys == 1 { "" } else { "s" }
    )]
    NoChain { keys: u64 },
    #[error("head says {head} events, found {found} (the newest deleted)")]
    NewestMissing { head: i64, found: i64 },
    #[error("head says {head} events, found {found} (events added past the head)")]
    PastHead { head: i64, found: i64 },
    #[error("the head's hash is not event {seq}'s (the newest replaced)")]
    HeadMismatch { seq: i64 },
}

fn missing(after: i64, seq: i64) -> String {
    if seq - after == 2 {
        format!("event {} is missing (deleted)", after + 1)
    } else {
        format!("events {} to {} are missing (deleted)", after + 1, seq - 1)
    }
}

/// What an intact check covered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ChainSummary {
    pub accounts: u64,
    pub events: u64,
}

/// The account being walked.
#[derive(Debug)]
struct Walk {
    account: String,
    last: Head,
    head_seen: bool,
    keys: u64,
}

/// Checks rows as [`crate::Store::stream_audit_chain`] hands them out, one
/// at a time (memory stays one account's head), and keeps the first
/// broken link; rows after it are not looked at.
#[derive(Debug, Default)]
pub struct ChainCheck {
    walk: Option<Walk>,
    summary: ChainSummary,
    broken: Option<BrokenLink>,
}

impl ChainCheck {
    pub fn new() -> Self {
        Self::default()
    }

    /// The first broken link so far.
    pub fn broken(&self) -> Option<&BrokenLink> {
        self.broken.as_ref()
    }

    pub fn push(&mut self, row: AuditChainRow) {
        if self.broken.is_some() {
            return;
        }
        if let Err(problem) = self.check(row) {
            let account = self.walk.as_ref().map(|w| w.account.clone());
            self.broken = Some(BrokenLink {
                account: account.unwrap_or_default(),
                problem,
            });
        }
    }

    /// The summary when every chain was intact, else the first broken link.
    pub fn finish(mut self) -> Result<ChainSummary, BrokenLink> {
        if self.broken.is_none()
            && let Err(problem) = self.close()
        {
            let account = self.walk.take().map(|w| w.account).unwrap_or_default();
            return Err(BrokenLink { account, problem });
        }
        match self.broken {
            Some(broken) => Err(broken),
            None => Ok(self.summary),
        }
    }

    fn check(&mut self, row: AuditChainRow) -> Result<(), Break> {
        if self.walk.as_ref().map(|w| w.account.as_str()) != Some(row.account_id()) {
            self.close()?;
            self.summary.accounts += 1;
            self.walk = Some(Walk {
                account: row.account_id().to_owned(),
                last: Head::EMPTY,
                head_seen: false,
                keys: 0,
            });
        }
        let walk = self.walk.as_mut().expect("set above");
        match row {
            AuditChainRow::Event(event) => {
                self.summary.events += 1;
                walk.last = check_event(walk.last, &event)?;
            }
            AuditChainRow::Head(head) => {
                walk.head_seen = true;
                let found = walk.last.seq;
                if head.seq > found {
                    return Err(Break::NewestMissing {
                        head: head.seq,
                        found,
                    });
                }
                if head.seq < found {
                    return Err(Break::PastHead {
                        head: head.seq,
                        found,
                    });
                }
                if head.hash[..] != walk.last.hash[..] {
                    return Err(Break::HeadMismatch { seq: found });
                }
            }
            AuditChainRow::Key(_) => walk.keys += 1,
            // An account row alone is an account no change was ever made
            // to (its tier set to what it was); the state check compares it.
            AuditChainRow::Account(_) => {}
        }
        Ok(())
    }

    /// Ends the account being walked: it must have had its head, and it
    /// must have a chain if it has keys (every key is created by an event).
    fn close(&mut self) -> Result<(), Break> {
        match &self.walk {
            Some(walk) if !walk.head_seen && walk.last.seq > 0 => Err(Break::NoHead {
                found: walk.last.seq,
            }),
            Some(walk) if !walk.head_seen && walk.keys > 0 => {
                Err(Break::NoChain { keys: walk.keys })
            }
            _ => Ok(()),
        }
    }
}

/// Checks one event against the one before it (`last`); returns the new last.
fn check_event(last: Head, event: &StoredAuditEvent) -> Result<Head, Break> {
    let Some(seq) = event.seq else {
        return Err(Break::Unnumbered {
            row_id: event.row_id,
        });
    };
    if seq <= last.seq {
        return Err(Break::Repeated { seq });
    }
    if seq > last.seq + 1 {
        return Err(Break::Missing {
            seq,
            after: last.seq,
        });
    }
    let (Some(hash), Some(prev)) = (&event.hash, &event.prev_hash) else {
        return Err(Break::Unhashed { seq });
    };
    let (Ok(hash), Ok(prev)) = (
        <[u8; 32]>::try_from(&hash[..]),
        <[u8; 32]>::try_from(&prev[..]),
    ) else {
        return Err(Break::Edited { seq });
    };
    let Some(changes) = &event.changes else {
        return Err(Break::Edited { seq });
    };
    let content = EventContent {
        account_id: &event.account_id,
        seq,
        key_id: event.key_id.as_deref(),
        action: &event.action,
        actor: &event.actor,
        actor_ip: event.actor_ip.as_deref(),
        at: event.at,
        changes,
    };
    if event_hash(&content, &prev) != hash {
        return Err(Break::Edited { seq });
    }
    if prev != last.hash {
        return Err(Break::Unlinked {
            seq,
            after: last.seq,
        });
    }
    Ok(Head { seq, hash })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn at(seconds: i64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_800_000_000 + seconds).unwrap()
    }

    /// `n` chained events of `account`, hashed as a backend writes them.
    fn chain(account: &str, n: i64) -> Vec<StoredAuditEvent> {
        let mut last = Head::EMPTY;
        (1..=n)
            .map(|seq| {
                let changes = json!([{"field": "name", "old": null, "new": format!("k{seq}")}]);
                let mut event = StoredAuditEvent {
                    row_id: seq * 10,
                    account_id: account.to_owned(),
                    seq: Some(seq),
                    key_id: Some("key_AAAAAAAAAAAAAAAAAAAA".into()),
                    action: "created".into(),
                    actor: "operator:alice".into(),
                    actor_ip: (seq % 2 == 0).then(|| "203.0.113.7".into()),
                    at: at(seq),
                    changes: Some(changes),
                    prev_hash: Some(last.hash.to_vec()),
                    hash: None,
                };
                let hash = event_hash(&content(&event), &last.hash);
                event.hash = Some(hash.to_vec());
                last = Head { seq, hash };
                event
            })
            .collect()
    }

    fn content(e: &StoredAuditEvent) -> EventContent<'_> {
        EventContent {
            account_id: &e.account_id,
            seq: e.seq.unwrap(),
            key_id: e.key_id.as_deref(),
            action: &e.action,
            actor: &e.actor,
            actor_ip: e.actor_ip.as_deref(),
            at: e.at,
            changes: e.changes.as_ref().unwrap(),
        }
    }

    fn head_of(events: &[StoredAuditEvent]) -> StoredAuditHead {
        let last = events.last().unwrap();
        StoredAuditHead {
            account_id: last.account_id.clone(),
            seq: last.seq.unwrap(),
            hash: last.hash.clone().unwrap(),
        }
    }

    fn check(
        events: Vec<StoredAuditEvent>,
        head: Option<StoredAuditHead>,
    ) -> Result<ChainSummary, BrokenLink> {
        let mut check = ChainCheck::new();
        for e in events {
            check.push(AuditChainRow::Event(e));
        }
        if let Some(head) = head {
            check.push(AuditChainRow::Head(head));
        }
        check.finish()
    }

    fn message(outcome: Result<ChainSummary, BrokenLink>) -> String {
        outcome.expect_err("a broken chain").to_string()
    }

    #[test]
    fn an_intact_chain_checks_and_counts() {
        let mut check = ChainCheck::new();
        for account in ["acme", "globex"] {
            let events = chain(account, 3);
            let head = head_of(&events);
            events
                .into_iter()
                .for_each(|e| check.push(AuditChainRow::Event(e)));
            check.push(AuditChainRow::Head(head));
        }
        assert_eq!(
            check.finish(),
            Ok(ChainSummary {
                accounts: 2,
                events: 6
            })
        );
        assert_eq!(check_nothing(), Ok(ChainSummary::default()));
    }

    fn check_nothing() -> Result<ChainSummary, BrokenLink> {
        ChainCheck::new().finish()
    }

    #[test]
    fn every_field_is_covered_by_the_hash() {
        type Edit = fn(&mut StoredAuditEvent);
        let edits: [(&str, Edit); 9] = [
            ("account", |e| e.account_id.push('x')),
            ("key", |e| e.key_id = None),
            ("action", |e| e.action = "revoked".into()),
            ("actor", |e| e.actor.push('x')),
            ("ip", |e| e.actor_ip = Some("198.51.100.1".into())),
            ("time", |e| e.at += time::Duration::microseconds(1)),
            ("changes", |e| {
                e.changes = Some(json!([{"field": "name", "old": null, "new": "other"}]))
            }),
            ("changes' shape", |e| {
                e.changes = Some(json!([{"field": "name", "old": null, "new": "k2", "x": 1}]))
            }),
            ("predecessor", |e| e.prev_hash = Some(vec![7; 32])),
        ];
        let original = chain("acme", 3);
        let reference = event_hash(
            &content(&original[1]),
            &original[0].hash.clone().unwrap().try_into().unwrap(),
        );
        for (what, edit) in edits {
            let mut e = original[1].clone();
            edit(&mut e);
            let prev: [u8; 32] = e.prev_hash.clone().unwrap().try_into().unwrap();
            assert_ne!(event_hash(&content(&e), &prev), reference, "{what}");
        }
    }

    #[test]
    fn length_prefixes_keep_neighbouring_fields_apart() {
        let changes = json!([]);
        let base = EventContent {
            account_id: "ab",
            seq: 1,
            key_id: None,
            action: "c",
            actor: "d",
            actor_ip: None,
            at: at(0),
            changes: &changes,
        };
        let shifted = EventContent {
            action: "",
            actor: "cd",
            ..base
        };
        assert_ne!(event_hash(&base, &GENESIS), event_hash(&shifted, &GENESIS));
        let empty_ip = EventContent {
            actor_ip: Some(""),
            ..base
        };
        assert_ne!(event_hash(&base, &GENESIS), event_hash(&empty_ip, &GENESIS));
    }

    #[test]
    fn object_key_order_does_not_matter() {
        let a: serde_json::Value =
            serde_json::from_str(r#"{"field":"x","old":null,"new":"y"}"#).unwrap();
        let b: serde_json::Value =
            serde_json::from_str(r#"{"new":"y","old":null,"field":"x"}"#).unwrap();
        let mut ha = blake3::Hasher::new();
        json(&mut ha, &a);
        let mut hb = blake3::Hasher::new();
        json(&mut hb, &b);
        assert_eq!(ha.finalize(), hb.finalize());
    }

    #[test]
    fn an_edited_event_is_named() {
        let mut events = chain("acme", 5);
        events[2].actor = "operator:mallory".into();
        let head = head_of(&events);
        assert_eq!(
            message(check(events, Some(head))),
            "account 'acme', event 3: its content does not match its hash (edited)"
        );
    }

    #[test]
    fn a_deleted_event_leaves_a_gap() {
        let mut events = chain("acme", 20);
        let head = head_of(&events);
        events.remove(16);
        assert_eq!(
            message(check(events.clone(), Some(head.clone()))),
            "account 'acme', event 18 follows 16: event 17 is missing (deleted)"
        );
        events.remove(16);
        assert_eq!(
            message(check(events, Some(head))),
            "account 'acme', event 19 follows 16: events 17 to 18 are missing (deleted)"
        );
    }

    #[test]
    fn the_newest_deleted_shows_against_the_head() {
        let mut events = chain("acme", 20);
        let head = head_of(&events);
        events.pop();
        assert_eq!(
            message(check(events, Some(head.clone()))),
            "account 'acme', head says 20 events, found 19 (the newest deleted)"
        );
        assert_eq!(
            message(check(vec![], Some(head))),
            "account 'acme', head says 20 events, found 0 (the newest deleted)"
        );
    }

    #[test]
    fn a_missing_or_wrong_head_is_named() {
        let events = chain("acme", 4);
        assert_eq!(
            message(check(events.clone(), None)),
            "account 'acme', no head is recorded for its 4 events (the head was deleted)"
        );
        let mut head = head_of(&events);
        head.seq = 3;
        assert_eq!(
            message(check(events.clone(), Some(head))),
            "account 'acme', head says 3 events, found 4 (events added past the head)"
        );
        let mut head = head_of(&events);
        head.hash = vec![1; 32];
        assert_eq!(
            message(check(events, Some(head))),
            "account 'acme', the head's hash is not event 4's (the newest replaced)"
        );
    }

    #[test]
    fn swapped_rows_are_caught() {
        // Contents swapped, numbers kept: each hash covers its number.
        let mut events = chain("acme", 5);
        let head = head_of(&events);
        let (a, b) = (events[1].clone(), events[2].clone());
        events[1] = StoredAuditEvent {
            seq: a.seq,
            row_id: a.row_id,
            ..b.clone()
        };
        events[2] = StoredAuditEvent {
            seq: b.seq,
            row_id: b.row_id,
            ..a
        };
        assert_eq!(
            message(check(events, Some(head.clone()))),
            "account 'acme', event 2: its content does not match its hash (edited)"
        );
        // A row put in place of event 3 with a hash that matches its own
        // content, but linking to a hash that is not event 2's.
        let mut events = chain("acme", 5);
        let foreign = chain("acme", 5);
        let mut replaced = foreign[2].clone();
        replaced.prev_hash = Some(vec![9; 32]);
        let prev: [u8; 32] = [9; 32];
        replaced.hash = Some(event_hash(&content(&replaced), &prev).to_vec());
        events[2] = replaced;
        assert_eq!(
            message(check(events, Some(head))),
            "account 'acme', event 3 does not follow event 2: the hash it links to is not event 2's \
             (reordered or replaced)"
        );
    }

    #[test]
    fn rows_outside_the_chain_are_named() {
        let mut events = chain("acme", 3);
        let head = head_of(&events);
        let mut stray = events[0].clone();
        stray.seq = None;
        stray.row_id = 99;
        events.insert(0, stray);
        assert_eq!(
            message(check(events, Some(head.clone()))),
            "account 'acme', a row without an event number (row id 99) is outside the chain \
             (inserted without it, e.g. by an older version of the service)"
        );
        let mut events = chain("acme", 3);
        events[1].hash = None;
        assert_eq!(
            message(check(events, Some(head.clone()))),
            "account 'acme', event 2 has no hash (inserted without the chain)"
        );
        let mut events = chain("acme", 3);
        let copy = events[1].clone();
        events.insert(2, copy);
        assert_eq!(
            message(check(events, Some(head))),
            "account 'acme', event 2 appears more than once (copied)"
        );
    }

    #[test]
    fn the_first_break_is_kept_and_names_its_account() {
        let mut check = ChainCheck::new();
        let good = chain("acme", 2);
        let head = head_of(&good);
        good.into_iter()
            .for_each(|e| check.push(AuditChainRow::Event(e)));
        check.push(AuditChainRow::Head(head));
        let mut bad = chain("globex", 3);
        bad[0].changes = None;
        bad[2].actor.push('x');
        bad.into_iter()
            .for_each(|e| check.push(AuditChainRow::Event(e)));
        assert_eq!(
            check.finish().unwrap_err().to_string(),
            "account 'globex', event 1: its content does not match its hash (edited)"
        );
    }

    #[test]
    fn stored_time_truncates_to_microseconds() {
        let t = at(0) + time::Duration::nanoseconds(1_999);
        assert_eq!(stored_time(t), at(0) + time::Duration::microseconds(1));
        assert_eq!(stored_time(at(0)), at(0));
    }
}
