//! Why the verify engine could not answer: the store failed, or the
//! engine's own limits on store reads (the bulkhead between misses and
//! hits, and the feed's deadline) refused or cut one off.

use std::time::Duration;

use vilvik_keys_store::StoreError;

/// A failure of the verify engine. Its own conditions (all but `Store`)
/// are ones the store never reports, and each of them changed nothing:
/// repeating the call is safe.
#[derive(Debug)]
pub enum VerifyError {
    /// The store failed the read.
    Store(StoreError),
    /// This node's budget of concurrent lookups of keys not in memory
    /// (`permits` of them) is spent: the database is slow, or someone
    /// floods it with misses. The lookup was refused without waiting.
    LookupsSaturated { permits: usize },
    /// A lookup of a key not in memory did not finish within `timeout`.
    LookupTimeout { timeout: Duration },
    /// A read of the change log (or a subscription to it) did not finish
    /// within the feed's deadline, `timeout`.
    FeedTimeout { timeout: Duration },
}

impl std::fmt::Display for VerifyError {
    /// What is down, in one phrase a caller can be told.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Store(e) => e.fmt(f),
            Self::LookupsSaturated { .. } => {
                f.write_str("too many lookups of keys not in memory are waiting on the database")
            }
            Self::LookupTimeout { .. } => {
                f.write_str("the database did not answer the key lookup in time")
            }
            Self::FeedTimeout { .. } => {
                f.write_str("the database did not answer a read of the change log in time")
            }
        }
    }
}

impl std::error::Error for VerifyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Store(e) => e.source(),
            Self::LookupsSaturated { .. }
            | Self::LookupTimeout { .. }
            | Self::FeedTimeout { .. } => None,
        }
    }
}

impl From<StoreError> for VerifyError {
    fn from(e: StoreError) -> Self {
        Self::Store(e)
    }
}
