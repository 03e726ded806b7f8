//! The verify listener's HTTP face, beside KeyVerify on the same address
//! and port (HTTP/1.1 and HTTP/2, TLS when the listener has it), for what
//! cannot or will not speak our gRPC API: a person's curl smoke test
//! (`GET /v1/keys/self`), a backend verifying a key in JSON
//! (`POST /v1/keys:verify`), a gateway's forward-auth check
//! (`/v1/authorize`), and probes (`/healthz`, `/readyz`).
//!
//! Every route asks the same verify engine as KeyVerify, and a verdict
//! becomes an HTTP answer in one place ([`answer`]), which Envoy's check
//! ([`crate::server::ext_authz`], the gRPC face of the same answers)
//! shares, reading a request's key and scopes with `credentials`. The routes
//! run behind the listener's transport like any gRPC call: connection
//! caps and timeouts, admission (the body whole before a slot is taken,
//! within the size limit) and the request deadline. Which header carries
//! the key is a setting (`http_key_headers`).

use std::net::IpAddr;
use std::sync::Arc;

use axum::Router;
use axum::routing::{any, get, post};
use http::HeaderName;
use vilvik_keys_verify::Verifier;

pub mod answer;
pub(crate) mod credentials;
mod json_verify;
mod routes;

/// What the routes share.
#[derive(Debug, Clone)]
pub struct HttpFace(Arc<Face>);

#[derive(Debug)]
struct Face {
    verifier: Verifier,
    trusted_proxies: Vec<IpAddr>,
    key_headers: Vec<HeaderName>,
}

impl HttpFace {
    /// `key_headers`: where a key is read from (`authorization` as a bearer
    /// token, any other as the bare key).
    pub fn new(
        verifier: Verifier,
        trusted_proxies: Vec<IpAddr>,
        key_headers: Vec<HeaderName>,
    ) -> Self {
        Self(Arc::new(Face {
            verifier,
            trusted_proxies,
            key_headers,
        }))
    }

    /// The routes, to serve beside the listener's gRPC services.
    pub fn router(self) -> Router {
        Router::new()
            .route("/v1/keys/self", get(routes::key_self))
            .route("/v1/keys:verify", post(json_verify::verify))
            .route("/v1/authorize", any(routes::authorize))
            .route("/healthz", get(routes::healthz))
            .route("/readyz", get(routes::readyz))
            .with_state(self)
    }
}
