//! The properties the fuzz targets check, one function per target in
//! `fuzz_targets/` (each target only hands libFuzzer's input to its
//! function here). Every function must hold for any input: a panic is a
//! bug in the service or in the property.
//!
//! Besides "never panics", each parser is held to an independent statement
//! of its rule (the key format, the scope pattern) and each decoder to
//! prost's generated decoding of the same bytes, or to the invariants its
//! output promises (a validated config, a validated request).
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::path::Path;

use prost::Message;
use prost::bytes::Buf;
use time::OffsetDateTime;
use time::macros::datetime;
use tonic::Code;
use vilvik_keys::config::Config;
use vilvik_keys::proto;
use vilvik_keys::server::admin::{parse_create_request, parse_update_request};
use vilvik_keys::server::codec::{NOT_UTF8, decode_error};
use vilvik_keys::server::convert;
use vilvik_keys::server::verify_wire::VerifyCall;
use vilvik_keys::service::ApiError;
use vilvik_keys_domain::{
    ApiKey, Description, KEY_LENGTH, KEY_PREFIX, KeyFormatError, KeyName, KeyPrefix, Scope,
    ScopeError, ScopeSet, excerpt, looks_like_a_credential,
};

/// The key format, restated from its documentation in
/// `crates/domain/src/key.rs`: `vlk_` + 8 base62, `_`, 32 + 6 base62, the
/// last 6 being CRC32 of the rest as fixed-width base62.
mod reference {
    pub const PREFIX_LEN: usize = 12;
    const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    /// The stored hash's BLAKE3 context; a contract that never changes.
    pub const HASH_CONTEXT: &str = "vilvik-keys 2026-11-26 api key secret hash v1";
    pub const HASH_KEY_CONTEXT: &str = "vilvik-keys 2026-12-02 api key secret hash v2 keyed";
    pub const PEPPER: [u8; 32] = [7; 32];

    pub fn pepper() -> vilvik_keys_domain::Pepper {
        vilvik_keys_domain::Pepper::from_bytes(&PEPPER)
    }

    fn base62_6(mut value: u32) -> [u8; 6] {
        let mut out = [0; 6];
        for slot in out.iter_mut().rev() {
            *slot = ALPHABET[(value % 62) as usize];
            value /= 62;
        }
        out
    }

    pub fn is_prefix(s: &[u8]) -> bool {
        s.len() == PREFIX_LEN
            && s.starts_with(b"vlk_")
            && s[4..].iter().all(u8::is_ascii_alphanumeric)
    }

    pub fn is_key(s: &[u8]) -> bool {
        s.len() == 51
            && is_prefix(&s[..PREFIX_LEN])
            && s[PREFIX_LEN] == b'_'
            && s[PREFIX_LEN + 1..].iter().all(u8::is_ascii_alphanumeric)
            && s[45..] == base62_6(crc32fast::hash(&s[..45]))
    }

    /// `[a-z0-9_.-]+:[a-z0-9_.-]+`, or with `*` as the whole action, at
    /// most 128 bytes.
    pub fn is_scope(s: &str) -> bool {
        let part = |p: &str| {
            !p.is_empty()
                && p.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b'-')
                })
        };
        s.len() <= MAX_SCOPE_LEN
            && s.split_once(':')
                .is_some_and(|(resource, action)| part(resource) && (action == "*" || part(action)))
    }

    /// A scope but for a `*` that is not the whole action (`datasets:re*d`).
    pub fn is_partial_wildcard(s: &str) -> bool {
        s.split_once(':').is_some_and(|(resource, action)| {
            action != "*"
                && action.contains('*')
                && is_scope(&format!("{resource}:{}", action.replace('*', "x")))
        })
    }

    /// Longest scope accepted (`crates/domain/src/scope.rs`).
    pub const MAX_SCOPE_LEN: usize = 128;
    /// Most scopes one key may hold (ditto).
    pub const MAX_SCOPES: usize = 50;
}

/// `ApiKey::from_bytes`, `str::parse::<ApiKey>` and `KeyPrefix` from str.
pub fn key(data: &[u8]) {
    let from_bytes = ApiKey::from_bytes(data);
    assert_eq!(
        from_bytes.is_ok(),
        reference::is_key(data),
        "ApiKey::from_bytes disagrees with the key format"
    );
    match &from_bytes {
        Ok(key) => {
            assert_eq!(
                key.prefix().as_str().as_bytes(),
                &data[..reference::PREFIX_LEN]
            );
            // Legacy (unkeyed) hashes must never change: stored keys
            // from before peppers verify with them. Keyed hashes are
            // keyed BLAKE3 under a key derived from the pepper.
            let expected = blake3::derive_key(reference::HASH_CONTEXT, data);
            assert_eq!(
                key.hash_with(None).as_bytes(),
                &expected,
                "the legacy hash changed"
            );
            let hash_key = blake3::derive_key(reference::HASH_KEY_CONTEXT, &reference::PEPPER);
            let keyed = blake3::keyed_hash(&hash_key, data);
            assert_eq!(
                key.hash_with(Some(&reference::pepper())).as_bytes(),
                keyed.as_bytes(),
                "the keyed hash changed"
            );
            // CRC32 catches every error in one byte: any single-character
            // change of a valid key is malformed.
            let mut typo = data.to_vec();
            for pos in 0..data.len() {
                for c in b"0Az_!-".iter().copied().chain([data[pos] ^ 1]) {
                    if c == data[pos] {
                        continue;
                    }
                    typo[pos] = c;
                    assert!(ApiKey::from_bytes(&typo).is_err(), "a typo at {pos} passed");
                }
                typo[pos] = data[pos];
            }
        }
        Err(KeyFormatError::WrongLength(n)) => {
            assert_eq!(*n, data.len(), "from_bytes counts a length in bytes");
            assert_ne!(*n, KEY_LENGTH);
        }
        Err(KeyFormatError::WrongPrefix) => {
            assert_eq!(data.len(), KEY_LENGTH);
            assert!(!data.starts_with(KEY_PREFIX.as_bytes()));
        }
        Err(KeyFormatError::InvalidCharacter | KeyFormatError::ChecksumMismatch) => {
            assert_eq!(data.len(), KEY_LENGTH);
            assert!(data.starts_with(KEY_PREFIX.as_bytes()));
        }
    }

    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = text.parse::<ApiKey>();
    let chars = text.chars().count();
    match (&from_bytes, &parsed) {
        (Ok(a), Ok(b)) => {
            assert_eq!(a.prefix(), b.prefix());
            let pepper = reference::pepper();
            assert!(
                a.hash_with(Some(&pepper))
                    .matches(&b.hash_with(Some(&pepper)))
            );
        }
        // A str's wrong length is counted in characters, as its message says.
        (_, Err(KeyFormatError::WrongLength(n))) => {
            assert!(from_bytes.is_err());
            assert_eq!(*n, chars);
            assert_ne!(
                *n,
                KEY_LENGTH,
                "a key of {KEY_LENGTH} characters is refused for its length: {:?}",
                parsed.as_ref().err().map(ToString::to_string)
            );
        }
        // As many characters as a key but more bytes: not ASCII.
        (Err(KeyFormatError::WrongLength(_)), Err(e)) if chars == KEY_LENGTH => {
            let expected = if text.starts_with(KEY_PREFIX) {
                KeyFormatError::InvalidCharacter
            } else {
                KeyFormatError::WrongPrefix
            };
            assert_eq!(*e, expected);
        }
        (Err(a), Err(b)) => assert_eq!(a, b, "bytes and str parse to different errors"),
        _ => panic!("bytes and str disagree: {from_bytes:?} and {parsed:?}"),
    }

    let prefix = text.parse::<KeyPrefix>();
    assert_eq!(prefix.is_ok(), reference::is_prefix(data));
    if let Ok(prefix) = prefix {
        assert_eq!(prefix.as_str(), text);
        assert_eq!(prefix.to_string(), text);
        assert!(prefix.packed() < 62u64.pow(8));
        // The packed form is the base62 number: distinct prefixes differ.
        let digits = text[4..].bytes().fold(0u64, |acc, b| {
            let value = match b {
                b'0'..=b'9' => b - b'0',
                b'A'..=b'Z' => b - b'A' + 10,
                _ => b - b'a' + 36,
            };
            acc * 62 + u64::from(value)
        });
        assert_eq!(prefix.packed(), digits);
    }
}

/// `Scope` from str, and `ScopeSet::parse` of the input's lines.
pub fn scope(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    check_scope(text);
    // Every line a scope, as a key's scope list.
    let list: Vec<&str> = if text.is_empty() {
        Vec::new()
    } else {
        text.split('\n').collect()
    };
    for line in list.iter().take(4) {
        check_scope(line);
    }
    match ScopeSet::parse(&list) {
        Ok(set) => {
            assert!(list.len() <= reference::MAX_SCOPES);
            let mut expected: Vec<&str> = list.clone();
            expected.sort_unstable();
            expected.dedup();
            assert_eq!(
                set.to_strings(),
                expected,
                "a set is sorted and deduplicated"
            );
            assert_eq!(set.len(), expected.len());
            assert!(set.grants_all(set.iter()));
            let scopes: Vec<Scope> = set.iter().cloned().collect();
            for (i, a) in scopes.iter().enumerate().take(8) {
                for b in scopes.iter().skip(i).take(8) {
                    let rule = |a: &Scope, b: &Scope| {
                        a == b || (a.action() == "*" && a.resource() == b.resource())
                    };
                    assert_eq!(a.grants(b), rule(a, b));
                    assert_eq!(b.grants(a), rule(b, a));
                }
            }
        }
        Err((index, ScopeError::TooMany(n))) => {
            assert_eq!(n, list.len());
            assert!(n > reference::MAX_SCOPES);
            assert_eq!(index, reference::MAX_SCOPES);
        }
        Err((index, e)) => {
            assert!(list.len() <= reference::MAX_SCOPES);
            assert!(list[..index].iter().all(|s| reference::is_scope(s)));
            assert_eq!(
                list[index].parse::<Scope>(),
                Err(e),
                "the first bad entry is named"
            );
        }
    }
}

fn check_scope(text: &str) {
    match text.parse::<Scope>() {
        Ok(scope) => {
            assert!(reference::is_scope(text), "{text:?} is not a scope");
            assert_eq!(scope.as_str(), text);
            assert_eq!(scope.to_string(), text);
            assert_eq!(format!("{}:{}", scope.resource(), scope.action()), text);
            assert!(scope.grants(&scope));
        }
        Err(ScopeError::TooLong(n)) => {
            assert!(text.len() > reference::MAX_SCOPE_LEN);
            assert_eq!(n, text.chars().count());
            assert!(
                n > reference::MAX_SCOPE_LEN,
                "{:?}",
                ScopeError::TooLong(n).to_string()
            );
        }
        Err(ScopeError::Invalid(shown)) => {
            assert!(!reference::is_scope(text), "{text:?} is a scope");
            assert!(
                !reference::is_partial_wildcard(text),
                "{text:?}: say '*' is misplaced"
            );
            // The message quotes a printable excerpt, never a credential.
            assert_eq!(shown, excerpt(text));
            check_quoted(&shown);
            assert!(
                shown.chars().count() <= 33 || shown.contains("not repeated"),
                "{shown:?} is no excerpt"
            );
        }
        Err(ScopeError::PartialWildcard(shown)) => {
            assert!(
                reference::is_partial_wildcard(text),
                "{text:?} has no partial wildcard"
            );
            assert_eq!(shown, excerpt(text));
            check_quoted(&shown);
        }
        Err(e @ ScopeError::TooMany(_)) => panic!("one scope cannot be {e}"),
    }
}

/// How a decode failure reaches the caller, on either listener: always
/// INVALID_ARGUMENT, and a text field that is not UTF-8 says so.
fn check_decode_error(e: &prost::DecodeError) {
    let status = tonic::Status::from(decode_error(e));
    assert_eq!(status.code(), Code::InvalidArgument);
    if e.to_string().contains("UTF-8") {
        assert!(status.message().ends_with(NOT_UTF8), "{status:?}");
    }
}

/// `e` is prost's refusal of a key that is not UTF-8: the one thing the
/// hand-written decoder accepts on purpose (the key parser refuses it).
fn is_key_not_utf8(e: &prost::DecodeError) -> bool {
    let text = e.to_string();
    text.contains("VerifyKeyRequest.key: ") && text.contains("UTF-8")
}

fn same_call(a: &VerifyCall, b: &VerifyCall) -> bool {
    a.key == b.key && a.required_scopes == b.required_scopes && a.client_ip == b.client_ip
}

/// The verify listener's hand-written `VerifyKeyRequest` decoder against
/// prost's generated one, and against itself on a buffer in two chunks.
pub fn verify_request(data: &[u8]) {
    let ours = VerifyCall::decode(data);
    let theirs = proto::VerifyKeyRequest::decode(data);

    // tonic hands the decoder a buffer of one or more chunks; the fast
    // path reads only the current chunk. Split where the last byte says.
    let split = data
        .last()
        .map_or(0, |&b| usize::from(b) % (data.len() + 1));
    let chunked = VerifyCall::decode(Buf::chain(&data[..split], &data[split..]));
    match (&ours, &chunked) {
        (Ok(a), Ok(b)) => assert!(same_call(a, b), "a split at {split} changes the request"),
        (Err(a), Err(b)) => assert_eq!(a, b, "a split at {split} changes the error"),
        _ => panic!("a split at {split} changes whether the request decodes"),
    }

    match (&ours, &theirs) {
        (Ok(call), Ok(request)) => {
            assert_eq!(&call.key[..], request.key.as_bytes());
            assert_eq!(&call.required_scopes[..], &request.required_scopes[..]);
            assert_eq!(call.client_ip, request.client_ip);
            assert_eq!(call.encoded_len(), request.encoded_len());
            assert_eq!(call.encode_to_vec(), request.encode_to_vec());
        }
        (Ok(_), Err(e)) => assert!(
            is_key_not_utf8(e),
            "only a key that is not UTF-8 may decode here and not in prost: {e}"
        ),
        (Err(e), Ok(_)) => panic!("prost decodes what the verify listener refuses: {e}"),
        (Err(a), Err(b)) => {
            // Both walk the same fields until prost stops at a key that is
            // not UTF-8; any other failure is the same failure.
            if !is_key_not_utf8(b) {
                assert_eq!(a.to_string(), b.to_string());
            }
        }
    }
    match &ours {
        Ok(call) => {
            // What the verify handler does next.
            let _ = ApiKey::from_bytes(&call.key);
            for scope in &call.required_scopes {
                let _ = scope.parse::<Scope>();
            }
        }
        Err(e) => check_decode_error(e),
    }
}

/// The `now` validation runs at.
const NOW: OffsetDateTime = datetime!(2026-11-26 12:00 UTC);

/// A validation failure is INVALID_ARGUMENT naming a field of the request.
fn check_invalid(e: ApiError, fields: &[&str], scopes: usize) {
    let ApiError::InvalidArgument { field, message } = &e else {
        panic!("validation failed with something other than a bad field: {e:?}");
    };
    let scope_index = field
        .strip_prefix("scopes[")
        .and_then(|rest| rest.strip_suffix(']'))
        .map(|i| i.parse::<usize>().expect("a scope index"));
    match scope_index {
        Some(i) => assert!(i < scopes || i == reference::MAX_SCOPES, "{field}"),
        None => assert!(fields.contains(&field.as_str()), "{field}"),
    }
    assert!(!message.is_empty());
    check_quoted(message);
    assert_eq!(tonic::Status::from(e).code(), Code::InvalidArgument);
}

/// A message quoting the caller's input holds nothing that could be a
/// credential and no control characters (`crates/domain/src/echo.rs`).
fn check_quoted(text: &str) {
    assert!(
        !looks_like_a_credential(text),
        "{text:?} repeats a credential"
    );
    assert!(!text.chars().any(char::is_control), "{text:?}");
}

fn check_name(name: &KeyName, sent: &str) {
    assert_eq!(name.as_str(), sent.trim());
    assert!((1..=64).contains(&name.as_str().chars().count()));
    assert!(!name.as_str().chars().any(char::is_control));
    assert!(name.as_str().parse::<KeyName>().as_ref() == Ok(name));
}

fn check_description(description: &Description, sent: &str) {
    assert_eq!(description.as_str(), sent.trim());
    assert!(description.as_str().chars().count() <= 1000);
    assert_eq!(
        description.as_str().parse::<Description>().as_ref(),
        Ok(description)
    );
}

fn check_scopes(scopes: &ScopeSet, sent: &[String]) {
    assert_eq!(Ok(scopes), ScopeSet::parse(sent).as_ref());
}

fn check_expiry(at: Option<OffsetDateTime>, sent: Option<&prost_types::Timestamp>) {
    assert_eq!(at.is_some(), sent.is_some());
    if let (Some(at), Some(ts)) = (at, sent) {
        assert!(at > NOW);
        // Kept to the microsecond, as both stores keep it.
        let back = vilvik_keys::proto::timestamp(at);
        assert_eq!(back.seconds, ts.seconds);
        assert_eq!(back.nanos, ts.nanos / 1000 * 1000);
        assert_eq!(convert::from_timestamp("expires_at", &back).ok(), Some(at));
    }
}

/// prost-decodes a `CreateKeyRequest` and validates it as CreateKey does.
pub fn create_key_request(data: &[u8]) {
    let req = match proto::CreateKeyRequest::decode(data) {
        Ok(req) => req,
        Err(e) => return check_decode_error(&e),
    };
    match parse_create_request(&req, NOW) {
        Ok(fields) => {
            check_name(&fields.name, &req.name);
            check_description(&fields.description, &req.description);
            check_scopes(&fields.scopes, &req.scopes);
            check_expiry(fields.expires_at, req.expires_at.as_ref());
        }
        Err(e) => check_invalid(e, &["name", "description", "expires_at"], req.scopes.len()),
    }
}

/// prost-decodes an `UpdateKeyRequest` and validates it as UpdateKey does.
pub fn update_key_request(data: &[u8]) {
    let req = match proto::UpdateKeyRequest::decode(data) {
        Ok(req) => req,
        Err(e) => return check_decode_error(&e),
    };
    match parse_update_request(&req, NOW) {
        Ok((key_id, changes)) => {
            assert_eq!(key_id.as_str(), req.key_id);
            let paths = &req.update_mask.as_ref().expect("a mask").paths;
            assert!(!paths.is_empty());
            let named = |field: &str| paths.iter().any(|p| p == field);
            for path in paths {
                assert!(["name", "description", "scopes", "expires_at"].contains(&path.as_str()));
            }
            assert_eq!(changes.name.is_some(), named("name"));
            assert_eq!(changes.description.is_some(), named("description"));
            assert_eq!(changes.scopes.is_some(), named("scopes"));
            assert_eq!(changes.expires_at.is_some(), named("expires_at"));
            // An etag is `v` and the version in decimal; none means any version.
            match changes.if_version {
                None => assert!(req.etag.is_empty()),
                Some(version) => assert_eq!(
                    req.etag.strip_prefix('v').map(|d| d.parse::<i64>()),
                    Some(Ok(version))
                ),
            }
            if let Some(name) = &changes.name {
                check_name(name, &req.name);
            }
            if let Some(description) = &changes.description {
                check_description(description, &req.description);
            }
            if let Some(scopes) = &changes.scopes {
                check_scopes(scopes, &req.scopes);
            }
            if let Some(at) = changes.expires_at {
                check_expiry(at, req.expires_at.as_ref());
            }
        }
        Err(e) => check_invalid(
            e,
            &[
                "key_id",
                "update_mask",
                "name",
                "description",
                "expires_at",
                "etag",
            ],
            req.scopes.len(),
        ),
    }
}

/// `convert::cursor` of a page token, and its round trip with
/// `convert::page_token`.
pub fn page_token(data: &[u8]) {
    if let Some(bytes) = data.get(..8) {
        let cursor = i64::from_le_bytes(bytes.try_into().expect("8 bytes"));
        if cursor >= 0 {
            let token = convert::page_token(Some(cursor));
            assert_eq!(convert::cursor(&token).ok(), Some(Some(cursor)));
        }
    }
    // A page token is a proto string: always UTF-8.
    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    match convert::cursor(token) {
        Ok(None) => assert!(token.is_empty()),
        Ok(Some(cursor)) => {
            assert!(cursor >= 0);
            assert!(token.starts_with("p1."));
            let issued = convert::page_token(Some(cursor));
            assert_eq!(convert::cursor(&issued).ok(), Some(Some(cursor)));
        }
        Err(e) => {
            assert!(!token.is_empty());
            check_invalid(e, &["page_token"], 0);
        }
    }
}

/// The config file's text through the loader, with an empty environment
/// (the process's is never read).
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("fuzz.toml");
    match Config::from_file_text(path, text, &HashMap::new()) {
        Ok(config) => {
            // What a validated configuration promises.
            assert!(config.tier_limits.premium >= config.tier_limits.free);
            let limits = config.listener_limits;
            assert!(limits.verify_concurrency_per_connection <= config.verify_concurrency_limit);
            assert!(limits.admin_concurrency_per_connection <= limits.admin_concurrency_limit);
            for count in [
                config.verify_concurrency_limit,
                config.verify_misses.concurrency,
                limits.max_connections,
                limits.verify_concurrency_per_connection,
                limits.admin_concurrency_limit,
                limits.admin_concurrency_per_connection,
                limits.http2_max_concurrent_streams as usize,
            ] {
                assert!(count >= 1);
            }
            for interval in [
                config.consistency_check_interval,
                config.change_poll_interval,
                config.change_feed_retry_interval,
                config.change_fallback_poll,
                config.store_timeout,
                config.listener.heartbeat,
                config.listener.heartbeat_timeout,
                config.verify_misses.timeout,
                limits.first_request_timeout,
                limits.idle_timeout,
                limits.http2_keepalive_interval,
                limits.http2_keepalive_timeout,
            ] {
                assert!(!interval.is_zero());
            }
            assert!(config.change_log_retention.as_secs() >= 3600);
            let _ = format!("{config:?}");
        }
        Err(e) => {
            let message = e.to_string();
            assert!(!message.is_empty());
            assert!(
                !matches!(e, vilvik_keys::config::ConfigError::Read { .. }),
                "{message}"
            );
        }
    }
}
