//! The verify engine against a real SQLite store.

use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;
use vilvik_keys_domain::{
    ApiKey, Clock, GeneratedKey, KeyFormatError, KeyId, KeyPrefix, ManualClock, Pepper, PepperId,
    Peppers, Scope,
};
use vilvik_keys_store::{KeyRecord, Store};
use vilvik_keys_test_db::Backend;
use vilvik_keys_test_db::fixtures::{
    account, actor, hash_under, manual_clock, new_key, new_secret, pepper, revoke, roomy, rotate,
    scopes,
};
use vilvik_keys_verify::{Origin, UsageConfig, UsageRecorder, Verdict, Verifier, VerifierConfig};

/// A verify node (with the fixtures' pepper) on a SQLite store of its
/// own, on a manual clock.
struct Fixture {
    store: Arc<dyn Store>,
    clock: Arc<ManualClock>,
    usage: UsageRecorder,
    verifier: Verifier,
    backend: Backend,
}

async fn fixture(migrated: bool) -> Fixture {
    let backend = Backend::sqlite();
    let store = backend.open().await;
    if migrated {
        store.migrate().await.unwrap();
    }
    let clock = manual_clock();
    let usage = UsageRecorder::new(store.clone(), UsageConfig::default());
    let peppers = Arc::new(Peppers::only(pepper()));
    let config = VerifierConfig::default();
    let verifier = Verifier::new(store.clone(), clock.clone(), usage.clone(), peppers, config);
    Fixture {
        store,
        clock,
        usage,
        verifier,
        backend,
    }
}

impl Fixture {
    /// Creates a key of ACME with `scopes`, expiring `expires_in` from now
    /// if given; returns it and its secret.
    async fn create(
        &self,
        scopes_granted: &[&str],
        expires_in: Option<time::Duration>,
    ) -> (KeyRecord, GeneratedKey) {
        let now = self.clock.now();
        let (mut new, secret) = new_key(&account("ACME"), "ci-runner", now);
        new.scopes = scopes(scopes_granted);
        new.expires_at = expires_in.map(|d| now + d);
        let key = self
            .store
            .create_key(new, &actor(), &roomy())
            .await
            .unwrap();
        (key, secret)
    }

    /// Another verify node on the same store, with `peppers`.
    fn node(&self, peppers: Peppers) -> Verifier {
        Verifier::new(
            self.store.clone(),
            self.clock.clone(),
            self.usage.clone(),
            Arc::new(peppers),
            VerifierConfig::default(),
        )
    }

    /// The stored pepper id and hash of the secret with `prefix`.
    async fn stored(&self, prefix: &KeyPrefix) -> (Option<PepperId>, [u8; 32]) {
        let secret = self.store.find_secret(prefix).await.unwrap().unwrap();
        (secret.pepper_id, *secret.hash.as_bytes())
    }

    /// Turns the stored hash of `secret` into the legacy unkeyed one, as
    /// a database from before peppers holds it.
    fn make_legacy(&self, secret: &GeneratedKey) {
        let presented: ApiKey = secret.expose_secret().parse().unwrap();
        let path = self.backend.sqlite_path().unwrap();
        let conn = rusqlite::Connection::open(path).unwrap();
        let changed = conn
            .execute(
                "UPDATE key_secrets SET hash = ?1, pepper_id = NULL WHERE prefix = ?2",
                rusqlite::params![
                    &presented.hash_with(None).as_bytes()[..],
                    secret.prefix().as_str()
                ],
            )
            .unwrap();
        assert_eq!(changed, 1);
    }

    async fn verify(&self, key: &str, required: &[&str]) -> Verdict {
        let required: Vec<Scope> = required.iter().map(|s| s.parse().unwrap()).collect();
        self.verifier
            .verify(key.as_bytes(), &required, seen_from("192.0.2.1"))
            .await
            .unwrap()
    }

    async fn last_used(&self, key: &KeyRecord) -> Option<OffsetDateTime> {
        let stored = self.store.get_key(&key.account_id, &key.key_id).await;
        stored.unwrap().unwrap().last_used_at
    }
}

#[tokio::test]
async fn malformed_keys_are_answered_without_touching_the_store() {
    // No schema: any lookup would fail.
    let f = fixture(false).await;
    let verdict = f.verify("vlk_nope", &[]).await;
    assert_eq!(verdict, Verdict::Malformed(KeyFormatError::WrongLength(8)));
    let good_shape = new_secret();
    assert!(
        f.verifier
            .verify(
                good_shape.expose_secret().as_bytes(),
                &[],
                Origin::default()
            )
            .await
            .is_err()
    );
}

#[tokio::test]
async fn each_verdict_in_turn() {
    let f = fixture(true).await;
    let (created, secret) = f
        .create(&["datasets:*"], Some(time::Duration::hours(1)))
        .await;

    let Verdict::Valid(key) = f.verify(secret.expose_secret(), &["datasets:read"]).await else {
        panic!("expected valid");
    };
    assert_eq!(key.key_id, created.key_id);
    match f
        .verify(secret.expose_secret(), &["datasets:read", "models:read"])
        .await
    {
        Verdict::InsufficientScope { missing, .. } => {
            assert_eq!(missing, vec!["models:read".parse::<Scope>().unwrap()])
        }
        other => panic!("expected insufficient scope, got {other:?}"),
    }
    // Unknown key, and a forged secret under a real prefix: both NOT_FOUND.
    let unknown = new_secret();
    assert_eq!(
        f.verify(unknown.expose_secret(), &[]).await,
        Verdict::NotFound
    );
    let forged = forge_with_prefix(secret.prefix().as_str());
    assert_eq!(f.verify(&forged, &[]).await, Verdict::NotFound);

    f.clock.advance(time::Duration::hours(2));
    assert!(matches!(
        f.verify(secret.expose_secret(), &[]).await,
        Verdict::Expired(_)
    ));

    let (key, secret) = f.create(&["a:b"], None).await;
    let next = new_secret();
    rotate(&*f.store, &key, &next, f.clock.now()).await;
    assert!(matches!(
        f.verify(secret.expose_secret(), &[]).await,
        Verdict::Rotated(_)
    ));
    assert!(f.verify(next.expose_secret(), &[]).await.is_valid());
    revoke(&*f.store, &key, "test", f.clock.now()).await;
    assert!(matches!(
        f.verify(next.expose_secret(), &[]).await,
        Verdict::Revoked(_)
    ));
}

/// A well-formed key (valid checksum) that shares `prefix` but not the secret.
fn forge_with_prefix(prefix: &str) -> String {
    let body = format!("{prefix}_{}", "A".repeat(32));
    let crc = crc32(&body);
    format!("{body}{crc}")
}

fn crc32(body: &str) -> String {
    // Same encoding as the domain crate: 6 base62 digits, most significant first.
    const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut value = crc32fast::hash(body.as_bytes());
    let mut digits = [b'0'; 6];
    for slot in digits.iter_mut().rev() {
        *slot = ALPHABET[(value % 62) as usize];
        value /= 62;
    }
    String::from_utf8(digits.to_vec()).unwrap()
}

/// A verify seen from `ip`, claiming nothing.
fn seen_from(ip: &str) -> Origin {
    Origin {
        observed: ip.parse().ok(),
        claimed: None,
    }
}

#[tokio::test]
async fn valid_uses_are_last_uses_and_refusals_of_a_matched_secret_are_counted_apart() {
    let f = fixture(true).await;
    let (key, secret) = f.create(&["a:b"], None).await;
    let valid_at = f.clock.now();
    assert!(f.verify(secret.expose_secret(), &["a:b"]).await.is_valid());
    f.clock.advance(time::Duration::minutes(1));
    // Insufficient scope: a refusal, not a use.
    f.verify(secret.expose_secret(), &["c:d"]).await;
    assert_eq!(f.usage.flush().await.unwrap(), 1);
    assert_eq!(f.last_used(&key).await, Some(valid_at));
    let stored = f.store.get_key(&key.account_id, &key.key_id).await;
    let stored = stored.unwrap().unwrap();
    assert_eq!(stored.usage.valid_uses, 1);
    assert_eq!(stored.usage.rejected_uses, 1);
    assert_eq!(stored.usage.last_rejected_at, Some(f.clock.now()));
    assert_eq!(stored.usage.last_rejected_ip.as_deref(), Some("192.0.2.1"));

    let (other_key, other) = f.create(&["a:b"], None).await;
    revoke(&*f.store, &other_key, "", f.clock.now()).await;
    f.verify(other.expose_secret(), &[]).await;
    assert_eq!(f.usage.flush().await.unwrap(), 1);
    let stored = f
        .store
        .get_key(&other_key.account_id, &other_key.key_id)
        .await;
    let stored = stored.unwrap().unwrap();
    assert_eq!(stored.last_used_at, None);
    assert_eq!(
        (stored.usage.valid_uses, stored.usage.rejected_uses),
        (0, 1)
    );

    // A wrong secret is nobody's use.
    f.verify(&forge_with_prefix(secret.prefix().as_str()), &[])
        .await;
    assert_eq!(f.usage.flush().await.unwrap(), 0);
}

#[tokio::test]
async fn uses_are_coalesced_per_key_and_bounded() {
    let f = fixture(true).await;
    let (key, _) = f.create(&["a:b"], None).await;
    let t0 = f.clock.now();
    for i in 0..1_000 {
        f.usage.record(
            &key.key_id,
            t0 + time::Duration::seconds(i),
            seen_from(&format!("192.0.2.{}", i % 200)),
        );
    }
    // An older use arriving late does not replace a newer one.
    f.usage.record(&key.key_id, t0, seen_from("198.51.100.1"));
    assert_eq!(f.usage.flush().await.unwrap(), 1, "one row for one key");
    let stored = f.store.get_key(&key.account_id, &key.key_id).await;
    let stored = stored.unwrap().unwrap();
    assert_eq!(stored.last_used_at, Some(t0 + time::Duration::seconds(999)));
    assert_eq!(stored.last_used_ip.as_deref(), Some("192.0.2.199"));
    assert_eq!(stored.usage.valid_uses, 1_001, "every use counted");

    let small = UsageRecorder::new(
        f.store.clone(),
        UsageConfig {
            flush_interval: Duration::from_secs(1),
            max_pending: 16,
        },
    );
    for _ in 0..200 {
        small.record(&KeyId::generate(), t0, Origin::default());
    }
    assert!(
        small.flush().await.unwrap() <= 16,
        "past the bound, further keys wait for the next interval"
    );
}

#[tokio::test]
async fn a_failed_flush_keeps_the_batch_for_the_next_one() {
    let f = fixture(false).await;
    f.usage
        .record(&KeyId::generate(), f.clock.now(), Origin::default());
    assert!(f.usage.flush().await.is_err(), "no schema yet");
    f.store.migrate().await.unwrap();
    assert_eq!(
        f.usage.flush().await.unwrap(),
        1,
        "retried on the next flush"
    );
}

async fn verify_on(node: &Verifier, key: &GeneratedKey) -> Verdict {
    node.verify(key.expose_secret().as_bytes(), &[], Origin::default())
        .await
        .unwrap()
}

/// What [`Fixture::stored`] says of `secret` once it is hashed under
/// `pepper`.
fn stored_under(secret: &GeneratedKey, pepper: &Pepper) -> (Option<PepperId>, [u8; 32]) {
    (Some(pepper.id()), *hash_under(secret, pepper).as_bytes())
}

#[tokio::test]
async fn a_key_under_an_older_pepper_verifies_and_moves_to_the_current_one() {
    let f = fixture(true).await;
    let (a, b) = (pepper(), Pepper::generate());
    let (key, secret) = f.create(&["a:b"], None).await;
    let (revoked_key, revoked) = f.create(&[], None).await;
    revoke(&*f.store, &revoked_key, "", f.clock.now()).await;

    let rotated = f.node(Peppers::new(b.clone(), vec![a.clone()]).unwrap());
    let Verdict::Valid(verified) = verify_on(&rotated, &secret).await else {
        panic!("an older pepper's key verifies");
    };
    assert_eq!(verified.key_id, key.key_id);
    assert!(matches!(
        verify_on(&rotated, &revoked).await,
        Verdict::Revoked(_)
    ));
    // A wrong secret under the old pepper notes nothing.
    let forged = forge_with_prefix(secret.prefix().as_str());
    assert_eq!(
        rotated
            .verify(forged.as_bytes(), &[], Origin::default())
            .await
            .unwrap(),
        Verdict::NotFound
    );
    // Noted once per key however often it verifies, and written behind.
    assert!(verify_on(&rotated, &secret).await.is_valid());
    assert_eq!(rotated.pending_rehashes(), 2);
    assert_eq!(f.stored(secret.prefix()).await.0, Some(a.id()));
    assert_eq!(rotated.flush_rehashes().await.unwrap(), 2);
    assert_eq!(f.stored(secret.prefix()).await, stored_under(&secret, &b));
    assert_eq!(f.stored(revoked.prefix()).await.0, Some(b.id()));

    // The node's entry moved with it: nothing more to do.
    assert!(verify_on(&rotated, &secret).await.is_valid());
    assert_eq!(rotated.pending_rehashes(), 0);
    // With the old pepper retired, the key still verifies; a node that
    // still has only the old one no longer can.
    let retired = f.node(Peppers::only(b.clone()));
    assert!(verify_on(&retired, &secret).await.is_valid());
    assert!(matches!(
        verify_on(&retired, &revoked).await,
        Verdict::Revoked(_)
    ));
    let stale = f.node(Peppers::only(a));
    assert_eq!(verify_on(&stale, &secret).await, Verdict::NotFound);
}

#[tokio::test]
async fn a_key_whose_pepper_is_not_configured_is_not_found_and_stays_as_it_is() {
    let f = fixture(true).await;
    let (_, secret) = f.create(&[], None).await;
    let before = f.stored(secret.prefix()).await;
    let other = f.node(Peppers::only(Pepper::generate()));
    for _ in 0..3 {
        assert_eq!(verify_on(&other, &secret).await, Verdict::NotFound);
    }
    assert_eq!(other.pending_rehashes(), 0);
    assert_eq!(other.flush_rehashes().await.unwrap(), 0);
    assert_eq!(f.stored(secret.prefix()).await, before);
    // Given the pepper again (as an older one), the key verifies.
    let again = f.node(Peppers::new(Pepper::generate(), vec![pepper()]).unwrap());
    assert!(verify_on(&again, &secret).await.is_valid());
}

#[tokio::test]
async fn a_legacy_unkeyed_hash_verifies_and_is_rehashed_with_the_current_pepper() {
    let f = fixture(true).await;
    let (key, secret) = f.create(&["a:b"], None).await;
    f.make_legacy(&secret);
    let node = f.node(Peppers::only(pepper()));
    let Verdict::Valid(verified) = verify_on(&node, &secret).await else {
        panic!("a legacy key verifies");
    };
    assert_eq!(verified.key_id, key.key_id);
    assert_eq!(node.pending_rehashes(), 1);
    assert_eq!(node.flush_rehashes().await.unwrap(), 1);
    assert_eq!(
        f.stored(secret.prefix()).await,
        stored_under(&secret, &pepper())
    );
    assert!(verify_on(&node, &secret).await.is_valid());
    assert_eq!(node.pending_rehashes(), 0);
    // And a wrong secret under a legacy prefix is NOT_FOUND, noting nothing.
    let (_, other) = f.create(&[], None).await;
    f.make_legacy(&other);
    let forged = forge_with_prefix(other.prefix().as_str());
    assert_eq!(
        node.verify(forged.as_bytes(), &[], Origin::default())
            .await
            .unwrap(),
        Verdict::NotFound
    );
    assert_eq!(node.pending_rehashes(), 0);
}

#[tokio::test]
async fn a_rehash_another_node_wrote_first_makes_this_one_read_the_stored_hash() {
    let f = fixture(true).await;
    let (a, b) = (pepper(), Pepper::generate());
    let (_, secret) = f.create(&[], None).await;
    let peppers = || Peppers::new(b.clone(), vec![a.clone()]).unwrap();
    let (first, second) = (f.node(peppers()), f.node(peppers()));
    assert!(verify_on(&first, &secret).await.is_valid());
    assert!(verify_on(&second, &secret).await.is_valid());
    assert_eq!(first.flush_rehashes().await.unwrap(), 1);
    assert_eq!(second.flush_rehashes().await.unwrap(), 0, "written once");
    assert_eq!(f.stored(secret.prefix()).await, stored_under(&secret, &b));
    // The loser forgot its entry: its next verify reads the new hash and
    // has nothing left to re-hash.
    assert!(verify_on(&second, &secret).await.is_valid());
    assert_eq!(second.pending_rehashes(), 0);
}
