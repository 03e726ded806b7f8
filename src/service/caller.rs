//! Who calls the admin API, from the credential a surface received.
//!
//! Two kinds of credential are accepted as the bearer credential:
//! - a management key: a `vlk_` key holding `keys:admin`; it acts on its
//!   own account, and the audit actor is `key:<key_id>`;
//! - the operator token from configuration, for trusted platform backends;
//!   the account and the human actor are named beside it (the
//!   `x-vilvik-account` and `x-vilvik-actor` headers), and the actor is
//!   recorded as `operator:<actor>`.
//!
//! Nothing a caller names beside the operator token is looked at before
//! the token matched.

use std::net::IpAddr;

use secrecy::{ExposeSecret, SecretString};
use subtle::ConstantTimeEq;
use time::OffsetDateTime;
use vilvik_keys_domain::{ADMIN_SCOPE, AccountId, KEY_PREFIX, Scope};
use vilvik_keys_store::Actor;
use vilvik_keys_verify::{Origin, Verdict, Verifier};

use super::error::ApiError;
use crate::headers;

const MAX_ACTOR_LEN: usize = 128;

/// A call's credentials as a surface received them; nothing in them is
/// checked until [`Admin::admit`](super::Admin::admit).
#[derive(Debug, Clone, Copy)]
pub struct Credentials<'a> {
    /// The bearer credential, a management key or the operator token;
    /// `None` when the call carries none a surface could read.
    pub bearer: Option<&'a str>,
    /// With the operator token: the account the call acts on
    /// (`x-vilvik-account`).
    pub account: Sent<'a>,
    /// With the operator token: the person acting (`x-vilvik-actor`).
    pub actor: Sent<'a>,
    /// The caller's address, as the surface determined it (behind trusted
    /// proxies, the client's); recorded with every change.
    pub ip: Option<IpAddr>,
}

/// A value a caller names beside its credential, as the surface received
/// it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Sent<'a> {
    /// Not sent, or only blanks.
    Missing,
    /// Sent, but not printable ASCII.
    Unreadable,
    /// Sent, trimmed.
    Text(&'a str),
}

impl std::fmt::Debug for Sent<'_> {
    /// Shows whether a value was sent, never the value: a caller may put
    /// anything in it, a credential included.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Sent::Missing => "Missing",
            Sent::Unreadable => "Unreadable",
            Sent::Text(_) => "Text(..)",
        })
    }
}

impl<'a> Sent<'a> {
    /// The value, which the operator token requires: `name` is the header
    /// it is read from.
    fn required(self, name: &str) -> Result<&'a str, ApiError> {
        match self {
            Sent::Missing => Err(ApiError::invalid(
                name,
                "is required with the operator token",
            )),
            Sent::Unreadable => Err(ApiError::invalid(name, "must be printable ASCII")),
            Sent::Text(value) => Ok(value),
        }
    }
}

/// An admitted call: its credential was checked and its account's admin
/// rate let it through. Every admin operation takes one, and only
/// [`Admin::admit`](super::Admin::admit) makes one, once per call.
#[derive(Debug, Clone)]
pub struct Caller {
    pub(super) account: AccountId,
    /// Who acts, from where, and whether with the operator token.
    pub(super) actor: Actor,
    pub(super) at: OffsetDateTime,
}

impl Caller {
    /// The account the call acts on.
    pub fn account(&self) -> &AccountId {
        &self.account
    }

    /// Who acts, as the audit log records it.
    pub fn actor(&self) -> &Actor {
        &self.actor
    }

    pub fn is_operator(&self) -> bool {
        self.actor.operator
    }

    /// When the call was admitted: the one clock reading every check and
    /// every record of the call uses (an expiry must be after it, a new
    /// key is created at it).
    pub fn now(&self) -> OffsetDateTime {
        self.at
    }
}

/// Resolves credentials to the account and actor they act as.
#[derive(Clone)]
pub(super) struct Authenticator {
    verifier: Verifier,
    operator_token: Option<SecretString>,
    admin_scope: Scope,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field(
                "operator_token",
                &self.operator_token.as_ref().map(|_| "[REDACTED]"),
            )
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    pub(super) fn new(verifier: Verifier, operator_token: Option<SecretString>) -> Self {
        // No error message may quote it, whichever field it is put in.
        if let Some(token) = &operator_token {
            vilvik_keys_domain::never_echo(token);
        }
        Self {
            verifier,
            operator_token,
            admin_scope: ADMIN_SCOPE
                .parse()
                .expect("the admin scope is a valid scope"),
        }
    }

    /// The account and actor `credentials` act as.
    pub(super) async fn authenticate(
        &self,
        credentials: Credentials<'_>,
    ) -> Result<(AccountId, Actor), ApiError> {
        let credential = credentials.bearer.ok_or_else(|| {
            ApiError::Unauthenticated(
                "missing credential: send 'authorization: Bearer <management key or operator token>'"
                    .into(),
            )
        })?;
        if credential.starts_with(KEY_PREFIX) {
            return self.management_key(credential, credentials.ip).await;
        }
        self.operator(credential, credentials)
    }

    async fn management_key(
        &self,
        credential: &str,
        ip: Option<IpAddr>,
    ) -> Result<(AccountId, Actor), ApiError> {
        let verdict = self
            .verifier
            .verify(
                credential.as_bytes(),
                std::slice::from_ref(&self.admin_scope),
                // The admin listener's view of the caller; nobody claims one.
                Origin {
                    observed: ip,
                    claimed: None,
                },
            )
            .await?;
        let unauthenticated = |why: &str| {
            Err(ApiError::Unauthenticated(format!(
                "the management key {why}"
            )))
        };
        match verdict {
            Verdict::Valid(key) => Ok((
                key.account_id,
                Actor {
                    name: format!("key:{}", key.key_id),
                    ip: ip.map(|ip| ip.to_string()),
                    operator: false,
                },
            )),
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
        credentials: Credentials<'_>,
    ) -> Result<(AccountId, Actor), ApiError> {
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
        let account = AccountId::from_caller(credentials.account.required(headers::ACCOUNT)?)
            .map_err(|e| ApiError::invalid(headers::ACCOUNT, e))?;
        let actor = credentials.actor.required(headers::ACTOR)?;
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
        Ok((
            account,
            Actor {
                name: format!("operator:{actor}"),
                ip: credentials.ip.map(|ip| ip.to_string()),
                operator: true,
            },
        ))
    }
}
