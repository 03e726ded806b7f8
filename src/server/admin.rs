//! The KeyAdmin service: key lifecycle and audit for an account's tooling.
//! Every handler authenticates first, validates every field before touching
//! the store, and leaves each change (with its audit event) to one store
//! transaction.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use vilvik_keys_domain::{
    AccountId, Clock, Description, GeneratedKey, KeyId, KeyName, REQUEST_ID_WINDOW, Reason,
    RequestId, ScopeCatalogue, ScopeSet, open_sealed_secret, seal_secret, validate_expiry,
};
use vilvik_keys_store::{
    Account, KeyChanges, KeyRecord, NewKey, NewSecret, Outcome, Policy, Replay, RequestMethod,
    RequestRecord, Rotation, RotationRequest, Store, StoreError,
};
use zeroize::Zeroizing;

use vilvik_keys_verify::Verifier;

use super::auth::Authenticator;
use super::convert;
use super::error::ApiError;
use crate::admin_server::key_admin_server::KeyAdmin;
use crate::{headers, proto};

/// Fresh identifiers collide with probability ~2^-47; retry a few times anyway.
const MAX_ID_ATTEMPTS: usize = 3;

/// BLAKE3 `derive_key` context of a request's parameters' digest.
/// NEVER CHANGE THIS: retries within the window would be refused.
const PARAMS_CONTEXT: &str = "vilvik-keys 2026-12-04 request parameters v1";

#[derive(Debug, Clone)]
pub struct AdminService {
    pub store: Arc<dyn Store>,
    pub clock: Arc<dyn Clock>,
    /// This node's verify engine, told of each change as soon as it commits.
    pub verifier: Verifier,
    pub auth: Authenticator,
    /// The tier caps and the server's grantable scopes, enforced by the store.
    pub policy: Policy,
    /// How the printed smoke-test command reaches the verify listener.
    pub smoke_test: SmokeTest,
}

/// The grpcurl command CreateKey and RotateKey print, with what it needs to
/// reach the verify listener: its public address, and `-plaintext` or the
/// CA to check its certificate against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmokeTest {
    verify_addr: String,
    transport: String,
}

impl SmokeTest {
    /// `tls`: `None` for a plaintext listener, else the CA file to pass as
    /// `-cacert` (none: grpcurl uses the system's CAs).
    pub fn new(verify_addr: String, tls: Option<Option<&std::path::Path>>) -> Self {
        let transport = match tls {
            None => "-plaintext ".to_owned(),
            Some(None) => String::new(),
            Some(Some(ca)) => format!("-cacert {} ", shell_quoted(&ca.to_string_lossy())),
        };
        Self {
            verify_addr,
            transport,
        }
    }

    fn command(&self, secret: &str) -> String {
        format!(
            "grpcurl {}-d '{{\"key\":\"{secret}\"}}' {} vilvik.keys.v1.KeyVerify/VerifyKey",
            self.transport, self.verify_addr
        )
    }
}

/// `s` as one shell word: bare when it is plainly safe, else single-quoted.
fn shell_quoted(s: &str) -> String {
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+:,=@".contains(&b));
    if plain {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

impl AdminService {
    fn smoke_test_command(&self, secret: &str) -> String {
        self.smoke_test.command(secret)
    }

    /// The record a call under `id` leaves for its retries: `secret`
    /// sealed under the current pepper and the id.
    fn request_record(
        &self,
        account: &AccountId,
        retry: &RetryKey,
        method: RequestMethod,
        key_id: &KeyId,
        secret: &GeneratedKey,
        now: time::OffsetDateTime,
    ) -> RequestRecord {
        let (id, pepper) = (&retry.id, self.verifier.peppers().current());
        RequestRecord {
            digest: id.digest(account),
            method,
            params: retry.params,
            key_id: key_id.clone(),
            sealed: seal_secret(
                pepper,
                account,
                id,
                &seal_context(method, key_id),
                secret.expose_secret(),
            ),
            pepper_id: pepper.id(),
            expires_at: now + REQUEST_ID_WINDOW,
        }
    }

    /// Opens the secret a retried call's first call returned.
    fn open_replay(
        &self,
        account: &AccountId,
        id: &RequestId,
        method: RequestMethod,
        replay: &Replay,
    ) -> Result<Zeroizing<String>, ApiError> {
        let pepper = self
            .verifier
            .peppers()
            .resolve(Some(replay.pepper_id))
            .map_err(|_| {
                ApiError::FailedPrecondition(format!(
                    "request_id: the first call's secret was sealed under pepper {}, which this \
                     server no longer holds, so it cannot be returned again: rotate the key \
                     (RotateKey with a new request id) to get a new secret",
                    replay.pepper_id
                ))
            })?
            .ok_or_else(|| {
                ApiError::Internal(StoreError::Internal(
                    "a replay without a pepper".into(),
                    None,
                ))
            })?;
        open_sealed_secret(
            pepper,
            account,
            id,
            &seal_context(method, &replay.key.key_id),
            &replay.sealed,
        )
        .map_err(|e| {
            ApiError::Internal(StoreError::Internal(
                "a sealed secret does not open".into(),
                Some(Box::new(e)),
            ))
        })
    }

    fn key(&self, record: KeyRecord) -> proto::Key {
        convert::key(record, self.clock.now())
    }

    fn account(&self, account_id: &AccountId, account: Account) -> proto::Account {
        let grantable = account.grantable.as_ref().unwrap_or(&self.policy.grantable);
        proto::Account {
            account_id: account_id.to_string(),
            tier: convert::tier(account.tier).into(),
            active_key_limit: self.policy.tiers.for_tier(account.tier),
            grantable_scopes: grantable.to_strings(),
            grantable_scopes_default: account.grantable.is_none(),
        }
    }
}

/// Refuses a caller without the operator token: `what` says what only the
/// operator may do.
fn require_operator(caller: &super::auth::Caller, what: &str) -> Result<(), ApiError> {
    if caller.is_operator() {
        Ok(())
    } else {
        Err(ApiError::PermissionDenied(format!(
            "only the platform operator can {what}; a management key cannot"
        )))
    }
}

/// The account an operator call names in its request, else the one of
/// `x-vilvik-account`.
fn target_account(caller: &super::auth::Caller, account_id: &str) -> Result<AccountId, ApiError> {
    match account_id {
        "" => Ok(caller.account.clone()),
        id => AccountId::from_caller(id).map_err(|e| ApiError::invalid("account_id", e)),
    }
}

fn parse_key_id(key_id: &str) -> Result<KeyId, ApiError> {
    if key_id.is_empty() {
        return Err(ApiError::invalid(
            "key_id",
            "is required: pass the key_id returned by CreateKey or ListKeys",
        ));
    }
    key_id.parse().map_err(|e| ApiError::invalid("key_id", e))
}

fn parse_name(name: &str) -> Result<KeyName, ApiError> {
    name.parse().map_err(|e| ApiError::invalid("name", e))
}

fn parse_description(description: &str) -> Result<Description, ApiError> {
    description
        .parse()
        .map_err(|e| ApiError::invalid("description", e))
}

fn parse_scopes(scopes: &[String]) -> Result<ScopeSet, ApiError> {
    ScopeSet::parse(scopes).map_err(|(index, e)| ApiError::invalid(format!("scopes[{index}]"), e))
}

fn parse_expiry(
    expires_at: Option<&prost_types::Timestamp>,
    now: time::OffsetDateTime,
) -> Result<Option<time::OffsetDateTime>, ApiError> {
    expires_at
        .map(|ts| {
            let at = convert::from_timestamp("expires_at", ts)?;
            validate_expiry(at, now).map_err(|e| ApiError::invalid("expires_at", e))?;
            Ok(at)
        })
        .transpose()
}

/// The request id of a create or rotation: its `request_id` field, else
/// its `idempotency-key` header; when both are sent they must agree.
fn request_id<T>(request: &Request<T>, field: &str) -> Result<Option<RequestId>, ApiError> {
    let header = match request.metadata().get(headers::IDEMPOTENCY_KEY) {
        None => None,
        Some(value) => Some(value.to_str().map_err(|_| {
            ApiError::invalid(
                headers::IDEMPOTENCY_KEY,
                "is not printable ASCII: send a UUID",
            )
        })?),
    };
    let id = match (field, header) {
        ("", None) => return Ok(None),
        ("", Some(header)) => header,
        (field, Some(header)) if !field.eq_ignore_ascii_case(header) => {
            return Err(ApiError::invalid(
                "request_id",
                "differs from the idempotency-key header: send the request id once, or the same in both",
            ));
        }
        (field, _) => field,
    };
    id.parse()
        .map(Some)
        .map_err(|e| ApiError::invalid("request_id", e))
}

/// What tells a retry of a create or rotation from a new call: the
/// caller's request id, and a digest of everything else the call asks for.
#[derive(Debug)]
struct RetryKey {
    id: RequestId,
    params: [u8; 32],
}

/// A digest of everything a call under a request id asks for but the id:
/// a retry must ask for the same.
fn params_digest(method: RequestMethod, message: &impl prost::Message) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new_derive_key(PARAMS_CONTEXT);
    hasher.update(method.as_str().as_bytes());
    hasher.update(&[0]);
    hasher.update(&message.encode_to_vec());
    *hasher.finalize().as_bytes()
}

/// What a sealed secret belongs to: a secret sealed for one call and key
/// opens for no other.
fn seal_context(method: RequestMethod, key_id: &KeyId) -> Vec<u8> {
    format!("{} {key_id}", method.as_str()).into_bytes()
}

/// What a new key takes from a CreateKey request, validated.
#[derive(Debug)]
pub struct NewKeyFields {
    pub name: KeyName,
    pub description: Description,
    pub scopes: ScopeSet,
    pub expires_at: Option<time::OffsetDateTime>,
}

/// Validates a CreateKey request's fields, as `create_key` does before it
/// touches the store (public for the fuzz targets in `fuzz/`).
pub fn parse_create_request(
    req: &proto::CreateKeyRequest,
    now: time::OffsetDateTime,
) -> Result<NewKeyFields, ApiError> {
    Ok(NewKeyFields {
        name: parse_name(&req.name)?,
        description: parse_description(&req.description)?,
        scopes: parse_scopes(&req.scopes)?,
        expires_at: parse_expiry(req.expires_at.as_ref(), now)?,
    })
}

/// Validates an UpdateKey request into the key and the changes its
/// `update_mask` names, as `update_key` does before it touches the store
/// (public for the fuzz targets in `fuzz/`).
pub fn parse_update_request(
    req: &proto::UpdateKeyRequest,
    now: time::OffsetDateTime,
) -> Result<(KeyId, KeyChanges), ApiError> {
    let key_id = parse_key_id(&req.key_id)?;
    let paths = req.update_mask.as_ref().map_or(&[][..], |m| &m.paths);
    if paths.is_empty() {
        return Err(ApiError::invalid(
            "update_mask",
            "is empty: name the fields to change, from name, description, scopes and expires_at",
        ));
    }
    let mut changes = KeyChanges {
        if_version: convert::etag_version(&req.etag)?,
        ..KeyChanges::default()
    };
    for path in paths {
        match path.as_str() {
            "name" => changes.name = Some(parse_name(&req.name)?),
            "description" => changes.description = Some(parse_description(&req.description)?),
            "scopes" => changes.scopes = Some(parse_scopes(&req.scopes)?),
            "expires_at" => changes.expires_at = Some(parse_expiry(req.expires_at.as_ref(), now)?),
            other => {
                return Err(ApiError::invalid(
                    "update_mask",
                    format!(
                        "'{}' cannot be updated: use name, description, scopes or expires_at",
                        vilvik_keys_domain::excerpt(other)
                    ),
                ));
            }
        }
    }
    Ok((key_id, changes))
}

#[tonic::async_trait]
impl KeyAdmin for AdminService {
    async fn create_key(
        &self,
        request: Request<proto::CreateKeyRequest>,
    ) -> Result<Response<proto::CreateKeyResponse>, Status> {
        let caller = self.auth.caller(&request).await?;
        let now = self.clock.now();
        let NewKeyFields {
            name,
            description,
            scopes,
            expires_at,
        } = parse_create_request(request.get_ref(), now)?;
        // The other fields are digested only when a request id is sent.
        let retry = request_id(&request, &request.get_ref().request_id)?.map(|id| RetryKey {
            id,
            params: params_digest(
                RequestMethod::CreateKey,
                &proto::CreateKeyRequest {
                    request_id: String::new(),
                    ..request.get_ref().clone()
                },
            ),
        });

        for _ in 0..MAX_ID_ATTEMPTS {
            let secret = GeneratedKey::generate(self.verifier.peppers().current());
            let key_id = KeyId::generate();
            let record = retry.as_ref().map(|retry| {
                self.request_record(
                    &caller.account,
                    retry,
                    RequestMethod::CreateKey,
                    &key_id,
                    &secret,
                    now,
                )
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
            match self
                .store
                .create_key_with(new, record.as_ref(), &caller.actor, &self.policy)
                .await
            {
                Ok(Outcome::Replayed(replay)) => {
                    let id = &retry
                        .as_ref()
                        .expect("only a call with a request id replays")
                        .id;
                    let secret =
                        self.open_replay(&caller.account, id, RequestMethod::CreateKey, &replay)?;
                    tracing::info!(key.id = %replay.key.key_id, account = %caller.account, actor = %caller.actor.name, "key create retried: answered with the first call's key");
                    return Ok(Response::new(proto::CreateKeyResponse {
                        key: Some(self.key(replay.key)),
                        smoke_test_command: self.smoke_test_command(&secret),
                        secret: secret.as_str().to_owned(),
                    }));
                }
                Ok(Outcome::Done(record)) => {
                    self.verifier.invalidate(&record.prefix);
                    tracing::info!(key.id = %record.key_id, key.prefix = %record.prefix, account = %caller.account, actor = %caller.actor.name, "key created");
                    return Ok(Response::new(proto::CreateKeyResponse {
                        key: Some(self.key(record)),
                        smoke_test_command: self.smoke_test_command(secret.expose_secret()),
                        secret: secret.expose_secret().to_owned(),
                    }));
                }
                Err(StoreError::Conflict) => continue,
                Err(e) => return Err(ApiError::from(e).into()),
            }
        }
        Err(ApiError::from(StoreError::Conflict).into())
    }

    async fn list_keys(
        &self,
        request: Request<proto::ListKeysRequest>,
    ) -> Result<Response<proto::ListKeysResponse>, Status> {
        let caller = self.auth.caller(&request).await?;
        let req = request.into_inner();
        let limit = convert::page_size(req.page_size)?;
        let after = convert::cursor(&req.page_token)?;
        let page = self
            .store
            .list_keys(&caller.account, req.include_revoked, after, limit)
            .await
            .map_err(ApiError::from)?;
        let now = self.clock.now();
        Ok(Response::new(proto::ListKeysResponse {
            keys: page
                .items
                .into_iter()
                .map(|k| convert::key(k, now))
                .collect(),
            next_page_token: convert::page_token(page.next_cursor),
        }))
    }

    async fn get_key(
        &self,
        request: Request<proto::GetKeyRequest>,
    ) -> Result<Response<proto::Key>, Status> {
        let caller = self.auth.caller(&request).await?;
        let key_id = parse_key_id(&request.get_ref().key_id)?;
        let record = self
            .store
            .get_key(&caller.account, &key_id)
            .await
            .map_err(ApiError::from)?
            .ok_or_else(|| ApiError::key_not_found(&key_id))?;
        Ok(Response::new(self.key(record)))
    }

    async fn update_key(
        &self,
        request: Request<proto::UpdateKeyRequest>,
    ) -> Result<Response<proto::Key>, Status> {
        let caller = self.auth.caller(&request).await?;
        let req = request.into_inner();
        let now = self.clock.now();
        let (key_id, changes) = parse_update_request(&req, now)?;
        let paths = req.update_mask.map(|m| m.paths).unwrap_or_default();
        let record = self
            .store
            .update_key(
                &caller.account,
                &key_id,
                changes,
                &caller.actor,
                now,
                &self.policy,
            )
            .await
            .map_err(ApiError::from)?;
        self.verifier.invalidate(&record.prefix);
        tracing::info!(key.id = %key_id, account = %caller.account, actor = %caller.actor.name, fields = ?paths, "key updated");
        Ok(Response::new(self.key(record)))
    }

    async fn rotate_key(
        &self,
        request: Request<proto::RotateKeyRequest>,
    ) -> Result<Response<proto::RotateKeyResponse>, Status> {
        let caller = self.auth.caller(&request).await?;
        let key_id = parse_key_id(&request.get_ref().key_id)?;
        let if_version = convert::etag_version(&request.get_ref().etag)?;
        let retry = request_id(&request, &request.get_ref().request_id)?.map(|id| RetryKey {
            id,
            params: params_digest(
                RequestMethod::RotateKey,
                &proto::RotateKeyRequest {
                    request_id: String::new(),
                    ..request.get_ref().clone()
                },
            ),
        });
        let now = self.clock.now();
        for _ in 0..MAX_ID_ATTEMPTS {
            let secret = GeneratedKey::generate(self.verifier.peppers().current());
            let rotation = RotationRequest {
                secret: NewSecret::from(&secret),
                if_version,
                request: retry.as_ref().map(|retry| {
                    self.request_record(
                        &caller.account,
                        retry,
                        RequestMethod::RotateKey,
                        &key_id,
                        &secret,
                        now,
                    )
                }),
            };
            match self
                .store
                .rotate_key_with(
                    &caller.account,
                    &key_id,
                    &rotation,
                    &caller.actor,
                    now,
                    &self.policy,
                )
                .await
            {
                Ok(Outcome::Replayed(replay)) => {
                    let id = &retry
                        .as_ref()
                        .expect("only a call with a request id replays")
                        .id;
                    let secret =
                        self.open_replay(&caller.account, id, RequestMethod::RotateKey, &replay)?;
                    tracing::info!(key.id = %key_id, account = %caller.account, actor = %caller.actor.name, "key rotation retried: answered with the first rotation's secret");
                    return Ok(Response::new(proto::RotateKeyResponse {
                        key: Some(self.key(replay.key)),
                        smoke_test_command: self.smoke_test_command(&secret),
                        secret: secret.as_str().to_owned(),
                    }));
                }
                Ok(Outcome::Done(Rotation {
                    key: record,
                    replaced_prefix,
                    pruned_prefixes,
                })) => {
                    self.verifier.invalidate(&replaced_prefix);
                    for pruned in &pruned_prefixes {
                        self.verifier.invalidate(pruned);
                    }
                    self.verifier.invalidate(&record.prefix);
                    tracing::info!(key.id = %key_id, key.prefix = %record.prefix, account = %caller.account, actor = %caller.actor.name, "key rotated");
                    return Ok(Response::new(proto::RotateKeyResponse {
                        key: Some(self.key(record)),
                        smoke_test_command: self.smoke_test_command(secret.expose_secret()),
                        secret: secret.expose_secret().to_owned(),
                    }));
                }
                Err(StoreError::Conflict) => continue,
                Err(e) => return Err(ApiError::from(e).into()),
            }
        }
        Err(ApiError::from(StoreError::Conflict).into())
    }

    async fn revoke_key(
        &self,
        request: Request<proto::RevokeKeyRequest>,
    ) -> Result<Response<proto::Key>, Status> {
        let caller = self.auth.caller(&request).await?;
        let req = request.into_inner();
        let key_id = parse_key_id(&req.key_id)?;
        let reason: Reason = req
            .reason
            .parse()
            .map_err(|e| ApiError::invalid("reason", e))?;
        let if_version = convert::etag_version(&req.etag)?;
        let record = self
            .store
            .revoke_key_if(
                &caller.account,
                &key_id,
                reason.as_str(),
                if_version,
                &caller.actor,
                self.clock.now(),
            )
            .await
            .map_err(ApiError::from)?;
        self.verifier.invalidate(&record.prefix);
        tracing::info!(key.id = %key_id, account = %caller.account, actor = %caller.actor.name, "key revoked");
        Ok(Response::new(self.key(record)))
    }

    async fn list_audit_events(
        &self,
        request: Request<proto::ListAuditEventsRequest>,
    ) -> Result<Response<proto::ListAuditEventsResponse>, Status> {
        let caller = self.auth.caller(&request).await?;
        let req = request.into_inner();
        let key_id = match req.key_id.as_str() {
            "" => None,
            id => Some(parse_key_id(id)?),
        };
        let limit = convert::page_size(req.page_size)?;
        let after = convert::cursor(&req.page_token)?;
        if let Some(key_id) = &key_id {
            // An unknown key is NOT_FOUND rather than an empty log.
            self.store
                .get_key(&caller.account, key_id)
                .await
                .map_err(ApiError::from)?
                .ok_or_else(|| ApiError::key_not_found(key_id))?;
        }
        let page = self
            .store
            .list_audit_events(&caller.account, key_id.as_ref(), after, limit)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(proto::ListAuditEventsResponse {
            events: page.items.into_iter().map(convert::audit_event).collect(),
            next_page_token: convert::page_token(page.next_cursor),
        }))
    }

    async fn set_account_tier(
        &self,
        request: Request<proto::SetAccountTierRequest>,
    ) -> Result<Response<proto::Account>, Status> {
        let caller = self.auth.caller(&request).await?;
        require_operator(&caller, "change an account's tier")?;
        let req = request.into_inner();
        let account = target_account(&caller, &req.account_id)?;
        let tier = convert::tier_from_proto(req.tier)?;
        let updated = self
            .store
            .set_tier(&account, tier, &caller.actor, self.clock.now())
            .await
            .map_err(ApiError::from)?;
        self.auth.rate_limits().tier_set(&account, updated.tier);
        tracing::info!(account = %account, tier = %tier, actor = %caller.actor.name, "account tier set");
        Ok(Response::new(self.account(&account, updated)))
    }

    async fn get_account(
        &self,
        request: Request<proto::GetAccountRequest>,
    ) -> Result<Response<proto::Account>, Status> {
        let caller = self.auth.caller(&request).await?;
        let account = self
            .store
            .get_account(&caller.account)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(self.account(&caller.account, account)))
    }

    async fn set_account_scopes(
        &self,
        request: Request<proto::SetAccountScopesRequest>,
    ) -> Result<Response<proto::Account>, Status> {
        let caller = self.auth.caller(&request).await?;
        require_operator(&caller, "set which scopes an account's keys may be granted")?;
        let req = request.into_inner();
        let account = target_account(&caller, &req.account_id)?;
        let grantable = parse_grantable(&req)?;
        let updated = self
            .store
            .set_grantable_scopes(
                &account,
                grantable.as_ref(),
                &caller.actor,
                self.clock.now(),
            )
            .await
            .map_err(ApiError::from)?;
        tracing::info!(account = %account, grantable_scopes = %grantable.as_ref().map_or_else(|| "server default".to_owned(), ToString::to_string), actor = %caller.actor.name, "account grantable scopes set");
        Ok(Response::new(self.account(&account, updated)))
    }
}

/// The catalogue a SetAccountScopes request asks for; `None`: the server's.
fn parse_grantable(
    req: &proto::SetAccountScopesRequest,
) -> Result<Option<ScopeCatalogue>, ApiError> {
    if req.use_server_default {
        if !req.grantable_scopes.is_empty() {
            return Err(ApiError::invalid(
                "grantable_scopes",
                "must be empty with use_server_default: send either the account's own patterns or use_server_default",
            ));
        }
        return Ok(None);
    }
    ScopeCatalogue::parse(&req.grantable_scopes)
        .map(Some)
        .map_err(|(index, e)| ApiError::invalid(format!("grantable_scopes[{index}]"), e))
}
