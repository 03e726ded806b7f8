//! Who is calling the admin API, from the request's credential.
//!
//! Two kinds of credential are accepted in `authorization: Bearer …`:
//! - a management key: a `vlk_` key holding `keys:admin`; it acts on its
//!   own account, and the audit actor is `key:<key_id>`;
//! - the operator token from configuration, for trusted platform backends;
//!   the account comes from `x-vilvik-account` and the human actor from
//!   `x-vilvik-actor` (recorded as `operator:<actor>`).

use std::net::{IpAddr, SocketAddr};

use secrecy::{ExposeSecret, SecretString};
use subtle::ConstantTimeEq;
use tonic::metadata::MetadataMap;
use vilvik_keys_domain::{ADMIN_SCOPE, AccountId, KEY_PREFIX, Scope};
use vilvik_keys_store::Actor;
use vilvik_keys_verify::{Verdict, Verifier};

use super::error::ApiError;

pub const ACCOUNT_HEADER: &str = "x-vilvik-account";
pub const ACTOR_HEADER: &str = "x-vilvik-actor";
const MAX_ACTOR_LEN: usize = 128;

/// An authenticated admin caller.
#[derive(Debug, Clone)]
pub struct Caller {
    pub account: AccountId,
    pub actor: Actor,
    pub is_operator: bool,
}

/// Resolves credentials to callers.
#[derive(Clone)]
pub struct Authenticator {
    verifier: Verifier,
    operator_token: Option<SecretString>,
    trusted_proxies: Vec<IpAddr>,
    admin_scope: Scope,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field(
                "operator_token",
                &self.operator_token.as_ref().map(|_| "[REDACTED]"),
            )
            .field("trusted_proxies", &self.trusted_proxies)
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    pub fn new(
        verifier: Verifier,
        operator_token: Option<SecretString>,
        trusted_proxies: Vec<IpAddr>,
    ) -> Self {
        // No error message may quote it, whichever field it was put in.
        if let Some(token) = &operator_token {
            vilvik_keys_domain::never_echo(token);
        }
        Self {
            verifier,
            operator_token,
            trusted_proxies,
            admin_scope: ADMIN_SCOPE
                .parse()
                .expect("the admin scope is a valid scope"),
        }
    }

    pub async fn caller<T>(&self, request: &tonic::Request<T>) -> Result<Caller, ApiError> {
        let ip = client_ip(
            request.metadata(),
            crate::server::connections::peer_addr(request),
            &self.trusted_proxies,
        );
        let credential = bearer(request.metadata())?;
        if credential.starts_with(KEY_PREFIX) {
            return self.management_key(credential, ip).await;
        }
        self.operator(credential, request.metadata(), ip)
    }

    async fn management_key(
        &self,
        credential: &str,
        ip: Option<IpAddr>,
    ) -> Result<Caller, ApiError> {
        let verdict = self
            .verifier
            .verify(
                credential.as_bytes(),
                std::slice::from_ref(&self.admin_scope),
                ip,
            )
            .await?;
        let ip = ip.map(|ip| ip.to_string());
        let unauthenticated = |why: &str| {
            Err(ApiError::Unauthenticated(format!(
                "the management key {why}"
            )))
        };
        match verdict {
            Verdict::Valid(key) => Ok(Caller {
                actor: Actor {
                    name: format!("key:{}", key.key_id),
                    ip,
                },
                account: key.account_id,
                is_operator: false,
            }),
            Verdict::Malformed(e) => unauthenticated(&format!("is malformed: {e}")),
            Verdict::NotFound => unauthenticated("is not known to this service"),
            Verdict::Expired(_) => unauthenticated("has expired"),
            Verdict::Revoked(_) => unauthenticated("was revoked"),
            Verdict::Rotated(_) => unauthenticated("was rotated: use its new secret"),
            Verdict::InsufficientScope { .. } => Err(ApiError::PermissionDenied(format!(
                "this key lacks the '{ADMIN_SCOPE}' scope needed for the admin API; use a management key"
            ))),
        }
    }

    fn operator(
        &self,
        credential: &str,
        metadata: &MetadataMap,
        ip: Option<IpAddr>,
    ) -> Result<Caller, ApiError> {
        let matches = self.operator_token.as_ref().is_some_and(|token| {
            bool::from(
                token
                    .expose_secret()
                    .as_bytes()
                    .ct_eq(credential.as_bytes()),
            )
        });
        if !matches {
            return Err(ApiError::Unauthenticated(
                "the bearer credential is neither a management key (vlk_…) nor the operator token"
                    .into(),
            ));
        }
        let account = AccountId::from_caller(header(metadata, ACCOUNT_HEADER)?)
            .map_err(|e| ApiError::invalid(ACCOUNT_HEADER, e))?;
        let actor = header(metadata, ACTOR_HEADER)?;
        if vilvik_keys_domain::looks_like_a_credential(actor) {
            return Err(ApiError::invalid(
                ACTOR_HEADER,
                "looks like a credential (an API key or the operator token), so it is not recorded: name the person acting, e.g. alice@example.com",
            ));
        }
        if actor.chars().count() > MAX_ACTOR_LEN || actor.chars().any(char::is_control) {
            return Err(ApiError::invalid(
                ACTOR_HEADER,
                format!(
                    "must be at most {MAX_ACTOR_LEN} printable characters naming the person acting"
                ),
            ));
        }
        Ok(Caller {
            account,
            actor: Actor {
                name: format!("operator:{actor}"),
                ip: ip.map(|ip| ip.to_string()),
            },
            is_operator: true,
        })
    }
}

fn bearer(metadata: &MetadataMap) -> Result<&str, ApiError> {
    let missing = || {
        ApiError::Unauthenticated(
            "missing credential: send 'authorization: Bearer <management key or operator token>'"
                .into(),
        )
    };
    let value = metadata.get("authorization").ok_or_else(missing)?;
    let value = value.to_str().map_err(|_| missing())?;
    value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .ok_or_else(missing)
}

fn header<'a>(metadata: &'a MetadataMap, name: &str) -> Result<&'a str, ApiError> {
    metadata
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| ApiError::invalid(name, "is required with the operator token"))
}

/// The caller's address: the peer, or the first `x-forwarded-for` hop when
/// the peer is a trusted proxy.
pub fn client_ip(
    metadata: &MetadataMap,
    peer: Option<SocketAddr>,
    trusted_proxies: &[IpAddr],
) -> Option<IpAddr> {
    let peer = peer?.ip();
    let peer = peer.to_canonical();
    if trusted_proxies.contains(&peer) {
        let forwarded = metadata
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
            .and_then(|hop| hop.trim().parse::<IpAddr>().ok());
        if let Some(ip) = forwarded {
            return Some(ip);
        }
    }
    Some(peer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_for_is_used_only_behind_a_trusted_proxy() {
        let mut md = MetadataMap::new();
        md.insert("x-forwarded-for", "203.0.113.7, 10.0.0.1".parse().unwrap());
        let proxy: SocketAddr = "10.0.0.2:5000".parse().unwrap();
        let trusted = ["10.0.0.2".parse().unwrap()];
        assert_eq!(
            client_ip(&md, Some(proxy), &trusted)
                .map(|ip| ip.to_string())
                .as_deref(),
            Some("203.0.113.7")
        );
        assert_eq!(
            client_ip(&md, Some(proxy), &[])
                .map(|ip| ip.to_string())
                .as_deref(),
            Some("10.0.0.2")
        );
    }
}
