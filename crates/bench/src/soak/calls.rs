//! Every call the soak makes, timed and filed: latencies per RPC and
//! sample interval, failures per RPC and status, verify codes per class.

use std::collections::{BTreeMap, HashMap};
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tonic::{Code, Request, Status};

use super::pool::{Class, Pool};
use crate::client::retry_after;
use crate::stats::micros;

/// Deadline of every call: a hung call is counted as DEADLINE_EXCEEDED.
pub(super) const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// One task's record: latencies per RPC and sample interval, errors per
/// RPC and status, verify codes per class.
#[derive(Default)]
pub(super) struct Record {
    pub(super) latencies_us: HashMap<(&'static str, usize), Vec<u64>>,
    pub(super) errors: BTreeMap<(&'static str, String), u64>,
    pub(super) codes: BTreeMap<(Class, String), u64>,
    pub(super) refused_at_ceiling: u64,
}

impl Record {
    pub(super) fn merge(&mut self, other: Record) {
        for (k, mut v) in other.latencies_us {
            self.latencies_us.entry(k).or_default().append(&mut v);
        }
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
        for (k, v) in other.codes {
            *self.codes.entry(k).or_default() += v;
        }
        self.refused_at_ceiling += other.refused_at_ceiling;
    }
}

/// What every task shares: the clock, the stop flag and running totals.
pub(super) struct Shared {
    pub(super) started: Instant,
    pub(super) sample: Duration,
    pub(super) stop: AtomicBool,
    pub(super) verify_calls: AtomicU64,
    pub(super) admin_calls: AtomicU64,
    /// Calls failed, creates refused at the stored-key ceiling and calls
    /// refused by the admin rate limit apart.
    pub(super) errors: AtomicU64,
    pub(super) refused: AtomicU64,
    pub(super) rate_limited: AtomicU64,
    pub(super) pool: RwLock<Pool>,
}

impl Shared {
    pub(super) fn bucket(&self) -> usize {
        (self.started.elapsed().as_secs_f64() / self.sample.as_secs_f64()) as usize
    }

    /// Times one call and files it: latency on success, status otherwise.
    /// A call the admin rate limit refused is not sent again, but the task
    /// waits as long as the refusal says before its next call.
    pub(super) async fn call<T>(
        &self,
        record: &mut Record,
        rpc: &'static str,
        call: impl Future<Output = Result<tonic::Response<T>, Status>>,
    ) -> Result<T, Status> {
        let bucket = self.bucket();
        let started = Instant::now();
        let result = call.await;
        let elapsed = micros(started.elapsed());
        let counter = if rpc == "VerifyKey" {
            &self.verify_calls
        } else {
            &self.admin_calls
        };
        counter.fetch_add(1, Ordering::Relaxed);
        match result {
            Ok(response) => {
                record
                    .latencies_us
                    .entry((rpc, bucket))
                    .or_default()
                    .push(elapsed);
                Ok(response.into_inner())
            }
            Err(status) => {
                let wait = retry_after(&status);
                let counter = if at_stored_key_ceiling(&status) {
                    &self.refused
                } else if wait.is_some() {
                    &self.rate_limited
                } else {
                    &self.errors
                };
                counter.fetch_add(1, Ordering::Relaxed);
                *record
                    .errors
                    .entry((rpc, format!("{:?}", status.code())))
                    .or_default() += 1;
                if let Some(wait) = wait {
                    tokio::time::sleep(wait.min(CALL_TIMEOUT)).await;
                }
                Err(status)
            }
        }
    }
}

/// CreateKey refused because the account stores as many keys as it may
/// (its message names the history, unlike the active-key cap's).
pub(super) fn at_stored_key_ceiling(status: &Status) -> bool {
    status.code() == Code::ResourceExhausted && status.message().contains("history")
}

/// `message` with the soak's deadline.
pub(super) fn with_timeout<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.set_timeout(CALL_TIMEOUT);
    request
}

/// `message` with a management key and the soak's deadline.
pub(super) fn bearer<T>(message: T, key: &str) -> anyhow::Result<Request<T>> {
    let mut request = crate::client::bearer(message, key)?;
    request.set_timeout(CALL_TIMEOUT);
    Ok(request)
}
