//! Why a call failed, in words the caller can act on: one type for every
//! surface. Each store and verify-engine failure gets its message and its
//! kind here, in total matches (no catch-all), so a new variant must be
//! given both; each surface then turns the kind into its own status in one
//! place (gRPC: `server::error`).

use vilvik_keys_domain::{ADMIN_SCOPE, Tier};
use vilvik_keys_store::{Outage, StoreError};
use vilvik_keys_verify::VerifyError;

use super::etag;
use crate::service::rate_limit::RateLimited;

/// Why an API call failed. Each variant is a kind of failure a surface
/// gives one status; its `Display` is the message the caller reads.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A request field is wrong; `field` names it as the caller sent it.
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
    /// Over the account's admin rate; the answer says when to retry.
    #[error("{0}")]
    RateLimited(RateLimited),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
    /// The store is down; the message says what and whether to retry.
    #[error("{}", unavailable_message(.0.kind.what_is_down(), .0.kind.nothing_changed()))]
    Unavailable(#[source] Outage),
    /// The verify engine refused or cut off a read of the store on its own
    /// limits (every [`VerifyError`] but `Store`, which is mapped as the
    /// store's failure): nothing was changed.
    #[error("{}", unavailable_message(&.0.to_string(), true))]
    VerifyUnavailable(#[source] VerifyError),
    /// The caller gets an opaque message; the cause is logged.
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

    /// An internal failure that is no store's, e.g. a stored value that
    /// does not decode: `what` is logged, never shown.
    pub fn internal(what: &str, source: Option<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::Internal(StoreError::Internal(what.to_owned(), source))
    }
}

impl From<RateLimited> for ApiError {
    fn from(limited: RateLimited) -> Self {
        Self::RateLimited(limited)
    }
}

/// What an UNAVAILABLE answer says: what is down, and whether retrying is
/// safe.
fn unavailable_message(what_is_down: &str, nothing_changed: bool) -> String {
    let retry = if nothing_changed {
        "nothing was changed; retrying shortly is safe"
    } else {
        "the outcome is unknown: the change may have been committed. Retrying a CreateKey or \
         RotateKey with the same request_id is safe (it returns the first call's key and secret \
         and changes nothing); without a request id, read the key back (GetKey, ListAuditEvents) \
         before repeating a change; reads are safe to retry"
    };
    format!("the key store is unavailable: {what_is_down}; {retry}")
}

/// Every store failure has one kind and message. Rule failures are spelled
/// out one by one (no catch-all), so a new variant must be given its own.
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
            StoreError::LastLastingManager { key_id } => ApiError::FailedPrecondition(format!(
                "key {key_id} is the account's last management key ({ADMIN_SCOPE}) without an \
                 expiry: revoking it, taking {ADMIN_SCOPE} from it or giving it an expiry would \
                 leave only management keys that expire, and then nobody able to manage the \
                 account's keys; first have the operator create another management key without \
                 an expiry (`vilvik-keys keys create --name NAME --scope {ADMIN_SCOPE}` with the \
                 operator token), then retry"
            )),
            StoreError::StaleVersion {
                key_id,
                expected,
                current,
            } => ApiError::Aborted(format!(
                "key {key_id} was changed since you read it (etag {}; it is now {}): nothing \
                 was changed; read it again (GetKey), reapply your change and send the new etag",
                etag::etag(expected),
                etag::etag(current)
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
            StoreError::RequestIdNotYours => ApiError::FailedPrecondition(
                "request_id: was used within the last 24 hours by another caller of this account \
                 (another management key, or the operator for another actor), and its answer is \
                 that caller's alone: nothing was changed; use a new request id"
                    .to_owned(),
            ),
            StoreError::RequestIdsExhausted { limit } => ApiError::ResourceExhausted(format!(
                "request_id: the account already holds {limit} request ids used within the last \
                 24 hours, the most it may (setting request_ids_per_account, \
                 VILVIK_KEYS_REQUEST_IDS_PER_ACCOUNT): nothing was changed; retry a call with \
                 the request id it was first sent with, send new calls without a request id, or \
                 wait for older ids to expire"
            )),
            StoreError::Unavailable(outage) => ApiError::Unavailable(outage),
            // A generated identifier collided on every attempt, or a
            // follower-only answer reached a handler: both are bugs.
            e @ (StoreError::Conflict
            | StoreError::ChangesPruned { .. }
            | StoreError::Internal(..)) => ApiError::Internal(e),
        }
    }
}

/// The verify engine's failures: the store's as the store's, and each of
/// its own limits as UNAVAILABLE with nothing changed.
impl From<VerifyError> for ApiError {
    fn from(e: VerifyError) -> Self {
        match e {
            VerifyError::Store(e) => e.into(),
            e @ (VerifyError::LookupsSaturated { .. }
            | VerifyError::LookupTimeout { .. }
            | VerifyError::FeedTimeout { .. }) => ApiError::VerifyUnavailable(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;
    use vilvik_keys_domain::{ScopeCatalogue, TierLimits};
    use vilvik_keys_store::{OutageKind, RequestMethod};

    use super::*;

    fn status(e: StoreError) -> ApiError {
        ApiError::from(e)
    }

    /// The kind of failure, as its variant's name.
    fn kind_of(e: &ApiError) -> &'static str {
        match e {
            ApiError::InvalidArgument { .. } => "InvalidArgument",
            ApiError::NotFound(_) => "NotFound",
            ApiError::FailedPrecondition(_) => "FailedPrecondition",
            ApiError::Aborted(_) => "Aborted",
            ApiError::ResourceExhausted(_) => "ResourceExhausted",
            ApiError::RateLimited(_) => "RateLimited",
            ApiError::Unauthenticated(_) => "Unauthenticated",
            ApiError::PermissionDenied(_) => "PermissionDenied",
            ApiError::Unavailable(_) => "Unavailable",
            ApiError::VerifyUnavailable(_) => "VerifyUnavailable",
            ApiError::Internal(_) => "Internal",
        }
    }

    #[test]
    fn not_found_is_not_found() {
        assert_eq!(kind_of(&status(StoreError::NotFound)), "NotFound");
    }

    #[test]
    fn revoked_is_failed_precondition_and_says_it_is_final() {
        let s = status(StoreError::Revoked {
            revoked_at: datetime!(2026-01-02 03:04:05 UTC),
        });
        assert_eq!(kind_of(&s), "FailedPrecondition");
        assert!(s.to_string().contains("2026-01-02T03:04:05Z"), "{s:?}");
        assert!(s.to_string().contains("revocation is final"), "{s:?}");
    }

    #[test]
    fn expired_is_failed_precondition_and_names_the_remedy() {
        let s = status(StoreError::Expired {
            expires_at: datetime!(2026-01-02 03:04:05 UTC),
        });
        assert_eq!(kind_of(&s), "FailedPrecondition");
        assert!(s.to_string().contains("UpdateKey (expires_at)"), "{s:?}");
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
        assert_eq!(kind_of(&s), "ResourceExhausted");
        assert!(s.to_string().contains("free tier, which allows 3"), "{s:?}");
        assert!(
            s.to_string().contains("premium tier (50 active keys)"),
            "{s:?}"
        );
        let s = status(StoreError::QuotaExceeded {
            tier: Tier::Premium,
            limit: 50,
            active: 50,
            limits,
        });
        assert_eq!(kind_of(&s), "ResourceExhausted");
        assert!(!s.to_string().contains("move to"), "{s:?}");
    }

    #[test]
    fn the_stored_key_ceiling_is_resource_exhausted_with_the_numbers() {
        let s = status(StoreError::StoredKeysExceeded {
            tier: Tier::Free,
            limit: 300,
            stored: 300,
        });
        assert_eq!(kind_of(&s), "ResourceExhausted");
        assert!(
            s.to_string()
                .contains("stores 300 keys, revoked and expired ones included"),
            "{s:?}"
        );
        assert!(s.to_string().contains("free tier may keep 300"), "{s:?}");
    }

    #[test]
    fn a_scope_not_grantable_is_permission_denied_naming_it() {
        let why = ScopeCatalogue::default()
            .check_grant(&"keys:admin".parse().unwrap(), false)
            .unwrap_err();
        let s = status(StoreError::NotGrantable(why));
        assert_eq!(kind_of(&s), "PermissionDenied");
        assert!(s.to_string().starts_with("scopes: 'keys:admin' "), "{s:?}");
        assert!(s.to_string().contains("only the operator token"), "{s:?}");
    }

    #[test]
    fn the_last_management_key_is_failed_precondition_saying_what_to_do_first() {
        let key_id = vilvik_keys_domain::KeyId::generate();
        let s = status(StoreError::LastManagementKey {
            key_id: key_id.clone(),
        });
        assert_eq!(kind_of(&s), "FailedPrecondition");
        assert!(s.to_string().contains(key_id.as_str()), "{s:?}");
        assert!(
            s.to_string()
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
            assert_eq!(kind_of(&s), "Internal");
            assert_eq!(s.to_string(), "internal error");
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
        ];
        for kind in all {
            match kind {
                OutageKind::PoolTimeout
                | OutageKind::ConnectionRefused
                | OutageKind::NotAcceptingConnections
                | OutageKind::ConnectionLost
                | OutageKind::CommitUnknown
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
            assert_eq!(kind_of(&s), "Unavailable", "{kind:?}");
            assert!(s.to_string().contains(kind.what_is_down()), "{s:?}");
            // The backend's own words (which may name hosts) stay in the log.
            assert!(!s.to_string().contains("cause from the backend"), "{s:?}");
            let advice = if kind.nothing_changed() {
                "retrying shortly is safe"
            } else {
                "the outcome is unknown: the change may have been committed. Retrying a \
                 CreateKey or RotateKey with the same request_id is safe"
            };
            assert!(s.to_string().contains(advice), "{kind:?}: {s:?}");
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
    fn a_stale_etag_is_aborted_naming_both_etags() {
        let key_id = vilvik_keys_domain::KeyId::generate();
        let s = status(StoreError::StaleVersion {
            key_id: key_id.clone(),
            expected: 3,
            current: 5,
        });
        assert_eq!(kind_of(&s), "Aborted");
        assert!(
            s.to_string().starts_with(&format!(
                "key {key_id} was changed since you read it (etag v3; it is now v5): nothing was changed"
            )),
            "{s:?}"
        );
    }

    #[test]
    fn the_last_manager_without_an_expiry_says_to_create_a_lasting_one_first() {
        let key_id = vilvik_keys_domain::KeyId::generate();
        let s = status(StoreError::LastLastingManager {
            key_id: key_id.clone(),
        });
        assert_eq!(kind_of(&s), "FailedPrecondition");
        assert!(
            s.to_string().starts_with(&format!(
                "key {key_id} is the account's last management key (keys:admin) without an expiry"
            )),
            "{s:?}"
        );
        assert!(
            s.to_string().contains(
                "first have the operator create another management key without an expiry"
            ),
            "{s:?}"
        );
    }

    #[test]
    fn another_callers_request_id_is_failed_precondition_asking_for_a_new_one() {
        let s = status(StoreError::RequestIdNotYours);
        assert_eq!(kind_of(&s), "FailedPrecondition");
        assert!(s.to_string().starts_with("request_id: was used"), "{s:?}");
        assert!(s.to_string().ends_with("use a new request id"), "{s:?}");
    }

    #[test]
    fn too_many_request_ids_is_resource_exhausted_naming_the_setting() {
        let s = status(StoreError::RequestIdsExhausted { limit: 10 });
        assert_eq!(kind_of(&s), "ResourceExhausted");
        assert!(s.to_string().contains("holds 10 request ids"), "{s:?}");
        assert!(
            s.to_string()
                .contains("VILVIK_KEYS_REQUEST_IDS_PER_ACCOUNT"),
            "{s:?}"
        );
    }

    #[test]
    fn a_request_id_reused_is_invalid_argument_naming_the_first_method() {
        let s = status(StoreError::RequestIdReused {
            method: RequestMethod::CreateKey,
        });
        assert_eq!(kind_of(&s), "InvalidArgument");
        assert!(
            s.to_string().starts_with(
                "request_id: was already used within the last 24 hours for a CreateKey with other parameters"
            ),
            "{s:?}"
        );
    }
}
