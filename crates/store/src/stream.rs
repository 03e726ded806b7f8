//! What both backends share for [`crate::KeySource::stream_secrets`] and
//! [`crate::KeySource::stream_prefixes`]: a
//! producer (a blocking thread for SQLite, a task for Postgres) reads and
//! decodes rows into batches and sends them over a bounded channel; the
//! caller's task hands each batch to its sink. Reading and decoding thus
//! overlap with whatever the sink does, and memory stays bounded by a few
//! batches however large the store is.

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::{Result, StoreError};

/// Every secret with what verification needs of its key, in the order
/// [`crate::rows::entry`] reads them; the same text serves both backends. No
/// `ORDER BY` and no parameters, so the planner may join the two tables
/// in whichever order is cheapest (Postgres: a hash join, one pass each).
pub(crate) const STREAM_SECRETS: &str = "SELECT s.prefix, s.hash, s.superseded_at IS NOT NULL, \
     k.revoked_at IS NOT NULL, k.expires_at, k.key_id, k.account_id, k.name, k.scopes, s.pepper_id \
     FROM key_secrets s JOIN keys k ON k.key_id = s.key_id";

/// Secrets per pepper id, live (current secret of a key not revoked) and in
/// all; the same text serves both backends. See [`crate::PepperUse`].
pub(crate) const SECRETS_BY_PEPPER: &str = "SELECT s.pepper_id, \
     SUM(CASE WHEN s.superseded_at IS NULL AND k.revoked_at IS NULL THEN 1 ELSE 0 END), COUNT(*) \
     FROM key_secrets s JOIN keys k ON k.key_id = s.key_id GROUP BY s.pepper_id";

/// Every prefix a secret (current or superseded) was issued with.
pub(crate) const STREAM_PREFIXES: &str = "SELECT prefix FROM key_secrets";

/// Batches decoded ahead of the sink.
pub(crate) const BUFFERED_BATCHES: usize = 4;
/// Most entries a batch allocates room for up front, so that a huge
/// `batch` costs memory only as rows arrive.
const MAX_PREALLOCATED: usize = 16_384;

/// Collects a producer's items into batches for the caller.
pub(crate) struct Batcher<T> {
    size: usize,
    items: Vec<T>,
}

impl<T> Batcher<T> {
    /// Batches of `size` items (0 counts as 1), each allocating room for
    /// at most [`MAX_PREALLOCATED`] up front.
    pub fn new(size: usize) -> Self {
        let size = size.max(1);
        Self {
            size,
            items: Vec::with_capacity(size.min(MAX_PREALLOCATED)),
        }
    }

    /// Adds `item`; returns the batch when it is full.
    pub fn push(&mut self, item: T) -> Option<Vec<T>> {
        self.items.push(item);
        (self.items.len() == self.size).then(|| {
            let fresh = Vec::with_capacity(self.size.min(MAX_PREALLOCATED));
            std::mem::replace(&mut self.items, fresh)
        })
    }

    /// The last, partly filled batch, if any.
    pub fn rest(self) -> Option<Vec<T>> {
        (!self.items.is_empty()).then_some(self.items)
    }
}

/// The caller's side: hands every batch the producer sends to `sink`, then
/// returns how many entries there were, or the producer's error.
pub(crate) async fn drain<T>(
    mut batches: mpsc::Receiver<Vec<T>>,
    producer: JoinHandle<Result<()>>,
    sink: &mut (dyn FnMut(Vec<T>) + Send),
) -> Result<usize> {
    let mut count = 0;
    while let Some(entries) = batches.recv().await {
        count += entries.len();
        sink(entries);
    }
    producer
        .await
        .map_err(|e| StoreError::internal_from("the stream's reader failed", e))??;
    Ok(count)
}
