//! The verify engine against a real SQLite store.

use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;
use vilvik_keys_domain::{
    AccountId, Clock, GeneratedKey, KeyFormatError, KeyId, ManualClock, Scope, ScopeSet, TierLimits,
};
use vilvik_keys_store::{Actor, NewKey, SqliteStore, Store};
use vilvik_keys_verify::{UsageConfig, UsageRecorder, Verdict, Verifier, VerifierConfig};

struct Fixture {
    store: Arc<dyn Store>,
    clock: Arc<ManualClock>,
    usage: UsageRecorder,
    verifier: Verifier,
    _dir: tempfile::TempDir,
}

async fn fixture(migrated: bool) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> =
        Arc::new(SqliteStore::open(&dir.path().join("k.db")).await.unwrap());
    if migrated {
        store.migrate().await.unwrap();
    }
    let clock = Arc::new(ManualClock::new(
        OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap(),
    ));
    let usage = UsageRecorder::new(store.clone(), UsageConfig::default());
    let verifier = Verifier::new(
        store.clone(),
        clock.clone(),
        usage.clone(),
        VerifierConfig::default(),
    );
    Fixture {
        store,
        clock,
        usage,
        verifier,
        _dir: dir,
    }
}

fn actor() -> Actor {
    Actor {
        name: "test".into(),
        ip: None,
    }
}

impl Fixture {
    async fn create(
        &self,
        scopes: &[&str],
        expires_in: Option<time::Duration>,
    ) -> (KeyId, GeneratedKey) {
        let now = self.clock.now();
        let (new, secret) = NewKey::builder("ACME".parse().unwrap())
            .name("ci-runner".parse().unwrap())
            .scopes(ScopeSet::parse(scopes).unwrap())
            .expires_at(expires_in.map(|d| now + d))
            .created_at(now)
            .build();
        let record = self
            .store
            .create_key(new, &actor(), TierLimits::default())
            .await
            .unwrap();
        (record.key_id, secret)
    }

    async fn verify(&self, key: &str, required: &[&str]) -> Verdict {
        let required: Vec<Scope> = required.iter().map(|s| s.parse().unwrap()).collect();
        self.verifier
            .verify(key.as_bytes(), &required, "192.0.2.1".parse().ok())
            .await
            .unwrap()
    }

    async fn last_used(&self, key_id: &KeyId) -> Option<OffsetDateTime> {
        let account: AccountId = "ACME".parse().unwrap();
        self.store
            .get_key(&account, key_id)
            .await
            .unwrap()
            .unwrap()
            .last_used_at
    }
}

#[tokio::test]
async fn malformed_keys_are_answered_without_touching_the_store() {
    // No schema: any lookup would fail.
    let f = fixture(false).await;
    let verdict = f.verify("vlk_nope", &[]).await;
    assert_eq!(verdict, Verdict::Malformed(KeyFormatError::WrongLength(8)));
    let good_shape = GeneratedKey::generate();
    assert!(
        f.verifier
            .verify(good_shape.expose_secret().as_bytes(), &[], None)
            .await
            .is_err()
    );
}

#[tokio::test]
async fn each_verdict_in_turn() {
    let f = fixture(true).await;
    let (key_id, secret) = f
        .create(&["datasets:*"], Some(time::Duration::hours(1)))
        .await;

    let Verdict::Valid(key) = f.verify(secret.expose_secret(), &["datasets:read"]).await else {
        panic!("expected valid");
    };
    assert_eq!(key.key_id, key_id);
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
    assert_eq!(
        f.verify(GeneratedKey::generate().expose_secret(), &[])
            .await,
        Verdict::NotFound
    );
    let forged = forge_with_prefix(secret.prefix().as_str());
    assert_eq!(f.verify(&forged, &[]).await, Verdict::NotFound);

    f.clock.advance(time::Duration::hours(2));
    assert!(matches!(
        f.verify(secret.expose_secret(), &[]).await,
        Verdict::Expired(_)
    ));

    let (key_id, secret) = f.create(&["a:b"], None).await;
    let account: AccountId = "ACME".parse().unwrap();
    let next = GeneratedKey::generate();
    f.store
        .rotate_key(
            &account,
            &key_id,
            next.prefix(),
            next.hash(),
            &actor(),
            f.clock.now(),
        )
        .await
        .unwrap();
    assert!(matches!(
        f.verify(secret.expose_secret(), &[]).await,
        Verdict::Rotated(_)
    ));
    assert!(f.verify(next.expose_secret(), &[]).await.is_valid());
    f.store
        .revoke_key(&account, &key_id, "test", &actor(), f.clock.now())
        .await
        .unwrap();
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

#[tokio::test]
async fn only_authenticated_uses_of_active_keys_are_recorded() {
    let f = fixture(true).await;
    let (key_id, secret) = f.create(&["a:b"], None).await;
    f.verify(secret.expose_secret(), &["c:d"]).await; // insufficient scope: still a use
    assert_eq!(f.usage.flush().await.unwrap(), 1);
    assert_eq!(f.last_used(&key_id).await, Some(f.clock.now()));

    let (other_id, other) = f.create(&["a:b"], None).await;
    let account: AccountId = "ACME".parse().unwrap();
    f.store
        .revoke_key(&account, &other_id, "", &actor(), f.clock.now())
        .await
        .unwrap();
    f.verify(other.expose_secret(), &[]).await;
    assert_eq!(f.usage.flush().await.unwrap(), 0);
    assert_eq!(f.last_used(&other_id).await, None);
}

#[tokio::test]
async fn uses_are_coalesced_per_key_and_bounded() {
    let f = fixture(true).await;
    let (key_id, _) = f.create(&["a:b"], None).await;
    let t0 = f.clock.now();
    for i in 0..1_000 {
        f.usage.record(
            &key_id,
            t0 + time::Duration::seconds(i),
            format!("192.0.2.{}", i % 200).parse().ok(),
        );
    }
    // An older use arriving late does not replace a newer one.
    f.usage.record(&key_id, t0, "198.51.100.1".parse().ok());
    assert_eq!(f.usage.flush().await.unwrap(), 1, "one row for one key");
    let account: AccountId = "ACME".parse().unwrap();
    let key = f.store.get_key(&account, &key_id).await.unwrap().unwrap();
    assert_eq!(key.last_used_at, Some(t0 + time::Duration::seconds(999)));
    assert_eq!(key.last_used_ip.as_deref(), Some("192.0.2.199"));

    let small = UsageRecorder::new(
        f.store.clone(),
        UsageConfig {
            flush_interval: Duration::from_secs(1),
            max_pending: 16,
        },
    );
    for _ in 0..200 {
        small.record(&KeyId::generate(), t0, None);
    }
    assert!(
        small.flush().await.unwrap() <= 16,
        "past the bound, further keys wait for the next interval"
    );
}

#[tokio::test]
async fn a_failed_flush_keeps_the_batch_for_the_next_one() {
    let f = fixture(false).await;
    f.usage.record(&KeyId::generate(), f.clock.now(), None);
    assert!(f.usage.flush().await.is_err(), "no schema yet");
    f.store.migrate().await.unwrap();
    assert_eq!(
        f.usage.flush().await.unwrap(),
        1,
        "retried on the next flush"
    );
}
