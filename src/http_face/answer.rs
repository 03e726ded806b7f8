//! Verdicts and failures as HTTP answers, in one place for every HTTP
//! route and for Envoy's check: the status (401 for a key that is no good,
//! 403 for a missing scope, 503 when this node cannot vouch for its
//! answer), RFC 6750's `WWW-Authenticate`, a JSON body
//! `{"code":…,"message":…}` whose message says what to do, and, for an
//! allowed key, the identity headers a gateway passes upstream.
//!
//! No answer carries the key a request presented, or any part of it.

use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};
use vilvik_keys_domain::{Scope, format_time};
use vilvik_keys_verify::{Verdict, VerifiedKey};

/// The realm every challenge names.
const REALM: &str = "vilvik";

/// Identity headers of an allowed key, for the gateway to pass upstream.
pub const KEY_ID: HeaderName = HeaderName::from_static("x-vilvik-key-id");
pub const ACCOUNT_ID: HeaderName = HeaderName::from_static("x-vilvik-account-id");
pub const KEY_NAME: HeaderName = HeaderName::from_static("x-vilvik-key-name");
pub const SCOPES: HeaderName = HeaderName::from_static("x-vilvik-scopes");

/// Seconds a 503 asks the caller to wait before trying again.
const RETRY_AFTER_SECS: &str = "1";

/// Bytes of a key name escaped in its header: controls, `%`, and anything
/// not ASCII (a header value is ASCII text; the name is UTF-8).
const NAME_ESCAPES: &AsciiSet = &CONTROLS.add(b'%');

/// An answer that is not 200: its status, headers and JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub status: StatusCode,
    /// The body's `code`: the verdict's name (`REVOKED`), or the request's
    /// problem (`MISSING_KEY`, `AMBIGUOUS_KEY`, `UNAVAILABLE`…).
    pub code: &'static str,
    pub message: String,
    /// `WWW-Authenticate` (401 and 403 only).
    pub challenge: Option<HeaderValue>,
}

impl Denial {
    /// The response headers: the challenge, `Retry-After` on a 503, and
    /// `Cache-Control: no-store` (an answer about a key is never cached).
    pub fn headers(&self) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(
            http::header::CACHE_CONTROL,
            HeaderValue::from_static("no-store"),
        );
        if let Some(challenge) = &self.challenge {
            headers.insert(http::header::WWW_AUTHENTICATE, challenge.clone());
        }
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            headers.insert(
                http::header::RETRY_AFTER,
                HeaderValue::from_static(RETRY_AFTER_SECS),
            );
        }
        headers
    }

    /// The JSON body, with a final newline (as every JSON answer).
    pub fn body(&self) -> String {
        let body = serde_json::json!({ "code": self.code, "message": self.message });
        format!("{body}\n")
    }

    /// As an HTTP response.
    pub fn response(&self) -> http::Response<axum::body::Body> {
        let mut response = http::Response::new(axum::body::Body::from(self.body()));
        *response.status_mut() = self.status;
        *response.headers_mut() = self.headers();
        response
    }
}

/// What is wrong with a request before any key is judged (400 and 431).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Two headers (or one header twice) carry different keys.
    Ambiguous {
        first: HeaderName,
        second: HeaderName,
    },
    /// A key header that is not ASCII text.
    Unreadable { header: HeaderName },
    /// A key header far longer than any key.
    KeyTooLong { header: HeaderName },
    /// The request's headers together exceed `max` bytes.
    HeadersTooLarge { max: usize },
    /// A required scope that is not a scope, named by where it came from.
    BadScope {
        source: &'static str,
        problem: String,
    },
}

impl From<Refusal> for Denial {
    fn from(refusal: Refusal) -> Self {
        let (status, code, message) = match refusal {
            Refusal::Ambiguous { first, second } if first == second => (
                StatusCode::BAD_REQUEST,
                "AMBIGUOUS_KEY",
                format!("the request carries two different keys in {first} headers: send one key"),
            ),
            Refusal::Ambiguous { first, second } => (
                StatusCode::BAD_REQUEST,
                "AMBIGUOUS_KEY",
                format!(
                    "the request carries different keys in the {first} and {second} headers: send one key, in one of them"
                ),
            ),
            Refusal::Unreadable { header } => (
                StatusCode::BAD_REQUEST,
                "UNREADABLE_KEY",
                format!(
                    "the {header} header is not ASCII text, so it holds no key: send the key as it was shown"
                ),
            ),
            Refusal::KeyTooLong { header } => (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "KEY_TOO_LONG",
                format!(
                    "the {header} header is far longer than a key ({} characters): send the key alone",
                    vilvik_keys_domain::KEY_LENGTH
                ),
            ),
            Refusal::HeadersTooLarge { max } => (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "HEADERS_TOO_LARGE",
                format!("the request's headers exceed {max} bytes: send fewer or shorter ones"),
            ),
            Refusal::BadScope { source, problem } => (
                StatusCode::BAD_REQUEST,
                "INVALID_SCOPE",
                format!("a required scope in {source} is not valid: {problem}"),
            ),
        };
        Denial {
            status,
            code,
            message,
            challenge: None,
        }
    }
}

/// No key was presented: a challenge without an error (RFC 6750, 3.1).
pub fn missing_key(key_headers: &[HeaderName]) -> Denial {
    let names: Vec<String> = key_headers
        .iter()
        .map(|h| {
            if *h == http::header::AUTHORIZATION {
                "Authorization: Bearer vlk_…".to_owned()
            } else {
                format!("{h}: vlk_…")
            }
        })
        .collect();
    Denial {
        status: StatusCode::UNAUTHORIZED,
        code: "MISSING_KEY",
        message: format!("no key was sent: send one as {}", names.join(" or ")),
        challenge: Some(HeaderValue::from_static("Bearer realm=\"vilvik\"")),
    }
}

/// The denial a verdict is, if it is one; `required` are the scopes the
/// request asked for (named in a 403's challenge).
pub fn denial(verdict: &Verdict, required: &[Scope]) -> Option<Denial> {
    let (code, message) = match verdict {
        Verdict::Valid(_) => return None,
        Verdict::InsufficientScope { missing, .. } => {
            let missing: Vec<&str> = missing.iter().map(Scope::as_str).collect();
            let message = format!(
                "the key lacks the scope{} {} that this request requires: grant it to the key, or use a key that has it",
                if missing.len() == 1 { "" } else { "s" },
                missing.join(", ")
            );
            let required: Vec<&str> = required.iter().map(Scope::as_str).collect();
            let challenge = format!(
                "Bearer realm=\"{REALM}\", error=\"insufficient_scope\", error_description=\"{}\", scope=\"{}\"",
                quotable(&message),
                quotable(&required.join(" "))
            );
            return Some(Denial {
                status: StatusCode::FORBIDDEN,
                code: "INSUFFICIENT_SCOPE",
                message,
                challenge: HeaderValue::from_str(&challenge).ok(),
            });
        }
        Verdict::Malformed(e) => (
            "MALFORMED",
            format!("this is not a valid key: {e}; send the whole secret, as it was shown when the key was created"),
        ),
        Verdict::NotFound => (
            "NOT_FOUND",
            "no key has this secret: check that it was copied whole, or create a new key".to_owned(),
        ),
        Verdict::Expired(key) => (
            "EXPIRED",
            format!(
                "the key expired at {}: create a new key",
                key.expires_at.map(format_time).unwrap_or_default()
            ),
        ),
        Verdict::Revoked(_) => (
            "REVOKED",
            "the key was revoked; revocation is final: create a new key".to_owned(),
        ),
        Verdict::Rotated(_) => (
            "ROTATED",
            "this secret was replaced when the key was rotated: use the new secret the rotation returned"
                .to_owned(),
        ),
    };
    let challenge = format!(
        "Bearer realm=\"{REALM}\", error=\"invalid_token\", error_description=\"{}\"",
        quotable(&message)
    );
    Some(Denial {
        status: StatusCode::UNAUTHORIZED,
        code,
        message,
        challenge: HeaderValue::from_str(&challenge).ok(),
    })
}

/// This node cannot vouch for its answer (the store is down for a key not
/// in memory, or the lease on memory expired): 503, with what is down.
pub fn unavailable(what: impl std::fmt::Display) -> Denial {
    Denial {
        status: StatusCode::SERVICE_UNAVAILABLE,
        code: "UNAVAILABLE",
        message: format!("this node cannot vouch for the key now: {what}; retry shortly"),
        challenge: None,
    }
}

/// The identity headers of an allowed key.
pub fn identity_headers(key: &VerifiedKey) -> [(HeaderName, HeaderValue); 4] {
    let ascii =
        |s: &[u8]| HeaderValue::from_bytes(s).unwrap_or_else(|_| HeaderValue::from_static(""));
    // Escaped only when it must be: most names are plain ASCII.
    let plain = |b: u8| (b' '..=b'~').contains(&b) && b != b'%';
    let name = key.name.as_str();
    let name = if name.bytes().all(plain) {
        ascii(name.as_bytes())
    } else {
        ascii(
            utf8_percent_encode(name, NAME_ESCAPES)
                .to_string()
                .as_bytes(),
        )
    };
    let mut scopes = Vec::with_capacity(64);
    for scope in key.scopes.iter() {
        if !scopes.is_empty() {
            scopes.push(b',');
        }
        scopes.extend_from_slice(scope.as_str().as_bytes());
    }
    [
        (KEY_ID, ascii(key.key_id.as_str().as_bytes())),
        (ACCOUNT_ID, ascii(key.account_id.as_str().as_bytes())),
        (KEY_NAME, name),
        (SCOPES, ascii(&scopes)),
    ]
}

/// `text` as a quoted-string's content in a challenge: RFC 6750 allows
/// printable ASCII but `"` and `\`.
fn quotable(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '"' => '\'',
            '\\' => '/',
            ' '..='~' => c,
            _ => '?',
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_challenge_quotes_only_what_rfc_6750_allows() {
        assert_eq!(quotable("a \"b\" \\ c…"), "a 'b' / c?");
    }

    #[test]
    fn no_key_is_a_challenge_without_an_error() {
        let d = missing_key(&[
            http::header::AUTHORIZATION,
            HeaderName::from_static("x-api-key"),
        ]);
        assert_eq!(d.status, StatusCode::UNAUTHORIZED);
        assert_eq!(d.challenge.unwrap(), "Bearer realm=\"vilvik\"");
        assert_eq!(
            d.message,
            "no key was sent: send one as Authorization: Bearer vlk_… or x-api-key: vlk_…"
        );
    }

    #[test]
    fn not_found_is_invalid_token_with_what_to_do() {
        let d = denial(&Verdict::NotFound, &[]).unwrap();
        assert_eq!(d.status, StatusCode::UNAUTHORIZED);
        assert_eq!(d.code, "NOT_FOUND");
        assert_eq!(
            d.challenge.clone().unwrap(),
            "Bearer realm=\"vilvik\", error=\"invalid_token\", error_description=\"no key has this secret: check that it was copied whole, or create a new key\""
        );
        assert_eq!(
            d.body(),
            "{\"code\":\"NOT_FOUND\",\"message\":\"no key has this secret: check that it was copied whole, or create a new key\"}\n"
        );
    }
}
