//! The admin service every surface calls, and its one door: [`Admin::admit`].

use std::sync::Arc;

use secrecy::SecretString;
use time::OffsetDateTime;
use vilvik_keys_domain::Clock;
use vilvik_keys_store::{Policy, Store};
use vilvik_keys_verify::Verifier;

use super::caller::{Authenticator, Caller, Credentials};
use super::error::ApiError;
use crate::service::rate_limit::AdminRateLimiter;

/// The KeyAdmin operations and the rules around them: who may call,
/// how often, what each may change. Cheap to clone (shared state).
#[derive(Debug, Clone)]
pub struct Admin {
    pub(super) store: Arc<dyn Store>,
    pub(super) clock: Arc<dyn Clock>,
    /// This node's verify engine: it authenticates management keys, and is
    /// told of each change as soon as it commits.
    pub(super) verifier: Verifier,
    /// The tier caps and the server's grantable scopes, enforced by the store.
    pub(super) policy: Policy,
    auth: Authenticator,
    pub(super) rate_limits: AdminRateLimiter,
}

impl Admin {
    /// `operator_token`: the credential of the platform's trusted backends
    /// (none: only management keys are accepted).
    pub fn new(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        verifier: Verifier,
        policy: Policy,
        operator_token: Option<SecretString>,
        rate_limits: AdminRateLimiter,
    ) -> Self {
        Self {
            auth: Authenticator::new(verifier.clone(), operator_token),
            store,
            clock,
            verifier,
            policy,
            rate_limits,
        }
    }

    /// Admits a call: authenticates its credentials, then counts the call
    /// against its account's admin rate. Every operation starts here, so
    /// a call refused here was not validated and touched nothing.
    pub async fn admit(&self, credentials: Credentials<'_>) -> Result<Caller, ApiError> {
        let (account, actor) = self.auth.authenticate(credentials).await?;
        self.rate_limits.admit(&account).await?;
        Ok(Caller {
            account,
            actor,
            at: self.clock.now(),
        })
    }

    /// The time by this service's clock (what a key's state is judged at
    /// when it is shown).
    pub fn now(&self) -> OffsetDateTime {
        self.clock.now()
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// The per-account admin rate limits [`Admin::admit`] enforces.
    pub fn rate_limits(&self) -> &AdminRateLimiter {
        &self.rate_limits
    }
}
