//! `POST /v1/keys:verify`: KeyVerify's VerifyKey in proto3 JSON, for a
//! backend that verifies someone else's key. Every verdict is 200 with
//! `valid` and `code` (the caller asked a question and got its answer);
//! only a request that cannot be read is refused: 400 naming the field,
//! 413 over the size limit, 415 for a body that is not JSON, 503 when this
//! node cannot vouch for its answer.
//!
//! Field names are the proto's lowerCamelCase JSON names, as grpcurl
//! shows them; a request may also use the proto field names
//! (`required_scopes`), as the proto3 JSON mapping requires.

use std::net::IpAddr;

use axum::body::Body;
use axum::extract::{Request, State};
use http::StatusCode;
use serde_json::{Map, Value};
use smallvec::SmallVec;
use vilvik_keys_domain::{MAX_REQUIRED_SCOPES, Scope, excerpt, format_time};
use vilvik_keys_verify::{Origin, Verdict};

use super::HttpFace;
use super::routes::{json, json_text, unavailable};
use crate::config::MAX_MESSAGE_BYTES;
use crate::proto::VerifyCode;

/// A request's fields, read.
#[derive(Default)]
struct Call {
    key: String,
    required: SmallVec<[Scope; 2]>,
    claimed: Option<IpAddr>,
}

/// Why a request cannot be read: the status, and the field at fault.
struct Unreadable {
    status: StatusCode,
    field: Option<String>,
    message: String,
}

impl Unreadable {
    fn field(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            field: Some(field.into()),
            message: message.into(),
        }
    }

    fn response(self) -> http::Response<Body> {
        let code = match self.status {
            StatusCode::PAYLOAD_TOO_LARGE => "PAYLOAD_TOO_LARGE",
            StatusCode::UNSUPPORTED_MEDIA_TYPE => "UNSUPPORTED_MEDIA_TYPE",
            _ => "INVALID_ARGUMENT",
        };
        let mut body = serde_json::json!({ "code": code, "message": self.message });
        if let Some(field) = self.field {
            body["field"] = Value::String(field);
        }
        json(self.status, &body)
    }
}

pub async fn verify(State(face): State<HttpFace>, request: Request) -> http::Response<Body> {
    let (parts, body) = request.into_parts();
    let call = match read(&parts.headers, body).await {
        Ok(call) => call,
        Err(unreadable) => return unreadable.response(),
    };
    let face = &face.0;
    let origin = Origin {
        claimed: call.claimed,
        ..face.origin(&parts)
    };
    match face
        .verifier
        .verify(call.key.as_bytes(), &call.required, origin)
        .await
    {
        Ok(verdict) => Answer::of(&verdict).response(),
        Err(e) => unavailable(e).response(),
    }
}

/// Reads a request: its content type, its body, its fields.
async fn read(headers: &http::HeaderMap, body: Body) -> Result<Call, Unreadable> {
    let json_type = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|t| t.to_str().ok())
        .and_then(|t| t.split(';').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"));
    if !json_type {
        return Err(Unreadable {
            status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
            field: None,
            message: "send the request as JSON, with Content-Type: application/json".to_owned(),
        });
    }
    let body = whole(body).await.ok_or_else(|| Unreadable {
        status: StatusCode::PAYLOAD_TOO_LARGE,
        field: None,
        message: format!("the request's body is over the limit of {MAX_MESSAGE_BYTES} bytes"),
    })?;
    if let Some(call) = well_formed(&body) {
        return call;
    }
    let value: Value = serde_json::from_slice(&body).map_err(|e| Unreadable {
        status: StatusCode::BAD_REQUEST,
        field: None,
        message: format!("the body is not JSON: {e}"),
    })?;
    let Value::Object(fields) = value else {
        return Err(Unreadable {
            status: StatusCode::BAD_REQUEST,
            field: None,
            message:
                "the body must be a JSON object: {\"key\": \"vlk_…\", \"requiredScopes\": […]}"
                    .to_owned(),
        });
    };
    fields_of(fields)
}

/// The body, within the size limit: admission has read it already, so it
/// is usually one chunk, taken as it is.
async fn whole(mut body: Body) -> Option<bytes::Bytes> {
    use http_body::Body as _;
    let first = std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await;
    let Some(first) = first else {
        return Some(bytes::Bytes::new());
    };
    let first = first.ok()?.into_data().ok()?;
    if body.is_end_stream() {
        return Some(first);
    }
    let rest = axum::body::to_bytes(body, MAX_MESSAGE_BYTES.checked_sub(first.len())?)
        .await
        .ok()?;
    Some([first, rest].concat().into())
}

/// The usual request, read straight into its fields (no JSON tree, no
/// copy of a string without escapes); `None` for anything else, which the
/// general way reads to say precisely what is wrong.
fn well_formed(body: &[u8]) -> Option<Result<Call, Unreadable>> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Fields<'a> {
        #[serde(borrow, default)]
        key: Option<std::borrow::Cow<'a, str>>,
        #[serde(borrow, default, rename = "requiredScopes", alias = "required_scopes")]
        required_scopes: Option<Vec<std::borrow::Cow<'a, str>>>,
        #[serde(borrow, default, rename = "clientIp", alias = "client_ip")]
        client_ip: Option<std::borrow::Cow<'a, str>>,
    }
    // serde would also take a struct from an array: only an object here.
    if body.trim_ascii_start().first() != Some(&b'{') {
        return None;
    }
    let fields: Fields = serde_json::from_slice(body).ok()?;
    let mut call = Call {
        key: fields.key.map(|k| k.into_owned()).unwrap_or_default(),
        ..Call::default()
    };
    if let Some(scopes) = fields.required_scopes {
        match required(scopes.iter().map(|s| Some(s.as_ref()))) {
            Ok(scopes) => call.required = scopes,
            Err(e) => return Some(Err(e)),
        }
    }
    if let Some(ip) = fields.client_ip {
        match claimed(&ip) {
            Ok(ip) => call.claimed = ip,
            Err(e) => return Some(Err(e)),
        }
    }
    Some(Ok(call))
}

/// A VerifyKeyRequest's fields, each under its JSON or its proto name
/// (not both); `null` is the field's default, as proto3 JSON has it.
fn fields_of(fields: Map<String, Value>) -> Result<Call, Unreadable> {
    let mut call = Call::default();
    let mut seen: [Option<&str>; 3] = [None; 3];
    for (name, value) in &fields {
        let (slot, json_name) = match name.as_str() {
            "key" => (0, "key"),
            "requiredScopes" | "required_scopes" => (1, "requiredScopes"),
            "clientIp" | "client_ip" => (2, "clientIp"),
            other => {
                return Err(Unreadable::field(
                    excerpt(other),
                    format!(
                        "unknown field '{}': a VerifyKeyRequest has key, requiredScopes and clientIp",
                        excerpt(other)
                    ),
                ));
            }
        };
        if let Some(first) = seen[slot].replace(name) {
            return Err(Unreadable::field(
                json_name,
                format!("the field is given twice, as {first} and {name}: give it once"),
            ));
        }
        match (slot, value) {
            (_, Value::Null) => {}
            (0, Value::String(key)) => call.key = key.clone(),
            (1, Value::Array(scopes)) => {
                call.required = required(scopes.iter().map(Value::as_str))?;
            }
            (2, Value::String(ip)) => call.claimed = claimed(ip)?,
            (1, _) => {
                return Err(Unreadable::field(
                    json_name,
                    "must be an array of strings, such as [\"datasets:read\"]",
                ));
            }
            _ => return Err(Unreadable::field(json_name, "must be a string")),
        }
    }
    Ok(call)
}

/// The required scopes, each `None` when it is not a string.
fn required<'a>(
    scopes: impl ExactSizeIterator<Item = Option<&'a str>>,
) -> Result<SmallVec<[Scope; 2]>, Unreadable> {
    if scopes.len() > MAX_REQUIRED_SCOPES {
        return Err(Unreadable::field(
            "requiredScopes",
            format!(
                "at most {MAX_REQUIRED_SCOPES} scopes may be required; {} were given",
                scopes.len()
            ),
        ));
    }
    scopes
        .enumerate()
        .map(|(i, scope)| {
            let field = || format!("requiredScopes[{i}]");
            let Some(scope) = scope else {
                return Err(Unreadable::field(field(), "must be a string"));
            };
            scope
                .parse::<Scope>()
                .map_err(|e| Unreadable::field(field(), e.to_string()))
        })
        .collect()
}

fn claimed(ip: &str) -> Result<Option<IpAddr>, Unreadable> {
    match ip.trim() {
        "" => Ok(None),
        ip => ip.parse().map(Some).map_err(|_| {
            Unreadable::field(
                "clientIp",
                format!("'{}' is not an IPv4 or IPv6 address", excerpt(ip)),
            )
        }),
    }
}

/// A verdict as a VerifyKeyResponse in proto3 JSON, written straight
/// from the verdict (the proto's order; absent fields left out, as
/// proto3 JSON does). `valid` is always written, so that a reader need not
/// know proto3 leaves out `false`.
struct Answer<'a>(&'a Verdict);

impl Answer<'_> {
    fn of(verdict: &Verdict) -> Answer<'_> {
        Answer(verdict)
    }

    fn json(&self) -> Vec<u8> {
        let verdict = self.0;
        let (code, key, missing) = match verdict {
            Verdict::Valid(key) => (VerifyCode::Valid, Some(key), None),
            Verdict::Malformed(_) => (VerifyCode::Malformed, None, None),
            Verdict::NotFound => (VerifyCode::NotFound, None, None),
            Verdict::Expired(key) => (VerifyCode::Expired, Some(key), None),
            Verdict::Revoked(key) => (VerifyCode::Revoked, Some(key), None),
            Verdict::Rotated(key) => (VerifyCode::Rotated, Some(key), None),
            Verdict::InsufficientScope { key, missing } => {
                (VerifyCode::InsufficientScope, Some(key), Some(missing))
            }
        };
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(if verdict.is_valid() {
            b"{\"valid\":true,\"code\":"
        } else {
            b"{\"valid\":false,\"code\":"
        });
        plain(&mut out, code.as_str_name());
        if let Some(key) = key {
            out.extend_from_slice(b",\"keyId\":");
            plain(&mut out, key.key_id.as_str());
            out.extend_from_slice(b",\"accountId\":");
            plain(&mut out, key.account_id.as_str());
            out.extend_from_slice(b",\"name\":");
            string(&mut out, key.name.as_str());
            out.extend_from_slice(b",\"scopes\":");
            strings(&mut out, key.scopes.iter().map(Scope::as_str));
            if let Some(at) = key.expires_at {
                out.extend_from_slice(b",\"expiresAt\":");
                plain(&mut out, &format_time(at));
            }
        }
        if let Some(missing) = missing {
            out.extend_from_slice(b",\"missingScopes\":");
            strings(&mut out, missing.iter().map(Scope::as_str));
        }
        out.extend_from_slice(b"}\n");
        out
    }

    fn response(&self) -> http::Response<Body> {
        json_text(StatusCode::OK, self.json())
    }
}

/// `text` as a JSON string: copied as it is when nothing in it needs
/// escaping (ids, scopes and most names), else escaped by serde_json.
fn string(out: &mut Vec<u8>, text: &str) {
    if text.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.push(b'"');
        out.extend_from_slice(text.as_bytes());
        out.push(b'"');
    } else {
        serde_json::to_writer(&mut *out, text).expect("a string serializes");
    }
}

/// `text` as a JSON string, for values whose format has nothing to escape
/// (codes, ids, scopes, times: checked when they were parsed).
fn plain(out: &mut Vec<u8>, text: &str) {
    debug_assert!(
        text.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\'),
        "{text:?}"
    );
    out.push(b'"');
    out.extend_from_slice(text.as_bytes());
    out.push(b'"');
}

/// Scopes as a JSON array (their format has nothing to escape).
fn strings<'a>(out: &mut Vec<u8>, items: impl Iterator<Item = &'a str>) {
    out.push(b'[');
    for (i, item) in items.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        plain(out, item);
    }
    out.push(b']');
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn key(name: &str) -> vilvik_keys_verify::VerifiedKey {
        vilvik_keys_verify::VerifiedKey {
            key_id: "key_0123456789abcdefghij".parse().unwrap(),
            account_id: "acme".parse().unwrap(),
            name: name.parse().unwrap(),
            scopes: Arc::new(
                vilvik_keys_domain::ScopeSet::parse(&[
                    "datasets:read".to_owned(),
                    "a:b".to_owned(),
                ])
                .unwrap(),
            ),
            expires_at: Some(time::macros::datetime!(2027-01-02 03:04:05 UTC)),
        }
    }

    #[test]
    fn the_answer_is_the_json_serde_would_write() {
        let verdicts = [
            Verdict::Valid(key("ci \"runner\" \\ Zoë")),
            Verdict::NotFound,
            Verdict::InsufficientScope {
                key: key("ci"),
                missing: vec!["datasets:write".parse().unwrap()],
            },
        ];
        for verdict in &verdicts {
            let written = Answer::of(verdict).json();
            let parsed: Value = serde_json::from_slice(&written).unwrap();
            let mut expected = serde_json::json!({
                "valid": verdict.is_valid(),
                "code": match verdict {
                    Verdict::Valid(_) => "VERIFY_CODE_VALID",
                    Verdict::NotFound => "VERIFY_CODE_NOT_FOUND",
                    _ => "VERIFY_CODE_INSUFFICIENT_SCOPE",
                },
            });
            if let Verdict::Valid(key) | Verdict::InsufficientScope { key, .. } = verdict {
                expected["keyId"] = key.key_id.as_str().into();
                expected["accountId"] = "acme".into();
                expected["name"] = key.name.as_str().into();
                expected["scopes"] = serde_json::json!(["a:b", "datasets:read"]);
                expected["expiresAt"] = "2027-01-02T03:04:05Z".into();
            }
            if let Verdict::InsufficientScope { .. } = verdict {
                expected["missingScopes"] = serde_json::json!(["datasets:write"]);
            }
            assert_eq!(parsed, expected);
            assert_eq!(written.last(), Some(&b'\n'));
        }
    }
}
