//! What tests send and compare: requests carrying credentials, the
//! messages most tests build, and the assertions on what comes back.

use time::OffsetDateTime;
use tonic::{Code, Request, Status};
use vilvik_keys::headers;
use vilvik_keys::proto;

/// `message` with `authorization: Bearer <credential>`: a management key,
/// or the operator token.
pub fn bearer<T>(message: T, credential: &str) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {credential}")
            .parse()
            .expect("a credential that fits in a header"),
    );
    request
}

/// `message` with the operator `token`, acting on `account` on behalf of
/// `actor` (the [`headers::ACCOUNT`] and [`headers::ACTOR`] headers).
pub fn as_operator<T>(message: T, token: &str, account: &str, actor: &str) -> Request<T> {
    let mut request = bearer(message, token);
    let metadata = request.metadata_mut();
    metadata.insert(
        headers::ACCOUNT,
        account.parse().expect("an account that fits in a header"),
    );
    metadata.insert(
        headers::ACTOR,
        actor.parse().expect("an actor that fits in a header"),
    );
    request
}

/// Asserts the call failed with `code` and a message containing `needle`;
/// returns the status.
#[track_caller]
pub fn assert_status<T: std::fmt::Debug>(
    result: Result<T, Status>,
    code: Code,
    needle: &str,
) -> Status {
    let status = result.expect_err("the call should have failed");
    assert_eq!(status.code(), code, "unexpected status: {status:?}");
    assert!(
        status.message().contains(needle),
        "message {:?} should mention {needle:?}",
        status.message()
    );
    status
}

/// A protobuf timestamp `days` after `now` (before it when negative).
pub fn days_from(now: OffsetDateTime, days: i64) -> prost_types::Timestamp {
    let at = now + time::Duration::days(days);
    prost_types::Timestamp {
        seconds: at.unix_timestamp(),
        nanos: 0,
    }
}

/// Keys without their last-use fields, which every admin call through a
/// management key updates in the background; for before/after comparisons.
pub fn without_usage(mut keys: Vec<proto::Key>) -> Vec<proto::Key> {
    for key in &mut keys {
        *key = proto::Key {
            last_used_at: None,
            last_used_ip: String::new(),
            last_used_observed_ip: String::new(),
            last_used_claimed_ip: String::new(),
            valid_use_count: 0,
            rejected_use_count: 0,
            last_rejected_at: None,
            last_rejected_ip: String::new(),
            ..std::mem::take(key)
        };
    }
    keys
}

/// An update mask of `paths`.
pub fn mask(paths: &[&str]) -> Option<prost_types::FieldMask> {
    Some(prost_types::FieldMask {
        paths: paths.iter().map(|p| p.to_string()).collect(),
    })
}

/// CreateKey of a key named `name` with `scopes`, no expiry.
pub fn create(name: &str, scopes: &[&str]) -> proto::CreateKeyRequest {
    proto::CreateKeyRequest {
        name: name.into(),
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// GetKey of `key_id`.
pub fn get(key_id: &str) -> proto::GetKeyRequest {
    proto::GetKeyRequest {
        key_id: key_id.into(),
    }
}

/// UpdateKey of `key_id`'s name to `name`.
pub fn rename(key_id: &str, name: &str) -> proto::UpdateKeyRequest {
    proto::UpdateKeyRequest {
        key_id: key_id.into(),
        name: name.into(),
        update_mask: mask(&["name"]),
        ..Default::default()
    }
}

/// UpdateKey of `key_id`'s scopes to `scopes`.
pub fn rescope(key_id: &str, scopes: &[&str]) -> proto::UpdateKeyRequest {
    proto::UpdateKeyRequest {
        key_id: key_id.into(),
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
        update_mask: mask(&["scopes"]),
        ..Default::default()
    }
}

/// RotateKey of `key_id`, with no request id or etag.
pub fn rotate(key_id: &str) -> proto::RotateKeyRequest {
    proto::RotateKeyRequest {
        key_id: key_id.into(),
        ..Default::default()
    }
}

/// RevokeKey of `key_id`, giving no reason.
pub fn revoke(key_id: &str) -> proto::RevokeKeyRequest {
    proto::RevokeKeyRequest {
        key_id: key_id.into(),
        ..Default::default()
    }
}

/// VerifyKey of `key` requiring `required`, with no client IP.
pub fn verify(key: &str, required: &[&str]) -> proto::VerifyKeyRequest {
    proto::VerifyKeyRequest {
        key: key.into(),
        required_scopes: required.iter().map(|s| s.to_string()).collect(),
        client_ip: String::new(),
    }
}
