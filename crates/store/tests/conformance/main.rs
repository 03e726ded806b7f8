//! The storage conformance suite: every backend must pass every test here.
//!
//! Each test is an `async fn(Arc<dyn Store>)` written once, in the module
//! of its area; `on_both_backends!` at the bottom of that module runs it on
//! each backend:
//!
//! - `<area>::sqlite::<test>`: a fresh database file in a temporary directory;
//! - `<area>::postgres::<test>`: a fresh database from `vilvik-keys-test-db`. Without
//!   `VILVIK_KEYS_TEST_DATABASE_URL` these print a skip line and pass, unless
//!   `VILVIK_KEYS_REQUIRE_POSTGRES=1`.
//!
//! The keys, actor and policies come from `vilvik_keys_test_db::fixtures`;
//! times are whole seconds so that both backends round-trip them exactly.

mod accounts;
mod audit;
mod cap;
mod feed;
mod import;
mod keys;
mod managers;
mod prune;
mod request_ids;
mod revocation;
mod rotation;
mod streams;
mod updates;
mod usage;

use time::OffsetDateTime;
use vilvik_keys_domain::{AccountId, KeyId, KeyPrefix};
use vilvik_keys_store::{
    NewSecret, Outcome, Page, Replay, Rotation, SecretRecord, Store, StoreError,
};
use vilvik_keys_test_db::fixtures::{actor, roomy};

/// Every page of a listing, in order: `list(after)` reads the page after
/// cursor `after` (`None`: the first), and each page's cursor leads to
/// the next until a page has none.
async fn pages<T>(mut list: impl AsyncFnMut(Option<i64>) -> Page<T>) -> Vec<Vec<T>> {
    let mut pages = Vec::new();
    let mut after = None;
    loop {
        let page = list(after).await;
        pages.push(page.items);
        match page.next_cursor {
            Some(next) => after = Some(next),
            None => return pages,
        }
    }
}

/// The stored secret with `prefix`, and its key; panics when there is none.
async fn secret_of(store: &dyn Store, prefix: &KeyPrefix) -> SecretRecord {
    let found = store.find_secret(prefix).await.unwrap();
    found.unwrap_or_else(|| panic!("no secret has prefix {prefix}"))
}

/// Rotates `account`'s key `key_id` onto `secret` at `at`, for a test
/// that expects the rotation to be refused.
async fn try_rotate(
    store: &dyn Store,
    account: &AccountId,
    key_id: &KeyId,
    secret: &NewSecret,
    at: OffsetDateTime,
) -> Result<Rotation, StoreError> {
    store
        .rotate_key(account, key_id, secret, &actor(), at, &roomy())
        .await
}

/// What a call that ran did; panics with `replayed` when it was a replay.
fn done<T>(outcome: Outcome<T>, replayed: &str) -> T {
    match outcome {
        Outcome::Done(done) => done,
        Outcome::Replayed(_) => panic!("{replayed}"),
    }
}

/// What a replayed call answered; panics with `ran` when the call ran.
fn replayed<T>(outcome: Outcome<T>, ran: &str) -> Replay {
    match outcome {
        Outcome::Replayed(replay) => *replay,
        Outcome::Done(_) => panic!("{ran}"),
    }
}

/// How many keys `account` has, revoked ones included.
async fn key_count(store: &dyn Store, account: &AccountId) -> usize {
    let listed = store.list_keys(account, true, None, 1_000).await.unwrap();
    listed.items.len()
}

/// The prefixes the change log holds after sequence number `seq`, in order.
async fn published_since(store: &dyn Store, seq: i64) -> Vec<KeyPrefix> {
    let changes = store.changes_since(seq, 1_000).await.unwrap();
    changes.into_iter().map(|(_, prefix)| prefix).collect()
}
