//! The KeyVerify service: the hot path other backends call on every request.

use std::net::IpAddr;

use compact_str::CompactString;
use smallvec::SmallVec;
use tonic::{Request, Response, Status};
use vilvik_keys_domain::{MAX_REQUIRED_SCOPES, Scope};
use vilvik_keys_verify::{Origin, Verdict, Verifier};

use super::verify_wire::{VerifyAnswer, VerifyCall};
use crate::service::ApiError;
use crate::verify_server::key_verify_server::KeyVerify;

#[derive(Debug, Clone)]
pub struct VerifyService {
    pub verifier: Verifier,
    pub trusted_proxies: Vec<IpAddr>,
}

/// The required scopes, checked; inline for the usual one or two.
fn parse_required(scopes: &[CompactString]) -> Result<SmallVec<[Scope; 2]>, ApiError> {
    if scopes.len() > MAX_REQUIRED_SCOPES {
        return Err(ApiError::invalid(
            "required_scopes",
            format!(
                "at most {MAX_REQUIRED_SCOPES} scopes may be required; {} were given",
                scopes.len()
            ),
        ));
    }
    scopes
        .iter()
        .enumerate()
        .map(|(i, s)| {
            s.parse::<Scope>()
                .map_err(|e| ApiError::invalid(format!("required_scopes[{i}]"), e))
        })
        .collect()
}

#[tonic::async_trait]
impl KeyVerify for VerifyService {
    async fn verify_key(
        &self,
        request: Request<VerifyCall>,
    ) -> Result<Response<VerifyAnswer>, Status> {
        // What this listener saw (the peer, or the client a trusted proxy
        // forwarded), kept apart from what the caller claims.
        let observed = crate::headers::client_ip(
            request.metadata().as_ref(),
            crate::transport::peer_addr(&request),
            &self.trusted_proxies,
        );
        let call = request.into_inner();
        let required = parse_required(&call.required_scopes)?;
        let claimed = match call.client_ip.trim() {
            "" => None,
            ip => Some(ip.parse::<IpAddr>().map_err(|_| {
                ApiError::invalid(
                    "client_ip",
                    format!(
                        "'{}' is not an IPv4 or IPv6 address",
                        vilvik_keys_domain::excerpt(ip)
                    ),
                )
            })?),
        };
        let verdict = self
            .verifier
            .verify(&call.key, &required, Origin { observed, claimed })
            .await
            .map_err(ApiError::from)?;
        // A well-formed key is ASCII, so only a malformed one needs the
        // UTF-8 check a string field gets everywhere else.
        if matches!(verdict, Verdict::Malformed(_)) && std::str::from_utf8(&call.key).is_err() {
            return Err(ApiError::invalid("key", super::codec::NOT_UTF8).into());
        }
        Ok(Response::new(verdict.into()))
    }
}
