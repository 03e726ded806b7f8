//! The key lifecycle and its audit log: each operation takes an admitted
//! [`Caller`] and validated domain values, leaves each change (with its
//! audit event and change-log entry) to one store transaction, and tells
//! this node's verify engine of it before answering.

use secrecy::SecretString;
use vilvik_keys_domain::{ApiKey, Description, GeneratedKey, KeyId, KeyName, Reason, ScopeSet};
use vilvik_keys_store::{
    AuditEvent, KeyChanges, KeyRecord, NewKey, NewSecret, Outcome, Page, Replay, RequestMethod,
    Rotation, RotationRequest, StoreError,
};

use super::admin::Admin;
use super::caller::Caller;
use super::error::ApiError;
use super::retry::{Retry, RetryKey};

/// Fresh identifiers collide with probability ~2^-47; retry a few times anyway.
const MAX_ID_ATTEMPTS: usize = 3;

/// What a new key takes, validated.
#[derive(Debug)]
pub struct NewKeyFields {
    pub name: KeyName,
    pub description: Description,
    pub scopes: ScopeSet,
    pub expires_at: Option<time::OffsetDateTime>,
}

/// A key with a secret to show once: a new key, a rotated one, or the
/// first call's answer to a retry.
#[derive(Debug)]
pub struct Issued {
    pub key: KeyRecord,
    pub secret: SecretString,
}

impl Admin {
    /// Creates a key in the caller's account. With `retry`, a call with
    /// the same request id and fields made within the window gets the
    /// first call's key and secret, and changes nothing.
    pub async fn create_key(
        &self,
        caller: &Caller,
        fields: NewKeyFields,
        retry: Option<Retry>,
    ) -> Result<Issued, ApiError> {
        let NewKeyFields {
            name,
            description,
            scopes,
            expires_at,
        } = fields;
        let method = RequestMethod::CreateKey;
        let retry = retry.map(|retry| retry.key(method));
        let now = caller.now();
        let (outcome, secret) = until_unique(|| {
            let secret = GeneratedKey::generate(self.verifier.peppers().current());
            let key_id = KeyId::generate();
            let record = retry.as_ref().map(|retry| {
                self.request_record(&caller.account, retry, method, &key_id, &secret, now)
            });
            let new = NewKey {
                key_id,
                account_id: caller.account.clone(),
                name: name.clone(),
                description: description.clone(),
                scopes: scopes.clone(),
                expires_at,
                prefix: secret.prefix().clone(),
                hash: secret.hash(),
                pepper_id: secret.pepper_id(),
                created_at: now,
            };
            async move {
                let outcome = self
                    .store
                    .create_key_with(new, record.as_ref(), &caller.actor, &self.policy)
                    .await
                    .inspect_err(|e| note_foreign_replay(caller, method, e))?;
                Ok((outcome, secret))
            }
        })
        .await?;
        match outcome {
            Outcome::Replayed(replay) => self.replayed(caller, retry.as_ref(), method, replay),
            Outcome::Done(record) => {
                self.verifier.invalidate(&record.prefix);
                tracing::info!(key.id = %record.key_id, key.prefix = %record.prefix, account = %caller.account, actor = %caller.actor.name, "key created");
                Ok(Issued {
                    key: record,
                    secret: secret.expose_secret().into(),
                })
            }
        }
    }

    /// The caller's keys, oldest first, a page at a time: `after` is the
    /// cursor of the page before.
    pub async fn list_keys(
        &self,
        caller: &Caller,
        include_revoked: bool,
        after: Option<i64>,
        limit: u32,
    ) -> Result<Page<KeyRecord>, ApiError> {
        Ok(self
            .store
            .list_keys(&caller.account, include_revoked, after, limit)
            .await?)
    }

    /// One of the caller's keys; another account's is NOT_FOUND, exactly
    /// like one that does not exist.
    pub async fn get_key(&self, caller: &Caller, key_id: &KeyId) -> Result<KeyRecord, ApiError> {
        self.store
            .get_key(&caller.account, key_id)
            .await?
            .ok_or_else(|| ApiError::key_not_found(key_id))
    }

    /// Changes what `changes` names (if `changes.if_version`, only when
    /// the key is still at that version).
    pub async fn update_key(
        &self,
        caller: &Caller,
        key_id: &KeyId,
        changes: KeyChanges,
    ) -> Result<KeyRecord, ApiError> {
        let fields: Vec<&str> = [
            ("name", changes.name.is_some()),
            ("description", changes.description.is_some()),
            ("scopes", changes.scopes.is_some()),
            ("expires_at", changes.expires_at.is_some()),
        ]
        .into_iter()
        .filter_map(|(field, named)| named.then_some(field))
        .collect();
        let record = self
            .store
            .update_key(
                &caller.account,
                key_id,
                changes,
                &caller.actor,
                caller.now(),
                &self.policy,
            )
            .await?;
        self.verifier.invalidate(&record.prefix);
        tracing::info!(key.id = %key_id, account = %caller.account, actor = %caller.actor.name, ?fields, "key updated");
        Ok(record)
    }

    /// Gives the key a new secret; the old one answers ROTATED from then
    /// on. `if_version` and `retry` as for [`Admin::update_key`] and
    /// [`Admin::create_key`].
    pub async fn rotate_key(
        &self,
        caller: &Caller,
        key_id: &KeyId,
        if_version: Option<i64>,
        retry: Option<Retry>,
    ) -> Result<Issued, ApiError> {
        let method = RequestMethod::RotateKey;
        let retry = retry.map(|retry| retry.key(method));
        let now = caller.now();
        let (outcome, secret) = until_unique(|| {
            let secret = GeneratedKey::generate(self.verifier.peppers().current());
            let rotation = RotationRequest {
                secret: NewSecret::from(&secret),
                if_version,
                request: retry.as_ref().map(|retry| {
                    self.request_record(&caller.account, retry, method, key_id, &secret, now)
                }),
            };
            async move {
                let outcome = self
                    .store
                    .rotate_key_with(
                        &caller.account,
                        key_id,
                        &rotation,
                        &caller.actor,
                        now,
                        &self.policy,
                    )
                    .await
                    .inspect_err(|e| note_foreign_replay(caller, method, e))?;
                Ok((outcome, secret))
            }
        })
        .await?;
        match outcome {
            Outcome::Replayed(replay) => self.replayed(caller, retry.as_ref(), method, replay),
            Outcome::Done(Rotation {
                key: record,
                replaced_prefix,
                pruned_prefixes,
            }) => {
                self.verifier.invalidate(&replaced_prefix);
                for pruned in &pruned_prefixes {
                    self.verifier.invalidate(pruned);
                }
                self.verifier.invalidate(&record.prefix);
                tracing::info!(key.id = %key_id, key.prefix = %record.prefix, account = %caller.account, actor = %caller.actor.name, "key rotated");
                Ok(Issued {
                    key: record,
                    secret: secret.expose_secret().into(),
                })
            }
        }
    }

    /// Revokes the key, for good (`if_version` as for
    /// [`Admin::update_key`]).
    pub async fn revoke_key(
        &self,
        caller: &Caller,
        key_id: &KeyId,
        reason: Reason,
        if_version: Option<i64>,
    ) -> Result<KeyRecord, ApiError> {
        let record = self
            .store
            .revoke_key_if(
                &caller.account,
                key_id,
                reason.as_str(),
                if_version,
                &caller.actor,
                caller.now(),
            )
            .await?;
        self.verifier.invalidate(&record.prefix);
        tracing::info!(key.id = %key_id, account = %caller.account, actor = %caller.actor.name, "key revoked");
        Ok(record)
    }

    /// The caller's audit log, or one key's, a page at a time; an unknown
    /// key is NOT_FOUND rather than an empty log.
    pub async fn list_audit_events(
        &self,
        caller: &Caller,
        key_id: Option<&KeyId>,
        after: Option<i64>,
        limit: u32,
    ) -> Result<Page<AuditEvent>, ApiError> {
        if let Some(key_id) = key_id {
            self.get_key(caller, key_id).await?;
        }
        Ok(self
            .store
            .list_audit_events(&caller.account, key_id, after, limit)
            .await?)
    }

    /// The answer to a retried create or rotation: the key as it is now,
    /// with the secret the first call returned, unless a later rotation
    /// superseded that secret (it would verify `ROTATED`).
    fn replayed(
        &self,
        caller: &Caller,
        retry: Option<&RetryKey>,
        method: RequestMethod,
        replay: Box<Replay>,
    ) -> Result<Issued, ApiError> {
        let id = &retry.expect("only a call with a request id replays").id;
        let secret = self.open_replay(&caller.account, id, method, &replay)?;
        let (key_id, account, actor) = (&replay.key.key_id, &caller.account, &caller.actor.name);
        if superseded(&secret, &replay.key) {
            tracing::info!(key.id = %key_id, %account, %actor, method = method.as_str(), "request retried after its secret was superseded: refused");
            let at = replay.key.rotated_at.map_or_else(
                || "an unknown time".to_owned(),
                vilvik_keys_domain::format_time,
            );
            let what = match method {
                RequestMethod::CreateKey => "the key created with this request id was rotated",
                RequestMethod::RotateKey => {
                    "the rotation made with this request id was superseded by a later rotation"
                }
            };
            return Err(ApiError::FailedPrecondition(format!(
                "request_id: {what} at {at}, so the secret it returned no longer works: \
                 nothing was changed; rotate key {key_id} with a new request id for a working \
                 secret"
            )));
        }
        match method {
            RequestMethod::CreateKey => {
                tracing::info!(key.id = %key_id, %account, %actor, "key create retried: answered with the first call's key");
            }
            RequestMethod::RotateKey => {
                tracing::info!(key.id = %key_id, %account, %actor, "key rotation retried: answered with the first rotation's secret");
            }
        }
        Ok(Issued {
            key: replay.key,
            secret: secret.as_str().into(),
        })
    }
}

/// Logs a caller's attempt to replay another caller's request id (it was
/// refused): someone holding an id that is not theirs is worth a look.
fn note_foreign_replay(caller: &Caller, method: RequestMethod, e: &StoreError) {
    if matches!(e, StoreError::RequestIdNotYours) {
        tracing::warn!(account = %caller.account, actor = %caller.actor.name, method = method.as_str(), "request id of another caller sent again: refused, no secret returned");
    }
}

/// Whether `secret` is no longer `key`'s current one.
fn superseded(secret: &str, key: &KeyRecord) -> bool {
    ApiKey::from_bytes(secret.as_bytes())
        .map_or(true, |presented| *presented.prefix() != key.prefix)
}

/// Runs `attempt` (a store call with freshly generated identifiers) again
/// while what it generated collides with what is stored, a few times at
/// most.
async fn until_unique<T, F, Fut>(mut attempt: F) -> Result<T, ApiError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    for _ in 0..MAX_ID_ATTEMPTS {
        match attempt().await {
            Err(StoreError::Conflict) => continue,
            done => return Ok(done?),
        }
    }
    Err(StoreError::Conflict.into())
}
