//! The secret canary: the whole tour, run against a real
//! `vilvik-keys serve` process logging at `RUST_LOG=trace`, plus the
//! mistakes a user makes with secrets (pasting one into the wrong field,
//! using a rotated or revoked one), and the printed curl smoke tests, which
//! send the secret in an HTTP header. Then every log line, every response
//! other than the one that created a secret, every error message, every
//! audit event and the SQLite files are searched for every secret, for the
//! part of it after its public prefix, and for the operator token: none
//! may appear anywhere.

use std::path::Path;
use std::time::Duration;

use tonic::{Request, Status};
use vilvik_keys::proto::key_admin_client::KeyAdminClient;
use vilvik_keys::proto::key_verify_client::KeyVerifyClient;
use vilvik_keys::proto::{
    CreateKeyRequest, GetAccountRequest, ListAuditEventsRequest, ListKeysRequest, RevokeKeyRequest,
    RotateKeyRequest, SetAccountTierRequest, Tier, UpdateKeyRequest, VerifyKeyRequest,
};
use vilvik_keys_test_support::requests::{create, get, mask, verify};
use vilvik_keys_test_support::{ServedBinary, StoreSettings, bearer, binary, channel, eventually};

/// The canary's own operator token, with a `Z` to mistype.
const OPERATOR_TOKEN: &str = "canary-operator-token-Zq81Lw0Xc4Hs9Tb2Vn";

/// Everything the service said, to be searched at the end.
#[derive(Default)]
struct Transcript {
    /// (what, text) for every response and error seen.
    said: Vec<(String, String)>,
    /// Every secret handed out, and the operator token.
    secrets: Vec<String>,
}

impl Transcript {
    fn response<T: std::fmt::Debug>(
        &mut self,
        what: &str,
        result: &Result<tonic::Response<T>, Status>,
    ) {
        let text = match result {
            Ok(response) => format!("{:?} {:?}", response.metadata(), response.get_ref()),
            Err(status) => format!(
                "{:?} {} {:?}",
                status.code(),
                status.message(),
                status.metadata()
            ),
        };
        self.said.push((what.to_owned(), text));
    }

    /// Runs a printed curl smoke test (through the verify listener's HTTP
    /// face, the secret in its `authorization` header); asserts it
    /// succeeded (or, `works` false, that curl was refused with a 401).
    /// What curl printed goes into the transcript.
    async fn curl(&mut self, what: &str, command: &str, works: bool) {
        let output = binary::sh_curl(command).await;
        let text = format!(
            "{} {}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let code = output.status.code();
        assert_eq!(code, Some(if works { 0 } else { 22 }), "{what}: {text}");
        self.said.push((what.to_owned(), text));
    }

    /// An answer of the verify listener's HTTP face: its status, headers
    /// and body go into the transcript.
    fn http(&mut self, what: &str, answer: &vilvik_keys_test_support::http::Answer) {
        self.said.push((
            what.to_owned(),
            format!("{} {:?} {}", answer.status, answer.headers, answer.body),
        ));
    }

    /// A call that must fail: its status goes into the transcript.
    fn refused<T: std::fmt::Debug>(
        &mut self,
        what: &str,
        result: Result<tonic::Response<T>, Status>,
    ) {
        assert!(result.is_err(), "{what} should have failed: {result:?}");
        self.response(what, &result);
    }
}

/// Sends `message` with the management key `key`, then again as a retry
/// would; both answers, which must be OK.
async fn twice<M: Clone, R, Fut>(message: M, key: &str, send: impl Fn(Request<M>) -> Fut) -> (R, R)
where
    Fut: std::future::Future<Output = Result<tonic::Response<R>, Status>>,
{
    let first = send(bearer(message.clone(), key)).await.unwrap();
    let again = send(bearer(message, key)).await.unwrap();
    (first.into_inner(), again.into_inner())
}

fn as_operator<T>(message: T, account: &str) -> Request<T> {
    vilvik_keys_test_support::as_operator(message, OPERATOR_TOKEN, account, "alice@example.com")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_appears_in_logs_responses_errors_audit_events_or_database_files() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("keys.db");
    let store = StoreSettings::sqlite(db.clone());
    let mut transcript = Transcript::default();
    transcript.secrets.push(OPERATOR_TOKEN.to_owned());

    // Step 1 of the tour: a management key, printed once by bootstrap.
    let trace = [("RUST_LOG", "trace")];
    binary::migrate(store.env());
    let (management, bootstrap_log) = binary::bootstrap(store.env().chain(trace), "ACME");
    transcript.secrets.push(management.clone());

    let mut server = ServedBinary::serve()
        .envs(store.env())
        .env("VILVIK_KEYS_OPERATOR_TOKEN", OPERATOR_TOKEN)
        .env("VILVIK_KEYS_USAGE_FLUSH_INTERVAL_MS", "100")
        .envs(trace)
        .start()
        .await;
    let mut admin = KeyAdminClient::new(channel(server.admin_addr()).await);
    let mut verifier = KeyVerifyClient::new(channel(server.verify_addr()).await);
    let key = management.as_str();

    // Create (the response carries the secret: the one place it may be),
    // with a request id, and retry it: the retry's answer carries the
    // same secret. The request id is key material too.
    let create_id = vilvik_keys_domain::RequestId::generate();
    transcript.secrets.push(create_id.as_str().to_owned());
    let creation = CreateKeyRequest {
        description: "nightly builds".into(),
        request_id: create_id.as_str().into(),
        ..create("ci-runner", &["datasets:read"])
    };
    let (created, retried) = twice(creation, key, |request| {
        let mut admin = admin.clone();
        async move { admin.create_key(request).await }
    })
    .await;
    assert_eq!(retried.secret, created.secret);
    let first = created.secret.clone();
    transcript.secrets.push(first.clone());
    let first_curl = created.curl_smoke_test_command.clone();
    transcript
        .curl("the curl smoke test", &first_curl, true)
        .await;
    let key_id = created.key.unwrap().key_id;

    // List, show, update, verify.
    let r = admin
        .list_keys(bearer(ListKeysRequest::default(), key))
        .await;
    transcript.response("ListKeys", &r);
    let r = admin.get_key(bearer(get(&key_id), key)).await;
    transcript.response("GetKey", &r);
    let update = UpdateKeyRequest {
        key_id: key_id.clone(),
        name: "ci-runner-2".into(),
        scopes: vec!["datasets:read".into(), "datasets:write".into()],
        update_mask: mask(&["name", "scopes"]),
        ..Default::default()
    };
    let r = admin.update_key(bearer(update, key)).await;
    assert!(r.is_ok(), "{r:?}");
    transcript.response("UpdateKey", &r);
    for scopes in [&[][..], &["datasets:write"], &["billing:read"]] {
        let r = verifier.verify_key(verify(&first, scopes)).await;
        assert!(r.is_ok(), "{r:?}");
        transcript.response("VerifyKey", &r);
    }
    let mut wrong = first.clone();
    wrong.replace_range(20..21, if &first[20..21] == "a" { "b" } else { "a" });
    let r = verifier.verify_key(verify(&wrong, &[])).await;
    transcript.response("VerifyKey with a wrong secret", &r);

    // Rotate: the old secret dies, the new one is handed out once.
    let rotate_id = vilvik_keys_domain::RequestId::generate();
    transcript.secrets.push(rotate_id.as_str().to_owned());
    let rotate = RotateKeyRequest {
        key_id: key_id.clone(),
        request_id: rotate_id.as_str().into(),
        ..Default::default()
    };
    let (rotated, r) = twice(rotate, key, |request| {
        let mut admin = admin.clone();
        async move { admin.rotate_key(request).await }
    })
    .await;
    assert_eq!(r.secret, rotated.secret, "the retried rotation's secret");
    let second = rotated.secret.clone();
    transcript.secrets.push(second.clone());
    for secret in [&first, &second] {
        let r = verifier.verify_key(verify(secret, &[])).await;
        transcript.response("VerifyKey after rotation", &r);
    }
    transcript
        .curl(
            "the first curl smoke test after rotation",
            &first_curl,
            false,
        )
        .await;
    let second_curl = rotated.curl_smoke_test_command.clone();
    transcript
        .curl("the rotation's curl smoke test", &second_curl, true)
        .await;

    // Mistakes with secrets: each is refused, and no message repeats it.
    let as_scope = create("oops", &[second.as_str()]);
    transcript.refused(
        "a secret as a scope",
        admin.create_key(bearer(as_scope, key)).await,
    );
    transcript.refused(
        "a secret as a key id",
        admin.get_key(bearer(get(&second), key)).await,
    );
    transcript.refused(
        "the part after the prefix as a key id",
        admin.get_key(bearer(get(&second[13..]), key)).await,
    );
    let as_mask = UpdateKeyRequest {
        key_id: key_id.clone(),
        update_mask: mask(&[second.as_str()]),
        ..Default::default()
    };
    transcript.refused(
        "a secret in an update mask",
        admin.update_key(bearer(as_mask, key)).await,
    );
    transcript.refused(
        "a secret as a client ip",
        verifier
            .verify_key(VerifyKeyRequest {
                client_ip: second.clone(),
                ..verify(&second, &[])
            })
            .await,
    );
    transcript.refused(
        "a secret as a required scope",
        verifier.verify_key(verify(&second, &[&first])).await,
    );
    transcript.refused(
        "the operator token as the account",
        admin
            .get_account(as_operator(GetAccountRequest {}, OPERATOR_TOKEN))
            .await,
    );
    transcript.refused(
        "a rotated secret as the management key",
        admin
            .list_keys(bearer(ListKeysRequest::default(), &first))
            .await,
    );
    let mistyped = OPERATOR_TOKEN.replace('Z', "z");
    transcript.refused(
        "a mistyped operator token",
        admin
            .list_keys(bearer(ListKeysRequest::default(), &mistyped))
            .await,
    );

    // Revoke, audit, and the operator's calls.
    let revoke = RevokeKeyRequest {
        key_id: key_id.clone(),
        reason: "leaked in a build log".into(),
        ..Default::default()
    };
    let r = admin.revoke_key(bearer(revoke, key)).await;
    assert!(r.is_ok(), "{r:?}");
    transcript.response("RevokeKey", &r);
    let r = verifier.verify_key(verify(&second, &[])).await;
    transcript.response("VerifyKey after revocation", &r);
    transcript
        .curl("the curl smoke test after revocation", &second_curl, false)
        .await;
    http_face_mistakes(&mut transcript, server.verify_addr(), &first, &second).await;
    let r = admin
        .list_audit_events(bearer(ListAuditEventsRequest::default(), key))
        .await;
    assert!(
        r.as_ref().is_ok_and(|r| r.get_ref().events.len() >= 4),
        "{r:?}"
    );
    transcript.response("ListAuditEvents", &r);
    let premium = SetAccountTierRequest {
        account_id: "ACME".into(),
        tier: Tier::Premium.into(),
    };
    let r = admin.set_account_tier(as_operator(premium, "ACME")).await;
    assert!(r.is_ok(), "{r:?}");
    transcript.response("SetAccountTier", &r);
    let r = admin
        .get_account(as_operator(GetAccountRequest {}, "ACME"))
        .await;
    transcript.response("GetAccount", &r);
    // Usage (last use time and IP) reaches the store, written behind.
    let with_revoked = ListKeysRequest {
        include_revoked: true,
        ..Default::default()
    };
    eventually(Duration::from_secs(5), "a key's last use is stored", || {
        let request = bearer(with_revoked.clone(), key);
        let mut admin = admin.clone();
        async move {
            let listed = admin.list_keys(request).await.unwrap().into_inner();
            listed.keys.iter().any(|k| k.last_used_at.is_some())
        }
    })
    .await;
    let r = admin.list_keys(bearer(with_revoked, key)).await;
    assert!(
        r.as_ref()
            .is_ok_and(|r| r.get_ref().keys.iter().any(|k| k.last_used_at.is_some())),
        "{r:?}"
    );
    transcript.response("ListKeys with revoked", &r);

    // Stop the server so that its log is complete.
    server.sigterm();
    server.wait_for_exit(Duration::from_secs(10)).await;

    let serve_log = server.log();
    assert!(
        serve_log.lines().count() > 100 && serve_log.contains("TRACE"),
        "the server did not log at trace level: {} lines",
        serve_log.lines().count()
    );
    let mut places: Vec<(String, Vec<u8>)> = vec![
        ("bootstrap's log".into(), bootstrap_log.into_bytes()),
        ("the server's log".into(), serve_log.into_bytes()),
    ];
    places.extend(
        transcript
            .said
            .iter()
            .map(|(what, text)| (format!("the answer to {what}"), text.clone().into_bytes())),
    );
    places.extend(database_files(&db));

    let mut hits = Vec::new();
    for secret in &transcript.secrets {
        let mut needles = vec![secret.as_str()];
        if secret.starts_with("vlk_") {
            needles.push(&secret[13..]);
        }
        for needle in needles {
            for (place, text) in &places {
                if text.windows(needle.len()).any(|w| w == needle.as_bytes()) {
                    hits.push(format!("{needle} in {place}"));
                }
            }
        }
    }
    assert!(hits.is_empty(), "secrets found: {hits:#?}");
}

/// The mistakes people make with secrets on the HTTP face: a rotated
/// (`old`) and a revoked (`revoked`) secret presented, two keys at once,
/// a secret as a required scope (header and query), as a JSON field's
/// name, as a scope or an address, padded past the length limit.
async fn http_face_mistakes(
    transcript: &mut Transcript,
    addr: std::net::SocketAddr,
    old: &str,
    revoked: &str,
) {
    use vilvik_keys_test_support::http::{HttpVersion, get, request, send};
    let json = |body: String| {
        request(
            "POST",
            "/v1/keys:verify",
            &[("content-type", "application/json")],
            &body,
        )
    };
    let bearer = format!("Bearer {old}");
    let padded = format!("{revoked}{}", "x".repeat(300));
    let scope_query = format!("/v1/authorize?scope={revoked}");
    let mistakes = [
        (
            "a revoked key on /v1/keys/self",
            get("/v1/keys/self", &[("x-api-key", revoked)]),
            401,
        ),
        (
            "a rotated key on /v1/authorize",
            get("/v1/authorize", &[("authorization", &bearer)]),
            401,
        ),
        (
            "two keys at once",
            get(
                "/v1/authorize",
                &[("authorization", &bearer), ("x-api-key", revoked)],
            ),
            400,
        ),
        (
            "a secret as the required scopes",
            get(
                "/v1/authorize",
                &[
                    ("authorization", &bearer),
                    ("x-vilvik-required-scopes", revoked),
                ],
            ),
            400,
        ),
        (
            "a secret as a scope in the query",
            get(&scope_query, &[("x-api-key", old)]),
            400,
        ),
        (
            "a padded secret",
            get("/v1/keys/self", &[("x-api-key", &padded)]),
            431,
        ),
        (
            "a secret as a JSON field's name",
            json(format!(r#"{{"{revoked}":1}}"#)),
            400,
        ),
        (
            "a secret as a required scope in JSON",
            json(format!(r#"{{"key":"x","requiredScopes":["{revoked}"]}}"#)),
            400,
        ),
        (
            "a secret as the client address",
            json(format!(r#"{{"clientIp":"{revoked}"}}"#)),
            400,
        ),
        (
            "a secret in a list",
            json(format!(r#"{{"key":["{revoked}"]}}"#)),
            400,
        ),
        (
            "a secret as the scopes",
            json(format!(r#"{{"requiredScopes":"{revoked}"}}"#)),
            400,
        ),
        (
            "a secret in broken JSON",
            json(format!(r#"{{"key":"{revoked}"#)),
            400,
        ),
        (
            "a revoked key in JSON",
            json(format!(r#"{{"key":"{revoked}"}}"#)),
            200,
        ),
    ];
    for (what, request, status) in mistakes {
        let answer = send(addr, HttpVersion::Http1, request).await;
        assert_eq!(answer.status.as_u16(), status, "{what}: {answer:?}");
        transcript.http(what, &answer);
    }
}

fn database_files(db: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files = Vec::new();
    for suffix in ["", "-wal", "-shm"] {
        let path = format!("{}{suffix}", db.display());
        if let Ok(bytes) = std::fs::read(&path) {
            files.push((path, bytes));
        }
    }
    assert!(!files.is_empty(), "no database file at {}", db.display());
    files
}
