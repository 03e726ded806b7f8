//! The one place where failures become gRPC statuses: one total `match`
//! from each kind of [`ApiError`] to its code, the metadata a refusal
//! carries, and the log line an internal failure or an outage leaves.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use tonic::{Code, Status};
use vilvik_keys_store::OutageKind;
use vilvik_keys_verify::VerifyError;

use crate::service::ApiError;

/// The status code of each kind of failure.
fn code(e: &ApiError) -> Code {
    match e {
        ApiError::InvalidArgument { .. } => Code::InvalidArgument,
        ApiError::NotFound(_) => Code::NotFound,
        ApiError::FailedPrecondition(_) => Code::FailedPrecondition,
        ApiError::Aborted(_) => Code::Aborted,
        ApiError::ResourceExhausted(_) | ApiError::RateLimited(_) => Code::ResourceExhausted,
        ApiError::Unauthenticated(_) => Code::Unauthenticated,
        ApiError::PermissionDenied(_) => Code::PermissionDenied,
        ApiError::Unavailable(_) | ApiError::VerifyUnavailable(_) => Code::Unavailable,
        ApiError::Internal(_) => Code::Internal,
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Self {
        // The caller gets an opaque message; the cause chain is logged here,
        // at most once a second for each kind of failure.
        match &e {
            ApiError::Internal(source) => {
                if let Some(unlogged) = FAILURE_LOG.admit(Failure::Internal, Instant::now()) {
                    tracing::error!(error = %error_chain(source), similar_failures_unlogged = unlogged, "request failed");
                }
            }
            ApiError::Unavailable(outage) => {
                if let Some(unlogged) =
                    FAILURE_LOG.admit(Failure::Store(outage.kind), Instant::now())
                {
                    tracing::warn!(error = %error_chain(outage), similar_failures_unlogged = unlogged, "request failed: store unavailable");
                }
            }
            ApiError::VerifyUnavailable(limit) => {
                if let Some(unlogged) = FAILURE_LOG.admit(Failure::verify(limit), Instant::now()) {
                    tracing::warn!(error = %error_chain(limit), detail = ?limit, similar_failures_unlogged = unlogged, "request failed: store unavailable");
                }
            }
            ApiError::RateLimited(limited) => {
                // When to call again, for clients and proxies: whole
                // seconds rounded up as in HTTP, and milliseconds.
                let mut metadata = tonic::metadata::MetadataMap::new();
                metadata.insert(
                    crate::headers::RETRY_AFTER,
                    limited.retry_after_secs().into(),
                );
                metadata.insert(
                    crate::headers::RETRY_AFTER_MS,
                    limited.retry_after_ms().into(),
                );
                return Status::with_metadata(code(&e), e.to_string(), metadata);
            }
            ApiError::InvalidArgument { .. }
            | ApiError::NotFound(_)
            | ApiError::FailedPrecondition(_)
            | ApiError::Aborted(_)
            | ApiError::ResourceExhausted(_)
            | ApiError::Unauthenticated(_)
            | ApiError::PermissionDenied(_) => {}
        }
        Status::new(code(&e), e.to_string())
    }
}

/// A kind of failure, as the log counts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    Internal,
    Store(OutageKind),
    LookupsSaturated,
    LookupTimeout,
    FeedTimeout,
}

impl Failure {
    fn verify(e: &VerifyError) -> Self {
        match e {
            // Never held: `ApiError::from` maps the store's failures as
            // the store's.
            VerifyError::Store(_) => Failure::Internal,
            VerifyError::LookupsSaturated { .. } => Failure::LookupsSaturated,
            VerifyError::LookupTimeout { .. } => Failure::LookupTimeout,
            VerifyError::FeedTimeout { .. } => Failure::FeedTimeout,
        }
    }
}

/// How often one kind of failure is logged: a store that is down fails
/// every request, and one line per request would bury everything else.
const FAILURE_LOG_EVERY: Duration = Duration::from_secs(1);

static FAILURE_LOG: FailureLog = FailureLog::new();

/// At most one log line per [`FAILURE_LOG_EVERY`] for each kind of
/// failure, each line saying how many like it went unlogged since the one
/// before.
struct FailureLog {
    kinds: Mutex<Vec<(Failure, LastLine)>>,
}

struct LastLine {
    at: Instant,
    unlogged: u64,
}

impl FailureLog {
    const fn new() -> Self {
        Self {
            kinds: Mutex::new(Vec::new()),
        }
    }

    /// Whether a failure of `kind` at `now` gets a line; if so, how many
    /// failures of that kind were left unlogged before it.
    fn admit(&self, kind: Failure, now: Instant) -> Option<u64> {
        let mut kinds = self.kinds.lock().unwrap_or_else(|p| p.into_inner());
        let Some((_, last)) = kinds.iter_mut().find(|(k, _)| *k == kind) else {
            kinds.push((
                kind,
                LastLine {
                    at: now,
                    unlogged: 0,
                },
            ));
            return Some(0);
        };
        if now.duration_since(last.at) < FAILURE_LOG_EVERY {
            last.unlogged += 1;
            return None;
        }
        let unlogged = std::mem::take(&mut last.unlogged);
        last.at = now;
        Some(unlogged)
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use vilvik_keys_domain::Tier;
    use vilvik_keys_store::StoreError;

    use super::*;
    use crate::service::rate_limit::RateLimited;

    #[test]
    fn each_kind_of_failure_is_logged_at_most_once_a_second_with_a_count() {
        let log = FailureLog::new();
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let refused = Failure::Store(OutageKind::ConnectionRefused);
        assert_eq!(log.admit(refused, at(0)), Some(0));
        assert_eq!(log.admit(refused, at(1)), None);
        assert_eq!(log.admit(refused, at(999)), None);
        // Another kind has a line of its own at once.
        assert_eq!(log.admit(Failure::Internal, at(500)), Some(0));
        assert_eq!(
            log.admit(Failure::Store(OutageKind::Busy), at(500)),
            Some(0)
        );
        assert_eq!(log.admit(Failure::LookupsSaturated, at(500)), Some(0));
        // A second on: one line, counting the two left out.
        assert_eq!(log.admit(refused, at(1_000)), Some(2));
        assert_eq!(log.admit(refused, at(1_500)), None);
        assert_eq!(log.admit(refused, at(2_000)), Some(1));
        assert_eq!(log.admit(Failure::Internal, at(1_400)), None);
        assert_eq!(log.admit(Failure::Internal, at(1_500)), Some(1));
    }

    #[test]
    fn rate_limited_is_resource_exhausted_saying_when_to_retry_in_metadata() {
        let limited = RateLimited {
            account: "acme".parse().unwrap(),
            rate: crate::config::AdminRateLimits::default().for_tier(Tier::Free),
            tier: None,
            retry_after: Duration::from_micros(1_500_500),
        };
        let s: Status = ApiError::from(limited).into();
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert_eq!(
            s.message(),
            "admin calls for account 'acme' are limited to 100 per second (burst 200); retry after 1501 ms"
        );
        let header = |name| s.metadata().get(name).unwrap().to_str().unwrap().to_owned();
        assert_eq!(header("retry-after"), "2");
        assert_eq!(header("retry-after-ms"), "1501");
    }

    #[test]
    fn field_errors_are_invalid_argument_naming_the_field() {
        let s: Status = ApiError::invalid("scopes[2]", "is not resource:action").into();
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(s.message(), "scopes[2]: is not resource:action");
    }
    /// Every verify-engine failure, spelled out so that a new one fails to
    /// compile here.
    fn every_verify_error() -> Vec<VerifyError> {
        let all = vec![
            VerifyError::Store(StoreError::unavailable(OutageKind::Busy, "locked")),
            VerifyError::LookupsSaturated { permits: 64 },
            VerifyError::LookupTimeout {
                timeout: Duration::from_secs(1),
            },
            VerifyError::FeedTimeout {
                timeout: Duration::from_secs(5),
            },
        ];
        for e in &all {
            match e {
                VerifyError::Store(_)
                | VerifyError::LookupsSaturated { .. }
                | VerifyError::LookupTimeout { .. }
                | VerifyError::FeedTimeout { .. } => {}
            }
        }
        all
    }

    #[test]
    fn every_verify_failure_is_unavailable_saying_what_is_down_and_that_retrying_is_safe() {
        let expected = [
            "the key store is unavailable: the database file is locked by another writer; \
             nothing was changed; retrying shortly is safe",
            "the key store is unavailable: too many lookups of keys not in memory are waiting \
             on the database; nothing was changed; retrying shortly is safe",
            "the key store is unavailable: the database did not answer the key lookup in time; \
             nothing was changed; retrying shortly is safe",
            "the key store is unavailable: the database did not answer a read of the change \
             log in time; nothing was changed; retrying shortly is safe",
        ];
        for (e, message) in every_verify_error().into_iter().zip(expected) {
            let s: Status = ApiError::from(e).into();
            assert_eq!(s.code(), Code::Unavailable);
            assert_eq!(s.message(), message);
            assert!(s.metadata().is_empty(), "{s:?}");
        }
    }

    #[test]
    fn a_store_failure_met_by_the_verify_engine_is_the_stores() {
        let s: Status = ApiError::from(VerifyError::Store(StoreError::NotFound)).into();
        assert_eq!(s.code(), Code::NotFound);
        assert_eq!(s.message(), "the key was not found in this account");
        let s: Status =
            ApiError::from(VerifyError::Store(StoreError::Internal("bug".into(), None))).into();
        assert_eq!(s.code(), Code::Internal);
        assert_eq!(s.message(), "internal error");
    }

    #[test]
    fn every_kind_of_failure_has_its_code() {
        let limited = RateLimited {
            account: "acme".parse().unwrap(),
            rate: crate::config::AdminRateLimits::default().for_tier(Tier::Free),
            tier: None,
            retry_after: Duration::from_secs(1),
        };
        let cases = [
            (ApiError::invalid("name", "is empty"), Code::InvalidArgument),
            (ApiError::NotFound("gone".into()), Code::NotFound),
            (
                ApiError::FailedPrecondition("first".into()),
                Code::FailedPrecondition,
            ),
            (ApiError::Aborted("stale".into()), Code::Aborted),
            (
                ApiError::ResourceExhausted("full".into()),
                Code::ResourceExhausted,
            ),
            (ApiError::RateLimited(limited), Code::ResourceExhausted),
            (
                ApiError::Unauthenticated("who".into()),
                Code::Unauthenticated,
            ),
            (
                ApiError::PermissionDenied("no".into()),
                Code::PermissionDenied,
            ),
            (
                ApiError::from(StoreError::unavailable(OutageKind::Busy, "locked")),
                Code::Unavailable,
            ),
            (
                ApiError::VerifyUnavailable(VerifyError::LookupsSaturated { permits: 1 }),
                Code::Unavailable,
            ),
            (ApiError::internal("bug", None), Code::Internal),
        ];
        for (e, want) in cases {
            // Spelled out so that a new kind fails to compile here.
            match &e {
                ApiError::InvalidArgument { .. }
                | ApiError::NotFound(_)
                | ApiError::FailedPrecondition(_)
                | ApiError::Aborted(_)
                | ApiError::ResourceExhausted(_)
                | ApiError::RateLimited(_)
                | ApiError::Unauthenticated(_)
                | ApiError::PermissionDenied(_)
                | ApiError::Unavailable(_)
                | ApiError::VerifyUnavailable(_)
                | ApiError::Internal(_) => {}
            }
            let message = e.to_string();
            let s = Status::from(e);
            assert_eq!(s.code(), want, "{s:?}");
            assert_eq!(s.message(), message);
        }
    }
}
