//! The verify engine: decides whether a presented key is good and records
//! that it was used.
//!
//! [`Verifier::verify`] checks the format and checksum first (a malformed
//! key costs no store access), then finds the secret by its public prefix,
//! compares hashes in constant time, and checks rotation, revocation,
//! expiry and scopes, in that order. Uses are coalesced in memory by
//! [`UsageRecorder`] and written in batches, never one write per verify.
//!
//! This crate knows nothing of gRPC: the server maps [`Verdict`] to the
//! wire format. Both the public `KeyVerify` service and the admin API's
//! management-key authentication go through here.
#![forbid(unsafe_code)]

mod usage;

use std::sync::Arc;

use time::OffsetDateTime;
use vilvik_keys_domain::{
    AccountId, ApiKey, Clock, KeyFormatError, KeyId, KeyName, KeyState, Scope, ScopeSet,
};
use vilvik_keys_store::{Store, StoreError, UsageRecord};

pub use usage::{UsageConfig, UsageRecorder};

/// What is known about a key whose secret matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedKey {
    pub key_id: KeyId,
    pub account_id: AccountId,
    pub name: KeyName,
    pub scopes: ScopeSet,
    pub expires_at: Option<OffsetDateTime>,
}

/// The answer to "is this key good for these scopes?".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Valid(VerifiedKey),
    /// Not a key at all, or mistyped; no lookup was made.
    Malformed(KeyFormatError),
    /// No key has this secret.
    NotFound,
    Expired(VerifiedKey),
    Revoked(VerifiedKey),
    /// An old secret of a key that has since been rotated.
    Rotated(VerifiedKey),
    InsufficientScope {
        key: VerifiedKey,
        missing: Vec<Scope>,
    },
}

impl Verdict {
    pub fn is_valid(&self) -> bool {
        matches!(self, Verdict::Valid(_))
    }
}

/// Answers verify requests from the store and feeds the usage recorder.
#[derive(Debug, Clone)]
pub struct Verifier {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    usage: UsageRecorder,
}

impl Verifier {
    pub fn new(store: Arc<dyn Store>, clock: Arc<dyn Clock>, usage: UsageRecorder) -> Self {
        Self {
            store,
            clock,
            usage,
        }
    }

    /// Verifies `presented` against `required` scopes. `client_ip` is
    /// recorded as the key's last use when the key is active and matched.
    pub async fn verify(
        &self,
        presented: &str,
        required: &[Scope],
        client_ip: Option<String>,
    ) -> Result<Verdict, StoreError> {
        let key: ApiKey = match presented.parse() {
            Ok(key) => key,
            Err(e) => return Ok(Verdict::Malformed(e)),
        };
        let Some(secret) = self.store.find_secret(key.prefix()).await? else {
            return Ok(Verdict::NotFound);
        };
        if !secret.hash.matches(&key.hash()) {
            // Right prefix, wrong secret: indistinguishable from unknown.
            return Ok(Verdict::NotFound);
        }
        let now = self.clock.now();
        let record = secret.key;
        let verified = VerifiedKey {
            key_id: record.key_id.clone(),
            account_id: record.account_id.clone(),
            name: record.name.clone(),
            scopes: record.scopes.clone(),
            expires_at: record.expires_at,
        };
        if secret.superseded_at.is_some() {
            return Ok(Verdict::Rotated(verified));
        }
        match record.state(now) {
            KeyState::Revoked => return Ok(Verdict::Revoked(verified)),
            KeyState::Expired => return Ok(Verdict::Expired(verified)),
            KeyState::Active => {}
        }
        // An authenticated use, whether or not the scopes suffice.
        self.usage.record(UsageRecord {
            key_id: record.key_id,
            at: now,
            ip: client_ip,
        });
        let missing: Vec<Scope> = required
            .iter()
            .filter(|needed| !verified.scopes.grants_all([*needed]))
            .cloned()
            .collect();
        if !missing.is_empty() {
            return Ok(Verdict::InsufficientScope {
                key: verified,
                missing,
            });
        }
        Ok(Verdict::Valid(verified))
    }
}
