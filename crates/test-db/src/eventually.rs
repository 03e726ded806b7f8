//! Waiting for something that happens in the background (a change feed
//! evicting a key, a usage flush, a listener closing) without a fixed sleep:
//! poll a condition every few milliseconds until it holds or a deadline
//! passes, and fail naming what was awaited.

use std::future::Future;
use std::time::Duration;

/// How often [`eventually`] polls its condition.
pub const POLL_EVERY: Duration = Duration::from_millis(5);

/// Polls `check` every [`POLL_EVERY`] until it returns true, and panics
/// with "timed out after {within} waiting until {what}" when `within`
/// passes first. Returns how long it waited, for tests that also report or
/// bound the delay.
///
/// The deadline is only a bound for a broken build: a condition that holds
/// at once costs no wait at all. For synchronous code (e.g. a test that runs
/// a binary), run it with [`block_on`].
///
/// ```
/// # async fn example() {
/// let flag = std::sync::atomic::AtomicBool::new(true);
/// vilvik_keys_test_db::eventually(
///     std::time::Duration::from_secs(5),
///     "the flag is set",
///     || async { flag.load(std::sync::atomic::Ordering::SeqCst) },
/// )
/// .await;
/// # }
/// ```
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let started = tokio::time::Instant::now();
    let deadline = started + within;
    loop {
        if check().await {
            return started.elapsed();
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {within:?} waiting until {what}");
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// Runs `future` to completion on a fresh single-threaded runtime; for
/// using [`eventually`] from a synchronous test.
pub fn block_on<F: Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a current-thread runtime starts")
        .block_on(future)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[tokio::test]
    async fn returns_once_the_condition_holds() {
        let polls = AtomicUsize::new(0);
        eventually(Duration::from_secs(5), "the third poll", || async {
            polls.fetch_add(1, Ordering::SeqCst) == 2
        })
        .await;
        assert_eq!(polls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    #[should_panic(expected = "timed out after 20ms waiting until pigs fly")]
    async fn fails_naming_what_was_awaited() {
        eventually(Duration::from_millis(20), "pigs fly", || async { false }).await;
    }

    #[test]
    fn works_from_synchronous_code() {
        let mut polls = 0;
        let waited = block_on(eventually(
            Duration::from_secs(5),
            "the second poll",
            || {
                polls += 1;
                std::future::ready(polls == 2)
            },
        ));
        assert!(waited >= POLL_EVERY, "{waited:?}");
    }
}
