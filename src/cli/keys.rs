//! `keys …`: create, list, show, update, rotate, revoke and audit an
//! account's keys through the admin API.

use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::Value;
use time::OffsetDateTime;

use super::args::{ClientArgs, KeysCommand, UpdateArgs};
use super::errors::api_error;
use super::output::{self, emit};
use super::retry::with_retries;
use super::transport::{Api, connect};
use crate::proto;

/// Runs one `keys` command against the admin API `client` names and prints
/// its result: tables and blocks, or JSON with `--json`.
pub async fn run_keys(client: ClientArgs, command: KeysCommand) -> anyhow::Result<()> {
    let json = client.json;
    let mut api = connect(&client).await?;
    match command {
        KeysCommand::Create(args) => {
            let expires_at = expiry(args.expires_at, args.expires_in)?;
            let request = proto::CreateKeyRequest {
                name: args.name,
                description: args.description.unwrap_or_default(),
                scopes: args.scopes,
                expires_at,
                request_id: request_id(args.request_id),
            };
            issue(json, "Created", "CreateKey", &request.request_id, || {
                let (mut api, request) = (api.clone(), request.clone());
                async move { api.create_key(request).await }
            })
            .await
        }
        KeysCommand::List {
            include_revoked,
            page_size,
        } => {
            let keys = every_page(|page_token| {
                let mut api = api.clone();
                async move {
                    let page = api
                        .list_keys(proto::ListKeysRequest {
                            page_size: page_size.unwrap_or(0),
                            page_token,
                            include_revoked,
                        })
                        .await?
                        .into_inner();
                    Ok((page.keys, page.next_page_token))
                }
            })
            .await?;
            let empty = if include_revoked {
                "No keys.\n"
            } else {
                "No keys (revoked keys are hidden: add --include-revoked).\n"
            };
            print_list(json, &keys, output::key_json, empty, output::keys_table)
        }
        KeysCommand::Show { key_id } => {
            let key = get_key(&mut api, key_id).await?;
            print_key(json, None, &key)
        }
        KeysCommand::Update(args) => {
            let mut request = update_request(args)?;
            if request.etag.is_empty() {
                // Change the key only as it was read: a change made
                // meanwhile by someone else is ABORTED, not overwritten.
                request.etag = get_key(&mut api, request.key_id.clone()).await?.etag;
            }
            let key = api
                .update_key(request)
                .await
                .map_err(api_error)?
                .into_inner();
            print_key(json, Some("Updated"), &key)
        }
        KeysCommand::Rotate {
            key_id,
            request_id: id,
            etag,
        } => {
            let request = proto::RotateKeyRequest {
                key_id,
                request_id: request_id(id),
                etag: etag.unwrap_or_default(),
            };
            issue(json, "Rotated", "RotateKey", &request.request_id, || {
                let (mut api, request) = (api.clone(), request.clone());
                async move { api.rotate_key(request).await }
            })
            .await
        }
        KeysCommand::Revoke {
            key_id,
            reason,
            etag,
        } => {
            let key = api
                .revoke_key(proto::RevokeKeyRequest {
                    key_id,
                    reason: reason.unwrap_or_default(),
                    etag: etag.unwrap_or_default(),
                })
                .await
                .map_err(api_error)?
                .into_inner();
            print_key(json, Some("Revoked"), &key)
        }
        KeysCommand::Audit { key_id, page_size } => {
            let key_id = key_id.unwrap_or_default();
            let events = every_page(|page_token| {
                let (mut api, key_id) = (api.clone(), key_id.clone());
                async move {
                    let page = api
                        .list_audit_events(proto::ListAuditEventsRequest {
                            key_id,
                            page_size: page_size.unwrap_or(0),
                            page_token,
                        })
                        .await?
                        .into_inner();
                    Ok((page.events, page.next_page_token))
                }
            })
            .await?;
            print_list(
                json,
                &events,
                output::audit_event_json,
                "No audit events.\n",
                output::audit_table,
            )
        }
    }
}

/// A create's or rotation's answer: the key, its new secret and the
/// commands that try the secret out.
struct NewSecret {
    key: proto::Key,
    secret: String,
    /// curl against the verify listener's HTTP face (`GET /v1/keys/self`);
    /// empty from a server without it.
    curl_smoke_test: String,
    /// grpcurl against KeyVerify/VerifyKey.
    grpcurl_smoke_test: String,
}

impl From<proto::CreateKeyResponse> for NewSecret {
    fn from(response: proto::CreateKeyResponse) -> Self {
        Self {
            key: response.key.unwrap_or_default(),
            secret: response.secret,
            curl_smoke_test: response.curl_smoke_test_command,
            grpcurl_smoke_test: response.smoke_test_command,
        }
    }
}

impl From<proto::RotateKeyResponse> for NewSecret {
    fn from(response: proto::RotateKeyResponse) -> Self {
        Self {
            key: response.key.unwrap_or_default(),
            secret: response.secret,
            curl_smoke_test: response.curl_smoke_test_command,
            grpcurl_smoke_test: response.smoke_test_command,
        }
    }
}

/// A create or rotation: `call` tried as [`with_retries`] does, then the
/// key and its new secret printed.
async fn issue<R, F, Fut>(
    json: bool,
    verb: &str,
    method: &'static str,
    request_id: &str,
    call: F,
) -> anyhow::Result<()>
where
    R: Into<NewSecret>,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<tonic::Response<R>, tonic::Status>>,
{
    let issued = with_retries(method, request_id, call).await?.into();
    print_new_secret(json, verb, &issued)
}

async fn get_key(api: &mut Api, key_id: String) -> anyhow::Result<proto::Key> {
    Ok(api
        .get_key(proto::GetKeyRequest { key_id })
        .await
        .map_err(api_error)?
        .into_inner())
}

/// Every page of a listing: `page` fetches the one a page token names
/// (empty for the first) and answers its items and the next page's token.
async fn every_page<T, F, Fut>(mut page: F) -> anyhow::Result<Vec<T>>
where
    F: FnMut(String) -> Fut,
    Fut: Future<Output = Result<(Vec<T>, String), tonic::Status>>,
{
    let mut items = Vec::new();
    let mut page_token = String::new();
    loop {
        let (more, next) = page(page_token.clone()).await.map_err(api_error)?;
        items.extend(more);
        if !next_page(&mut page_token, next)? {
            return Ok(items);
        }
    }
}

/// Moves `current` to the next page's token; false on the last page.
fn next_page(current: &mut String, next: String) -> anyhow::Result<bool> {
    if next.is_empty() {
        return Ok(false);
    }
    if next == *current {
        bail!("the server returned the same page token twice; stopping to avoid a loop");
    }
    *current = next;
    Ok(true)
}

/// A listing as a JSON array, `empty` when there is nothing, or a table.
fn print_list<T>(
    json: bool,
    items: &[T],
    item_json: fn(&T) -> Value,
    empty: &str,
    table: fn(&[T]) -> String,
) -> anyhow::Result<()> {
    if json {
        emit(&output::json_text(&Value::Array(
            items.iter().map(item_json).collect(),
        )))
    } else if items.is_empty() {
        emit(empty)
    } else {
        emit(&table(items))
    }
}

/// The request id a create or rotation sends: the one given, else a new
/// one. The server checks its form.
fn request_id(given: Option<String>) -> String {
    given.unwrap_or_else(|| {
        vilvik_keys_domain::RequestId::generate()
            .as_str()
            .to_owned()
    })
}

/// The expiry asked for by `--expires-at` or `--expires-in`, if any.
fn expiry(
    at: Option<OffsetDateTime>,
    expires_in: Option<Duration>,
) -> anyhow::Result<Option<prost_types::Timestamp>> {
    let at = match (at, expires_in) {
        (Some(at), _) => at,
        (None, Some(after)) => time::Duration::try_from(after)
            .ok()
            .and_then(|after| OffsetDateTime::now_utc().checked_add(after))
            .context("--expires-in is too far in the future")?,
        (None, None) => return Ok(None),
    };
    Ok(Some(proto::timestamp(at)))
}

/// An UpdateKeyRequest whose field mask names exactly the flags given.
fn update_request(args: UpdateArgs) -> anyhow::Result<proto::UpdateKeyRequest> {
    let mut request = proto::UpdateKeyRequest {
        key_id: args.key_id,
        etag: args.etag.unwrap_or_default(),
        ..Default::default()
    };
    let mut paths = Vec::new();
    if let Some(name) = args.name {
        request.name = name;
        paths.push("name");
    }
    if let Some(description) = args.description {
        request.description = description;
        paths.push("description");
    }
    if !args.scopes.is_empty() || args.clear_scopes {
        request.scopes = args.scopes;
        paths.push("scopes");
    }
    if args.expires_at.is_some() || args.expires_in.is_some() || args.no_expiry {
        request.expires_at = expiry(args.expires_at, args.expires_in)?;
        paths.push("expires_at");
    }
    if paths.is_empty() {
        bail!(
            "nothing to update: give at least one of --name, --description, --scope, --clear-scopes, \
             --expires-at, --expires-in or --no-expiry"
        );
    }
    request.update_mask = Some(prost_types::FieldMask {
        paths: paths.into_iter().map(str::to_owned).collect(),
    });
    Ok(request)
}

fn print_key(json: bool, verb: Option<&str>, key: &proto::Key) -> anyhow::Result<()> {
    if json {
        return emit(&output::json_text(&output::key_json(key)));
    }
    let headline = verb
        .map(|verb| format!("{verb} key {}.\n\n", output::printable(&key.key_id)))
        .unwrap_or_default();
    emit(&format!("{headline}{}", output::key_block(key)))
}

/// After create and rotate: the key, then its secret (once), then the smoke
/// tests, curl's first.
fn print_new_secret(json: bool, verb: &str, issued: &NewSecret) -> anyhow::Result<()> {
    emit(&new_secret_text(json, verb, issued))
}

fn new_secret_text(json: bool, verb: &str, issued: &NewSecret) -> String {
    let NewSecret {
        key,
        secret,
        curl_smoke_test,
        grpcurl_smoke_test,
    } = issued;
    if json {
        return output::json_text(&serde_json::json!({
            "key": output::key_json(key),
            "secret": secret,
            "curl_smoke_test_command": curl_smoke_test,
            "smoke_test_command": grpcurl_smoke_test,
        }));
    }
    let old_secret = if verb == "Rotated" {
        " The previous secret has stopped working."
    } else {
        ""
    };
    let mut text = format!(
        "{verb} key {}.{old_secret}\n\n{}\n\
         Secret (shown once, store it now: it cannot be retrieved again):\n\n    {}\n\n",
        output::printable(&key.key_id),
        output::key_block(key),
        output::printable(secret),
    );
    if curl_smoke_test.is_empty() {
        text.push_str("Smoke test (checks the secret against the verify API):\n\n");
    } else {
        text.push_str(&format!(
            "Smoke test (run it from your terminal; it answers 200 with the key's details, \
             401 once the key is revoked):\n\n    {}\n\n\
             The same check over gRPC:\n\n",
            output::printable(curl_smoke_test),
        ));
    }
    text.push_str(&format!("    {}\n", output::printable(grpcurl_smoke_test)));
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update_args(key_id: &str) -> UpdateArgs {
        UpdateArgs {
            key_id: key_id.to_owned(),
            name: None,
            description: None,
            scopes: Vec::new(),
            clear_scopes: false,
            expires_at: None,
            expires_in: None,
            no_expiry: false,
            etag: None,
        }
    }

    #[test]
    fn update_mask_names_exactly_the_flags_given() {
        let request = update_request(UpdateArgs {
            scopes: vec!["a:read".into()],
            description: Some(String::new()),
            ..update_args("k1")
        })
        .unwrap();
        assert_eq!(
            request.update_mask.unwrap().paths,
            ["description", "scopes"]
        );
        assert_eq!(request.scopes, ["a:read"]);

        let request = update_request(UpdateArgs {
            clear_scopes: true,
            no_expiry: true,
            ..update_args("k1")
        })
        .unwrap();
        assert_eq!(request.update_mask.unwrap().paths, ["scopes", "expires_at"]);
        assert!(request.scopes.is_empty() && request.expires_at.is_none());

        let request = update_request(UpdateArgs {
            expires_in: Some(Duration::from_secs(3_600)),
            ..update_args("k1")
        })
        .unwrap();
        let at = request.expires_at.unwrap().seconds;
        let expected = OffsetDateTime::now_utc().unix_timestamp() + 3_600;
        assert!((at - expected).abs() <= 5, "{at} vs {expected}");

        let err = update_request(update_args("k1")).unwrap_err().to_string();
        assert!(err.contains("nothing to update"), "{err}");
    }

    fn issued(curl: &str) -> NewSecret {
        NewSecret {
            key: proto::Key {
                key_id: "key_1".into(),
                ..Default::default()
            },
            secret: "vlk_SECRET".into(),
            curl_smoke_test: curl.into(),
            grpcurl_smoke_test: "grpcurl GRPCURL".into(),
        }
    }

    #[test]
    fn a_new_secret_is_followed_by_the_curl_smoke_test_then_the_grpcurl_one() {
        let text = new_secret_text(false, "Created", &issued("curl CURL"));
        let at = |needle: &str| {
            text.find(needle)
                .unwrap_or_else(|| panic!("{needle}: {text}"))
        };
        let heading = at(
            "Smoke test (run it from your terminal; it answers 200 with the key's \
             details, 401 once the key is revoked):\n\n    curl CURL\n",
        );
        assert!(at("    vlk_SECRET\n") < heading, "{text}");
        assert!(heading < at("    grpcurl GRPCURL\n"), "{text}");

        let json: Value =
            serde_json::from_str(&new_secret_text(true, "Created", &issued("curl CURL"))).unwrap();
        assert_eq!(json["curl_smoke_test_command"], "curl CURL");
        assert_eq!(json["smoke_test_command"], "grpcurl GRPCURL");
        assert_eq!(json["secret"], "vlk_SECRET");
    }

    #[test]
    fn a_server_without_the_curl_smoke_test_gets_the_grpcurl_one_alone() {
        let text = new_secret_text(false, "Rotated", &issued(""));
        assert!(
            !text.contains("    curl") && !text.contains("401"),
            "{text}"
        );
        assert!(
            text.ends_with(
                "Smoke test (checks the secret against the verify API):\n\n    \
                 grpcurl GRPCURL\n"
            ),
            "{text}"
        );
    }
}
