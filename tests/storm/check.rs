//! The checks after the storm, through the management key's view of the
//! account, the verify listener and `vilvik-keys audit verify`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tonic::Status;
use tonic::transport::Channel;
use vilvik_keys::proto::key_admin_client::KeyAdminClient;
use vilvik_keys::proto::key_verify_client::KeyVerifyClient;
use vilvik_keys::proto::{self, AuditAction, VerifyCode};
use vilvik_keys_test_support::requests::{get, verify};
use vilvik_keys_test_support::{StoreSettings, bearer, binary, lazy_channel};

use crate::CALL_TIMEOUT;
use crate::journal::{Call, Effect, Journal, Owned};

/// The management key's view of the account, for readiness and the checks.
pub struct Admin {
    channel: Channel,
    credential: String,
}

impl Admin {
    pub fn new(addr: SocketAddr, credential: &str) -> Admin {
        Admin {
            channel: lazy_channel(addr, Some(CALL_TIMEOUT)),
            credential: credential.to_owned(),
        }
    }

    fn client(&self) -> KeyAdminClient<Channel> {
        KeyAdminClient::new(self.channel.clone())
    }

    pub async fn ready(&self) -> bool {
        self.client()
            .get_account(bearer(proto::GetAccountRequest {}, &self.credential))
            .await
            .is_ok()
    }

    pub async fn list_all_keys(&self) -> Vec<proto::Key> {
        all_pages(async |page_token| {
            let request = proto::ListKeysRequest {
                page_size: 100,
                page_token,
                include_revoked: true,
            };
            let page = self
                .client()
                .list_keys(bearer(request, &self.credential))
                .await
                .expect("ListKeys after the storm")
                .into_inner();
            (page.keys, page.next_page_token)
        })
        .await
    }

    async fn audit_events(&self, key_id: &str) -> Vec<proto::AuditEvent> {
        all_pages(async |page_token| {
            let request = proto::ListAuditEventsRequest {
                key_id: key_id.to_owned(),
                page_size: 100,
                page_token,
            };
            let page = self
                .client()
                .list_audit_events(bearer(request, &self.credential))
                .await
                .expect("ListAuditEvents after the storm")
                .into_inner();
            (page.events, page.next_page_token)
        })
        .await
    }

    async fn get_key(&self, key_id: &str) -> Result<proto::Key, Status> {
        self.client()
            .get_key(bearer(get(key_id), &self.credential))
            .await
            .map(|r| r.into_inner())
    }
}

/// Every item of a listing: `page` reads the page a token names and
/// answers its items and the next page's token (empty after the last).
async fn all_pages<T>(mut page: impl AsyncFnMut(String) -> (Vec<T>, String)) -> Vec<T> {
    let mut items = Vec::new();
    let mut page_token = String::new();
    loop {
        let (more, next) = page(page_token).await;
        items.extend(more);
        if next.is_empty() {
            return items;
        }
        page_token = next;
    }
}

/// The checks after the storm, with the server up (its verify listener at
/// `verify_addr`, its store `store`); one line per problem found.
pub async fn check(
    admin: &Admin,
    verify_addr: SocketAddr,
    management_key_id: &str,
    journals: &[Journal],
    store: &StoreSettings,
) -> Vec<String> {
    let mut problems = Vec::new();
    for journal in journals {
        for call in &journal.calls {
            if call.effect == Effect::Unknown {
                problems.push(format!(
                    "writer {}: never resolved: {}",
                    journal.writer,
                    call.describe()
                ));
            }
            for problem in &call.problems {
                problems.push(format!(
                    "writer {}: {problem}: {}",
                    journal.writer,
                    call.describe()
                ));
            }
        }
    }

    // (b) No orphan: every stored key is one a journal knows, and every
    // key a journal holds is stored.
    let known: BTreeMap<&str, &Owned> = journals
        .iter()
        .flat_map(|j| &j.keys)
        .map(|k| (k.key_id.as_str(), k))
        .collect();
    let stored: BTreeSet<String> = admin
        .list_all_keys()
        .await
        .into_iter()
        .map(|k| k.key_id)
        .filter(|id| id != management_key_id)
        .collect();
    for orphan in stored.iter().filter(|id| !known.contains_key(id.as_str())) {
        problems.push(format!("orphan key {orphan}: no journal created it"));
    }
    for lost in known.keys().filter(|id| !stored.contains(**id)) {
        let calls: Vec<String> = journals
            .iter()
            .flat_map(|j| &j.calls)
            .filter(|c| c.key_id.as_deref() == Some(*lost))
            .map(Call::describe)
            .collect();
        problems.push(format!(
            "lost key {lost}: acknowledged, not stored: {calls:?}"
        ));
    }

    let mut verifier = KeyVerifyClient::new(lazy_channel(verify_addr, Some(CALL_TIMEOUT)));
    for owned in known.values() {
        // (a) The last secret the journal holds is the key's. A change
        // whose answer was lost reached the node's cache through the
        // change feed, not at once: allow it a few seconds.
        let expected = if owned.revoked {
            VerifyCode::Revoked
        } else {
            VerifyCode::Valid
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let answer = verifier
                .verify_key(verify(&owned.secret, &[]))
                .await
                .map(|a| a.into_inner());
            let wrong = match &answer {
                Ok(a) if a.code() == expected && a.key_id == owned.key_id => break,
                Ok(a) => format!("verifies {:?} for {:?}", a.code(), a.key_id),
                Err(status) => format!("does not verify: {status:?}"),
            };
            if Instant::now() >= deadline {
                problems.push(format!(
                    "key {}: its last secret {wrong}, expected {expected:?}",
                    owned.key_id
                ));
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        // A rotated-away secret is dead (ROTATED, REVOKED, or NOT_FOUND
        // once its retention ends).
        for (n, old) in owned.old_secrets.iter().enumerate() {
            let answer = verifier
                .verify_key(verify(old, &[]))
                .await
                .map(|a| a.into_inner().code());
            if !matches!(
                answer,
                Ok(VerifyCode::Rotated | VerifyCode::Revoked | VerifyCode::NotFound)
            ) {
                problems.push(format!(
                    "key {}: its secret before rotation {} verifies {answer:?}",
                    owned.key_id,
                    n + 1
                ));
            }
        }

        // (c) Audit events one for one with the committed changes, and
        // the row a replay of them.
        let Ok(row) = admin.get_key(&owned.key_id).await else {
            continue; // reported as lost above
        };
        let events = admin.audit_events(&owned.key_id).await;
        let count = |action: AuditAction| events.iter().filter(|e| e.action() == action).count();
        let expected_counts = [
            (AuditAction::Created, 1),
            (AuditAction::Updated, owned.updates),
            (AuditAction::Rotated, owned.rotations),
            (AuditAction::Revoked, usize::from(owned.revoked)),
        ];
        for (action, expected) in expected_counts {
            if count(action) != expected {
                problems.push(format!(
                    "key {}: {} {action:?} events, the journal committed {expected}",
                    owned.key_id,
                    count(action)
                ));
            }
        }
        if let Err(problem) = replay_matches(&events, &row) {
            problems.push(format!(
                "key {}: the row is not the replay of its events: {problem}",
                owned.key_id
            ));
        }
        if row.name != owned.name {
            problems.push(format!(
                "key {}: named {:?}, the journal says {:?}",
                owned.key_id, row.name, owned.name
            ));
        }
    }

    // (d) The hash chain of the audit log is intact.
    let output = binary::command()
        .envs(store.env())
        .env("RUST_LOG", "warn")
        .args(["audit", "verify"])
        .output()
        .unwrap();
    if !output.status.success() {
        problems.push(format!(
            "audit verify exited {}: {} {}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    problems
}

/// Applies `events` in order, from nothing, and compares the result with
/// `row`: name, scopes, prefix, rotation and revocation.
fn replay_matches(events: &[proto::AuditEvent], row: &proto::Key) -> Result<(), String> {
    let mut name = None;
    let mut scopes = None;
    let mut prefix = None;
    let mut rotated = false;
    let mut revoked = false;
    for (n, event) in events.iter().enumerate() {
        let new = |field: &str| {
            event
                .changes
                .iter()
                .find(|c| c.field == field)
                .and_then(|c| c.new_value.clone())
        };
        let old = |field: &str| {
            event
                .changes
                .iter()
                .find(|c| c.field == field)
                .and_then(|c| c.old_value.clone())
        };
        match event.action() {
            AuditAction::Created => {
                if n != 0 {
                    return Err(format!("CREATED is event {n}"));
                }
                name = new("name");
                scopes = new("scopes");
                prefix = new("prefix");
            }
            AuditAction::Updated => {
                for (field, value) in [("name", &mut name), ("scopes", &mut scopes)] {
                    if let Some(changed) = new(field) {
                        if old(field) != *value {
                            return Err(format!(
                                "event {n} changes {field} from {:?}, it was {value:?}",
                                old(field)
                            ));
                        }
                        *value = Some(changed);
                    }
                }
            }
            AuditAction::Rotated => {
                if old("prefix") != prefix {
                    return Err(format!(
                        "event {n} rotates from {:?}, the prefix was {prefix:?}",
                        old("prefix")
                    ));
                }
                prefix = new("prefix");
                rotated = true;
            }
            AuditAction::Revoked => {
                if revoked {
                    return Err(format!("event {n} revokes it a second time"));
                }
                revoked = true;
            }
            other => return Err(format!("event {n} is {other:?}")),
        }
        if revoked && event.action() != AuditAction::Revoked {
            return Err(format!(
                "event {n} ({:?}) after the revocation",
                event.action()
            ));
        }
    }
    let row_scopes = row.scopes.join(" ");
    let checks = [
        ("name", name.as_deref() == Some(row.name.as_str())),
        ("scopes", scopes.as_deref() == Some(row_scopes.as_str())),
        ("prefix", prefix.as_deref() == Some(row.prefix.as_str())),
        ("rotated_at", rotated == row.rotated_at.is_some()),
        (
            "revoked",
            revoked == (row.state() == proto::KeyState::Revoked),
        ),
    ];
    let wrong: Vec<&str> = checks
        .iter()
        .filter(|(_, ok)| !ok)
        .map(|(f, _)| *f)
        .collect();
    if wrong.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{wrong:?} differ: replay name {name:?} scopes {scopes:?} prefix {prefix:?} rotated {rotated} revoked {revoked}; row {row:?}"
        ))
    }
}
