//! The verify listener's HTTP face, over real sockets on both stores, over
//! HTTP/1.1 and HTTP/2: every status each route answers, with its exact
//! headers and body. (TLS: `tls.rs`; gateways: `gateway` tests; attacks:
//! `http1_attacks.rs`.)

use std::time::Duration;

use http::StatusCode;
use vilvik_keys::proto::{self, VerifyCode};
use vilvik_keys_domain::{Clock, GeneratedKey, Pepper};
use vilvik_keys_test_support::http::{Answer, HTTP_VERSIONS, HttpVersion, get, request, send};
use vilvik_keys_test_support::{TestApp, days_from, requests};

crate::on_both_backends!(
    a_key_asks_about_itself,
    a_missing_scope_is_403_naming_the_scopes,
    every_key_that_is_no_good_is_401_with_a_challenge,
    no_key_is_a_challenge_without_an_error,
    a_request_that_cannot_be_read_is_refused_naming_its_fault,
    authorize_answers_any_method_with_the_identity_headers,
    authorize_records_the_peer_when_no_proxy_is_trusted,
    json_verify_answers_every_verdict_with_200,
    json_verify_refuses_what_it_cannot_read,
    probes_and_unknown_paths_answer_beside_grpc,
);

mod behind_a_trusted_proxy {
    use super::*;

    fn trust_loopback(config: &mut vilvik_keys::config::Config) {
        config.trusted_proxies = vec!["127.0.0.1".parse().unwrap()];
    }

    crate::on_both_backends!(
        configured by trust_loopback:
        authorize_records_the_forwarded_client_as_last_used_from,
    );
}

/// How long a verify takes to show on GetKey (the harness flushes usage
/// every 100 ms).
const WRITTEN_WITHIN: Duration = Duration::from_secs(5);

const SELF: &str = "/v1/keys/self";
const AUTHORIZE: &str = "/v1/authorize";
const VERIFY: &str = "/v1/keys:verify";

/// A new key named `name` granting `scopes`: its id and secret.
async fn new_key(app: &mut TestApp, name: &str, scopes: &[&str]) -> (String, String) {
    let created = app.create_key(name, scopes).await.unwrap();
    (created.key.unwrap().key_id, created.secret)
}

fn bearer(secret: &str) -> String {
    format!("Bearer {secret}")
}

/// Checks what every answer about a key carries, and that it does not
/// echo `secret`.
fn assert_key_answer(answer: &Answer, status: StatusCode, secret: &str) {
    assert_eq!(answer.status, status, "{answer:?}");
    assert_eq!(answer.header("cache-control"), "no-store", "{answer:?}");
    assert!(!answer.body.contains(secret), "{answer:?}");
    for (_, value) in &answer.headers {
        assert!(!value.to_str().unwrap_or("").contains(secret), "{answer:?}");
    }
}

/// Checks a 401 or 403's challenge and body.
fn assert_refused(answer: &Answer, status: StatusCode, code: &str, message: &str, secret: &str) {
    assert_key_answer(answer, status, secret);
    assert_eq!(answer.header("content-type"), "application/json");
    assert_eq!(
        answer.json(),
        serde_json::json!({ "code": code, "message": message }),
        "{answer:?}"
    );
    let error = if status == StatusCode::FORBIDDEN {
        "insufficient_scope"
    } else {
        "invalid_token"
    };
    let challenge = answer.header("www-authenticate");
    let expected = format!(
        "Bearer realm=\"vilvik\", error=\"{error}\", error_description=\"{}\"",
        message.replace('…', "?")
    );
    assert!(challenge.starts_with(&expected), "{challenge}\n{expected}");
}

async fn a_key_asks_about_itself(mut app: TestApp) {
    let now = app.clock.now();
    let request_with_expiry = app.authed(proto::CreateKeyRequest {
        expires_at: Some(days_from(now, 30)),
        ..requests::create("ci-runner", &["datasets:read", "billing:read"])
    });
    let created = app
        .admin
        .create_key(request_with_expiry)
        .await
        .unwrap()
        .into_inner();
    let (key, secret) = (created.key.unwrap(), created.secret);
    let expected = serde_json::json!({
        "key_id": key.key_id,
        "account_id": key.account_id,
        "name": "ci-runner",
        "scopes": ["billing:read", "datasets:read"],
        "expires_at": vilvik_keys_domain::format_time(now + time::Duration::days(30)),
        "state": "ACTIVE",
    });
    for version in HTTP_VERSIONS {
        for header in [
            ("authorization", bearer(&secret)),
            ("x-api-key", secret.clone()),
        ] {
            let answer = send(
                app.verify_addr,
                version,
                get(SELF, &[(header.0, &header.1)]),
            )
            .await;
            assert_key_answer(&answer, StatusCode::OK, &secret);
            assert_eq!(answer.header("content-type"), "application/json");
            assert_eq!(answer.json(), expected, "{version:?} {}", header.0);
        }
        // The scopes it has, asked for, are no obstacle.
        let path = format!("{SELF}?scope=datasets:read&scope=billing%3Aread");
        let answer = send(
            app.verify_addr,
            version,
            get(&path, &[("authorization", &bearer(&secret))]),
        )
        .await;
        assert_key_answer(&answer, StatusCode::OK, &secret);
    }
}

async fn a_missing_scope_is_403_naming_the_scopes(mut app: TestApp) {
    let (_, secret) = new_key(&mut app, "reader", &["datasets:read"]).await;
    for version in HTTP_VERSIONS {
        let path = format!("{SELF}?scope=datasets:read&scope=datasets:write");
        let answer = send(
            app.verify_addr,
            version,
            get(&path, &[("authorization", &bearer(&secret))]),
        )
        .await;
        let message = "the key lacks the scope datasets:write that this request requires: grant it to the key, or use a key that has it";
        assert_refused(
            &answer,
            StatusCode::FORBIDDEN,
            "INSUFFICIENT_SCOPE",
            message,
            &secret,
        );
        assert_eq!(
            answer.header("www-authenticate"),
            format!(
                "Bearer realm=\"vilvik\", error=\"insufficient_scope\", error_description=\"{message}\", scope=\"datasets:read datasets:write\""
            )
        );
    }
}

async fn every_key_that_is_no_good_is_401_with_a_challenge(mut app: TestApp) {
    // Revoked.
    let (revoked_id, revoked) = new_key(&mut app, "revoked", &["datasets:read"]).await;
    app.revoke_key(&revoked_id).await.unwrap();
    // Rotated: the old secret.
    let (rotated_id, rotated) = new_key(&mut app, "rotated", &["datasets:read"]).await;
    let new_secret = app.rotate_key(&rotated_id).await.unwrap().secret;
    // Expired: made to expire tomorrow, then the clock moves two days on.
    let now = app.clock.now();
    let expiring = app.authed(proto::CreateKeyRequest {
        expires_at: Some(days_from(now, 1)),
        ..requests::create("expiring", &["datasets:read"])
    });
    let expired = app
        .admin
        .create_key(expiring)
        .await
        .unwrap()
        .into_inner()
        .secret;
    app.clock.advance(time::Duration::days(2));
    // Unknown, and mistyped.
    let unknown = GeneratedKey::generate(&Pepper::generate());
    let unknown = unknown.expose_secret().to_owned();
    let mut typo = new_secret.clone();
    typo.replace_range(20..21, if &new_secret[20..21] == "a" { "b" } else { "a" });

    let expiry = vilvik_keys_domain::format_time(now + time::Duration::days(1));
    let cases = [
        (
            &revoked,
            "REVOKED",
            "the key was revoked; revocation is final: create a new key".to_owned(),
        ),
        (
            &rotated,
            "ROTATED",
            "this secret was replaced when the key was rotated: use the new secret the rotation returned".to_owned(),
        ),
        (
            &expired,
            "EXPIRED",
            format!("the key expired at {expiry}: create a new key"),
        ),
        (
            &unknown,
            "NOT_FOUND",
            "no key has this secret: check that it was copied whole, or create a new key".to_owned(),
        ),
        (
            &typo,
            "MALFORMED",
            "this is not a valid key: the key's checksum does not match: it was mistyped or truncated; send the whole secret, as it was shown when the key was created".to_owned(),
        ),
    ];
    for version in HTTP_VERSIONS {
        for (secret, code, message) in &cases {
            for path in [SELF, AUTHORIZE] {
                let answer = send(
                    app.verify_addr,
                    version,
                    get(path, &[("authorization", &bearer(secret))]),
                )
                .await;
                assert_refused(&answer, StatusCode::UNAUTHORIZED, code, message, secret);
                assert_eq!(
                    answer.header("www-authenticate"),
                    format!(
                        "Bearer realm=\"vilvik\", error=\"invalid_token\", error_description=\"{message}\""
                    ),
                    "{version:?} {path}"
                );
            }
        }
        // The rotation's new secret works.
        let answer = send(
            app.verify_addr,
            version,
            get(SELF, &[("x-api-key", &new_secret)]),
        )
        .await;
        assert_key_answer(&answer, StatusCode::OK, &new_secret);
    }
}

async fn no_key_is_a_challenge_without_an_error(app: TestApp) {
    let message = "no key was sent: send one as Authorization: Bearer vlk_… or x-api-key: vlk_…";
    for version in HTTP_VERSIONS {
        for headers in [
            vec![],
            // Another scheme is not a key of ours.
            vec![("authorization", "Basic dXNlcjpwYXNz")],
            vec![("authorization", "Bearer "), ("x-api-key", "")],
        ] {
            for path in [SELF, AUTHORIZE] {
                let answer = send(app.verify_addr, version, get(path, &headers)).await;
                assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{answer:?}");
                assert_eq!(answer.header("www-authenticate"), "Bearer realm=\"vilvik\"");
                assert_eq!(
                    answer.json(),
                    serde_json::json!({ "code": "MISSING_KEY", "message": message })
                );
            }
        }
    }
}

async fn a_request_that_cannot_be_read_is_refused_naming_its_fault(mut app: TestApp) {
    let (_, secret) = new_key(&mut app, "reader", &["datasets:read"]).await;
    let other = GeneratedKey::generate(&Pepper::generate());
    let other = other.expose_secret();
    for version in HTTP_VERSIONS {
        let ambiguous = send(
            app.verify_addr,
            version,
            get(
                AUTHORIZE,
                &[("authorization", &bearer(&secret)), ("x-api-key", other)],
            ),
        )
        .await;
        assert_key_answer(&ambiguous, StatusCode::BAD_REQUEST, &secret);
        assert!(!ambiguous.body.contains(other));
        assert_eq!(
            ambiguous.json(),
            serde_json::json!({
                "code": "AMBIGUOUS_KEY",
                "message": "the request carries different keys in the authorization and x-api-key headers: send one key, in one of them",
            })
        );
        // The same key in both is one key.
        let same = send(
            app.verify_addr,
            version,
            get(
                AUTHORIZE,
                &[("authorization", &bearer(&secret)), ("x-api-key", &secret)],
            ),
        )
        .await;
        assert_eq!(same.status, StatusCode::OK, "{same:?}");

        let bad_scope = send(
            app.verify_addr,
            version,
            get(
                AUTHORIZE,
                &[
                    ("x-api-key", &secret),
                    ("x-vilvik-required-scopes", "datasets:read, not a scope"),
                ],
            ),
        )
        .await;
        assert_key_answer(&bad_scope, StatusCode::BAD_REQUEST, &secret);
        assert_eq!(bad_scope.json()["code"], "INVALID_SCOPE");
        let message = bad_scope.json()["message"].as_str().unwrap().to_owned();
        assert!(
            message.starts_with(
                "a required scope in x-vilvik-required-scopes is not valid: 'not a scope'"
            ),
            "{message}"
        );

        let long = "a".repeat(1000);
        let too_long = send(app.verify_addr, version, get(SELF, &[("x-api-key", &long)])).await;
        assert_eq!(too_long.status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
        assert_eq!(too_long.json()["code"], "KEY_TOO_LONG");
        assert!(!too_long.body.contains(&long));
    }
}

async fn authorize_answers_any_method_with_the_identity_headers(mut app: TestApp) {
    let (key_id, secret) =
        new_key(&mut app, "Zoë's runner", &["datasets:read", "billing:read"]).await;
    let account = app.get_key(&key_id).await.account_id;
    for version in HTTP_VERSIONS {
        for method in ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"] {
            let answer = send(
                app.verify_addr,
                version,
                request(
                    method,
                    &format!("{AUTHORIZE}?scope=billing:read"),
                    &[
                        ("x-api-key", &secret),
                        ("x-vilvik-required-scopes", "datasets:read"),
                    ],
                    "",
                ),
            )
            .await;
            assert_key_answer(&answer, StatusCode::OK, &secret);
            assert_eq!(answer.header("x-vilvik-key-id"), key_id, "{method}");
            assert_eq!(answer.header("x-vilvik-account-id"), account);
            // UTF-8 in a name is percent-encoded: a header value is ASCII.
            assert_eq!(answer.header("x-vilvik-key-name"), "Zo%C3%AB's runner");
            assert_eq!(
                answer.header("x-vilvik-scopes"),
                "billing:read,datasets:read"
            );
            assert_eq!(answer.body, "");
        }
        // A scope the route requires and the key lacks.
        let answer = send(
            app.verify_addr,
            version,
            get(
                AUTHORIZE,
                &[
                    ("authorization", &bearer(&secret)),
                    ("x-vilvik-required-scopes", "datasets:read,datasets:write"),
                ],
            ),
        )
        .await;
        assert_eq!(answer.status, StatusCode::FORBIDDEN);
        assert!(
            answer
                .header("www-authenticate")
                .ends_with("scope=\"datasets:read datasets:write\""),
            "{answer:?}"
        );
        assert_eq!(answer.header("x-vilvik-key-id"), "");
    }
}

async fn authorize_records_the_peer_when_no_proxy_is_trusted(mut app: TestApp) {
    let (key_id, secret) = new_key(&mut app, "gateway", &["datasets:read"]).await;
    let answer = send(
        app.verify_addr,
        HttpVersion::Http1,
        get(
            AUTHORIZE,
            &[("x-api-key", &secret), ("x-forwarded-for", "198.51.100.23")],
        ),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    app.wait_for_key(&key_id, WRITTEN_WITHIN, "the use is written", |key| {
        key.valid_use_count == 1
    })
    .await;
    let key = app.get_key(&key_id).await;
    assert_eq!(key.last_used_observed_ip, "127.0.0.1");
    assert_eq!(key.last_used_claimed_ip, "");
}

async fn authorize_records_the_forwarded_client_as_last_used_from(mut app: TestApp) {
    let (key_id, secret) = new_key(&mut app, "gateway", &["datasets:read"]).await;
    let answer = send(
        app.verify_addr,
        HttpVersion::Http1,
        get(
            AUTHORIZE,
            &[
                ("x-api-key", &secret),
                ("x-forwarded-for", "203.0.113.9, 198.51.100.23"),
            ],
        ),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    app.wait_for_key(&key_id, WRITTEN_WITHIN, "the use is written", |key| {
        key.valid_use_count == 1
    })
    .await;
    let key = app.get_key(&key_id).await;
    // The rightmost hop the trusted gateway appended, never the gateway.
    assert_eq!(key.last_used_observed_ip, "198.51.100.23");
    assert_eq!(key.last_used_ip, "198.51.100.23");
}

fn json_post(body: &str) -> http::Request<String> {
    request(
        "POST",
        VERIFY,
        &[("content-type", "application/json; charset=utf-8")],
        body,
    )
}

async fn json_verify_answers_every_verdict_with_200(mut app: TestApp) {
    let (key_id, secret) = new_key(&mut app, "backend", &["datasets:read"]).await;
    let account = app.get_key(&key_id).await.account_id;
    let (revoked_id, revoked) = new_key(&mut app, "revoked", &["datasets:read"]).await;
    app.revoke_key(&revoked_id).await.unwrap();
    for version in HTTP_VERSIONS {
        // The proto field names and the JSON names are both accepted.
        for body in [
            format!(r#"{{"key":"{secret}","required_scopes":["datasets:read"]}}"#),
            format!(r#"{{"key":"{secret}","requiredScopes":["datasets:read"],"clientIp":null}}"#),
        ] {
            let answer = send(app.verify_addr, version, json_post(&body)).await;
            assert_key_answer(&answer, StatusCode::OK, &secret);
            assert_eq!(
                answer.json(),
                serde_json::json!({
                    "valid": true,
                    "code": "VERIFY_CODE_VALID",
                    "keyId": key_id,
                    "accountId": account,
                    "name": "backend",
                    "scopes": ["datasets:read"],
                })
            );
        }
        let body = format!(r#"{{"key":"{secret}","requiredScopes":["datasets:write"]}}"#);
        let answer = send(app.verify_addr, version, json_post(&body)).await;
        assert_eq!(answer.status, StatusCode::OK);
        let json = answer.json();
        assert_eq!(json["valid"], false);
        assert_eq!(json["code"], "VERIFY_CODE_INSUFFICIENT_SCOPE");
        assert_eq!(json["missingScopes"], serde_json::json!(["datasets:write"]));

        let body = format!(r#"{{"key":"{revoked}"}}"#);
        let answer = send(app.verify_addr, version, json_post(&body)).await;
        assert_key_answer(&answer, StatusCode::OK, &revoked);
        assert_eq!(answer.json()["valid"], false);
        assert_eq!(answer.json()["code"], "VERIFY_CODE_REVOKED");
        assert_eq!(answer.json()["keyId"], revoked_id);

        let answer = send(app.verify_addr, version, json_post(r#"{"key":"nope"}"#)).await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(
            answer.json(),
            serde_json::json!({ "valid": false, "code": "VERIFY_CODE_MALFORMED" })
        );
    }
    // What the backend claims is recorded beside what the listener saw
    // (a later use: uses at the same instant keep the first).
    app.clock.advance(time::Duration::seconds(5));
    let body = format!(r#"{{"key":"{secret}","clientIp":"203.0.113.66"}}"#);
    let answer = send(app.verify_addr, HttpVersion::Http1, json_post(&body)).await;
    assert_eq!(answer.json()["code"], "VERIFY_CODE_VALID");
    app.wait_for_key(&key_id, WRITTEN_WITHIN, "the claimed address", |key| {
        key.last_used_claimed_ip == "203.0.113.66"
    })
    .await;
    assert_eq!(
        app.get_key(&key_id).await.last_used_observed_ip,
        "127.0.0.1"
    );
    // The same verdicts as over gRPC.
    assert_eq!(app.verify_code(&secret, &[]).await, VerifyCode::Valid);
}

async fn json_verify_refuses_what_it_cannot_read(mut app: TestApp) {
    let (_, secret) = new_key(&mut app, "backend", &["datasets:read"]).await;
    let invalid = |field: &str, message: &str| serde_json::json!({ "code": "INVALID_ARGUMENT", "field": field, "message": message });
    let cases = [
        (
            format!(r#"{{"key":"{secret}","requiredScopes":["datasets:read","no"]}}"#),
            invalid(
                "requiredScopes[1]",
                "'no' is not a valid scope: use lowercase resource:action",
            ),
        ),
        (
            format!(r#"{{"key":"{secret}","required_scopes":[],"requiredScopes":[]}}"#),
            invalid(
                "requiredScopes",
                "the field is given twice, as requiredScopes and required_scopes: give it once",
            ),
        ),
        (
            format!(r#"{{"key":"{secret}","scopes":["datasets:read"]}}"#),
            invalid(
                "scopes",
                "unknown field 'scopes': a VerifyKeyRequest has key, requiredScopes and clientIp",
            ),
        ),
        (
            format!(r#"{{"key":"{secret}","clientIp":"localhost"}}"#),
            invalid("clientIp", "'localhost' is not an IPv4 or IPv6 address"),
        ),
        (
            r#"{"key":5}"#.to_owned(),
            invalid("key", "must be a string"),
        ),
        (
            format!(r#"{{"key":"{secret}","requiredScopes":"datasets:read"}}"#),
            invalid(
                "requiredScopes",
                "must be an array of strings, such as [\"datasets:read\"]",
            ),
        ),
    ];
    for version in HTTP_VERSIONS {
        for (body, expected) in &cases {
            let answer = send(app.verify_addr, version, json_post(body)).await;
            assert_key_answer(&answer, StatusCode::BAD_REQUEST, &secret);
            let got = answer.json();
            // The scope parser's own words may follow a fixed start.
            let message = got["message"].as_str().unwrap_or_default();
            assert!(
                message.starts_with(expected["message"].as_str().unwrap()),
                "{body}: {answer:?}"
            );
            assert_eq!(
                answer.json()["field"],
                expected["field"],
                "{body}: {answer:?}"
            );
            assert_eq!(answer.json()["code"], "INVALID_ARGUMENT");
        }
        let not_json = send(app.verify_addr, version, json_post("{\"key\":")).await;
        assert_eq!(not_json.status, StatusCode::BAD_REQUEST);
        assert!(
            not_json.json()["message"]
                .as_str()
                .unwrap()
                .starts_with("the body is not JSON: EOF while parsing"),
            "{not_json:?}"
        );
        for not_object in ["[]", "[\"vlk_x\"]", "\"vlk_x\"", "null"] {
            let answer = send(app.verify_addr, version, json_post(not_object)).await;
            assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{not_object}");
            assert!(
                answer.json()["message"]
                    .as_str()
                    .unwrap()
                    .starts_with("the body must be a JSON object"),
                "{answer:?}"
            );
        }

        let body = format!(r#"{{"key":"{secret}"}}"#);
        for content_type in [
            None,
            Some("text/plain"),
            Some("application/x-www-form-urlencoded"),
        ] {
            let headers: Vec<(&str, &str)> = content_type
                .map(|t| ("content-type", t))
                .into_iter()
                .collect();
            let answer = send(
                app.verify_addr,
                version,
                request("POST", VERIFY, &headers, &body),
            )
            .await;
            assert_key_answer(&answer, StatusCode::UNSUPPORTED_MEDIA_TYPE, &secret);
            assert_eq!(
                answer.json(),
                serde_json::json!({
                    "code": "UNSUPPORTED_MEDIA_TYPE",
                    "message": "send the request as JSON, with Content-Type: application/json",
                })
            );
        }
        let huge = format!(
            r#"{{"key":"{secret}","clientIp":"{}"}}"#,
            " ".repeat(70_000)
        );
        let answer = send(app.verify_addr, version, json_post(&huge)).await;
        assert_eq!(answer.status, StatusCode::PAYLOAD_TOO_LARGE, "{answer:?}");
        assert!(!answer.body.contains(&secret));

        let wrong_method = send(app.verify_addr, version, get(VERIFY, &[])).await;
        assert_eq!(wrong_method.status, StatusCode::METHOD_NOT_ALLOWED);
    }
}

async fn probes_and_unknown_paths_answer_beside_grpc(mut app: TestApp) {
    for version in HTTP_VERSIONS {
        let alive = send(app.verify_addr, version, get("/healthz", &[])).await;
        assert_eq!(alive.status, StatusCode::OK);
        assert_eq!(alive.json(), serde_json::json!({ "status": "alive" }));
        let ready = send(app.verify_addr, version, get("/readyz", &[])).await;
        assert_eq!(ready.status, StatusCode::OK);
        assert_eq!(ready.json(), serde_json::json!({ "status": "ready" }));
        let unknown = send(app.verify_addr, version, get("/v1/keys", &[])).await;
        assert_eq!(unknown.status, StatusCode::NOT_FOUND);
        assert_eq!(
            unknown.json(),
            serde_json::json!({
                "code": "NOT_FOUND",
                "message": "no route serves /v1/keys: see docs/INTEGRATIONS.md",
            })
        );
    }
    // A gRPC content type on a path no service has is still no call: a
    // 404 (which a gRPC client reads as UNIMPLEMENTED), never a gRPC
    // status, which is HTTP 200.
    for version in HTTP_VERSIONS {
        let answer = send(
            app.verify_addr,
            version,
            request(
                "POST",
                "/nope.Service/Method",
                &[("content-type", "application/grpc")],
                "",
            ),
        )
        .await;
        assert_eq!(answer.status, StatusCode::NOT_FOUND, "{answer:?}");
        assert_eq!(answer.header("grpc-status"), "");
    }
    // gRPC on the same port is as it was.
    let (_, secret) = new_key(&mut app, "grpc", &["datasets:read"]).await;
    assert_eq!(
        app.verify_code(&secret, &["datasets:read"]).await,
        VerifyCode::Valid
    );
}

/// The database refuses connections: once the lease on memory has run
/// out, this node cannot vouch for any key, and says so with 503 and
/// `Retry-After`; `/readyz` agrees; both recover without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_is_503_with_retry_after_until_the_database_is_back() {
    let Some(mut app) = vilvik_keys_test_support::spawn_app_with(
        vilvik_keys_test_support::Backend::Postgres,
        |config| config.staleness_bound = Duration::from_millis(500),
    )
    .await
    else {
        return;
    };
    let (_, secret) = new_key(&mut app, "backend", &["datasets:read"]).await;
    let database = {
        use secrecy::ExposeSecret;
        let url = app.config.database_url.as_ref().unwrap().expose_secret();
        let config: tokio_postgres::Config = url.parse().unwrap();
        config.get_dbname().unwrap().to_owned()
    };
    let addr = app.verify_addr;
    let key_self = || get(SELF, &[("x-api-key", &secret)]);
    assert_eq!(
        send(addr, HttpVersion::Http1, key_self()).await.status,
        StatusCode::OK
    );

    vilvik_keys_test_db::allow_connections(&database, false).await;
    // The lease is kept on the service's clock, which only the test moves.
    let clock = app.clock.clone();
    vilvik_keys_test_support::eventually(
        Duration::from_secs(15),
        "the lease runs out and the key cannot be vouched for",
        || async {
            clock.advance(time::Duration::seconds(1));
            send(addr, HttpVersion::Http1, key_self()).await.status
                == StatusCode::SERVICE_UNAVAILABLE
        },
    )
    .await;
    let body = format!(r#"{{"key":"{secret}"}}"#);
    for version in HTTP_VERSIONS {
        for answer in [
            send(addr, version, key_self()).await,
            send(addr, version, get(AUTHORIZE, &[("x-api-key", &secret)])).await,
            send(addr, version, json_post(&body)).await,
            send(addr, version, get("/readyz", &[])).await,
        ] {
            assert_key_answer(&answer, StatusCode::SERVICE_UNAVAILABLE, &secret);
            assert_eq!(answer.header("retry-after"), "1", "{answer:?}");
            assert_eq!(answer.header("www-authenticate"), "", "{answer:?}");
            let json = answer.json();
            assert_eq!(json["code"], "UNAVAILABLE");
            let message = json["message"].as_str().unwrap();
            assert!(
                message.starts_with("this node cannot vouch for the key now: ")
                    && message.ends_with("; retry shortly"),
                "{message}"
            );
        }
        // The process is alive all the same.
        let alive = send(addr, version, get("/healthz", &[])).await;
        assert_eq!(alive.status, StatusCode::OK);
    }

    vilvik_keys_test_db::allow_connections(&database, true).await;
    vilvik_keys_test_support::eventually(
        Duration::from_secs(15),
        "the node answers again, with no restart",
        || async { send(addr, HttpVersion::Http1, key_self()).await.status == StatusCode::OK },
    )
    .await;
    let ready = send(addr, HttpVersion::Http2, get("/readyz", &[])).await;
    assert_eq!(ready.status, StatusCode::OK);
}
