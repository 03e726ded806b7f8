//! Request ids: what makes a create or a rotation safe to retry. A call
//! with an id leaves a record of it, with the secret it returned sealed
//! under the pepper and the id; a retry with the same id and the same
//! other fields gets that key and secret back, and one with other fields
//! is refused.

use vilvik_keys_domain::{
    AccountId, GeneratedKey, KeyId, REQUEST_ID_WINDOW, RequestId, open_sealed_secret, seal_secret,
};
use vilvik_keys_store::{Replay, RequestMethod, RequestRecord};
use zeroize::Zeroizing;

use super::admin::Admin;
use super::error::ApiError;

/// BLAKE3 `derive_key` context of a request's parameters' digest.
/// NEVER CHANGE THIS: retries within the window would be refused.
const PARAMS_CONTEXT: &str = "vilvik-keys 2026-12-04 request parameters v1";

/// The request id of a create or rotation, from its `request_id` field
/// and its `idempotency-key` header (`None`: not sent); when both are
/// sent they must agree. `None` for both: the call has no id.
pub fn request_id(field: &str, header: Option<&str>) -> Result<Option<RequestId>, ApiError> {
    let id = match (field, header) {
        ("", None) => return Ok(None),
        ("", Some(header)) => header,
        (field, Some(header)) if !field.eq_ignore_ascii_case(header) => {
            return Err(ApiError::invalid(
                "request_id",
                "differs from the idempotency-key header: send the request id once, or the same in both",
            ));
        }
        (field, _) => field,
    };
    id.parse()
        .map(Some)
        .map_err(|e| ApiError::invalid("request_id", e))
}

/// What a create or rotation sends to be retried safely: its request id,
/// and everything else it asks for, encoded as the surface received it
/// (for gRPC, the request message without its id). A retry must send the
/// same bytes; a surface that accepts the same request as another should
/// encode it the same way, so that a retry may cross surfaces.
#[derive(Debug)]
pub struct Retry {
    pub id: RequestId,
    pub other_fields: Vec<u8>,
}

/// What tells a retry of one method from a new call: the caller's request
/// id, and a digest of everything else the call asks for.
#[derive(Debug)]
pub(super) struct RetryKey {
    pub(super) id: RequestId,
    params: [u8; 32],
}

impl Retry {
    pub(super) fn key(self, method: RequestMethod) -> RetryKey {
        let mut hasher = blake3::Hasher::new_derive_key(PARAMS_CONTEXT);
        hasher.update(method.as_str().as_bytes());
        hasher.update(&[0]);
        hasher.update(&self.other_fields);
        RetryKey {
            id: self.id,
            params: *hasher.finalize().as_bytes(),
        }
    }
}

/// What a sealed secret belongs to: a secret sealed for one call and key
/// opens for no other.
fn seal_context(method: RequestMethod, key_id: &KeyId) -> Vec<u8> {
    format!("{} {key_id}", method.as_str()).into_bytes()
}

impl Admin {
    /// The record a call under `retry` leaves for its retries: `secret`
    /// sealed under the current pepper and the id.
    pub(super) fn request_record(
        &self,
        account: &AccountId,
        retry: &RetryKey,
        method: RequestMethod,
        key_id: &KeyId,
        secret: &GeneratedKey,
        now: time::OffsetDateTime,
    ) -> RequestRecord {
        let (id, pepper) = (&retry.id, self.verifier.peppers().current());
        RequestRecord {
            digest: id.digest(account),
            method,
            params: retry.params,
            key_id: key_id.clone(),
            sealed: seal_secret(
                pepper,
                account,
                id,
                &seal_context(method, key_id),
                secret.expose_secret(),
            ),
            pepper_id: pepper.id(),
            expires_at: now + REQUEST_ID_WINDOW,
        }
    }

    /// Opens the secret a retried call's first call returned.
    pub(super) fn open_replay(
        &self,
        account: &AccountId,
        id: &RequestId,
        method: RequestMethod,
        replay: &Replay,
    ) -> Result<Zeroizing<String>, ApiError> {
        let pepper = self
            .verifier
            .peppers()
            .resolve(Some(replay.pepper_id))
            .map_err(|_| {
                ApiError::FailedPrecondition(format!(
                    "request_id: the first call's secret was sealed under pepper {}, which this \
                     server no longer holds, so it cannot be returned again: rotate the key \
                     (RotateKey with a new request id) to get a new secret",
                    replay.pepper_id
                ))
            })?
            .ok_or_else(|| ApiError::internal("a replay without a pepper", None))?;
        open_sealed_secret(
            pepper,
            account,
            id,
            &seal_context(method, &replay.key.key_id),
            &replay.sealed,
        )
        .map_err(|e| ApiError::internal("a sealed secret does not open", Some(Box::new(e))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "5f0c6a7e-3a1b-4c2d-9e8f-0a1b2c3d4e5f";

    #[test]
    fn a_request_id_comes_from_the_field_or_the_header_and_both_must_agree() {
        fn id(field: &str, header: Option<&str>) -> Result<Option<String>, ApiError> {
            request_id(field, header).map(|id| id.map(|id| id.as_str().to_owned()))
        }
        assert_eq!(id("", None).unwrap(), None);
        assert_eq!(id(ID, None).unwrap().as_deref(), Some(ID));
        assert_eq!(id("", Some(ID)).unwrap().as_deref(), Some(ID));
        assert_eq!(
            id(ID, Some(&ID.to_uppercase())).unwrap().as_deref(),
            Some(ID)
        );
        let differs = id(ID, Some("00000000-0000-4000-8000-000000000000")).unwrap_err();
        assert!(
            differs
                .to_string()
                .starts_with("request_id: differs from the idempotency-key header"),
            "{differs}"
        );
        let malformed = id("retry-1", None).unwrap_err();
        assert!(
            malformed
                .to_string()
                .starts_with("request_id: 'retry-1' is not a UUID"),
            "{malformed}"
        );
    }

    /// The digest is stored with each request id for a day: a node of
    /// another version must compute the same, or retries across an
    /// upgrade would be refused.
    #[test]
    fn the_digest_of_a_calls_other_fields_never_changes() {
        let key = |method, other_fields: &[u8]| {
            Retry {
                id: ID.parse().unwrap(),
                other_fields: other_fields.to_vec(),
            }
            .key(method)
            .params
        };
        let create = key(RequestMethod::CreateKey, b"\x0a\x03abc");
        let expected =
            blake3::Hasher::new_derive_key("vilvik-keys 2026-12-04 request parameters v1")
                .update(b"CreateKey\0\x0a\x03abc")
                .finalize();
        assert_eq!(&create, expected.as_bytes());
        assert_ne!(create, key(RequestMethod::RotateKey, b"\x0a\x03abc"));
        assert_ne!(create, key(RequestMethod::CreateKey, b"\x0a\x03abd"));
    }
}
