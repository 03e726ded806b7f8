//! The routes that judge the key a request presents in its headers
//! (`/v1/keys/self`, `/v1/authorize`) and the probes.

use axum::body::Body;
use axum::extract::{Request, State};
use http::{HeaderValue, StatusCode, request::Parts};
use smallvec::SmallVec;
use vilvik_keys_domain::{Scope, format_time};
use vilvik_keys_verify::{Origin, Verdict, VerifiedKey};

use super::answer::{self, Denial};
use super::credentials::{presented_key, required_scopes};
use super::{Face, HttpFace};
use crate::service::ApiError;

type Response = http::Response<Body>;

/// `GET /v1/keys/self`: a key asks about itself (the smoke test). 200 with
/// the key's details; `?scope=` names scopes it must have (403 without).
pub async fn key_self(State(face): State<HttpFace>, request: Request) -> Response {
    let (parts, _) = request.into_parts();
    match judge(&face.0, &parts, false).await {
        Ok(key) => json(StatusCode::OK, &details(&key)),
        Err(denial) => denial.response(),
    }
}

/// `/v1/authorize`, any method: a gateway's forward-auth check. 200 with
/// the identity headers, empty; else as `/v1/keys/self`. Scopes come from
/// `?scope=` and `x-vilvik-required-scopes`.
pub async fn authorize(State(face): State<HttpFace>, request: Request) -> Response {
    let (parts, _) = request.into_parts();
    match judge(&face.0, &parts, true).await {
        Ok(key) => {
            let mut response = Response::new(Body::empty());
            let headers = response.headers_mut();
            for (name, value) in answer::identity_headers(&key) {
                headers.insert(name, value);
            }
            headers.insert(
                http::header::CACHE_CONTROL,
                HeaderValue::from_static("no-store"),
            );
            response
        }
        Err(denial) => denial.response(),
    }
}

/// `GET /healthz`: the process is alive and serving.
pub async fn healthz() -> Response {
    json(StatusCode::OK, &serde_json::json!({ "status": "alive" }))
}

/// `GET /readyz`: this node can answer (its memory is trusted, or the
/// store answers); 503 when it cannot.
pub async fn readyz(State(face): State<HttpFace>) -> Response {
    match face.0.verifier.can_answer().await {
        Ok(()) => json(StatusCode::OK, &serde_json::json!({ "status": "ready" })),
        Err(e) => answer::unavailable(e).response(),
    }
}

/// The key a request presents, judged against the scopes it requires
/// (`gateway`: also from `x-vilvik-required-scopes`): the key when it is
/// good for them, else the denial to answer with.
async fn judge(face: &Face, parts: &Parts, gateway: bool) -> Result<VerifiedKey, Denial> {
    let key = presented_key(&parts.headers, &face.key_headers)?
        .ok_or_else(|| answer::missing_key(&face.key_headers))?;
    let required: SmallVec<[Scope; 2]> =
        required_scopes(parts.uri.query(), &parts.headers, gateway)?;
    let verdict = face
        .verifier
        .verify(key, &required, face.origin(parts))
        .await
        .map_err(unavailable)?;
    match verdict {
        Verdict::Valid(key) => Ok(key),
        verdict => Err(answer::denial(&verdict, &required).expect("a refusal")),
    }
}

/// A verify engine failure: logged as KeyVerify logs it (at most once a
/// second per kind), and answered 503.
pub(super) fn unavailable(e: vilvik_keys_verify::VerifyError) -> Denial {
    let status = tonic::Status::from(ApiError::from(e));
    answer::unavailable(status.message())
}

impl Face {
    /// Where a request came from: the peer, or behind a trusted proxy the
    /// client it forwarded. An HTTP caller claims nothing.
    pub(super) fn origin(&self, parts: &Parts) -> Origin {
        let observed = crate::headers::client_ip(
            &parts.headers,
            crate::transport::peer_addr_in(&parts.extensions),
            &self.trusted_proxies,
        );
        Origin {
            observed,
            claimed: None,
        }
    }
}

/// A valid key's details, as `/v1/keys/self` shows them.
fn details(key: &VerifiedKey) -> serde_json::Value {
    serde_json::json!({
        "key_id": key.key_id.as_str(),
        "account_id": key.account_id.as_str(),
        "name": key.name.as_str(),
        "scopes": key.scopes.iter().map(Scope::as_str).collect::<Vec<_>>(),
        "expires_at": key.expires_at.map(format_time),
        "state": "ACTIVE",
    })
}

/// A JSON response, never cached (an answer about a key is of its moment),
/// ending with a newline so that a terminal's prompt starts on a line of
/// its own after curl prints it.
pub(super) fn json(status: StatusCode, body: &serde_json::Value) -> Response {
    json_text(status, format!("{body}\n").into_bytes())
}

/// [`json`] for a body already written (with its newline).
pub(super) fn json_text(status: StatusCode, body: Vec<u8>) -> Response {
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-store"),
    );
    response
}
