//! The audit log's hash chain on both backends: rows edited, deleted and
//! reordered with direct SQL (as someone with database access would) are
//! each detected and named; an untouched store, concurrent changes of one
//! account and an old database migrated forward verify intact; event ids
//! are per account. And the stored keys and accounts against their
//! events: a key or an account changed by SQL without an event is named.
//!
//! Each test is an `async fn(&TestStore)` written once (the store, and
//! its database to tamper with behind its back); `on_both_backends!`
//! runs it on a SQLite file and on a fresh Postgres database (skipped
//! without `VILVIK_KEYS_TEST_DATABASE_URL` unless
//! `VILVIK_KEYS_REQUIRE_POSTGRES=1`).

use time::Duration;
use vilvik_keys_domain::{AccountId, Tier};
use vilvik_keys_store::{AuditCheck, AuditReport, BrokenLink, ChainCheck, ChainSummary, Store};
use vilvik_keys_test_db::fixtures::{
    account, actor, create, new_key, new_secret, now, rename_to, revoke, rotate, update,
};
use vilvik_keys_test_db::{Backend, TestStore};

/// Checks the chains: the half of `vilvik-keys audit verify` these tests
/// are about ([`audit`] below is the whole).
async fn verify(
    store: &dyn Store,
    account: Option<&AccountId>,
) -> Result<ChainSummary, BrokenLink> {
    let mut check = ChainCheck::new();
    store
        .stream_audit_chain(account, 3, &mut |rows| {
            rows.into_iter().for_each(|r| check.push(r))
        })
        .await
        .unwrap();
    check.finish()
}

async fn broken(store: &dyn Store) -> String {
    verify(store, None)
        .await
        .expect_err("the tampering is detected")
        .to_string()
}

/// What the check says of chains that are intact: `accounts` accounts with
/// `events` events in all.
fn intact(accounts: u64, events: u64) -> Result<ChainSummary, BrokenLink> {
    Ok(ChainSummary { accounts, events })
}

/// What the check says of [`fill`]ed chains after `sql` tampered with them.
async fn tampered(s: &TestStore, sql: &str) -> String {
    fill(&*s.store()).await;
    s.backend().exec(sql).await;
    broken(&*s.store()).await
}

/// The ids of `account`'s events, oldest first.
async fn event_ids(store: &dyn Store, account: &AccountId, after: Option<i64>) -> Vec<i64> {
    let page = store.list_audit_events(account, None, after, 100).await;
    page.unwrap().items.iter().map(|e| e.event_id).collect()
}

/// ACME: 8 events (create, create, update, rotate, revoke, tier, and two
/// imported keys); globex: 1; initech: 1 (imported).
async fn fill(store: &dyn Store) {
    let (acme, globex, initech) = (account("ACME"), account("globex"), account("initech"));
    let t0 = now();
    let at = |seconds| t0 + Duration::seconds(seconds);
    let alpha = create(store, &acme, "alpha", t0).await;
    let beta = create(store, &acme, "beta", t0).await;
    create(store, &globex, "theirs", t0).await;
    update(store, &alpha, rename_to("alpha-2"), at(1)).await;
    rotate(store, &alpha, &new_secret(), at(2)).await;
    revoke(store, &beta, "unused", at(3)).await;
    store
        .set_tier(&acme, Tier::Premium, &actor(), at(4))
        .await
        .unwrap();
    let imported = vec![
        new_key(&acme, "imported-1", t0).0,
        new_key(&initech, "imported-2", t0).0,
        new_key(&acme, "imported-3", t0).0,
    ];
    store.import_keys(imported, &actor()).await.unwrap();
}

// ---------------------------------------------------------------------------
// The tests

async fn an_untouched_store_verifies_and_numbers_events_per_account(s: &TestStore) {
    let store = s.store();
    assert_eq!(verify(&*store, None).await, intact(0, 0));
    fill(&*store).await;
    assert_eq!(verify(&*store, None).await, intact(3, 10));
    assert_eq!(verify(&*store, Some(&account("ACME"))).await, intact(1, 8));
    assert_eq!(
        verify(&*store, Some(&account("nobody"))).await,
        intact(0, 0)
    );
    // Each account counts its own events from 1: no id says how many
    // other accounts' events came before.
    for (name, count) in [("ACME", 8), ("globex", 1), ("initech", 1)] {
        let ids = event_ids(&*store, &account(name), None).await;
        assert_eq!(ids, (1..=count).collect::<Vec<_>>(), "{name}");
    }
    // Cursors are those numbers too.
    assert_eq!(event_ids(&*store, &account("ACME"), Some(6)).await, [7, 8]);
}

async fn an_edited_field_is_detected(s: &TestStore) {
    let sql = "UPDATE audit_events SET actor = 'operator:mallory' \
               WHERE account_id = 'ACME' AND account_seq = 3";
    let detected = "account 'ACME', event 3: its content does not match its hash (edited)";
    assert_eq!(tampered(s, sql).await, detected);
    // Another account's chain is untouched.
    assert!(verify(&*s.store(), Some(&account("globex"))).await.is_ok());
}

/// Tests that each tamper with [`fill`]ed chains by running `sql`, and
/// expect the check to report `detected`.
macro_rules! tampering_is_detected {
    ($($test:ident: $sql:expr => $detected:expr;)*) => {
        $(
            async fn $test(s: &TestStore) {
                assert_eq!(tampered(s, $sql).await, $detected);
            }
        )*
    };
}

tampering_is_detected! {
    edited_changes_are_detected:
        "UPDATE audit_events SET changes = '[{\"field\":\"reason\",\"old\":null,\"new\":\"routine\"}]' \
         WHERE account_id = 'ACME' AND account_seq = 5"
        => "account 'ACME', event 5: its content does not match its hash (edited)";
    a_deleted_event_is_detected:
        "DELETE FROM audit_events WHERE account_id = 'ACME' AND account_seq = 3"
        => "account 'ACME', event 4 follows 2: event 3 is missing (deleted)";
    the_newest_event_deleted_is_detected:
        "DELETE FROM audit_events WHERE account_id = 'ACME' AND account_seq = 8"
        => "account 'ACME', head says 8 events, found 7 (the newest deleted)";
    a_deleted_head_is_detected:
        "DELETE FROM audit_heads WHERE account_id = 'globex'"
        => "account 'globex', no head is recorded for its 1 events (the head was deleted)";
    swapped_numbers_are_detected:
        "UPDATE audit_events SET account_seq = -1 WHERE account_id = 'ACME' AND account_seq = 2; \
         UPDATE audit_events SET account_seq = 2 WHERE account_id = 'ACME' AND account_seq = 3; \
         UPDATE audit_events SET account_seq = 3 WHERE account_id = 'ACME' AND account_seq = -1;"
        => "account 'ACME', event 2: its content does not match its hash (edited)";
    // Every column but the numbers, hashes included.
    swapped_contents_are_detected:
        "CREATE TEMP TABLE copied AS SELECT * FROM audit_events \
             WHERE account_id = 'ACME' AND account_seq IN (4, 5); \
         UPDATE audit_events SET (key_id, action, actor, actor_ip, at, changes, prev_hash, hash) = \
             (SELECT key_id, action, actor, actor_ip, at, changes, prev_hash, hash FROM copied \
              WHERE copied.account_seq = 9 - audit_events.account_seq) \
         WHERE account_id = 'ACME' AND account_seq IN (4, 5);"
        => "account 'ACME', event 4: its content does not match its hash (edited)";
    an_event_moved_to_another_account_is_detected:
        "UPDATE audit_events SET account_id = 'globex', account_seq = 2 \
         WHERE account_id = 'ACME' AND account_seq = 8"
        => "account 'ACME', head says 8 events, found 7 (the newest deleted)";
}

async fn concurrent_changes_of_one_account_never_fork_the_chain(s: &TestStore) {
    let acme = account("ACME");
    let t0 = now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..16 {
        let store = s.store();
        let acme = acme.clone();
        tasks.spawn(async move {
            let key = create(&*store, &acme, &format!("k{i}"), t0).await;
            update(&*store, &key, rename_to(&format!("k{i}-renamed")), t0).await;
            revoke(&*store, &key, "done", t0).await;
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    assert_eq!(verify(&*s.store(), None).await, intact(1, 48));
    let ids = event_ids(&*s.store(), &acme, None).await;
    assert_eq!(ids, (1..=48).collect::<Vec<_>>());
}

vilvik_keys_test_db::on_both_backends!(
    an_untouched_store_verifies_and_numbers_events_per_account,
    an_edited_field_is_detected,
    edited_changes_are_detected,
    a_deleted_event_is_detected,
    the_newest_event_deleted_is_detected,
    a_deleted_head_is_detected,
    swapped_numbers_are_detected,
    swapped_contents_are_detected,
    an_event_moved_to_another_account_is_detected,
    concurrent_changes_of_one_account_never_fork_the_chain,
    untouched_keys_and_accounts_match_their_events,
    an_unrevoked_key_is_named,
    a_scope_added_is_named,
    an_old_secret_made_current_again_is_named,
    a_key_moved_deleted_or_its_tier_reset_is_named,
);

// ---------------------------------------------------------------------------
// Stored keys and accounts against their events

/// Everything `vilvik-keys audit verify` checks.
async fn audit(store: &dyn Store) -> AuditReport {
    let mut check = AuditCheck::new();
    store
        .stream_audit_chain(None, 3, &mut |rows| {
            rows.into_iter().for_each(|r| check.push(r))
        })
        .await
        .unwrap();
    check.finish()
}

/// What the check says of [`fill`]ed stores after `sql` changed rows
/// behind the service: every difference, the chain being intact.
async fn state_tampered(s: &TestStore, sql: &str) -> Vec<String> {
    fill(&*s.store()).await;
    s.backend().exec(sql).await;
    let report = audit(&*s.store()).await;
    assert!(report.chain.is_ok(), "{:?}", report.chain);
    assert_eq!(report.found as usize, report.differences.len());
    report.differences.iter().map(ToString::to_string).collect()
}

/// The id of the key named `name` (names are unique in [`fill`]).
async fn key_named(s: &TestStore, account_id: &str, name: &str) -> String {
    let page = s
        .store()
        .list_keys(&account(account_id), true, None, 100)
        .await;
    let keys = page.unwrap().items;
    let key = keys.iter().find(|k| k.name.to_string() == name).unwrap();
    key.key_id.to_string()
}

async fn untouched_keys_and_accounts_match_their_events(s: &TestStore) {
    fill(&*s.store()).await;
    let catalogue = vilvik_keys_domain::ScopeCatalogue::parse(&["models:read", "datasets:*"]);
    s.store()
        .set_grantable_scopes(
            &account("globex"),
            Some(&catalogue.unwrap()),
            &actor(),
            now(),
        )
        .await
        .unwrap();
    let report = audit(&*s.store()).await;
    assert!(report.intact(), "{report:?}");
    assert_eq!(report.keys, 6);
}

async fn an_unrevoked_key_is_named(s: &TestStore) {
    let found = state_tampered(
        s,
        "UPDATE keys SET revoked_at = NULL, revoke_reason = NULL WHERE name = 'beta'",
    )
    .await;
    let beta = key_named(s, "ACME", "beta").await;
    assert_eq!(found.len(), 1, "{found:?}");
    let expected = format!("account 'ACME', key {beta}: revoked is 'no' in the store but 'yes (");
    assert!(found[0].starts_with(&expected), "{found:?}");
    assert!(
        found[0].ends_with(": unused)' by the audit log"),
        "{found:?}"
    );
}

async fn a_scope_added_is_named(s: &TestStore) {
    let scopes = match s.backend() {
        Backend::Sqlite { .. } => "'[\"datasets:read\",\"keys:admin\",\"models:*\"]'",
        _ => "ARRAY['datasets:read', 'keys:admin', 'models:*']",
    };
    let sql = format!("UPDATE keys SET scopes = {scopes} WHERE name = 'theirs'");
    let found = state_tampered(s, &sql).await;
    let theirs = key_named(s, "globex", "theirs").await;
    assert_eq!(
        found,
        [format!(
            "account 'globex', key {theirs}: scopes is 'datasets:read keys:admin models:*' in the \
             store but 'datasets:read models:*' by the audit log"
        )]
    );
}

async fn an_old_secret_made_current_again_is_named(s: &TestStore) {
    let found = state_tampered(s, "UPDATE key_secrets SET superseded_at = NULL").await;
    let alpha = key_named(s, "ACME", "alpha-2").await;
    assert_eq!(found.len(), 1, "{found:?}");
    let expected = format!("account 'ACME', key {alpha}: current secret is 'vlk_");
    assert!(found[0].starts_with(&expected), "{found:?}");
}

async fn a_key_moved_deleted_or_its_tier_reset_is_named(s: &TestStore) {
    let found = state_tampered(
        s,
        "UPDATE keys SET account_id = 'globex' WHERE name = 'alpha-2'; \
         DELETE FROM key_secrets WHERE key_id IN (SELECT key_id FROM keys WHERE name = 'imported-3'); \
         DELETE FROM keys WHERE name = 'imported-3'; \
         UPDATE accounts SET tier = 'free' WHERE account_id = 'ACME';",
    )
    .await;
    let alpha = key_named(s, "globex", "alpha-2").await;
    let messages = [
        "the account's tier is 'free' in the store but 'premium' by the audit log".to_owned(),
        format!("key {alpha}, created by event 1, is not stored (deleted, or moved"),
        "created by event 8, is not stored".to_owned(),
        format!("account 'globex', key {alpha} is stored but no event of this account created it"),
    ];
    assert_eq!(found.len(), messages.len(), "{found:?}");
    for message in messages {
        assert!(
            found.iter().any(|f| f.contains(&message)),
            "{message} in {found:?}"
        );
    }
}

// ---------------------------------------------------------------------------
// A database from before the chain, migrated forward

/// The migrations before the chain's, as an older binary applied them
/// (its ledger from before checksums: trusted, filled in by `migrate`).
fn old_schema(files: [&str; 3]) -> String {
    let mut sql = files.join("\n");
    sql.push_str(
        "\nCREATE TABLE schema_migrations (version BIGINT PRIMARY KEY, name TEXT NOT NULL, \
         applied_at TEXT NOT NULL, checksum TEXT);\n\
         INSERT INTO schema_migrations (version, name, applied_at) VALUES \
         (1, 'initial', 'then'), (2, 'change_log_floor', 'then'), (3, 'pepper_id', 'then');\n",
    );
    sql
}

/// Five events the old binary wrote, two accounts interleaved; `at` is the
/// backend's expression for a time in whole seconds.
fn old_events(at: fn(i64) -> String) -> String {
    let key = vilvik_keys_domain::KeyId::generate();
    let rows = [
        ("ACME", "created", "bootstrap", "NULL"),
        ("globex", "created", "operator:bob", "'198.51.100.4'"),
        ("ACME", "updated", "operator:alice", "'203.0.113.7'"),
        ("globex", "revoked", "operator:bob", "NULL"),
        ("ACME", "rotated", "key:key_AAAAAAAAAAAAAAAAAAAA", "NULL"),
    ];
    rows.iter()
        .enumerate()
        .map(|(i, (account, action, actor, ip))| {
            format!(
                "INSERT INTO audit_events (account_id, key_id, action, actor, actor_ip, at, changes) \
                 VALUES ('{account}', '{key}', '{action}', '{actor}', {ip}, {}, \
                 '[{{\"field\":\"name\",\"old\":null,\"new\":\"k{i}\"}}]');\n",
                at(i as i64)
            )
        })
        .collect()
}

/// Writes the schema before the chain and [`old_events`] (their times as
/// `at` writes them) into `backend`, then checks that a store migrates
/// them forward: the old events verify, are numbered per account in the
/// order they were written, and new ones chain on.
async fn check_migrated_forward(backend: Backend, migrations: [&str; 3], at: fn(i64) -> String) {
    backend.exec(&old_schema(migrations)).await;
    backend.exec(&old_events(at)).await;
    let store = backend.open().await;
    assert_eq!(
        store.migrate().await.unwrap(),
        vilvik_keys_store::MIGRATION_COUNT - 3
    );
    assert_eq!(verify(&*store, None).await, intact(2, 5));
    let acme = account("ACME");
    let events = store
        .list_audit_events(&acme, None, None, 100)
        .await
        .unwrap()
        .items;
    let listed: Vec<(i64, &str)> = events
        .iter()
        .map(|e| (e.event_id, e.actor.as_str()))
        .collect();
    assert_eq!(
        listed,
        [
            (1, "bootstrap"),
            (2, "operator:alice"),
            (3, "key:key_AAAAAAAAAAAAAAAAAAAA")
        ]
    );
    create(&*store, &acme, "after", now()).await;
    assert_eq!(verify(&*store, None).await, intact(2, 6));
    assert_eq!(store.migrate().await.unwrap(), 0, "chained once");
    // And the old events are as tamper-evident as new ones.
    backend
        .exec("UPDATE audit_events SET actor = 'someone else' WHERE account_id = 'globex' AND account_seq = 1")
        .await;
    assert_eq!(
        broken(&*store).await,
        "account 'globex', event 1: its content does not match its hash (edited)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_an_old_database_migrated_forward_verifies_intact() {
    let migrations = [
        include_str!("../migrations/sqlite/0001_initial.sql"),
        include_str!("../migrations/sqlite/0002_change_log_floor.sql"),
        include_str!("../migrations/sqlite/0003_pepper_id.sql"),
    ];
    let microseconds = |s| format!("{}", (1_800_000_000 + s) * 1_000_000);
    check_migrated_forward(Backend::sqlite(), migrations, microseconds).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_an_old_database_migrated_forward_verifies_intact() {
    let Some(backend) = Backend::postgres().await else {
        return;
    };
    let migrations = [
        include_str!("../migrations/postgres/0001_initial.sql"),
        include_str!("../migrations/postgres/0002_change_log_floor.sql"),
        include_str!("../migrations/postgres/0003_pepper_id.sql"),
    ];
    let timestamp = |s| format!("to_timestamp({})", 1_800_000_000 + s);
    check_migrated_forward(backend, migrations, timestamp).await;
}

/// How an old binary wrote values the two backends keep differently.
struct Dialect {
    /// A time `s` seconds after the fixtures' start.
    at: fn(i64) -> String,
    /// A list of scopes.
    scopes: fn(&str) -> String,
    /// 32 bytes of `b`.
    hash: fn(u8) -> String,
}

/// A key created, renamed, rotated and revoked and an account moved to
/// premium by an old binary (every row as it wrote them, before the
/// chain), migrated forward: its events replay to its rows, and a key
/// then un-revoked is named.
async fn check_old_state_replays(backend: Backend, migrations: [&str; 3], d: Dialect) {
    backend.exec(&old_schema(migrations)).await;
    let key = vilvik_keys_domain::KeyId::generate();
    let at = d.at;
    let change = |field: &str, old: &str, new: &str| {
        format!(r#"{{"field":"{field}","old":{old},"new":{new}}}"#)
    };
    let created = [
        change("name", "null", r#""ci""#),
        change("description", "null", r#""CI""#),
        change("scopes", "null", r#""datasets:read""#),
        change("expires_at", "null", "null"),
        change("prefix", "null", r#""vlk_AAAAAAAA""#),
    ]
    .join(",");
    let events = [
        (Some(&key), "created", created, 0),
        (
            Some(&key),
            "updated",
            change("name", r#""ci""#, r#""ci-2""#),
            1,
        ),
        (
            Some(&key),
            "rotated",
            change("prefix", r#""vlk_AAAAAAAA""#, r#""vlk_BBBBBBBB""#),
            2,
        ),
        (
            Some(&key),
            "revoked",
            change("reason", "null", r#""done""#),
            3,
        ),
        (
            None,
            "tier_changed",
            change("tier", r#""free""#, r#""premium""#),
            4,
        ),
    ];
    let mut sql = format!(
        "INSERT INTO accounts (account_id, tier, created_at) VALUES ('OLD', 'premium', {t0});
         INSERT INTO keys (key_id, account_id, name, description, scopes, prefix, created_at, \
             revoked_at, revoke_reason, rotated_at) \
         VALUES ('{key}', 'OLD', 'ci-2', 'CI', {scopes}, 'vlk_BBBBBBBB', {t0}, {t3}, 'done', {t2});
         INSERT INTO key_secrets (prefix, key_id, hash, created_at, superseded_at) VALUES \
             ('vlk_AAAAAAAA', '{key}', {h1}, {t0}, {t2}), ('vlk_BBBBBBBB', '{key}', {h2}, {t2}, NULL);\n",
        t0 = at(0),
        t2 = at(2),
        t3 = at(3),
        scopes = (d.scopes)("datasets:read"),
        h1 = (d.hash)(1),
        h2 = (d.hash)(2),
    );
    for (key, action, changes, t) in events {
        let key = key.map_or("NULL".to_owned(), |k| format!("'{k}'"));
        sql.push_str(&format!(
            "INSERT INTO audit_events (account_id, key_id, action, actor, at, changes) \
             VALUES ('OLD', {key}, '{action}', 'operator:alice', {}, '[{changes}]');\n",
            at(t)
        ));
    }
    backend.exec(&sql).await;
    let store = backend.open().await;
    store.migrate().await.unwrap();
    let report = audit(&*store).await;
    assert!(report.intact(), "{report:?}");
    assert_eq!(report.keys, 1);
    backend
        .exec("UPDATE keys SET revoked_at = NULL, revoke_reason = NULL")
        .await;
    let found = audit(&*store).await.differences;
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(
        found[0].to_string().starts_with(&format!(
            "account 'OLD', key {key}: revoked is 'no' in the store"
        )),
        "{found:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_old_keys_replay_from_their_events_after_the_migration() {
    let migrations = [
        include_str!("../migrations/sqlite/0001_initial.sql"),
        include_str!("../migrations/sqlite/0002_change_log_floor.sql"),
        include_str!("../migrations/sqlite/0003_pepper_id.sql"),
    ];
    let dialect = Dialect {
        at: |s| format!("{}", (1_800_000_000 + s) * 1_000_000),
        scopes: |s| format!("'[\"{s}\"]'"),
        hash: |b| format!("X'{}'", format!("{b:02x}").repeat(32)),
    };
    check_old_state_replays(Backend::sqlite(), migrations, dialect).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_old_keys_replay_from_their_events_after_the_migration() {
    let Some(backend) = Backend::postgres().await else {
        return;
    };
    let migrations = [
        include_str!("../migrations/postgres/0001_initial.sql"),
        include_str!("../migrations/postgres/0002_change_log_floor.sql"),
        include_str!("../migrations/postgres/0003_pepper_id.sql"),
    ];
    let dialect = Dialect {
        at: |s| format!("to_timestamp({})", 1_800_000_000 + s),
        scopes: |s| format!("ARRAY['{s}']"),
        hash: |b| format!("'\\x{}'::bytea", format!("{b:02x}").repeat(32)),
    };
    check_old_state_replays(backend, migrations, dialect).await;
}
