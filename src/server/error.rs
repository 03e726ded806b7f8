//! The one place where failures become gRPC statuses.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use tonic::{Code, Status};
use vilvik_keys_domain::{ADMIN_SCOPE, Tier};
use vilvik_keys_store::{Outage, OutageKind, StoreError};

use super::rate_limit::RateLimited;

/// Why an API call failed, in terms the caller can act on.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A request field is wrong; `field` names it as in the proto.
    #[error("{field}: {message}")]
    InvalidArgument { field: String, message: String },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    FailedPrecondition(String),
    /// A conditional change lost the race: the caller's etag is stale.
    #[error("{0}")]
    Aborted(String),
    #[error("{0}")]
    ResourceExhausted(String),
    /// Over the account's admin rate; the status carries `retry-after`.
    #[error("{0}")]
    RateLimited(RateLimited),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
    /// The store is down; the message says what and whether to retry.
    #[error("{}", unavailable_message(.0))]
    Unavailable(#[source] Outage),
    #[error("internal error")]
    Internal(#[source] StoreError),
}

impl ApiError {
    pub fn invalid(field: impl Into<String>, message: impl std::fmt::Display) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            message: message.to_string(),
        }
    }

    pub fn key_not_found(key_id: &impl std::fmt::Display) -> Self {
        Self::NotFound(format!("key {key_id} not found in this account"))
    }

    fn code(&self) -> Code {
        match self {
            ApiError::InvalidArgument { .. } => Code::InvalidArgument,
            ApiError::NotFound(_) => Code::NotFound,
            ApiError::FailedPrecondition(_) => Code::FailedPrecondition,
            ApiError::Aborted(_) => Code::Aborted,
            ApiError::ResourceExhausted(_) | ApiError::RateLimited(_) => Code::ResourceExhausted,
            ApiError::Unauthenticated(_) => Code::Unauthenticated,
            ApiError::PermissionDenied(_) => Code::PermissionDenied,
            ApiError::Unavailable(_) => Code::Unavailable,
            ApiError::Internal(_) => Code::Internal,
        }
    }
}

impl From<RateLimited> for ApiError {
    fn from(limited: RateLimited) -> Self {
        Self::RateLimited(limited)
    }
}

fn unavailable_message(outage: &Outage) -> String {
    let retry = if outage.kind.nothing_changed() {
        "nothing was changed; retrying shortly is safe"
    } else {
        "the outcome is unknown: the change may have been committed. Retrying a CreateKey or \
         RotateKey with the same request_id is safe (it returns the first call's key and secret \
         and changes nothing); without a request id, read the key back (GetKey, ListAuditEvents) \
         before repeating a change; reads are safe to retry"
    };
    format!(
        "the key store is unavailable: {}; {retry}",
        outage.kind.what_is_down()
    )
}

/// Every store failure has one status. Rule failures are spelled out one
/// by one (no catch-all), so a new variant must be given its status here.
impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound => {
                ApiError::NotFound("the key was not found in this account".to_owned())
            }
            StoreError::Revoked { revoked_at } => ApiError::FailedPrecondition(format!(
                "the key was revoked at {}; revocation is final: create a new key instead",
                vilvik_keys_domain::format_time(revoked_at)
            )),
            StoreError::Expired { expires_at } => ApiError::FailedPrecondition(format!(
                "the key expired at {}: extend it with UpdateKey (expires_at) first, or create a new key",
                vilvik_keys_domain::format_time(expires_at)
            )),
            StoreError::QuotaExceeded {
                tier,
                limit,
                active,
                limits,
            } => {
                let remedy = match tier {
                    Tier::Free => format!(
                        "revoke a key you no longer use (RevokeKey), or move to the premium tier ({} active keys)",
                        limits.premium
                    ),
                    Tier::Premium => "revoke a key you no longer use (RevokeKey)".to_owned(),
                };
                ApiError::ResourceExhausted(format!(
                    "the account is on the {tier} tier, which allows {limit} active keys, and already holds {active}: {remedy}"
                ))
            }
            StoreError::StoredKeysExceeded {
                tier,
                limit,
                stored,
            } => ApiError::ResourceExhausted(format!(
                "the account stores {stored} keys, revoked and expired ones included (they are its \
                 history), and the {tier} tier may keep {limit}: no key can be created; ask the \
                 platform operator"
            )),
            StoreError::NotGrantable(why) => ApiError::PermissionDenied(format!("scopes: {why}")),
            StoreError::LastManagementKey { key_id } => ApiError::FailedPrecondition(format!(
                "key {key_id} is the account's last active management key ({ADMIN_SCOPE}): revoking it, \
                 taking {ADMIN_SCOPE} from it or making it expire sooner would leave nobody able to manage \
                 the account's keys; first have the operator create another management key \
                 (`vilvik-keys keys create --name NAME --scope {ADMIN_SCOPE}` with the operator \
                 token), then retry"
            )),
            StoreError::StaleVersion {
                key_id,
                expected,
                current,
            } => ApiError::Aborted(format!(
                "key {key_id} was changed since you read it (etag {}; it is now {}): nothing \
                 was changed; read it again (GetKey), reapply your change and send the new etag",
                super::convert::etag(expected),
                super::convert::etag(current)
            )),
            StoreError::RequestIdReused { method } => ApiError::invalid(
                "request_id",
                format!(
                    "was already used within the last 24 hours for a {} with other parameters: \
                     a retry must repeat the first call's fields exactly; use a new request id \
                     for a new request",
                    method.as_str()
                ),
            ),
            StoreError::Unavailable(outage) => ApiError::Unavailable(outage),
            // A generated identifier collided on every attempt, or a
            // follower-only answer reached a handler: both are bugs.
            e @ (StoreError::Conflict
            | StoreError::ChangesPruned { .. }
            | StoreError::Internal(..)) => ApiError::Internal(e),
        }
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Self {
        // The caller gets an opaque message; the cause chain is logged here,
        // at most once a second for each kind of failure.
        match &e {
            ApiError::Internal(source) => {
                if let Some(unlogged) = FAILURE_LOG.admit(None, Instant::now()) {
                    tracing::error!(error = %error_chain(source), similar_failures_unlogged = unlogged, "request failed");
                }
            }
            ApiError::Unavailable(outage) => {
                if let Some(unlogged) = FAILURE_LOG.admit(Some(outage.kind), Instant::now()) {
                    tracing::warn!(error = %error_chain(outage), similar_failures_unlogged = unlogged, "request failed: store unavailable");
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
                return Status::with_metadata(e.code(), e.to_string(), metadata);
            }
            _ => {}
        }
        Status::new(e.code(), e.to_string())
    }
}

/// How often one kind of failure is logged: a store that is down fails
/// every request, and one line per request would bury everything else.
const FAILURE_LOG_EVERY: Duration = Duration::from_secs(1);

static FAILURE_LOG: FailureLog = FailureLog::new();

/// At most one log line per [`FAILURE_LOG_EVERY`] for each kind of failure
/// (an outage kind, or `None` for internal errors), each line saying how
/// many like it went unlogged since the one before.
struct FailureLog {
    kinds: Mutex<Vec<(Option<OutageKind>, LastLine)>>,
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
    fn admit(&self, kind: Option<OutageKind>, now: Instant) -> Option<u64> {
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
    use time::macros::datetime;
    use vilvik_keys_domain::{ScopeCatalogue, TierLimits};

    use super::*;

    fn status(e: StoreError) -> Status {
        ApiError::from(e).into()
    }

    #[test]
    fn not_found_is_not_found() {
        assert_eq!(status(StoreError::NotFound).code(), Code::NotFound);
    }

    #[test]
    fn revoked_is_failed_precondition_and_says_it_is_final() {
        let s = status(StoreError::Revoked {
            revoked_at: datetime!(2026-01-02 03:04:05 UTC),
        });
        assert_eq!(s.code(), Code::FailedPrecondition);
        assert!(s.message().contains("2026-01-02T03:04:05Z"), "{s:?}");
        assert!(s.message().contains("revocation is final"), "{s:?}");
    }

    #[test]
    fn expired_is_failed_precondition_and_names_the_remedy() {
        let s = status(StoreError::Expired {
            expires_at: datetime!(2026-01-02 03:04:05 UTC),
        });
        assert_eq!(s.code(), Code::FailedPrecondition);
        assert!(s.message().contains("UpdateKey (expires_at)"), "{s:?}");
    }

    #[test]
    fn cap_reached_is_resource_exhausted_with_the_numbers() {
        let limits = TierLimits {
            free: 3,
            premium: 50,
        };
        let s = status(StoreError::QuotaExceeded {
            tier: Tier::Free,
            limit: 3,
            active: 3,
            limits,
        });
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert!(s.message().contains("free tier, which allows 3"), "{s:?}");
        assert!(
            s.message().contains("premium tier (50 active keys)"),
            "{s:?}"
        );
        let s = status(StoreError::QuotaExceeded {
            tier: Tier::Premium,
            limit: 50,
            active: 50,
            limits,
        });
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert!(!s.message().contains("move to"), "{s:?}");
    }

    #[test]
    fn the_stored_key_ceiling_is_resource_exhausted_with_the_numbers() {
        let s = status(StoreError::StoredKeysExceeded {
            tier: Tier::Free,
            limit: 300,
            stored: 300,
        });
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert!(
            s.message()
                .contains("stores 300 keys, revoked and expired ones included"),
            "{s:?}"
        );
        assert!(s.message().contains("free tier may keep 300"), "{s:?}");
    }

    #[test]
    fn a_scope_not_grantable_is_permission_denied_naming_it() {
        let why = ScopeCatalogue::default()
            .check_grant(&"keys:admin".parse().unwrap(), false)
            .unwrap_err();
        let s = status(StoreError::NotGrantable(why));
        assert_eq!(s.code(), Code::PermissionDenied);
        assert!(s.message().starts_with("scopes: 'keys:admin' "), "{s:?}");
        assert!(s.message().contains("only the operator token"), "{s:?}");
    }

    #[test]
    fn the_last_management_key_is_failed_precondition_saying_what_to_do_first() {
        let key_id = vilvik_keys_domain::KeyId::generate();
        let s = status(StoreError::LastManagementKey {
            key_id: key_id.clone(),
        });
        assert_eq!(s.code(), Code::FailedPrecondition);
        assert!(s.message().contains(key_id.as_str()), "{s:?}");
        assert!(
            s.message()
                .contains("first have the operator create another management key"),
            "{s:?}"
        );
    }

    #[test]
    fn conflict_pruned_and_internal_are_internal_and_opaque() {
        for e in [
            StoreError::Conflict,
            StoreError::ChangesPruned { pruned_through: 7 },
            StoreError::Internal("corrupt row".into(), None),
        ] {
            let s = status(e);
            assert_eq!(s.code(), Code::Internal);
            assert_eq!(s.message(), "internal error");
        }
    }

    /// Every kind, spelled out so that a new one fails to compile here.
    fn every_outage_kind() -> Vec<OutageKind> {
        let all = [
            OutageKind::PoolTimeout,
            OutageKind::ConnectionRefused,
            OutageKind::NotAcceptingConnections,
            OutageKind::ConnectionLost,
            OutageKind::CommitUnknown,
            OutageKind::StatementTimeout,
            OutageKind::Busy,
            OutageKind::LookupsSaturated,
            OutageKind::LookupTimeout,
        ];
        for kind in all {
            match kind {
                OutageKind::PoolTimeout
                | OutageKind::ConnectionRefused
                | OutageKind::NotAcceptingConnections
                | OutageKind::ConnectionLost
                | OutageKind::CommitUnknown
                | OutageKind::StatementTimeout
                | OutageKind::Busy
                | OutageKind::LookupsSaturated
                | OutageKind::LookupTimeout => {}
            }
        }
        all.to_vec()
    }

    #[test]
    fn every_outage_is_unavailable_saying_what_is_down_and_whether_to_retry() {
        for kind in every_outage_kind() {
            let s = status(StoreError::unavailable(kind, "cause from the backend"));
            assert_eq!(s.code(), Code::Unavailable, "{kind:?}");
            assert!(s.message().contains(kind.what_is_down()), "{s:?}");
            // The backend's own words (which may name hosts) stay in the log.
            assert!(!s.message().contains("cause from the backend"), "{s:?}");
            let advice = if kind.nothing_changed() {
                "retrying shortly is safe"
            } else {
                "the outcome is unknown: the change may have been committed. Retrying a \
                 CreateKey or RotateKey with the same request_id is safe"
            };
            assert!(s.message().contains(advice), "{kind:?}: {s:?}");
        }
    }

    #[test]
    fn only_a_broken_connection_leaves_the_outcome_open() {
        for kind in every_outage_kind() {
            assert_eq!(
                kind.nothing_changed(),
                !matches!(kind, OutageKind::ConnectionLost | OutageKind::CommitUnknown),
                "{kind:?}"
            );
        }
    }

    #[test]
    fn each_kind_of_failure_is_logged_at_most_once_a_second_with_a_count() {
        let log = FailureLog::new();
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let refused = Some(OutageKind::ConnectionRefused);
        assert_eq!(log.admit(refused, at(0)), Some(0));
        assert_eq!(log.admit(refused, at(1)), None);
        assert_eq!(log.admit(refused, at(999)), None);
        // Another kind has a line of its own at once.
        assert_eq!(log.admit(None, at(500)), Some(0));
        assert_eq!(log.admit(Some(OutageKind::Busy), at(500)), Some(0));
        // A second on: one line, counting the two left out.
        assert_eq!(log.admit(refused, at(1_000)), Some(2));
        assert_eq!(log.admit(refused, at(1_500)), None);
        assert_eq!(log.admit(refused, at(2_000)), Some(1));
        assert_eq!(log.admit(None, at(1_400)), None);
        assert_eq!(log.admit(None, at(1_500)), Some(1));
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
}
