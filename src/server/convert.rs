//! Conversions between wire (prost) types and domain, store and service
//! types, and the parsing of the proto's shared fields (timestamps, page
//! sizes and tokens, etags, tiers) with errors naming the field. Only the
//! gRPC adapter does this; the service and the crates below never see
//! prost types.

use prost_types::Timestamp;
use time::OffsetDateTime;
use vilvik_keys_domain::{AuditAction, KeyState, Tier};
use vilvik_keys_store::{AuditEvent, KeyRecord};

use crate::proto;
use crate::service::{AccountView, ApiError, etag};

/// Largest page a listing returns; 0 asks for the default.
const MAX_PAGE_SIZE: i32 = 100;
const DEFAULT_PAGE_SIZE: u32 = 50;

pub fn from_timestamp(field: &str, ts: &Timestamp) -> Result<OffsetDateTime, ApiError> {
    let at = proto::datetime(ts).ok_or_else(|| {
        ApiError::invalid(
            field,
            "is not a valid timestamp: seconds or nanos out of range",
        )
    })?;
    // Stored with microsecond precision by both backends.
    Ok(at - time::Duration::nanoseconds(i64::from(at.nanosecond() % 1_000)))
}

pub fn key_state(state: KeyState) -> proto::KeyState {
    match state {
        KeyState::Active => proto::KeyState::Active,
        KeyState::Expired => proto::KeyState::Expired,
        KeyState::Revoked => proto::KeyState::Revoked,
    }
}

pub fn key(record: KeyRecord, now: OffsetDateTime) -> proto::Key {
    let state = key_state(record.state(now)).into();
    let usage = record.usage;
    proto::Key {
        state,
        key_id: record.key_id.to_string(),
        account_id: record.account_id.to_string(),
        name: record.name.to_string(),
        description: record.description.as_str().to_owned(),
        scopes: record.scopes.to_strings(),
        prefix: record.prefix.to_string(),
        created_at: Some(proto::timestamp(record.created_at)),
        expires_at: record.expires_at.map(proto::timestamp),
        revoked_at: record.revoked_at.map(proto::timestamp),
        rotated_at: record.rotated_at.map(proto::timestamp),
        last_used_at: record.last_used_at.map(proto::timestamp),
        last_used_ip: record.last_used_ip.unwrap_or_default(),
        revoke_reason: record.revoke_reason.unwrap_or_default(),
        etag: etag::etag(record.version),
        last_used_observed_ip: usage.last_used_observed_ip.unwrap_or_default(),
        last_used_claimed_ip: usage.last_used_claimed_ip.unwrap_or_default(),
        valid_use_count: usage.valid_uses,
        rejected_use_count: usage.rejected_uses,
        last_rejected_at: usage.last_rejected_at.map(proto::timestamp),
        last_rejected_ip: usage.last_rejected_ip.unwrap_or_default(),
    }
}

/// The version an optional `etag` field names; empty: none.
pub fn etag_version(field: &str) -> Result<Option<i64>, ApiError> {
    etag::version(field).map_err(|e| ApiError::invalid("etag", e))
}

fn audit_action(action: AuditAction) -> proto::AuditAction {
    match action {
        AuditAction::Created => proto::AuditAction::Created,
        AuditAction::Updated => proto::AuditAction::Updated,
        AuditAction::Rotated => proto::AuditAction::Rotated,
        AuditAction::Revoked => proto::AuditAction::Revoked,
        AuditAction::TierChanged => proto::AuditAction::TierChanged,
        AuditAction::GrantableScopesChanged => proto::AuditAction::GrantableScopesChanged,
    }
}

pub fn audit_event(event: AuditEvent) -> proto::AuditEvent {
    proto::AuditEvent {
        event_id: event.event_id.to_string(),
        account_id: event.account_id.to_string(),
        key_id: event.key_id.map(|k| k.to_string()).unwrap_or_default(),
        action: audit_action(event.action).into(),
        actor: event.actor,
        actor_ip: event.actor_ip.unwrap_or_default(),
        at: Some(proto::timestamp(event.at)),
        changes: event
            .changes
            .into_iter()
            .map(|c| proto::FieldChange {
                field: c.field,
                old_value: c.old,
                new_value: c.new,
            })
            .collect(),
    }
}

pub fn tier(tier: Tier) -> proto::Tier {
    match tier {
        Tier::Free => proto::Tier::Free,
        Tier::Premium => proto::Tier::Premium,
    }
}

pub fn account(view: AccountView) -> proto::Account {
    proto::Account {
        account_id: view.account_id.to_string(),
        tier: tier(view.tier).into(),
        active_key_limit: view.active_key_limit,
        grantable_scopes: view.grantable.to_strings(),
        grantable_scopes_default: view.grantable_default,
    }
}

pub fn tier_from_proto(value: i32) -> Result<Tier, ApiError> {
    match proto::Tier::try_from(value) {
        Ok(proto::Tier::Free) => Ok(Tier::Free),
        Ok(proto::Tier::Premium) => Ok(Tier::Premium),
        _ => Err(ApiError::invalid(
            "tier",
            "must be TIER_FREE or TIER_PREMIUM",
        )),
    }
}

/// `page_size` of a listing: 0 means the default, 1 to 100 are taken as given.
pub fn page_size(page_size: i32) -> Result<u32, ApiError> {
    match page_size {
        0 => Ok(DEFAULT_PAGE_SIZE),
        1..=MAX_PAGE_SIZE => Ok(page_size as u32),
        _ => Err(ApiError::invalid(
            "page_size",
            format!(
                "{page_size} is out of range: use 1 to {MAX_PAGE_SIZE}, or 0 for the default of {DEFAULT_PAGE_SIZE}"
            ),
        )),
    }
}

const PAGE_TOKEN_TAG: &str = "p1.";

/// Page tokens are opaque to callers; inside they hold the store's cursor.
pub fn page_token(cursor: Option<i64>) -> String {
    cursor
        .map(|c| format!("{PAGE_TOKEN_TAG}{c}"))
        .unwrap_or_default()
}

pub fn cursor(page_token: &str) -> Result<Option<i64>, ApiError> {
    if page_token.is_empty() {
        return Ok(None);
    }
    page_token
        .strip_prefix(PAGE_TOKEN_TAG)
        .and_then(|c| c.parse::<i64>().ok())
        .filter(|c| *c >= 0)
        .map(Some)
        .ok_or_else(|| {
            ApiError::invalid(
                "page_token",
                "is not a token this service issued: pass next_page_token from the previous response, or leave it empty for the first page",
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_reject_forgeries() {
        assert_eq!(cursor(&page_token(Some(42))).unwrap(), Some(42));
        assert_eq!(cursor("").unwrap(), None);
        assert!(cursor("42").is_err());
        assert!(cursor("p1.-5").is_err());
        assert!(cursor("p1.abc").is_err());
    }

    #[test]
    fn page_size_bounds() {
        assert_eq!(page_size(0).unwrap(), 50);
        assert_eq!(page_size(100).unwrap(), 100);
        assert!(page_size(101).is_err());
        assert!(page_size(-1).is_err());
    }

    #[test]
    fn timestamps_round_trip_at_microsecond_precision() {
        let ts = Timestamp {
            seconds: 1_800_000_000,
            nanos: 123_456_789,
        };
        let at = from_timestamp("expires_at", &ts).unwrap();
        assert_eq!(
            proto::timestamp(at),
            Timestamp {
                seconds: 1_800_000_000,
                nanos: 123_456_000
            }
        );
        assert!(
            from_timestamp(
                "expires_at",
                &Timestamp {
                    seconds: 0,
                    nanos: -1
                }
            )
            .is_err()
        );
        assert!(
            from_timestamp(
                "expires_at",
                &Timestamp {
                    seconds: i64::MAX,
                    nanos: 0
                }
            )
            .is_err()
        );
    }
}
