//! The in-memory index and the change-log follower, against a real SQLite
//! store wrapped so that the test can count its lookups and cut it off.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use vilvik_keys_domain::{Clock, GeneratedKey, KeyId, KeyPrefix, ManualClock, Peppers};
use vilvik_keys_store::{
    ChangeListener, KeySource, NewKey, OutageKind, Rehash, Result, SecretEntry, SecretRecord,
    Store, StoreError, UsageRecord,
};
use vilvik_keys_test_db::fixtures::{
    account, actor, manual_clock, new_key_for, new_secret, pepper, roomy,
};
use vilvik_keys_test_db::{Backend, eventually};
use vilvik_keys_verify::{
    CacheConfig, FeedConfig, MissConfig, Origin, UsageConfig, UsageRecorder, Verdict, Verifier,
    VerifierConfig, VerifyError,
};

/// A real store whose lookups are counted and which the test can take
/// down: the change feed alone (`feed_down`), or every read
/// (`store_down`); hang the change feed (`feed_hung`: its reads never
/// answer, as with a frozen database); or refuse to stream the known
/// prefixes (`prefixes_down`).
/// The verify engine sees only its [`KeySource`] side; the tests make
/// their changes through `inner`.
#[derive(Debug)]
struct Instrumented {
    inner: Arc<dyn Store>,
    finds: AtomicUsize,
    find_delay: Duration,
    feed_down: AtomicBool,
    feed_hung: AtomicBool,
    store_down: AtomicBool,
    prefixes_down: AtomicBool,
}

impl Instrumented {
    /// Fails or never answers, as the test set the feed.
    async fn feed(&self) -> Result<()> {
        if self.feed_hung.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        if self.feed_down.load(Ordering::SeqCst) {
            return Err(down());
        }
        Ok(())
    }
}

fn down() -> StoreError {
    StoreError::unavailable(OutageKind::ConnectionRefused, "taken down by the test")
}

#[async_trait]
impl KeySource for Instrumented {
    async fn find_secret(&self, prefix: &KeyPrefix) -> Result<Option<SecretRecord>> {
        self.finds.fetch_add(1, Ordering::SeqCst);
        if self.store_down.load(Ordering::SeqCst) {
            return Err(down());
        }
        tokio::time::sleep(self.find_delay).await;
        self.inner.find_secret(prefix).await
    }
    async fn record_usage(&self, usage: &[UsageRecord]) -> Result<()> {
        self.inner.record_usage(usage).await
    }
    async fn rehash_secrets(&self, rehashes: &[Rehash]) -> Result<Vec<KeyPrefix>> {
        self.inner.rehash_secrets(rehashes).await
    }
    async fn change_sequence(&self) -> Result<i64> {
        self.feed().await?;
        self.inner.change_sequence().await
    }
    async fn changes_since(&self, seq: i64, limit: u32) -> Result<Vec<(i64, KeyPrefix)>> {
        self.feed().await?;
        self.inner.changes_since(seq, limit).await
    }
    async fn listen(&self) -> Result<Option<Box<dyn ChangeListener>>> {
        self.feed().await?;
        self.inner.listen().await
    }
    async fn stream_prefixes(
        &self,
        batch: usize,
        sink: &mut (dyn FnMut(Vec<KeyPrefix>) + Send),
    ) -> Result<usize> {
        if self.prefixes_down.load(Ordering::SeqCst) {
            return Err(down());
        }
        self.inner.stream_prefixes(batch, sink).await
    }
    async fn stream_secrets(
        &self,
        batch: usize,
        sink: &mut (dyn FnMut(Vec<SecretEntry>) + Send),
    ) -> Result<usize> {
        self.inner.stream_secrets(batch, sink).await
    }
}

struct Node {
    store: Arc<Instrumented>,
    clock: Arc<ManualClock>,
    verifier: Verifier,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    /// The SQLite file under `store`, for other writers to open.
    backend: Backend,
}

const BOUND: Duration = Duration::from_secs(30);
/// How long an unknown prefix is remembered, on the node's manual clock:
/// only the test's `advance` expires a negative entry.
const NEGATIVE_TTL: Duration = Duration::from_secs(2);
/// A bound for waits on the follower; reached only when something is broken.
const PATIENCE: Duration = Duration::from_secs(5);

/// How long a change-feed read may take in these tests.
const FEED_DEADLINE: Duration = Duration::from_millis(200);

async fn node(find_delay: Duration, staleness_bound: Duration) -> Node {
    node_with(find_delay, staleness_bound, MissConfig::default(), true).await
}

/// A node (no lookup delay, the usual bound) that verified a key of its
/// own and holds it in memory, the key's creation applied by the
/// follower first (it evicts the prefix); with the key's id and secret.
async fn node_with_a_cached_key() -> (Node, KeyId, GeneratedKey) {
    let node = node(Duration::ZERO, BOUND).await;
    let (key_id, key) = node.create_and_catch_up().await;
    assert!(node.verify(&key).await.unwrap().is_valid());
    (node, key_id, key)
}

/// A node; without `prefix_set` it never learns the set of known prefixes
/// (their stream fails), so unknown prefixes are looked up in the store.
async fn node_with(
    find_delay: Duration,
    staleness_bound: Duration,
    misses: MissConfig,
    prefix_set: bool,
) -> Node {
    let backend = Backend::sqlite();
    let inner = backend.open().await;
    inner.migrate().await.unwrap();
    let store = Arc::new(Instrumented {
        inner,
        finds: AtomicUsize::new(0),
        find_delay,
        feed_down: AtomicBool::new(false),
        feed_hung: AtomicBool::new(false),
        store_down: AtomicBool::new(false),
        prefixes_down: AtomicBool::new(!prefix_set),
    });
    let clock = manual_clock();
    let usage = UsageRecorder::new(store.clone(), UsageConfig::default());
    let verifier = Verifier::new(
        store.clone(),
        clock.clone(),
        usage,
        Arc::new(Peppers::only(pepper())),
        VerifierConfig {
            cache: CacheConfig {
                negative_ttl: NEGATIVE_TTL,
                ..CacheConfig::default()
            },
            feed: FeedConfig {
                staleness_bound,
                consistency_check_interval: Duration::from_millis(100),
                poll_interval: Duration::from_millis(20),
                retry_interval: Duration::from_millis(20),
                fallback_poll_interval: Duration::from_millis(20),
                deadline: FEED_DEADLINE,
            },
            misses,
            ..VerifierConfig::default()
        },
    );
    verifier.mark_change_log_position().await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let follower = verifier.clone();
    tokio::spawn(async move {
        follower
            .follow_changes(async {
                let _ = stopped.await;
            })
            .await
    });
    let node = Node {
        store,
        clock,
        verifier,
        stop: Some(stop),
        backend,
    };
    node.wait_until_following(true).await;
    assert_eq!(node.verifier.known_prefixes().1, prefix_set);
    node
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Whether a verify answered that the key is revoked.
fn answers_revoked(outcome: Result<Verdict, VerifyError>) -> bool {
    matches!(outcome, Ok(Verdict::Revoked(_)))
}

/// A key of ACME for `secret`, created `at`.
fn key_for(secret: &GeneratedKey, at: time::OffsetDateTime) -> NewKey {
    new_key_for(&account("ACME"), "ci-runner", secret, at)
}

impl Node {
    /// Creates a key as this node's admin API would.
    async fn create(&self) -> (KeyId, GeneratedKey) {
        let secret = new_secret();
        (self.create_with(&secret).await, secret)
    }

    /// [`Node::create`], then waits until the follower has applied the
    /// creation (which evicts the key's prefix), so that what a verify
    /// caches next stays cached.
    async fn create_and_catch_up(&self) -> (KeyId, GeneratedKey) {
        let created = self.create().await;
        self.wait_until_caught_up().await;
        created
    }

    /// Revokes key `key_id` behind this node's back (it is not told), as
    /// another node's admin API would.
    async fn revoke_elsewhere(&self, key_id: &KeyId) {
        let (acme, at) = (account("ACME"), self.clock.now());
        self.store
            .inner
            .revoke_key(&acme, key_id, "leaked", &actor(), at)
            .await
            .unwrap();
    }

    async fn create_with(&self, secret: &GeneratedKey) -> KeyId {
        let new = key_for(secret, self.clock.now());
        let key_id = self
            .store
            .inner
            .create_key(new, &actor(), &roomy())
            .await
            .unwrap()
            .key_id;
        // As the admin API does after each change: this node knows the key
        // at once, whatever the feed's delay.
        self.verifier.invalidate(secret.prefix());
        key_id
    }

    async fn verify(&self, key: &GeneratedKey) -> std::result::Result<Verdict, VerifyError> {
        self.verifier
            .verify(key.expose_secret().as_bytes(), &[], Origin::default())
            .await
    }

    fn finds(&self) -> usize {
        self.store.finds.load(Ordering::SeqCst)
    }

    /// Throws `fault`, one of the store's switches that take the change
    /// feed down, and waits until the follower notices.
    async fn cut_feed(&self, fault: &AtomicBool) {
        fault.store(true, Ordering::SeqCst);
        self.wait_until_following(false).await;
    }

    /// Waits until the follower is (or is no longer) following the feed.
    async fn wait_until_following(&self, following: bool) {
        let what = if following {
            "the follower follows the change feed"
        } else {
            "the follower notices the feed is down"
        };
        eventually(PATIENCE, what, || async {
            self.verifier.feed_health().following() == following
        })
        .await;
    }

    /// Waits until the follower has applied every change in the log so far.
    async fn wait_until_caught_up(&self) {
        let up_to = self.store.inner.change_sequence().await.unwrap();
        eventually(
            PATIENCE,
            &format!("the follower applies change {up_to}"),
            || async { self.verifier.feed_health().last_applied() >= up_to },
        )
        .await;
    }
}

#[tokio::test]
async fn a_hit_touches_no_store() {
    let (node, _, key) = node_with_a_cached_key().await;
    assert_eq!(node.finds(), 1);
    node.store.store_down.store(true, Ordering::SeqCst);
    for _ in 0..1_000 {
        assert!(node.verify(&key).await.unwrap().is_valid());
    }
    assert_eq!(
        node.finds(),
        1,
        "every later verify was answered from memory"
    );
    assert_eq!(node.verifier.cached_secrets(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_for_one_prefix_share_one_load() {
    let node = Arc::new(node(Duration::from_millis(100), BOUND).await);
    let (_, key) = node.create_and_catch_up().await;
    let key = Arc::new(key);
    let mut verifies = tokio::task::JoinSet::new();
    for _ in 0..50 {
        let (node, key) = (node.clone(), key.clone());
        verifies.spawn(async move { node.verify(&key).await.unwrap().is_valid() });
    }
    while let Some(valid) = verifies.join_next().await {
        assert!(valid.unwrap());
    }
    assert_eq!(node.finds(), 1);
}

#[tokio::test]
async fn without_the_prefix_set_unknown_prefixes_are_remembered_briefly() {
    let node = node_with(Duration::ZERO, BOUND, MissConfig::default(), false).await;
    let stranger = new_secret();
    for _ in 0..20 {
        assert_eq!(node.verify(&stranger).await.unwrap(), Verdict::NotFound);
    }
    assert_eq!(
        node.finds(),
        1,
        "a flood of one unknown key costs one lookup"
    );
    node.clock
        .advance(time::Duration::try_from(NEGATIVE_TTL).unwrap() - time::Duration::milliseconds(1));
    assert_eq!(node.verify(&stranger).await.unwrap(), Verdict::NotFound);
    assert_eq!(node.finds(), 1, "the negative entry lasts its whole TTL");
    node.clock.advance(time::Duration::milliseconds(1));
    assert_eq!(node.verify(&stranger).await.unwrap(), Verdict::NotFound);
    assert_eq!(node.finds(), 2, "the negative entry expired");
}

#[tokio::test]
async fn a_key_created_after_its_prefix_was_cached_as_unknown_is_found() {
    // The node's clock stands still, so the negative entry never expires:
    // only the creation's change-log entry can evict it.
    let node = node_with(Duration::ZERO, BOUND, MissConfig::default(), false).await;
    let key = new_secret();
    assert_eq!(node.verify(&key).await.unwrap(), Verdict::NotFound);
    assert_eq!(node.verify(&key).await.unwrap(), Verdict::NotFound);
    assert_eq!(node.finds(), 1, "the unknown prefix is cached");
    node.create_with(&key).await;
    node.wait_until_caught_up().await;
    assert!(
        node.verify(&key).await.unwrap().is_valid(),
        "the negative entry outlived the key's creation"
    );
    assert_eq!(node.finds(), 2, "the creation evicted the negative entry");
}

#[tokio::test]
async fn changes_by_another_writer_are_evicted_by_the_follower() {
    let (node, key_id, key) = node_with_a_cached_key().await;
    // Another process on the same database file revokes the key.
    let other = node.backend.open().await;
    let (acme, at) = (account("ACME"), node.clock.now());
    other
        .revoke_key(&acme, &key_id, "leaked", &actor(), at)
        .await
        .unwrap();
    eventually(
        Duration::from_secs(1),
        "the follower evicts the key revoked by another writer",
        || async { answers_revoked(node.verify(&key).await) },
    )
    .await;
}

#[tokio::test]
async fn changes_missed_while_the_feed_was_down_are_caught_up() {
    let (node, key_id, key) = node_with_a_cached_key().await;
    node.cut_feed(&node.store.feed_down).await;
    node.revoke_elsewhere(&key_id).await;
    // Within the bound the cached answer stands: the node cannot know.
    assert!(node.verify(&key).await.unwrap().is_valid());
    node.store.feed_down.store(false, Ordering::SeqCst);
    node.wait_until_following(true).await;
    assert!(answers_revoked(node.verify(&key).await));
}

#[tokio::test]
async fn changes_missed_and_pruned_from_the_log_clear_the_whole_cache() {
    let node = node(Duration::ZERO, BOUND).await;
    let (revoked_id, revoked) = node.create().await;
    let (_, untouched) = node.create().await;
    assert!(node.verify(&revoked).await.unwrap().is_valid());
    assert!(node.verify(&untouched).await.unwrap().is_valid());
    let finds = node.finds();
    node.cut_feed(&node.store.feed_down).await;
    node.revoke_elsewhere(&revoked_id).await;
    let (_, created_while_cut_off) = node.create().await;
    node.create().await; // the newest entry, which pruning keeps
    let pruned = node
        .store
        .inner
        .prune_changes(node.clock.now() + Duration::from_secs(86_400))
        .await
        .unwrap();
    assert!(pruned >= 4, "{pruned}");
    node.store.feed_down.store(false, Ordering::SeqCst);
    node.wait_until_following(true).await;
    assert!(answers_revoked(node.verify(&revoked).await));
    // Nothing cached survived: the unchanged key is read again.
    assert!(node.verify(&untouched).await.unwrap().is_valid());
    assert_eq!(node.finds(), finds + 2);
    // The set of known prefixes was reloaded: a key whose creation was
    // pruned from the log is known.
    assert_eq!(node.verifier.known_prefixes(), (4, true));
    assert!(
        node.verify(&created_while_cut_off)
            .await
            .unwrap()
            .is_valid()
    );
}

#[tokio::test]
async fn an_unknown_prefix_is_not_found_without_a_store_access() {
    let node = node(Duration::ZERO, BOUND).await;
    let (_, known) = node.create().await;
    node.wait_until_caught_up().await;
    node.store.store_down.store(true, Ordering::SeqCst);
    for _ in 0..100 {
        let stranger = new_secret();
        assert_eq!(node.verify(&stranger).await.unwrap(), Verdict::NotFound);
    }
    assert_eq!(node.finds(), 0, "no lookup for a prefix nobody has");
    // A known prefix not in memory still needs the store.
    assert!(node.verify(&known).await.is_err());
    assert_eq!(node.finds(), 1);
}

#[tokio::test]
async fn a_key_created_by_another_writer_becomes_known_through_the_feed() {
    let node = node(Duration::ZERO, BOUND).await;
    // Created behind the verifier's back (no `invalidate`): only the change
    // feed can tell it.
    let other = node.backend.open().await;
    let key = new_secret();
    other
        .create_key(key_for(&key, node.clock.now()), &actor(), &roomy())
        .await
        .unwrap();
    eventually(
        Duration::from_secs(1),
        "the follower learns the new prefix",
        || async { node.verify(&key).await.unwrap().is_valid() },
    )
    .await;
    assert_eq!(node.finds(), 1, "one lookup, once the prefix was known");
}

#[tokio::test]
async fn polls_renew_the_lease() {
    let (node, _, key) = node_with_a_cached_key().await;
    let finds = node.finds();
    node.clock.advance(time::Duration::seconds(31));
    eventually(PATIENCE, "a poll renews the lease", || async {
        node.verifier
            .feed_health()
            .lease_age(node.clock.now())
            .is_some_and(|age| age < BOUND)
    })
    .await;
    assert!(node.verify(&key).await.unwrap().is_valid());
    assert_eq!(node.finds(), finds, "answered from memory past the bound");
}

#[tokio::test]
async fn a_hung_change_log_ends_the_lease_at_the_bound() {
    let (node, key_id, key) = node_with_a_cached_key().await;
    // Reads of the change log never answer, as with a frozen database or
    // a partition that drops packets; the follower notices within its
    // deadline.
    node.cut_feed(&node.store.feed_hung).await;
    node.revoke_elsewhere(&key_id).await;
    node.clock.advance(time::Duration::seconds(29));
    assert!(
        node.verify(&key).await.unwrap().is_valid(),
        "within the bound the node answers from memory: it cannot know"
    );
    node.clock.advance(time::Duration::seconds(2));
    assert!(
        answers_revoked(node.verify(&key).await),
        "past the bound only a fresh read counts"
    );
}

#[tokio::test]
async fn past_the_staleness_bound_cached_entries_are_not_trusted() {
    let (node, key_id, key) = node_with_a_cached_key().await;

    // The feed and the database go down together, as in an outage.
    node.store.store_down.store(true, Ordering::SeqCst);
    node.cut_feed(&node.store.feed_down).await;
    node.clock.advance(time::Duration::seconds(29));
    assert!(
        node.verify(&key).await.unwrap().is_valid(),
        "within the bound a database outage costs no availability"
    );
    node.clock.advance(time::Duration::seconds(2));
    let err = node.verify(&key).await.unwrap_err();
    assert!(
        matches!(err, VerifyError::Store(StoreError::Unavailable(_))),
        "{err:?}"
    );

    // The database is back but the feed is not: answers come fresh from the
    // store, so a revocation the node missed is honoured.
    node.store.store_down.store(false, Ordering::SeqCst);
    node.revoke_elsewhere(&key_id).await;
    assert!(answers_revoked(node.verify(&key).await));
}

#[tokio::test]
async fn a_zero_bound_fails_closed_at_once() {
    let node = node(Duration::ZERO, Duration::ZERO).await;
    let (_, key) = node.create().await;
    assert!(node.verify(&key).await.unwrap().is_valid());
    node.store.store_down.store(true, Ordering::SeqCst);
    node.cut_feed(&node.store.feed_down).await;
    assert!(node.verify(&key).await.is_err());
    // A malformed key still gets its answer: it needs neither cache nor store.
    let answer = node
        .verifier
        .verify(b"vlk_typo", &[], Origin::default())
        .await
        .unwrap();
    assert!(matches!(answer, Verdict::Malformed(_)));
}

#[tokio::test]
async fn local_invalidation_is_immediate() {
    let (node, key_id, key) = node_with_a_cached_key().await;
    node.revoke_elsewhere(&key_id).await;
    node.verifier.invalidate(key.prefix());
    assert!(answers_revoked(node.verify(&key).await));
}

#[tokio::test]
async fn preload_puts_every_secret_in_memory() {
    let node = node(Duration::ZERO, BOUND).await;
    let secrets: Vec<GeneratedKey> = (0..2_500).map(|_| new_secret()).collect();
    let keys = secrets
        .iter()
        .map(|secret| key_for(secret, node.clock.now()))
        .collect();
    node.store.inner.import_keys(keys, &actor()).await.unwrap();
    // Let the follower pass the import's change-log entries first, so that
    // it has nothing left to evict.
    node.wait_until_caught_up().await;
    assert_eq!(node.verifier.preload().await.unwrap(), 2_500);
    assert_eq!(node.verifier.cached_secrets(), 2_500);
    node.store.store_down.store(true, Ordering::SeqCst);
    for secret in &secrets {
        assert!(node.verify(secret).await.unwrap().is_valid());
    }
    assert_eq!(node.finds(), 0, "every verify was answered from memory");
}

/// A verify's future is moved several times on its way through the gRPC
/// stack; the store lookup of a miss is boxed so that a hit's stays small.
#[tokio::test]
async fn the_future_of_a_verify_stays_small() {
    let node = node(Duration::ZERO, BOUND).await;
    let (_, key) = node.create().await;
    let verify = node
        .verifier
        .verify(key.expose_secret().as_bytes(), &[], Origin::default());
    let size = std::mem::size_of_val(&verify);
    assert!(size <= 160, "{size} bytes");
    assert!(verify.await.unwrap().is_valid());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misses_beyond_their_budget_fail_at_once_and_hits_never_wait_for_them() {
    let slow = Duration::from_secs(2);
    let misses = MissConfig {
        concurrency: 2,
        timeout: Duration::from_secs(10),
    };
    let node = Arc::new(node_with(slow, BOUND, misses, true).await);
    let (_, cached) = node.create().await;
    // Ten keys not in memory yet, against a store that takes 2 s.
    let mut uncached = Vec::new();
    for _ in 0..10 {
        uncached.push(node.create().await.1);
    }
    // Their creation evicts the prefixes when the follower applies it: let
    // that happen first, so the load below stays cached.
    node.wait_until_caught_up().await;
    assert!(node.verify(&cached).await.unwrap().is_valid());

    let mut lookups = tokio::task::JoinSet::new();
    for key in uncached {
        let node = node.clone();
        lookups.spawn(async move { node.verify(&key).await });
    }
    // Two take the lookup permits; the other eight are refused at once.
    let mut refused = 0;
    for _ in 0..8 {
        let outcome = lookups.join_next().await.unwrap().unwrap();
        assert!(
            matches!(outcome, Err(VerifyError::LookupsSaturated { permits: 2 })),
            "{outcome:?}"
        );
        refused += 1;
    }
    assert_eq!(refused, 8);
    assert_eq!(node.finds(), 3, "the cached key's load and two lookups");
    // Meanwhile hits are answered from memory, not queued behind them.
    for _ in 0..100 {
        assert!(node.verify(&cached).await.unwrap().is_valid());
    }
    assert_eq!(lookups.len(), 2, "the two lookups are still running");
    while let Some(outcome) = lookups.join_next().await {
        assert!(outcome.unwrap().unwrap().is_valid());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lookup_past_its_deadline_is_unavailable() {
    let misses = MissConfig {
        concurrency: 4,
        timeout: Duration::from_millis(100),
    };
    let node = node_with(Duration::from_secs(3), BOUND, misses, true).await;
    let (_, key) = node.create().await;
    node.wait_until_caught_up().await;
    let started = tokio::time::Instant::now();
    let outcome = node.verify(&key).await;
    assert!(
        matches!(outcome, Err(VerifyError::LookupTimeout { timeout }) if timeout == Duration::from_millis(100)),
        "{outcome:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}
