//! The KeyAdmin gRPC service: a thin adapter over [`crate::service::Admin`].
//! Each handler reads the call's credentials from its metadata and has the
//! service admit the call, then parses the request's fields into domain
//! values (an error names the field as in the proto), calls the operation,
//! and converts its answer to the response message.

use std::net::IpAddr;

use prost::Message;
use tonic::{Request, Response, Status};
use vilvik_keys_domain::{AccountId, KeyId, KeyName, Reason, ScopeCatalogue, ScopeSet};
use vilvik_keys_domain::{Description, validate_expiry};
use vilvik_keys_store::{KeyChanges, KeyRecord};

use super::auth;
use super::convert;
use crate::admin_server::key_admin_server::KeyAdmin;
use crate::service::{self, ApiError, Caller, Issued, NewKeyFields, OperatorOnly, Retry};
use crate::{headers, proto};

/// The KeyAdmin server's state: the service it adapts, and what only the
/// gRPC surface needs.
#[derive(Debug, Clone)]
pub struct AdminService {
    pub service: service::Admin,
    /// Proxies whose `x-forwarded-for` names the caller's address.
    pub trusted_proxies: Vec<IpAddr>,
    /// How the printed smoke-test command reaches the verify listener.
    pub smoke_test: SmokeTest,
}

/// The commands CreateKey and RotateKey print to try a new secret out: a
/// curl call to the verify listener's HTTP face (`GET /v1/keys/self`) and a
/// grpcurl call to its KeyVerify, with what they need to reach the
/// listener: its public address, and plaintext or the CA to check its
/// certificate against. Each runs as printed in `sh`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmokeTest {
    verify_addr: String,
    /// grpcurl's transport flag and its space: `-plaintext `, `-cacert FILE `
    /// or nothing.
    grpcurl_transport: String,
    /// curl's CA flag and its space: `--cacert FILE ` or nothing.
    curl_ca: String,
    /// The URL of `GET /v1/keys/self`, as one shell word.
    curl_url: String,
}

impl SmokeTest {
    /// `tls`: `None` for a plaintext listener, else the CA file to pass as
    /// `-cacert`/`--cacert` (none: grpcurl and curl use the system's CAs).
    pub fn new(verify_addr: String, tls: Option<Option<&std::path::Path>>) -> Self {
        let ca = tls.flatten().map(|ca| shell_quoted(&ca.to_string_lossy()));
        let (grpcurl_transport, curl_ca) = match (tls, ca) {
            (None, _) => ("-plaintext ".to_owned(), String::new()),
            (Some(_), None) => (String::new(), String::new()),
            (Some(_), Some(ca)) => (format!("-cacert {ca} "), format!("--cacert {ca} ")),
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        let curl_url = shell_quoted(&format!("{scheme}://{verify_addr}/v1/keys/self"));
        Self {
            verify_addr,
            grpcurl_transport,
            curl_ca,
            curl_url,
        }
    }

    /// The grpcurl command that verifies `secret` with KeyVerify/VerifyKey.
    fn grpcurl_command(&self, secret: &str) -> String {
        format!(
            "grpcurl {}-d '{{\"key\":\"{secret}\"}}' {} vilvik.keys.v1.KeyVerify/VerifyKey",
            self.grpcurl_transport, self.verify_addr
        )
    }

    /// The curl command that reads the key `secret` belongs to from
    /// `GET /v1/keys/self`: it exits 0 and prints the key's details while
    /// the secret works, and fails (`-f`: exit 22) once the answer is 401.
    /// A secret is `vlk_` and base62, so it needs no escaping in double
    /// quotes.
    fn curl_command(&self, secret: &str) -> String {
        format!(
            "curl -fsS {}-H \"Authorization: Bearer {secret}\" {}",
            self.curl_ca, self.curl_url
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
    /// The admitted caller of `request`: every handler starts here, so a
    /// call refused here was not validated and touched nothing.
    async fn caller<T>(&self, request: &Request<T>) -> Result<Caller, ApiError> {
        let credentials = auth::credentials(request, &self.trusted_proxies);
        self.service.admit(credentials).await
    }

    fn key(&self, record: KeyRecord) -> proto::Key {
        convert::key(record, self.service.now())
    }

    /// The key and secret a create or rotation returns, with the commands
    /// that try the secret out.
    fn issued(&self, issued: Issued) -> NewSecret {
        use secrecy::ExposeSecret;
        let secret = issued.secret.expose_secret();
        NewSecret {
            key: Some(self.key(issued.key)),
            secret: secret.to_owned(),
            smoke_test_command: self.smoke_test.grpcurl_command(secret),
            curl_smoke_test_command: self.smoke_test.curl_command(secret),
        }
    }
}

/// The fields CreateKeyResponse and RotateKeyResponse share.
struct NewSecret {
    key: Option<proto::Key>,
    secret: String,
    smoke_test_command: String,
    curl_smoke_test_command: String,
}

/// The account an operator call names in its request, else the caller's
/// (`x-vilvik-account`).
fn target_account(caller: &Caller, account_id: &str) -> Result<AccountId, ApiError> {
    match account_id {
        "" => Ok(caller.account().clone()),
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

/// The request id a create or rotation sends (its `request_id` field or
/// its `idempotency-key` header), with the request's other fields as they
/// arrived: `without_id` is the message with its id cleared. The other
/// fields are encoded only when an id is sent.
fn retry<T, M: Message>(
    request: &Request<T>,
    field: &str,
    without_id: impl FnOnce() -> M,
) -> Result<Option<Retry>, ApiError> {
    let header = match request.metadata().get(headers::IDEMPOTENCY_KEY) {
        None => None,
        Some(value) => Some(value.to_str().map_err(|_| {
            ApiError::invalid(
                headers::IDEMPOTENCY_KEY,
                "is not printable ASCII: send a UUID",
            )
        })?),
    };
    Ok(service::request_id(field, header)?.map(|id| Retry {
        id,
        other_fields: without_id().encode_to_vec(),
    }))
}

/// Validates a CreateKey request's fields, as `create_key` does before it
/// calls the service (public for the fuzz targets in `fuzz/`).
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
/// `update_mask` names, as `update_key` does before it calls the service
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

#[tonic::async_trait]
impl KeyAdmin for AdminService {
    async fn create_key(
        &self,
        request: Request<proto::CreateKeyRequest>,
    ) -> Result<Response<proto::CreateKeyResponse>, Status> {
        let caller = self.caller(&request).await?;
        let req = request.get_ref();
        let fields = parse_create_request(req, caller.now())?;
        let retry = retry(&request, &req.request_id, || proto::CreateKeyRequest {
            request_id: String::new(),
            // Scopes are a set: a retry may list them in another order.
            scopes: fields.scopes.to_strings(),
            ..req.clone()
        })?;
        let issued = self.service.create_key(&caller, fields, retry).await?;
        let NewSecret {
            key,
            secret,
            smoke_test_command,
            curl_smoke_test_command,
        } = self.issued(issued);
        Ok(Response::new(proto::CreateKeyResponse {
            key,
            secret,
            smoke_test_command,
            curl_smoke_test_command,
        }))
    }

    async fn list_keys(
        &self,
        request: Request<proto::ListKeysRequest>,
    ) -> Result<Response<proto::ListKeysResponse>, Status> {
        let caller = self.caller(&request).await?;
        let req = request.into_inner();
        let limit = convert::page_size(req.page_size)?;
        let after = convert::cursor(&req.page_token)?;
        let page = self
            .service
            .list_keys(&caller, req.include_revoked, after, limit)
            .await?;
        let now = self.service.now();
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
        let caller = self.caller(&request).await?;
        let key_id = parse_key_id(&request.get_ref().key_id)?;
        let record = self.service.get_key(&caller, &key_id).await?;
        Ok(Response::new(self.key(record)))
    }

    async fn update_key(
        &self,
        request: Request<proto::UpdateKeyRequest>,
    ) -> Result<Response<proto::Key>, Status> {
        let caller = self.caller(&request).await?;
        let (key_id, changes) = parse_update_request(request.get_ref(), caller.now())?;
        let record = self.service.update_key(&caller, &key_id, changes).await?;
        Ok(Response::new(self.key(record)))
    }

    async fn rotate_key(
        &self,
        request: Request<proto::RotateKeyRequest>,
    ) -> Result<Response<proto::RotateKeyResponse>, Status> {
        let caller = self.caller(&request).await?;
        let req = request.get_ref();
        let key_id = parse_key_id(&req.key_id)?;
        let if_version = convert::etag_version(&req.etag)?;
        let retry = retry(&request, &req.request_id, || proto::RotateKeyRequest {
            request_id: String::new(),
            ..req.clone()
        })?;
        let issued = self
            .service
            .rotate_key(&caller, &key_id, if_version, retry)
            .await?;
        let NewSecret {
            key,
            secret,
            smoke_test_command,
            curl_smoke_test_command,
        } = self.issued(issued);
        Ok(Response::new(proto::RotateKeyResponse {
            key,
            secret,
            smoke_test_command,
            curl_smoke_test_command,
        }))
    }

    async fn revoke_key(
        &self,
        request: Request<proto::RevokeKeyRequest>,
    ) -> Result<Response<proto::Key>, Status> {
        let caller = self.caller(&request).await?;
        let req = request.get_ref();
        let key_id = parse_key_id(&req.key_id)?;
        let reason: Reason = req
            .reason
            .parse()
            .map_err(|e| ApiError::invalid("reason", e))?;
        let if_version = convert::etag_version(&req.etag)?;
        let record = self
            .service
            .revoke_key(&caller, &key_id, reason, if_version)
            .await?;
        Ok(Response::new(self.key(record)))
    }

    async fn list_audit_events(
        &self,
        request: Request<proto::ListAuditEventsRequest>,
    ) -> Result<Response<proto::ListAuditEventsResponse>, Status> {
        let caller = self.caller(&request).await?;
        let req = request.into_inner();
        let key_id = match req.key_id.as_str() {
            "" => None,
            id => Some(parse_key_id(id)?),
        };
        let limit = convert::page_size(req.page_size)?;
        let after = convert::cursor(&req.page_token)?;
        let page = self
            .service
            .list_audit_events(&caller, key_id.as_ref(), after, limit)
            .await?;
        Ok(Response::new(proto::ListAuditEventsResponse {
            events: page.items.into_iter().map(convert::audit_event).collect(),
            next_page_token: convert::page_token(page.next_cursor),
        }))
    }

    async fn set_account_tier(
        &self,
        request: Request<proto::SetAccountTierRequest>,
    ) -> Result<Response<proto::Account>, Status> {
        let caller = self.caller(&request).await?;
        let operator = caller.operator(OperatorOnly::ChangeTier)?;
        let req = request.get_ref();
        let account = target_account(&caller, &req.account_id)?;
        let tier = convert::tier_from_proto(req.tier)?;
        let view = self
            .service
            .set_account_tier(operator, account, tier)
            .await?;
        Ok(Response::new(convert::account(view)))
    }

    async fn get_account(
        &self,
        request: Request<proto::GetAccountRequest>,
    ) -> Result<Response<proto::Account>, Status> {
        let caller = self.caller(&request).await?;
        let view = self.service.get_account(&caller).await?;
        Ok(Response::new(convert::account(view)))
    }

    async fn set_account_scopes(
        &self,
        request: Request<proto::SetAccountScopesRequest>,
    ) -> Result<Response<proto::Account>, Status> {
        let caller = self.caller(&request).await?;
        let operator = caller.operator(OperatorOnly::SetGrantableScopes)?;
        let req = request.get_ref();
        let account = target_account(&caller, &req.account_id)?;
        let grantable = parse_grantable(req)?;
        let view = self
            .service
            .set_account_scopes(operator, account, grantable)
            .await?;
        Ok(Response::new(convert::account(view)))
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    const SECRET: &str = "vlk_3kTMd8sQ_0Lr6bA2xYv9ZcW4eR7tU1iO5pQ8sD3fG6hJ0k";

    /// The words `sh` makes of `command`'s arguments (everything after its
    /// program name), as the program would receive them.
    fn words(command: &str) -> Vec<String> {
        let (_, args) = command.split_once(' ').expect("a program and arguments");
        let output = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("printf '%s\\n' {args}"))
            .output()
            .expect("sh runs");
        assert!(output.status.success(), "{output:?}");
        String::from_utf8(output.stdout)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn a_plaintext_listener_gets_an_http_url_and_grpcurl_plaintext() {
        let smoke = SmokeTest::new("127.0.0.1:50052".into(), None);
        assert_eq!(
            smoke.curl_command(SECRET),
            format!(
                "curl -fsS -H \"Authorization: Bearer {SECRET}\" \
                 http://127.0.0.1:50052/v1/keys/self"
            )
        );
        assert_eq!(
            smoke.grpcurl_command(SECRET),
            format!(
                "grpcurl -plaintext -d '{{\"key\":\"{SECRET}\"}}' 127.0.0.1:50052 \
                 vilvik.keys.v1.KeyVerify/VerifyKey"
            )
        );
    }

    #[test]
    fn a_tls_listener_without_a_public_ca_gets_https_and_the_system_cas() {
        let smoke = SmokeTest::new("keys.example.com:443".into(), Some(None));
        assert_eq!(
            smoke.curl_command(SECRET),
            format!(
                "curl -fsS -H \"Authorization: Bearer {SECRET}\" \
                 https://keys.example.com:443/v1/keys/self"
            )
        );
        assert_eq!(
            smoke.grpcurl_command(SECRET),
            format!(
                "grpcurl -d '{{\"key\":\"{SECRET}\"}}' keys.example.com:443 \
                 vilvik.keys.v1.KeyVerify/VerifyKey"
            )
        );
    }

    #[test]
    fn a_tls_listener_with_a_public_ca_passes_it_to_both_commands() {
        let ca = Path::new("/etc/vilvik/ca.pem");
        let smoke = SmokeTest::new("127.0.0.1:50052".into(), Some(Some(ca)));
        assert_eq!(
            smoke.curl_command(SECRET),
            format!(
                "curl -fsS --cacert /etc/vilvik/ca.pem -H \"Authorization: Bearer {SECRET}\" \
                 https://127.0.0.1:50052/v1/keys/self"
            )
        );
        assert_eq!(
            smoke.grpcurl_command(SECRET),
            format!(
                "grpcurl -cacert /etc/vilvik/ca.pem -d '{{\"key\":\"{SECRET}\"}}' \
                 127.0.0.1:50052 vilvik.keys.v1.KeyVerify/VerifyKey"
            )
        );
    }

    #[test]
    fn a_ca_path_and_an_address_sh_would_split_or_expand_are_quoted() {
        let ca = Path::new("/tmp/o'brien's certs/$HOME ca*.pem");
        let smoke = SmokeTest::new("[::1]:50052".into(), Some(Some(ca)));
        let curl = smoke.curl_command(SECRET);
        assert_eq!(
            curl,
            format!(
                r#"curl -fsS --cacert '/tmp/o'\''brien'\''s certs/$HOME ca*.pem' -H "Authorization: Bearer {SECRET}" 'https://[::1]:50052/v1/keys/self'"#
            )
        );
        assert_eq!(
            words(&curl),
            [
                "-fsS",
                "--cacert",
                "/tmp/o'brien's certs/$HOME ca*.pem",
                "-H",
                &format!("Authorization: Bearer {SECRET}"),
                "https://[::1]:50052/v1/keys/self",
            ]
        );
        assert_eq!(
            words(&smoke.grpcurl_command(SECRET))[..2],
            ["-cacert", "/tmp/o'brien's certs/$HOME ca*.pem"]
        );
    }
}
