//! Envoy's external authorization on the verify listener
//! (`envoy.service.auth.v3.Authorization/Check`): Envoy's `ext_authz` HTTP
//! filter asks, for each request on a route that has it, whether the
//! request may pass. It is the HTTP face's forward-auth check
//! (`/v1/authorize`) in Envoy's messages, read with the same rules and
//! answered with the same answers ([`crate::http_face::answer`]):
//!
//! - the key comes from the request's headers, as the HTTP face reads them
//!   (`http_key_headers`; Envoy sends them as a map of lower-case names,
//!   repeated ones joined by commas, or, with `encode_raw_headers`, as a
//!   list);
//! - the route's required scopes come from its `context_extensions` entry
//!   [`REQUIRED_SCOPES`], comma-separated (never from the request);
//! - an allowed request gets status OK and the identity headers, set over
//!   any the client sent, and every other `x-vilvik-*` header the client
//!   sent is removed, so no identity header reaching the upstream is the
//!   client's;
//! - a refused one gets the HTTP face's 401, 403, 400 or 431, its
//!   `WWW-Authenticate` and JSON body, which Envoy sends to the client;
//! - when this node cannot vouch for its answer (an outage) the call fails
//!   UNAVAILABLE, which Envoy treats as an error: `status_on_error`, or the
//!   request passes under `failure_mode_allow`.
//!
//! The client's address, for a key's "last used from": Envoy's downstream
//! peer (`attributes.source`) when the caller is a trusted proxy, else the
//! caller itself, with Envoy's report kept as what the caller claimed.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
use envoy_types::pb::envoy::config::core::v3::{HeaderValue, HeaderValueOption, address};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::HttpRequest;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{
    CheckRequest, CheckResponse, DeniedHttpResponse, OkHttpResponse,
};
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::google::rpc;
use http::{HeaderName, StatusCode};
use prost::Message;
use prost::bytes::{Buf, BufMut};
use prost::encoding::{DecodeContext, WireType};
use smallvec::SmallVec;
use tonic::{Code, Request, Response, Status};
use vilvik_keys_domain::Scope;
use vilvik_keys_verify::{Origin, Verdict, VerifiedKey, Verifier};

use crate::ext_authz_server::authorization_server::Authorization;
use crate::http_face::answer::{self, Denial};
use crate::http_face::credentials::{key_in_headers, listed_scopes};
use crate::service::ApiError;

/// The route's `context_extensions` entry that lists the scopes its
/// requests require, comma-separated (`ExtAuthzPerRoute.check_settings`).
pub const REQUIRED_SCOPES: &str = "vilvik_required_scopes";

/// Where a bad scope in [`REQUIRED_SCOPES`] came from, as its refusal says.
const SCOPES_SOURCE: &str = "the route's vilvik_required_scopes context extension";

/// The prefix of the headers only this service sets upstream.
const OUR_HEADERS: &str = "x-vilvik-";

/// The Authorization service.
#[derive(Debug, Clone)]
pub struct ExtAuthzService {
    pub verifier: Verifier,
    pub trusted_proxies: Vec<IpAddr>,
    /// Where a key is read from (`http_key_headers`).
    pub key_headers: Vec<HeaderName>,
}

#[tonic::async_trait]
impl Authorization for ExtAuthzService {
    async fn check(&self, request: Request<CheckCall>) -> Result<Response<CheckResponse>, Status> {
        let peer = crate::transport::peer_addr(&request);
        let CheckCall(call) = request.into_inner();
        let origin = self.origin(peer, &call);
        let http = call
            .attributes
            .as_ref()
            .and_then(|a| a.request.as_ref())
            .and_then(|r| r.http.as_ref());
        let scopes = call
            .attributes
            .as_ref()
            .and_then(|a| a.context_extensions.get(REQUIRED_SCOPES))
            .map(String::as_str);
        let answer = match self.judge(http, scopes, origin).await? {
            Ok(key) => allowed(&key, http),
            Err(denial) => denied(&denial),
        };
        Ok(Response::new(answer))
    }
}

impl ExtAuthzService {
    /// The key the request presents, judged against the route's scopes:
    /// the key when it is good for them, else the denial to answer with;
    /// a failure when this node cannot say (logged as KeyVerify logs it).
    async fn judge(
        &self,
        http: Option<&HttpRequest>,
        scopes: Option<&str>,
        origin: Origin,
    ) -> Result<Result<VerifiedKey, Denial>, Status> {
        let key = match key_in_headers(|| headers(http), &self.key_headers) {
            Ok(Some(key)) => key,
            Ok(None) => return Ok(Err(answer::missing_key(&self.key_headers))),
            Err(refusal) => return Ok(Err(refusal.into())),
        };
        let required: SmallVec<[Scope; 2]> =
            match listed_scopes(scopes.unwrap_or(""), SCOPES_SOURCE) {
                Ok(required) => required,
                Err(refusal) => return Ok(Err(refusal.into())),
            };
        let verdict = self
            .verifier
            .verify(key, &required, origin)
            .await
            .map_err(ApiError::from)?;
        Ok(match verdict {
            Verdict::Valid(key) => Ok(key),
            verdict => Err(answer::denial(&verdict, &required).expect("a refusal")),
        })
    }

    /// Where the request came from: Envoy's downstream peer when the caller
    /// is a trusted proxy (as `x-forwarded-for` is believed only from one);
    /// else the caller, which then only claims Envoy's downstream peer.
    fn origin(&self, peer: Option<SocketAddr>, call: &CheckRequest) -> Origin {
        let caller = peer.map(|p| p.ip().to_canonical());
        let source = source_ip(call);
        match caller {
            Some(ip) if self.trusted_proxies.contains(&ip) => Origin {
                observed: source.or(caller),
                claimed: None,
            },
            _ => Origin {
                observed: caller,
                claimed: source,
            },
        }
    }
}

/// The address of Envoy's downstream peer, if it is an IP address.
fn source_ip(call: &CheckRequest) -> Option<IpAddr> {
    let source = call.attributes.as_ref()?.source.as_ref()?;
    match source.address.as_ref()?.address.as_ref()? {
        address::Address::SocketAddress(socket) => socket
            .address
            .parse::<IpAddr>()
            .ok()
            .map(|ip| ip.to_canonical()),
        _ => None,
    }
}

/// The request's headers as (name, value) pairs: Envoy sends either the
/// `headers` map (repeated headers joined by commas) or, with
/// `encode_raw_headers`, the `header_map` list (`raw_value`; `value` from
/// older senders).
fn headers(http: Option<&HttpRequest>) -> impl Iterator<Item = (&str, &[u8])> {
    let map = http
        .map(|h| &h.headers)
        .into_iter()
        .flatten()
        .map(|(name, value)| (name.as_str(), value.as_bytes()));
    let list = http
        .and_then(|h| h.header_map.as_ref())
        .map(|m| &m.headers)
        .into_iter()
        .flatten()
        .map(|h| {
            let value = if h.raw_value.is_empty() {
                h.value.as_bytes()
            } else {
                h.raw_value.as_slice()
            };
            (h.key.as_str(), value)
        });
    map.chain(list)
}

/// OK, with the identity headers set upstream (over any the client sent)
/// and every other `x-vilvik-*` header the client sent removed. Envoy
/// removes after it sets, so the headers set are never in the list.
fn allowed(key: &VerifiedKey, http: Option<&HttpRequest>) -> CheckResponse {
    let identity = answer::identity_headers(key);
    let mut forged: Vec<String> = Vec::new();
    for (name, _) in headers(http) {
        let ours = name
            .get(..OUR_HEADERS.len())
            .is_some_and(|start| start.eq_ignore_ascii_case(OUR_HEADERS));
        if !ours {
            continue;
        }
        let name = name.to_ascii_lowercase();
        let set = identity.iter().any(|(header, _)| header.as_str() == name);
        if !set && !forged.contains(&name) {
            forged.push(name);
        }
    }
    forged.sort();
    CheckResponse {
        status: Some(rpc::Status {
            code: Code::Ok as i32,
            ..Default::default()
        }),
        http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
            headers: identity
                .iter()
                .map(|(name, value)| set_header(name.as_str(), value))
                .collect(),
            headers_to_remove: forged,
            ..Default::default()
        })),
        dynamic_metadata: None,
    }
}

/// The denial, for Envoy to send to the client as it is: its status,
/// headers (`WWW-Authenticate` among them) and JSON body.
fn denied(denial: &Denial) -> CheckResponse {
    CheckResponse {
        status: Some(rpc::Status {
            code: grpc_code(denial.status) as i32,
            message: denial.message.clone(),
            details: Vec::new(),
        }),
        http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
            status: Some(HttpStatus {
                code: i32::from(denial.status.as_u16()),
            }),
            headers: denial
                .headers()
                .iter()
                .map(|(name, value)| set_header(name.as_str(), value))
                .collect(),
            body: denial.body(),
        })),
        dynamic_metadata: None,
    }
}

/// The check's own status for a denial's HTTP status. Envoy denies on any
/// status but OK; the code is for its logs and traces.
fn grpc_code(status: StatusCode) -> Code {
    match status {
        StatusCode::UNAUTHORIZED => Code::Unauthenticated,
        StatusCode::FORBIDDEN => Code::PermissionDenied,
        StatusCode::SERVICE_UNAVAILABLE => Code::Unavailable,
        s if s.is_client_error() => Code::InvalidArgument,
        _ => Code::Unknown,
    }
}

/// A header set over any of the same name (not appended to it).
fn set_header(name: &str, value: &http::HeaderValue) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: name.to_owned(),
            // Every value made here is visible ASCII.
            value: value.to_str().unwrap_or_default().to_owned(),
            raw_value: Vec::new(),
        }),
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..Default::default()
    }
}

/// Envoy's `CheckRequest`, decoded as it is, whose `Debug` shows only the
/// request's id and method and its headers' names: a header's value may be
/// a key, and a path's query may carry one.
#[derive(Clone, Default, PartialEq)]
pub struct CheckCall(pub CheckRequest);

impl fmt::Debug for CheckCall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let http = self
            .0
            .attributes
            .as_ref()
            .and_then(|a| a.request.as_ref())
            .and_then(|r| r.http.as_ref());
        let names: Vec<&str> = headers(http).map(|(name, _)| name).collect();
        f.debug_struct("CheckCall")
            .field("id", &http.map(|h| h.id.as_str()))
            .field("method", &http.map(|h| h.method.as_str()))
            .field("header_names", &names)
            .finish_non_exhaustive()
    }
}

impl Message for CheckCall {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        self.0.encode_raw(buf);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        self.0.merge_field(tag, wire_type, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        self.0.encoded_len()
    }

    fn clear(&mut self) {
        self.0.clear();
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use envoy_types::pb::envoy::config::core::v3::HeaderMap;
    use envoy_types::pb::envoy::service::auth::v3::AttributeContext;
    use envoy_types::pb::envoy::service::auth::v3::attribute_context::Request as AttrRequest;

    use super::*;

    fn call(http: HttpRequest) -> CheckCall {
        CheckCall(CheckRequest {
            attributes: Some(AttributeContext {
                request: Some(AttrRequest {
                    http: Some(http),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        })
    }

    #[test]
    fn a_check_call_prints_no_header_value_or_path() {
        let secret = "vlk_AbCdEfGh_secretsecretsecretsecretsecretse";
        let with_map = call(HttpRequest {
            id: "req-1".into(),
            method: "GET".into(),
            path: format!("/data?api_key={secret}"),
            headers: HashMap::from([("authorization".into(), format!("Bearer {secret}"))]),
            ..Default::default()
        });
        let with_list = call(HttpRequest {
            header_map: Some(HeaderMap {
                headers: vec![HeaderValue {
                    key: "x-api-key".into(),
                    raw_value: secret.as_bytes().to_vec(),
                    ..Default::default()
                }],
            }),
            ..Default::default()
        });
        for call in [with_map, with_list] {
            let printed = format!("{call:?}");
            assert!(!printed.contains("secret"), "{printed}");
        }
        let printed = format!("{:?}", call(HttpRequest::default()));
        assert_eq!(
            printed,
            "CheckCall { id: Some(\"\"), method: Some(\"\"), header_names: [], .. }"
        );
    }

    #[test]
    fn a_check_call_decodes_and_encodes_as_the_check_request() {
        let request = call(HttpRequest {
            id: "req-1".into(),
            headers: HashMap::from([("x-api-key".into(), "vlk_x".into())]),
            ..Default::default()
        });
        let bytes = request.0.encode_to_vec();
        assert_eq!(request.encode_to_vec(), bytes);
        assert_eq!(CheckCall::decode(bytes.as_slice()).unwrap(), request);
    }

    #[test]
    fn each_denial_status_has_its_check_status() {
        assert_eq!(grpc_code(StatusCode::UNAUTHORIZED), Code::Unauthenticated);
        assert_eq!(grpc_code(StatusCode::FORBIDDEN), Code::PermissionDenied);
        assert_eq!(grpc_code(StatusCode::BAD_REQUEST), Code::InvalidArgument);
        assert_eq!(
            grpc_code(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE),
            Code::InvalidArgument
        );
        assert_eq!(
            grpc_code(StatusCode::SERVICE_UNAVAILABLE),
            Code::Unavailable
        );
    }
}
