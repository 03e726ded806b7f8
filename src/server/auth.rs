//! Who is calling the admin API, from the request's credential.
//!
//! Two kinds of credential are accepted in `authorization: Bearer …`:
//! - a management key: a `vlk_` key holding `keys:admin`; it acts on its
//!   own account, and the audit actor is `key:<key_id>`;
//! - the operator token from configuration, for trusted platform backends;
//!   the account comes from `x-vilvik-account` and the human actor from
//!   `x-vilvik-actor` (recorded as `operator:<actor>`).
//!
//! Once the caller is known, the call is counted against its account's
//! admin rate limit ([`super::rate_limit`]), before anything else is done.

use std::net::{IpAddr, SocketAddr};

use secrecy::{ExposeSecret, SecretString};
use subtle::ConstantTimeEq;
use tonic::metadata::MetadataMap;
use vilvik_keys_domain::{ADMIN_SCOPE, AccountId, KEY_PREFIX, Scope};
use vilvik_keys_store::Actor;
use vilvik_keys_verify::{Verdict, Verifier};

use super::error::ApiError;
use super::rate_limit::AdminRateLimiter;
use crate::headers;

const MAX_ACTOR_LEN: usize = 128;

/// An authenticated admin caller.
#[derive(Debug, Clone)]
pub struct Caller {
    pub account: AccountId,
    /// Who acts, and whether with the operator token (`actor.operator`).
    pub actor: Actor,
}

impl Caller {
    pub fn is_operator(&self) -> bool {
        self.actor.operator
    }
}

/// Resolves credentials to callers.
#[derive(Clone)]
pub struct Authenticator {
    verifier: Verifier,
    operator_token: Option<SecretString>,
    trusted_proxies: Vec<IpAddr>,
    admin_scope: Scope,
    rate_limits: AdminRateLimiter,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field(
                "operator_token",
                &self.operator_token.as_ref().map(|_| "[REDACTED]"),
            )
            .field("trusted_proxies", &self.trusted_proxies)
            .field("rate_limits", &self.rate_limits)
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    pub fn new(
        verifier: Verifier,
        operator_token: Option<SecretString>,
        trusted_proxies: Vec<IpAddr>,
        rate_limits: AdminRateLimiter,
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
            rate_limits,
        }
    }

    /// The per-account admin rate limits this authenticator enforces.
    pub fn rate_limits(&self) -> &AdminRateLimiter {
        &self.rate_limits
    }

    /// The authenticated caller, once its call is within its account's
    /// admin rate: every KeyAdmin handler starts here, so a call over the
    /// rate is refused before any validation or store access.
    pub async fn caller<T>(&self, request: &tonic::Request<T>) -> Result<Caller, ApiError> {
        let caller = self.authenticate(request).await?;
        self.rate_limits.admit(&caller.account).await?;
        Ok(caller)
    }

    async fn authenticate<T>(&self, request: &tonic::Request<T>) -> Result<Caller, ApiError> {
        let ip = client_ip(
            request.metadata(),
            crate::transport::peer_addr(request),
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
                    operator: false,
                },
                account: key.account_id,
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
        let account = AccountId::from_caller(header(metadata, headers::ACCOUNT)?)
            .map_err(|e| ApiError::invalid(headers::ACCOUNT, e))?;
        let actor = header(metadata, headers::ACTOR)?;
        if vilvik_keys_domain::looks_like_a_credential(actor) {
            return Err(ApiError::invalid(
                headers::ACTOR,
                "looks like a credential (an API key or the operator token), so it is not recorded: name the person acting, e.g. alice@example.com",
            ));
        }
        if actor.chars().count() > MAX_ACTOR_LEN {
            return Err(ApiError::invalid(
                headers::ACTOR,
                format!("must be at most {MAX_ACTOR_LEN} characters naming the person acting"),
            ));
        }
        vilvik_keys_domain::check_label(actor).map_err(|why| {
            ApiError::invalid(
                headers::ACTOR,
                format!("{why}: name the person acting, e.g. alice@example.com"),
            )
        })?;
        Ok(Caller {
            account,
            actor: Actor {
                name: format!("operator:{actor}"),
                ip: ip.map(|ip| ip.to_string()),
                operator: true,
            },
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
    let required = || ApiError::invalid(name, "is required with the operator token");
    let value = metadata.get(name).ok_or_else(required)?;
    let value = value
        .to_str()
        .map_err(|_| ApiError::invalid(name, "must be printable ASCII"))?;
    Some(value.trim())
        .filter(|v| !v.is_empty())
        .ok_or_else(required)
}

/// The caller's address. From a trusted proxy, `x-forwarded-for` is read
/// from the right, the end the proxies append to: the first hop that is
/// not itself a trusted proxy is the client. Hops further left were written
/// by the client or by proxies we do not know, so they are never believed.
/// A hop that does not parse stops the walk at the last address known.
pub fn client_ip(
    metadata: &MetadataMap,
    peer: Option<SocketAddr>,
    trusted_proxies: &[IpAddr],
) -> Option<IpAddr> {
    let mut client = peer?.ip().to_canonical();
    if !trusted_proxies.contains(&client) {
        return Some(client);
    }
    // Several headers count as one list, in the order received.
    let headers: Vec<&str> = metadata
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    for hop in headers.iter().rev().flat_map(|h| h.rsplit(',')) {
        let Some(ip) = parse_hop(hop) else { break };
        client = ip;
        if !trusted_proxies.contains(&ip) {
            break;
        }
    }
    Some(client)
}

/// One `x-forwarded-for` hop: an address, or an address and port.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim();
    hop.parse::<IpAddr>()
        .or_else(|_| hop.parse::<SocketAddr>().map(|a| a.ip()))
        .ok()
        .map(|ip| ip.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip_for(headers: &[&str], peer: &str, trusted: &[&str]) -> String {
        let mut md = MetadataMap::new();
        for h in headers {
            md.append("x-forwarded-for", h.parse().unwrap());
        }
        let trusted: Vec<IpAddr> = trusted.iter().map(|t| t.parse().unwrap()).collect();
        client_ip(&md, Some(peer.parse().unwrap()), &trusted)
            .unwrap()
            .to_string()
    }

    #[test]
    fn forwarded_for_is_used_only_behind_a_trusted_proxy() {
        let proxy = "10.0.0.2:5000";
        assert_eq!(
            ip_for(&["203.0.113.7"], proxy, &["10.0.0.2"]),
            "203.0.113.7"
        );
        assert_eq!(ip_for(&["203.0.113.7"], proxy, &[]), "10.0.0.2");
        assert_eq!(ip_for(&[], proxy, &["10.0.0.2"]), "10.0.0.2");
    }

    #[test]
    fn the_rightmost_hop_that_is_not_a_trusted_proxy_is_the_client() {
        let proxy = "10.0.0.2:5000";
        let trusted = ["10.0.0.2", "10.0.0.1"];
        // A client behind an appending proxy forges the leftmost hop.
        assert_eq!(
            ip_for(&["6.6.6.6, 203.0.113.7"], proxy, &trusted),
            "203.0.113.7"
        );
        // Trusted proxies in the chain are skipped.
        assert_eq!(
            ip_for(&["6.6.6.6, 203.0.113.7, 10.0.0.1"], proxy, &trusted),
            "203.0.113.7"
        );
        // Two headers are one list, in order; ports and spaces are allowed.
        assert_eq!(
            ip_for(&["6.6.6.6", " 203.0.113.7:443 ,10.0.0.1"], proxy, &trusted),
            "203.0.113.7"
        );
        assert_eq!(
            ip_for(&["6.6.6.6, [2001:db8::7]:443"], proxy, &trusted),
            "2001:db8::7"
        );
        // Garbage stops the walk at the last address known.
        assert_eq!(
            ip_for(&["6.6.6.6, junk, 10.0.0.1"], proxy, &trusted),
            "10.0.0.1"
        );
        assert_eq!(ip_for(&["6.6.6.6, junk"], proxy, &trusted), "10.0.0.2");
        // Only trusted proxies: the leftmost of them.
        assert_eq!(ip_for(&["10.0.0.1"], proxy, &trusted), "10.0.0.1");
        // IPv4 mapped into IPv6 is compared as IPv4.
        assert_eq!(
            ip_for(&["203.0.113.7"], "[::ffff:10.0.0.2]:5000", &trusted),
            "203.0.113.7"
        );
    }
}
