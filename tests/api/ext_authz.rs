//! Envoy's ext_authz check (`envoy.service.auth.v3.Authorization/Check`) on
//! the verify listener, asked as Envoy asks it: a `CheckRequest` shaped as
//! Envoy's HTTP filter builds one for a curl request (Envoy itself is not
//! run here), answered as Envoy reads an answer: the status, and the
//! headers and body Envoy passes upstream or sends to the client.

use std::collections::HashMap;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::address::Address as AddressKind;
use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
use envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier;
use envoy_types::pb::envoy::config::core::v3::{
    Address, HeaderMap, HeaderValue, HeaderValueOption, Metadata, SocketAddress,
};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Peer, Request};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{
    AttributeContext, CheckRequest, CheckResponse, DeniedHttpResponse, OkHttpResponse,
};
use envoy_types::pb::google::protobuf::Timestamp;
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use vilvik_keys::http_face::answer;
use vilvik_keys_test_db::allow_connections;
use vilvik_keys_test_support::{Backend, TestApp, eventually, spawn_app_with};

crate::on_both_backends!(
    a_valid_key_passes_with_its_identity_and_no_forged_header,
    a_key_without_the_routes_scope_is_forbidden_naming_it,
    garbage_revoked_and_rotated_keys_are_unauthorized,
    a_request_without_a_key_is_challenged,
    two_different_keys_are_a_bad_request,
    raw_headers_are_read_as_the_header_map_is,
    an_untrusted_caller_is_the_observed_address,
);

mod behind_a_trusted_proxy {
    use super::*;

    fn trust_loopback(config: &mut vilvik_keys::config::Config) {
        config.trusted_proxies = vec!["127.0.0.1".parse().unwrap()];
    }

    crate::on_both_backends!(
        configured by trust_loopback:
        envoys_downstream_peer_is_the_observed_address,
    );
}

/// The address Envoy saw the request come from.
const CLIENT: &str = "203.0.113.7";

/// How long a use takes to show on GetKey (the harness flushes usage every
/// 100 ms).
const WRITTEN_WITHIN: Duration = Duration::from_secs(5);

/// A client of the verify listener's Authorization service, as Envoy's
/// `envoy_grpc` cluster is.
async fn envoy(app: &TestApp) -> AuthorizationClient<Channel> {
    AuthorizationClient::new(vilvik_keys_test_support::channel(app.verify_addr).await)
}

/// The CheckRequest Envoy's ext_authz filter sends for `curl -H ...
/// http://api.example.com:10000/v1/datasets?page=2` from [`CLIENT`], with
/// `headers` added to curl's own, on a route whose `context_extensions`
/// require `scopes` (none when `None`).
fn check_request(headers: &[(&str, &str)], scopes: Option<&str>) -> CheckRequest {
    let id = "9d1c3a7e-3f2b-4c55-9a0e-5b7f1e2d8c44";
    let mut sent: HashMap<String, String> = [
        (":authority", "api.example.com:10000"),
        (":path", "/v1/datasets?page=2"),
        (":method", "GET"),
        (":scheme", "http"),
        ("user-agent", "curl/8.5.0"),
        ("accept", "*/*"),
        ("x-forwarded-proto", "http"),
        ("x-request-id", id),
    ]
    .into_iter()
    .map(|(name, value)| (name.to_owned(), value.to_owned()))
    .collect();
    for (name, value) in headers {
        // Envoy lower-cases names and joins repeated headers with commas.
        sent.entry(name.to_ascii_lowercase())
            .and_modify(|joined| {
                joined.push(',');
                joined.push_str(value);
            })
            .or_insert_with(|| (*value).to_owned());
    }
    let context_extensions = scopes
        .map(|s| HashMap::from([("vilvik_required_scopes".to_owned(), s.to_owned())]))
        .unwrap_or_default();
    CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(peer(CLIENT, 51234)),
            destination: Some(peer("127.0.0.1", 10000)),
            request: Some(Request {
                time: Some(Timestamp {
                    seconds: 1_767_225_600,
                    nanos: 0,
                }),
                http: Some(HttpRequest {
                    id: id.to_owned(),
                    method: "GET".to_owned(),
                    headers: sent,
                    path: "/v1/datasets?page=2".to_owned(),
                    host: "api.example.com:10000".to_owned(),
                    scheme: "http".to_owned(),
                    protocol: "HTTP/1.1".to_owned(),
                    size: 0,
                    ..Default::default()
                }),
            }),
            context_extensions,
            metadata_context: Some(Metadata::default()),
            ..Default::default()
        }),
    }
}

fn peer(ip: &str, port: u32) -> Peer {
    Peer {
        address: Some(Address {
            address: Some(AddressKind::SocketAddress(SocketAddress {
                address: ip.to_owned(),
                port_specifier: Some(PortSpecifier::PortValue(port)),
                ..Default::default()
            })),
        }),
        ..Default::default()
    }
}

/// Asks `envoy` to check `request`; panics unless the call succeeds.
async fn check(envoy: &mut AuthorizationClient<Channel>, request: CheckRequest) -> CheckResponse {
    envoy.check(request).await.expect("Check").into_inner()
}

/// The check's own status code.
fn code(answer: &CheckResponse) -> Code {
    Code::from(answer.status.as_ref().expect("a status").code)
}

fn passes(answer: &CheckResponse) -> &OkHttpResponse {
    assert_eq!(code(answer), Code::Ok, "{answer:?}");
    match &answer.http_response {
        Some(HttpResponse::OkResponse(ok)) => ok,
        other => panic!("not an OK response: {other:?}"),
    }
}

/// The denied response: its HTTP status, and the check's own code.
fn refusal(answer: &CheckResponse, status: u16, grpc: Code) -> &DeniedHttpResponse {
    assert_eq!(code(answer), grpc, "{answer:?}");
    let Some(HttpResponse::DeniedResponse(denied)) = &answer.http_response else {
        panic!("not a denied response: {answer:?}");
    };
    assert_eq!(
        denied.status.as_ref().expect("an HTTP status").code,
        i32::from(status),
        "{denied:?}"
    );
    assert_eq!(
        header(&denied.headers, "content-type"),
        Some("application/json")
    );
    assert_eq!(header(&denied.headers, "cache-control"), Some("no-store"));
    denied
}

/// The value of the header `name` among `headers`, which each must be set
/// over any of the same name (Envoy would otherwise append).
fn header<'a>(headers: &'a [HeaderValueOption], name: &str) -> Option<&'a str> {
    let found = headers
        .iter()
        .find(|h| h.header.as_ref().is_some_and(|h| h.key == name))?;
    assert_eq!(
        found.append_action,
        HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        "{found:?}"
    );
    Some(found.header.as_ref().unwrap().value.as_str())
}

/// The JSON body's code and message.
fn body(denied: &DeniedHttpResponse) -> (String, String) {
    let body: serde_json::Value = serde_json::from_str(&denied.body).expect("a JSON body");
    (
        body["code"].as_str().expect("a code").to_owned(),
        body["message"].as_str().expect("a message").to_owned(),
    )
}

/// A new key granting `datasets:read`: its id and secret.
async fn new_key(app: &mut TestApp, name: &str) -> (String, String) {
    let created = app.create_key(name, &["datasets:read"]).await.unwrap();
    (created.key.unwrap().key_id, created.secret)
}

async fn a_valid_key_passes_with_its_identity_and_no_forged_header(mut app: TestApp) {
    let (key_id, secret) = new_key(&mut app, "ci runner é").await;
    let mut envoy = envoy(&app).await;
    // The client tries to pass as another key, and slips in a header of
    // ours that we never set.
    let request = check_request(
        &[
            ("authorization", &format!("Bearer {secret}")),
            ("X-Vilvik-Key-Id", "key_forged"),
            ("x-vilvik-role", "admin"),
        ],
        Some("datasets:read"),
    );
    let answer = check(&mut envoy, request).await;
    let ok = passes(&answer);

    assert_eq!(ok.headers.len(), 4, "{ok:?}");
    assert_eq!(
        header(&ok.headers, "x-vilvik-key-id"),
        Some(key_id.as_str())
    );
    assert_eq!(header(&ok.headers, "x-vilvik-account-id"), Some("ACME"));
    assert_eq!(
        header(&ok.headers, "x-vilvik-key-name"),
        Some("ci runner %C3%A9")
    );
    assert_eq!(
        header(&ok.headers, "x-vilvik-scopes"),
        Some("datasets:read")
    );
    // The forged key id is overwritten by the header set above; listing it
    // for removal too would remove ours, as Envoy removes after it sets.
    assert_eq!(ok.headers_to_remove, ["x-vilvik-role"]);
    assert!(ok.query_parameters_to_set.is_empty() && ok.response_headers_to_add.is_empty());

    // The same key with no scope required, and in x-api-key.
    let request = check_request(&[("x-api-key", &secret)], None);
    let ok = check(&mut envoy, request).await;
    assert!(passes(&ok).headers_to_remove.is_empty());

    // Health reports the service as Envoy's cluster health check asks.
    let health = HealthClient::new(vilvik_keys_test_support::channel(app.verify_addr).await)
        .check(HealthCheckRequest {
            service: "envoy.service.auth.v3.Authorization".into(),
        })
        .await
        .expect("Health/Check")
        .into_inner();
    assert_eq!(health.status(), ServingStatus::Serving);
}

async fn a_key_without_the_routes_scope_is_forbidden_naming_it(mut app: TestApp) {
    let (_, secret) = new_key(&mut app, "reader").await;
    let mut envoy = envoy(&app).await;
    let request = check_request(
        &[("authorization", &format!("Bearer {secret}"))],
        Some("datasets:read, datasets:write"),
    );
    let answer = check(&mut envoy, request).await;
    let denied = refusal(&answer, 403, Code::PermissionDenied);
    let challenge = header(&denied.headers, "www-authenticate").expect("a challenge");
    assert!(
        challenge.starts_with("Bearer realm=\"vilvik\", "),
        "{challenge}"
    );
    assert!(
        challenge.contains("error=\"insufficient_scope\""),
        "{challenge}"
    );
    assert!(
        challenge.contains("scope=\"datasets:read datasets:write\""),
        "{challenge}"
    );
    let (code, message) = body(denied);
    assert_eq!(code, "INSUFFICIENT_SCOPE");
    assert!(message.contains("datasets:write"), "{message}");
    assert_eq!(answer.status.as_ref().unwrap().message, message);
    assert!(!denied.body.contains(&secret[13..]));

    // A scope in the route's list that is not a scope is the route's
    // mistake, named, before any key is judged.
    let request = check_request(
        &[("authorization", &format!("Bearer {secret}"))],
        Some("Datasets:Read"),
    );
    let answer = check(&mut envoy, request).await;
    let (code, message) = body(refusal(&answer, 400, Code::InvalidArgument));
    assert_eq!(code, "INVALID_SCOPE");
    assert!(message.contains("vilvik_required_scopes"), "{message}");
}

async fn garbage_revoked_and_rotated_keys_are_unauthorized(mut app: TestApp) {
    let (revoked_id, revoked) = new_key(&mut app, "revoked").await;
    app.revoke_key(&revoked_id).await.unwrap();
    let (rotated_id, rotated) = new_key(&mut app, "rotated").await;
    app.rotate_key(&rotated_id).await.unwrap();
    let mut envoy = envoy(&app).await;

    for (presented, expected) in [
        ("not-a-key", "MALFORMED"),
        (revoked.as_str(), "REVOKED"),
        (rotated.as_str(), "ROTATED"),
    ] {
        let request = check_request(
            &[("authorization", &format!("Bearer {presented}"))],
            Some("datasets:read"),
        );
        let answer = check(&mut envoy, request).await;
        let denied = refusal(&answer, 401, Code::Unauthenticated);
        let challenge = header(&denied.headers, "www-authenticate").expect("a challenge");
        assert!(
            challenge.starts_with(
                "Bearer realm=\"vilvik\", error=\"invalid_token\", error_description=\""
            ),
            "{challenge}"
        );
        let (code, message) = body(denied);
        assert_eq!(code, expected);
        assert!(!message.contains(presented), "{message}");
    }
}

async fn a_request_without_a_key_is_challenged(app: TestApp) {
    let mut envoy = envoy(&app).await;
    // Another scheme is no key of ours.
    for headers in [vec![], vec![("authorization", "Basic dXNlcjpwYXNz")]] {
        let answer = check(&mut envoy, check_request(&headers, Some("datasets:read"))).await;
        let denied = refusal(&answer, 401, Code::Unauthenticated);
        assert_eq!(
            header(&denied.headers, "www-authenticate"),
            Some("Bearer realm=\"vilvik\"")
        );
        // The HTTP face's answer, word for word.
        let expected = answer::missing_key(&app.config.http_key_headers);
        assert_eq!(denied.body, expected.body());
        assert_eq!(body(denied).0, "MISSING_KEY");
    }
}

async fn two_different_keys_are_a_bad_request(mut app: TestApp) {
    let (_, first) = new_key(&mut app, "first").await;
    let (_, second) = new_key(&mut app, "second").await;
    let mut envoy = envoy(&app).await;

    let bearer = format!("Bearer {first}");
    let in_two_headers = check_request(&[("authorization", &bearer), ("x-api-key", &second)], None);
    // Sent twice in one header: Envoy's map joins them with a comma.
    let twice = check_request(&[("x-api-key", &first), ("x-api-key", &second)], None);
    for request in [in_two_headers, twice] {
        let answer = check(&mut envoy, request).await;
        let denied = refusal(&answer, 400, Code::InvalidArgument);
        assert_eq!(header(&denied.headers, "www-authenticate"), None);
        let (code, message) = body(denied);
        assert_eq!(code, "AMBIGUOUS_KEY");
        assert!(
            message.ends_with("send one key") || message.contains("send one key, in one of them")
        );
        assert!(!denied.body.contains(&first[13..]) && !denied.body.contains(&second[13..]));
    }

    // The same key twice is one key.
    let same = check_request(&[("x-api-key", &first), ("authorization", &bearer)], None);
    passes(&check(&mut envoy, same).await);
}

async fn raw_headers_are_read_as_the_header_map_is(mut app: TestApp) {
    let (key_id, secret) = new_key(&mut app, "raw").await;
    let mut envoy = envoy(&app).await;
    // With `encode_raw_headers`, Envoy sends `header_map` (repeated headers
    // apart, values as bytes) instead of `headers`.
    let raw = |pairs: &[(&str, &str)]| {
        let mut request = check_request(&[], Some("datasets:read"));
        let http = request
            .attributes
            .as_mut()
            .and_then(|a| a.request.as_mut())
            .and_then(|r| r.http.as_mut())
            .unwrap();
        let mut headers: Vec<HeaderValue> = std::mem::take(&mut http.headers)
            .into_iter()
            .chain(
                pairs
                    .iter()
                    .map(|(n, v)| ((*n).to_owned(), (*v).to_owned())),
            )
            .map(|(key, value)| HeaderValue {
                key,
                raw_value: value.into_bytes(),
                ..Default::default()
            })
            .collect();
        headers.sort_by(|a, b| a.key.cmp(&b.key));
        http.header_map = Some(HeaderMap { headers });
        request
    };

    let answer = check(
        &mut envoy,
        raw(&[("x-api-key", &secret), ("x-vilvik-key-id", "key_forged")]),
    )
    .await;
    let ok = passes(&answer);
    assert_eq!(
        header(&ok.headers, "x-vilvik-key-id"),
        Some(key_id.as_str())
    );
    assert!(ok.headers_to_remove.is_empty(), "{ok:?}");

    let answer = check(
        &mut envoy,
        raw(&[("x-api-key", &secret), ("x-api-key", "vlk_other")]),
    )
    .await;
    assert_eq!(
        body(refusal(&answer, 400, Code::InvalidArgument)).0,
        "AMBIGUOUS_KEY"
    );
}

async fn an_untrusted_caller_is_the_observed_address(mut app: TestApp) {
    let (key_id, secret) = new_key(&mut app, "untrusted").await;
    let mut envoy = envoy(&app).await;
    let request = check_request(&[("x-api-key", &secret)], Some("datasets:read"));
    passes(&check(&mut envoy, request).await);
    app.wait_for_key(&key_id, WRITTEN_WITHIN, "the use is written", |key| {
        key.valid_use_count == 1
    })
    .await;
    let key = app.get_key(&key_id).await;
    assert_eq!(key.last_used_observed_ip, "127.0.0.1");
    // What an untrusted Envoy says of its client is only its claim.
    assert_eq!(key.last_used_claimed_ip, CLIENT);
}

async fn envoys_downstream_peer_is_the_observed_address(mut app: TestApp) {
    let (key_id, secret) = new_key(&mut app, "trusted").await;
    let mut envoy = envoy(&app).await;
    let request = check_request(&[("x-api-key", &secret)], Some("datasets:read"));
    passes(&check(&mut envoy, request).await);
    app.wait_for_key(&key_id, WRITTEN_WITHIN, "the use is written", |key| {
        key.valid_use_count == 1
    })
    .await;
    let key = app.get_key(&key_id).await;
    assert_eq!(key.last_used_observed_ip, CLIENT);
    assert_eq!(key.last_used_claimed_ip, "");

    // A refusal is noted from the same address.
    let request = check_request(&[("x-api-key", &secret)], Some("datasets:write"));
    refusal(
        &check(&mut envoy, request).await,
        403,
        Code::PermissionDenied,
    );
    app.wait_for_key(&key_id, WRITTEN_WITHIN, "the refusal is written", |key| {
        key.rejected_use_count == 1
    })
    .await;
    assert_eq!(app.get_key(&key_id).await.last_rejected_ip, CLIENT);
}

/// When this node cannot vouch for a key (the store is down, the key is
/// not in memory, and memory's lease has expired), the check fails
/// UNAVAILABLE, which Envoy answers with `status_on_error`; once the store
/// is back the same key passes, with no restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_is_unavailable_then_recovers() {
    let Some(mut app) = spawn_app_with(Backend::Postgres, |config| {
        config.staleness_bound = Duration::from_secs(2);
    })
    .await
    else {
        return;
    };
    // Created, never verified: not in this node's memory.
    let (_, secret) = new_key(&mut app, "during-outage").await;
    let mut envoy = envoy(&app).await;
    let database = crate::outage::database_name(&app);

    allow_connections(&database, false).await;
    // Past the staleness bound, memory's lease (no longer renewed) expired.
    app.clock.advance(time::Duration::seconds(3));
    let request = || check_request(&[("x-api-key", &secret)], Some("datasets:read"));
    let status = envoy
        .check(request())
        .await
        .expect_err("no answer without the store");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status
            .message()
            .starts_with("the key store is unavailable: "),
        "{status:?}"
    );
    assert!(!status.message().contains(&secret[13..]));

    allow_connections(&database, true).await;
    eventually(
        Duration::from_secs(10),
        "the check answers again, with no restart",
        || {
            let mut envoy = envoy.clone();
            let request = request();
            async move {
                envoy
                    .check(request)
                    .await
                    .is_ok_and(|answer| code(answer.get_ref()) == Code::Ok)
            }
        },
    )
    .await;
}
