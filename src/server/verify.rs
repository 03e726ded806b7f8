//! The KeyVerify service: the hot path other backends call on every request.

use std::net::IpAddr;

use tonic::{Request, Response, Status};
use vilvik_keys_domain::Scope;
use vilvik_keys_verify::{Verdict, VerifiedKey, Verifier};

use super::auth::client_ip;
use super::convert;
use super::error::ApiError;
use crate::proto::{self, VerifyCode, key_verify_server::KeyVerify};

/// Most scopes one verify request may require.
const MAX_REQUIRED_SCOPES: usize = 50;

#[derive(Debug, Clone)]
pub struct VerifyService {
    pub verifier: Verifier,
    pub trusted_proxies: Vec<IpAddr>,
}

fn parse_required(scopes: Vec<String>) -> Result<Vec<Scope>, ApiError> {
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
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            Scope::try_from(s).map_err(|e| ApiError::invalid(format!("required_scopes[{i}]"), e))
        })
        .collect()
}

fn response(
    code: VerifyCode,
    key: Option<VerifiedKey>,
    missing: Vec<Scope>,
) -> proto::VerifyKeyResponse {
    let mut out = proto::VerifyKeyResponse {
        valid: code == VerifyCode::Valid,
        code: code.into(),
        missing_scopes: missing.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    if let Some(key) = key {
        out.key_id = key.key_id.as_str().to_owned();
        out.account_id = key.account_id.as_str().to_owned();
        out.name = key.name.into_string();
        out.scopes = key.scopes.to_strings();
        out.expires_at = key.expires_at.map(convert::timestamp);
    }
    out
}

#[tonic::async_trait]
impl KeyVerify for VerifyService {
    async fn verify_key(
        &self,
        request: Request<proto::VerifyKeyRequest>,
    ) -> Result<Response<proto::VerifyKeyResponse>, Status> {
        let peer_ip = client_ip(
            request.metadata(),
            request.remote_addr(),
            &self.trusted_proxies,
        );
        let req = request.into_inner();
        let required = parse_required(req.required_scopes)?;
        let client_ip = match req.client_ip.trim() {
            "" => peer_ip,
            ip => Some(ip.parse::<IpAddr>().map_err(|_| {
                ApiError::invalid(
                    "client_ip",
                    format!("'{ip}' is not an IPv4 or IPv6 address"),
                )
            })?),
        };
        let verdict = self
            .verifier
            .verify(&req.key, &required, client_ip)
            .await
            .map_err(ApiError::from)?;
        let answer = match verdict {
            Verdict::Valid(key) => response(VerifyCode::Valid, Some(key), vec![]),
            Verdict::Malformed(_) => response(VerifyCode::Malformed, None, vec![]),
            Verdict::NotFound => response(VerifyCode::NotFound, None, vec![]),
            Verdict::Expired(key) => response(VerifyCode::Expired, Some(key), vec![]),
            Verdict::Revoked(key) => response(VerifyCode::Revoked, Some(key), vec![]),
            Verdict::Rotated(key) => response(VerifyCode::Rotated, Some(key), vec![]),
            Verdict::InsufficientScope { key, missing } => {
                response(VerifyCode::InsufficientScope, Some(key), missing)
            }
        };
        Ok(Response::new(answer))
    }
}
