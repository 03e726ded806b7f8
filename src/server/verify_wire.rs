//! `VerifyKeyRequest` and `VerifyKeyResponse` as the verify listener reads
//! and writes them: the same bytes on the wire as the generated messages in
//! [`crate::proto`], without a heap allocation per field.
//!
//! VerifyKey is the call other services make on every request they serve,
//! so its cost is measured against the gRPC framework's own (BENCHMARKS.md).
//! The generated request would copy the key into a fresh `String` and check
//! it is UTF-8 before the key parser checks every byte again; the generated
//! response would copy the key id, account, name and every scope into new
//! `String`s only to encode and free them. Here the key is decoded into an
//! inline buffer and the answer is encoded straight from the verifier's
//! shared values. Clients keep using the generated messages; tests in this
//! module hold both forms to the same bytes.

use std::fmt;

use compact_str::CompactString;
use prost::bytes::{Buf, BufMut};
use prost::encoding::{self, DecodeContext, WireType};
use prost::{DecodeError, Message};
use smallvec::SmallVec;
use vilvik_keys_domain::{KEY_LENGTH, Scope};
use vilvik_keys_verify::{Verdict, VerifiedKey};

use crate::proto::VerifyCode;

// Field numbers of `VerifyKeyRequest` and `VerifyKeyResponse` in
// proto/vilvik/keys/v1/keys.proto.
const REQUEST_MESSAGE: &str = "VerifyKeyRequest";
const REQUEST_KEY: u32 = 1;
const REQUEST_REQUIRED_SCOPES: u32 = 2;
const REQUEST_CLIENT_IP: u32 = 3;
const RESPONSE_VALID: u32 = 1;
const RESPONSE_CODE: u32 = 2;
const RESPONSE_KEY_ID: u32 = 3;
const RESPONSE_ACCOUNT_ID: u32 = 4;
const RESPONSE_NAME: u32 = 5;
const RESPONSE_SCOPES: u32 = 6;
const RESPONSE_EXPIRES_AT: u32 = 7;
const RESPONSE_MISSING_SCOPES: u32 = 8;

/// A decoded `VerifyKeyRequest`.
#[derive(Default)]
pub struct VerifyCall {
    /// The key's bytes as sent: inline when key-sized, on the heap only
    /// when a caller sends something longer. Not checked to be UTF-8:
    /// anything but the key format's ASCII is malformed anyway.
    pub key: SmallVec<[u8; KEY_LENGTH]>,
    /// Inline up to two scopes of up to 24 bytes each (the usual request).
    pub required_scopes: SmallVec<[CompactString; 2]>,
    pub client_ip: String,
}

impl fmt::Debug for VerifyCall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifyCall")
            .field("key", &"[REDACTED]")
            .field("required_scopes", &self.required_scopes)
            .field("client_ip", &self.client_ip)
            .finish()
    }
}

impl VerifyCall {
    fn merge_key(&mut self, buf: &mut impl Buf, ctx: DecodeContext) -> Result<(), DecodeError> {
        if let Some((key, size)) = short_field(buf, KEY_LENGTH) {
            self.key = SmallVec::from_slice(key);
            buf.advance(size);
            return Ok(());
        }
        let mut bytes = Vec::new();
        encoding::bytes::merge(WireType::LengthDelimited, &mut bytes, buf, ctx)?;
        self.key = SmallVec::from_vec(bytes);
        Ok(())
    }

    fn merge_required_scope(
        &mut self,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        if let Some((scope, size)) = short_field(buf, INLINE_SCOPE_LEN)
            && let Ok(scope) = std::str::from_utf8(scope)
        {
            self.required_scopes.push(CompactString::from(scope));
            buf.advance(size);
            return Ok(());
        }
        let mut scope = String::new();
        encoding::string::merge(WireType::LengthDelimited, &mut scope, buf, ctx)?;
        self.required_scopes.push(CompactString::from(scope));
        Ok(())
    }
}

/// Longest string a `CompactString` holds without a heap allocation.
const INLINE_SCOPE_LEN: usize = 24;

/// A length-delimited field's value and its size with the length prefix,
/// when the value is at most `max` bytes and wholly in the buffer's current
/// chunk (the fast path). `None` sends the caller to prost's own decoding,
/// with its checks and errors; the buffer is not moved either way.
fn short_field(buf: &impl Buf, max: usize) -> Option<(&[u8], usize)> {
    let chunk = buf.chunk();
    let mut rest = chunk;
    let len = usize::try_from(encoding::decode_varint(&mut rest).ok()?).ok()?;
    if len > max || len > rest.len() {
        return None;
    }
    Some((&rest[..len], chunk.len() - rest.len() + len))
}

impl Message for VerifyCall {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        encode_bytes(REQUEST_KEY, &self.key, buf);
        for scope in &self.required_scopes {
            encode_repeated_bytes(REQUEST_REQUIRED_SCOPES, scope.as_bytes(), buf);
        }
        encode_bytes(REQUEST_CLIENT_IP, self.client_ip.as_bytes(), buf);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        // Errors say which field, as prost's generated code does, so that
        // the codec can name it to the caller.
        let at = |field: &'static str| {
            move |mut e: DecodeError| {
                e.push(REQUEST_MESSAGE, field);
                e
            }
        };
        match tag {
            REQUEST_KEY => encoding::check_wire_type(WireType::LengthDelimited, wire_type)
                .and_then(|()| self.merge_key(buf, ctx))
                .map_err(at("key")),
            REQUEST_REQUIRED_SCOPES => {
                encoding::check_wire_type(WireType::LengthDelimited, wire_type)
                    .and_then(|()| self.merge_required_scope(buf, ctx))
                    .map_err(at("required_scopes"))
            }
            REQUEST_CLIENT_IP => encoding::string::merge(wire_type, &mut self.client_ip, buf, ctx)
                .map_err(at("client_ip")),
            _ => encoding::skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        bytes_len(REQUEST_KEY, &self.key)
            + self
                .required_scopes
                .iter()
                .map(|scope| repeated_bytes_len(REQUEST_REQUIRED_SCOPES, scope.as_bytes()))
                .sum::<usize>()
            + bytes_len(REQUEST_CLIENT_IP, self.client_ip.as_bytes())
    }

    fn clear(&mut self) {
        *self = Self::default();
    }
}

/// A `VerifyKeyResponse` to encode, holding the verifier's values rather
/// than copies of them. The server only ever encodes it.
#[derive(Debug, Default)]
pub struct VerifyAnswer {
    code: VerifyCode,
    key: Option<VerifiedKey>,
    missing: Vec<Scope>,
}

impl From<Verdict> for VerifyAnswer {
    fn from(verdict: Verdict) -> Self {
        let (code, key, missing) = match verdict {
            Verdict::Valid(key) => (VerifyCode::Valid, Some(key), Vec::new()),
            Verdict::Malformed(_) => (VerifyCode::Malformed, None, Vec::new()),
            Verdict::NotFound => (VerifyCode::NotFound, None, Vec::new()),
            Verdict::Expired(key) => (VerifyCode::Expired, Some(key), Vec::new()),
            Verdict::Revoked(key) => (VerifyCode::Revoked, Some(key), Vec::new()),
            Verdict::Rotated(key) => (VerifyCode::Rotated, Some(key), Vec::new()),
            Verdict::InsufficientScope { key, missing } => {
                (VerifyCode::InsufficientScope, Some(key), missing)
            }
        };
        Self { code, key, missing }
    }
}

impl Message for VerifyAnswer {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        if self.code == VerifyCode::Valid {
            encoding::bool::encode(RESPONSE_VALID, &true, buf);
        }
        if self.code != VerifyCode::Unspecified {
            encoding::int32::encode(RESPONSE_CODE, &i32::from(self.code), buf);
        }
        if let Some(key) = &self.key {
            encode_bytes(RESPONSE_KEY_ID, key.key_id.as_str().as_bytes(), buf);
            encode_bytes(RESPONSE_ACCOUNT_ID, key.account_id.as_str().as_bytes(), buf);
            encode_bytes(RESPONSE_NAME, key.name.as_str().as_bytes(), buf);
            for scope in key.scopes.iter() {
                encode_repeated_bytes(RESPONSE_SCOPES, scope.as_str().as_bytes(), buf);
            }
            if let Some(at) = key.expires_at {
                encoding::message::encode(RESPONSE_EXPIRES_AT, &crate::proto::timestamp(at), buf);
            }
        }
        for scope in &self.missing {
            encode_repeated_bytes(RESPONSE_MISSING_SCOPES, scope.as_str().as_bytes(), buf);
        }
    }

    /// Skips every field: clients decode `proto::VerifyKeyResponse`.
    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        let mut len = 0;
        if self.code == VerifyCode::Valid {
            len += encoding::bool::encoded_len(RESPONSE_VALID, &true);
        }
        if self.code != VerifyCode::Unspecified {
            len += encoding::int32::encoded_len(RESPONSE_CODE, &i32::from(self.code));
        }
        if let Some(key) = &self.key {
            len += bytes_len(RESPONSE_KEY_ID, key.key_id.as_str().as_bytes())
                + bytes_len(RESPONSE_ACCOUNT_ID, key.account_id.as_str().as_bytes())
                + bytes_len(RESPONSE_NAME, key.name.as_str().as_bytes());
            for scope in key.scopes.iter() {
                len += repeated_bytes_len(RESPONSE_SCOPES, scope.as_str().as_bytes());
            }
            if let Some(at) = key.expires_at {
                len += encoding::message::encoded_len(
                    RESPONSE_EXPIRES_AT,
                    &crate::proto::timestamp(at),
                );
            }
        }
        for scope in &self.missing {
            len += repeated_bytes_len(RESPONSE_MISSING_SCOPES, scope.as_str().as_bytes());
        }
        len
    }

    fn clear(&mut self) {
        *self = Self::default();
    }
}

/// A singular string or bytes field: proto3 leaves an empty one out.
fn encode_bytes(tag: u32, value: &[u8], buf: &mut impl BufMut) {
    if !value.is_empty() {
        encode_repeated_bytes(tag, value, buf);
    }
}

/// One element of a repeated string field, written even when empty.
fn encode_repeated_bytes(tag: u32, value: &[u8], buf: &mut impl BufMut) {
    encoding::encode_key(tag, WireType::LengthDelimited, buf);
    encoding::encode_varint(value.len() as u64, buf);
    buf.put_slice(value);
}

fn bytes_len(tag: u32, value: &[u8]) -> usize {
    if value.is_empty() {
        0
    } else {
        repeated_bytes_len(tag, value)
    }
}

fn repeated_bytes_len(tag: u32, value: &[u8]) -> usize {
    encoding::key_len(tag) + encoding::encoded_len_varint(value.len() as u64) + value.len()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use proptest::prelude::*;
    use time::macros::datetime;
    use vilvik_keys_domain::{GeneratedKey, KeyFormatError, KeyId, ScopeSet};

    use super::*;
    use crate::proto;

    /// The response as the generated message would carry it.
    fn generated(verdict: &Verdict) -> proto::VerifyKeyResponse {
        let (code, key, missing) = match verdict {
            Verdict::Valid(key) => (VerifyCode::Valid, Some(key), &[][..]),
            Verdict::Malformed(_) => (VerifyCode::Malformed, None, &[][..]),
            Verdict::NotFound => (VerifyCode::NotFound, None, &[][..]),
            Verdict::Expired(key) => (VerifyCode::Expired, Some(key), &[][..]),
            Verdict::Revoked(key) => (VerifyCode::Revoked, Some(key), &[][..]),
            Verdict::Rotated(key) => (VerifyCode::Rotated, Some(key), &[][..]),
            Verdict::InsufficientScope { key, missing } => {
                (VerifyCode::InsufficientScope, Some(key), &missing[..])
            }
        };
        // Every field spelled out (no `..`): a field added to the proto
        // does not compile here until the hand-written answer carries it.
        proto::VerifyKeyResponse {
            valid: code == VerifyCode::Valid,
            code: code.into(),
            key_id: key
                .map(|k| k.key_id.as_str().to_owned())
                .unwrap_or_default(),
            account_id: key
                .map(|k| k.account_id.as_str().to_owned())
                .unwrap_or_default(),
            name: key.map(|k| k.name.as_str().to_owned()).unwrap_or_default(),
            scopes: key.map(|k| k.scopes.to_strings()).unwrap_or_default(),
            expires_at: key.and_then(|k| k.expires_at.map(crate::proto::timestamp)),
            missing_scopes: missing.iter().map(|s| s.as_str().to_owned()).collect(),
        }
    }

    /// A message's fields in the descriptor set build.rs compiled from the
    /// proto: `(number, name, type, repeated)`.
    fn proto_fields(
        message: &str,
    ) -> Vec<(u32, String, prost_types::field_descriptor_proto::Type, bool)> {
        use prost_types::field_descriptor_proto::Label;
        let set = prost_types::FileDescriptorSet::decode(proto::FILE_DESCRIPTOR_SET).unwrap();
        let descriptor = set
            .file
            .iter()
            .filter(|f| f.package() == "vilvik.keys.v1")
            .flat_map(|f| &f.message_type)
            .find(|m| m.name() == message)
            .unwrap_or_else(|| panic!("{message} is not in the proto"));
        descriptor
            .field
            .iter()
            .map(|f| {
                (
                    u32::try_from(f.number()).unwrap(),
                    f.name().to_owned(),
                    f.r#type(),
                    f.label() == Label::Repeated,
                )
            })
            .collect()
    }

    #[test]
    fn the_field_numbers_and_types_are_the_protos() {
        use prost_types::field_descriptor_proto::Type;
        let fields = |list: &[(u32, &str, Type, bool)]| {
            list.iter()
                .map(|&(n, name, t, repeated)| (n, name.to_owned(), t, repeated))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            proto_fields("VerifyKeyRequest"),
            fields(&[
                (REQUEST_KEY, "key", Type::String, false),
                (
                    REQUEST_REQUIRED_SCOPES,
                    "required_scopes",
                    Type::String,
                    true
                ),
                (REQUEST_CLIENT_IP, "client_ip", Type::String, false),
            ]),
            "VerifyKeyRequest changed in the proto: teach VerifyCall the change"
        );
        assert_eq!(
            proto_fields("VerifyKeyResponse"),
            fields(&[
                (RESPONSE_VALID, "valid", Type::Bool, false),
                (RESPONSE_CODE, "code", Type::Enum, false),
                (RESPONSE_KEY_ID, "key_id", Type::String, false),
                (RESPONSE_ACCOUNT_ID, "account_id", Type::String, false),
                (RESPONSE_NAME, "name", Type::String, false),
                (RESPONSE_SCOPES, "scopes", Type::String, true),
                (RESPONSE_EXPIRES_AT, "expires_at", Type::Message, false),
                (
                    RESPONSE_MISSING_SCOPES,
                    "missing_scopes",
                    Type::String,
                    true
                ),
            ]),
            "VerifyKeyResponse changed in the proto: teach VerifyAnswer the change"
        );
    }

    #[test]
    fn the_verify_service_serves_every_method_of_the_proto() {
        let set = prost_types::FileDescriptorSet::decode(proto::FILE_DESCRIPTOR_SET).unwrap();
        let methods: Vec<_> = set
            .file
            .iter()
            .flat_map(|f| &f.service)
            .filter(|s| s.name() == "KeyVerify")
            .flat_map(|s| &s.method)
            .map(|m| (m.name(), m.input_type(), m.output_type()))
            .collect();
        // The methods build.rs gives the hand-written KeyVerify server.
        assert_eq!(
            methods,
            [(
                "VerifyKey",
                ".vilvik.keys.v1.VerifyKeyRequest",
                ".vilvik.keys.v1.VerifyKeyResponse"
            )],
            "KeyVerify changed in the proto: add the method to build.rs's verify_server and verify_wire"
        );
    }

    fn key(scopes: &[&str], expires_at: Option<time::OffsetDateTime>) -> VerifiedKey {
        VerifiedKey {
            key_id: KeyId::generate(),
            account_id: "ACME".parse().unwrap(),
            name: "ci-runner".parse().unwrap(),
            scopes: Arc::new(ScopeSet::parse(scopes).unwrap()),
            expires_at,
        }
    }

    #[test]
    fn every_answer_is_encoded_exactly_as_the_generated_message() {
        let expiry = Some(datetime!(2027-03-01 12:30:15.25 UTC));
        let verdicts = [
            Verdict::Valid(key(&["datasets:read", "models:*"], expiry)),
            Verdict::Valid(key(&[], None)),
            Verdict::Malformed(KeyFormatError::ChecksumMismatch),
            Verdict::NotFound,
            Verdict::Expired(key(&["datasets:read"], expiry)),
            Verdict::Revoked(key(&["datasets:read"], None)),
            Verdict::Rotated(key(&["datasets:read"], None)),
            Verdict::InsufficientScope {
                key: key(&["datasets:read"], None),
                missing: vec![
                    "datasets:write".parse().unwrap(),
                    "models:read".parse().unwrap(),
                ],
            },
        ];
        for verdict in verdicts {
            let expected = generated(&verdict).encode_to_vec();
            let answer = VerifyAnswer::from(verdict.clone());
            assert_eq!(answer.encoded_len(), expected.len(), "{verdict:?}");
            assert_eq!(answer.encode_to_vec(), expected, "{verdict:?}");
        }
    }

    fn call_of(request: &proto::VerifyKeyRequest) -> VerifyCall {
        VerifyCall::decode(request.encode_to_vec().as_slice()).unwrap()
    }

    #[test]
    fn a_request_decodes_to_the_same_fields_and_encodes_to_the_same_bytes() {
        let secret = GeneratedKey::generate(&vilvik_keys_domain::Pepper::generate());
        let long = "x".repeat(300);
        for key in [secret.expose_secret(), "", "vlk_short", long.as_str()] {
            let request = proto::VerifyKeyRequest {
                key: key.to_owned(),
                required_scopes: vec!["datasets:read".into(), String::new()],
                client_ip: "192.0.2.1".into(),
            };
            let call = call_of(&request);
            assert_eq!(&call.key[..], key.as_bytes());
            assert_eq!(&call.required_scopes[..], &request.required_scopes[..]);
            assert_eq!(call.client_ip, request.client_ip);
            assert_eq!(call.encoded_len(), request.encoded_len());
            assert_eq!(call.encode_to_vec(), request.encode_to_vec());
        }
    }

    #[test]
    fn a_key_sized_key_is_held_inline() {
        let secret = GeneratedKey::generate(&vilvik_keys_domain::Pepper::generate());
        let call = call_of(&proto::VerifyKeyRequest {
            key: secret.expose_secret().to_owned(),
            ..Default::default()
        });
        assert!(!call.key.spilled());
    }

    #[test]
    fn the_last_key_wins_and_unknown_fields_are_skipped_as_proto3_says() {
        let mut bytes = proto::VerifyKeyRequest {
            key: "first".into(),
            ..Default::default()
        }
        .encode_to_vec();
        encoding::uint64::encode(15, &7, &mut bytes);
        encoding::string::encode(REQUEST_KEY, &"second".to_owned(), &mut bytes);
        let call = VerifyCall::decode(bytes.as_slice()).unwrap();
        assert_eq!(&call.key[..], b"second");
        let generated = proto::VerifyKeyRequest::decode(bytes.as_slice()).unwrap();
        assert_eq!(generated.key, "second");
    }

    #[test]
    fn a_key_that_is_not_utf8_decodes_and_is_then_malformed() {
        let mut bytes = Vec::new();
        encode_bytes(REQUEST_KEY, &[b'v', 0xff, 0xfe], &mut bytes);
        let call = VerifyCall::decode(bytes.as_slice()).unwrap();
        assert_eq!(&call.key[..], &[b'v', 0xff, 0xfe]);
        assert_eq!(
            vilvik_keys_domain::ApiKey::from_bytes(&call.key).err(),
            Some(KeyFormatError::WrongLength(3))
        );
    }

    #[test]
    fn broken_messages_are_refused() {
        // The key claims 40 bytes; 5 follow.
        let mut truncated = Vec::new();
        encoding::encode_key(REQUEST_KEY, WireType::LengthDelimited, &mut truncated);
        encoding::encode_varint(40, &mut truncated);
        truncated.extend_from_slice(b"vlk_x");
        assert!(VerifyCall::decode(truncated.as_slice()).is_err());
        // The key sent as a number.
        let mut wrong_type = Vec::new();
        encoding::uint64::encode(REQUEST_KEY, &1, &mut wrong_type);
        assert!(VerifyCall::decode(wrong_type.as_slice()).is_err());
    }

    #[test]
    fn short_scopes_are_held_inline_and_a_bad_one_is_refused_like_prost_does() {
        let long = "datasets.with.a.long.name:read";
        let call = call_of(&proto::VerifyKeyRequest {
            required_scopes: vec!["datasets:read".into(), long.into()],
            ..Default::default()
        });
        assert!(!call.required_scopes.spilled());
        assert!(!call.required_scopes[0].is_heap_allocated());
        assert_eq!(call.required_scopes[1], long);
        let mut not_utf8 = Vec::new();
        encode_repeated_bytes(REQUEST_REQUIRED_SCOPES, &[b'a', 0xff], &mut not_utf8);
        assert!(VerifyCall::decode(not_utf8.as_slice()).is_err());
        assert!(proto::VerifyKeyRequest::decode(not_utf8.as_slice()).is_err());
    }

    #[test]
    fn debug_never_shows_the_key() {
        let secret = GeneratedKey::generate(&vilvik_keys_domain::Pepper::generate());
        let call = call_of(&proto::VerifyKeyRequest {
            key: secret.expose_secret().to_owned(),
            ..Default::default()
        });
        let shown = format!("{call:?}");
        assert!(shown.contains("[REDACTED]"));
        assert!(!shown.contains(&secret.expose_secret()[4..]), "{shown}");
    }

    proptest! {
        #[test]
        fn any_request_round_trips_like_the_generated_message(
            key in ".{0,80}",
            scopes in proptest::collection::vec(".{0,40}", 0..4),
            client_ip in ".{0,40}",
        ) {
            let request = proto::VerifyKeyRequest { key, required_scopes: scopes, client_ip };
            let call = call_of(&request);
            prop_assert_eq!(&call.key[..], request.key.as_bytes());
            prop_assert_eq!(&call.required_scopes[..], &request.required_scopes[..]);
            prop_assert_eq!(&call.client_ip, &request.client_ip);
            prop_assert_eq!(call.encode_to_vec(), request.encode_to_vec());
        }
    }
}
