//! The one place where failures become gRPC statuses.

use tonic::{Code, Status};
use vilvik_keys_domain::Tier;
use vilvik_keys_store::{Outage, StoreError};

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
    #[error("{0}")]
    ResourceExhausted(String),
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
            ApiError::ResourceExhausted(_) => Code::ResourceExhausted,
            ApiError::Unauthenticated(_) => Code::Unauthenticated,
            ApiError::PermissionDenied(_) => Code::PermissionDenied,
            ApiError::Unavailable(_) => Code::Unavailable,
            ApiError::Internal(_) => Code::Internal,
        }
    }
}

fn unavailable_message(outage: &Outage) -> String {
    let retry = if outage.kind.nothing_changed() {
        "nothing was changed; retrying shortly is safe"
    } else {
        "a change may or may not have been applied: read the key back (GetKey, \
         ListAuditEvents) before repeating a change; reads are safe to retry"
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
                crate::format_time(revoked_at)
            )),
            StoreError::Expired { expires_at } => ApiError::FailedPrecondition(format!(
                "the key expired at {}: extend it with UpdateKey (expires_at) first, or create a new key",
                crate::format_time(expires_at)
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
        match &e {
            // The caller gets an opaque message; the cause chain is logged once here.
            ApiError::Internal(source) => {
                tracing::error!(error = %error_chain(source), "request failed");
            }
            ApiError::Unavailable(outage) => {
                tracing::warn!(error = %error_chain(outage), "request failed: store unavailable");
            }
            _ => {}
        }
        Status::new(e.code(), e.to_string())
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
    use vilvik_keys_domain::TierLimits;
    use vilvik_keys_store::OutageKind;

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
            OutageKind::StatementTimeout,
            OutageKind::Busy,
        ];
        for kind in all {
            match kind {
                OutageKind::PoolTimeout
                | OutageKind::ConnectionRefused
                | OutageKind::NotAcceptingConnections
                | OutageKind::ConnectionLost
                | OutageKind::StatementTimeout
                | OutageKind::Busy => {}
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
                "may or may not have been applied"
            };
            assert!(s.message().contains(advice), "{kind:?}: {s:?}");
        }
    }

    #[test]
    fn only_a_broken_connection_leaves_the_outcome_open() {
        for kind in every_outage_kind() {
            assert_eq!(
                kind.nothing_changed(),
                kind != OutageKind::ConnectionLost,
                "{kind:?}"
            );
        }
    }

    #[test]
    fn field_errors_are_invalid_argument_naming_the_field() {
        let s: Status = ApiError::invalid("scopes[2]", "is not resource:action").into();
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(s.message(), "scopes[2]: is not resource:action");
    }
}
