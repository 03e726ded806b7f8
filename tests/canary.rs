//! The secret canary (issue 9): the whole tour, run against a real
//! `vilvik-keys serve` process logging at `RUST_LOG=trace`, plus the
//! mistakes a user makes with secrets (pasting one into the wrong field,
//! using a rotated or revoked one). Then every log line, every response
//! other than the one that created a secret, every error message, every
//! audit event and the SQLite files are searched for every secret, for the
//! part of it after its public prefix, and for the operator token: none
//! may appear anywhere.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tonic::transport::Channel;
use tonic::{Request, Status};
use vilvik_keys::proto::key_admin_client::KeyAdminClient;
use vilvik_keys::proto::key_verify_client::KeyVerifyClient;
use vilvik_keys::proto::{
    CreateKeyRequest, GetAccountRequest, GetKeyRequest, ListAuditEventsRequest, ListKeysRequest,
    RevokeKeyRequest, RotateKeyRequest, SetAccountTierRequest, Tier, UpdateKeyRequest,
    VerifyKeyRequest,
};
use vilvik_keys_test_db::eventually;

const BIN: &str = env!("CARGO_BIN_EXE_vilvik-keys");
const OPERATOR_TOKEN: &str = "canary-operator-token-Zq81Lw0Xc4Hs9Tb2Vn";

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

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

fn bearer<T>(message: T, credential: &str) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {credential}").parse().unwrap(),
    );
    request
}

fn as_operator<T>(message: T, account: &str) -> Request<T> {
    let mut request = bearer(message, OPERATOR_TOKEN);
    request
        .metadata_mut()
        .insert("x-vilvik-account", account.parse().unwrap());
    request
        .metadata_mut()
        .insert("x-vilvik-actor", "alice@example.com".parse().unwrap());
    request
}

fn verify(key: &str, scopes: &[&str]) -> VerifyKeyRequest {
    VerifyKeyRequest {
        key: key.to_owned(),
        required_scopes: scopes.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

async fn connect(addr: SocketAddr) -> Channel {
    let url = format!("http://{addr}");
    eventually(
        Duration::from_secs(20),
        "the server accepts connections",
        || {
            let url = url.clone();
            async move { Channel::from_shared(url).unwrap().connect().await.is_ok() }
        },
    )
    .await;
    Channel::from_shared(url).unwrap().connect().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_appears_in_logs_responses_errors_audit_events_or_database_files() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("keys.db");
    let log = dir.path().join("serve.log");
    let mut transcript = Transcript::default();
    transcript.secrets.push(OPERATOR_TOKEN.to_owned());

    // Step 1 of the tour: a management key, printed once by bootstrap.
    let bootstrap = Command::new(BIN)
        .args(["bootstrap", "--account", "ACME"])
        .env("VILVIK_KEYS_SQLITE_PATH", &db)
        .env("RUST_LOG", "trace")
        .output()
        .unwrap();
    assert!(bootstrap.status.success(), "{bootstrap:?}");
    let management = String::from_utf8(bootstrap.stdout)
        .unwrap()
        .trim()
        .to_owned();
    transcript.secrets.push(management.clone());
    let bootstrap_log = String::from_utf8_lossy(&bootstrap.stderr).into_owned();

    let (admin_addr, verify_addr) = (free_addr(), free_addr());
    let server = Server(
        Command::new(BIN)
            .arg("serve")
            .env("VILVIK_KEYS_SQLITE_PATH", &db)
            .env("VILVIK_KEYS_ADMIN_ADDR", admin_addr.to_string())
            .env("VILVIK_KEYS_VERIFY_ADDR", verify_addr.to_string())
            .env("VILVIK_KEYS_OPERATOR_TOKEN", OPERATOR_TOKEN)
            .env("VILVIK_KEYS_USAGE_FLUSH_INTERVAL_MS", "100")
            .env("RUST_LOG", "trace")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let mut admin = KeyAdminClient::new(connect(admin_addr).await);
    let mut verifier = KeyVerifyClient::new(connect(verify_addr).await);

    // Create (the response carries the secret: the one place it may be),
    // with a request id, and retry it: the retry's answer carries the
    // same secret. The request id is key material too.
    let create_id = vilvik_keys_domain::RequestId::generate();
    transcript.secrets.push(create_id.as_str().to_owned());
    let create = CreateKeyRequest {
        name: "ci-runner".into(),
        description: "nightly builds".into(),
        scopes: vec!["datasets:read".into()],
        request_id: create_id.as_str().into(),
        ..Default::default()
    };
    let created = admin
        .create_key(bearer(create.clone(), &management))
        .await
        .unwrap()
        .into_inner();
    let retried = admin
        .create_key(bearer(create, &management))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(retried.secret, created.secret);
    let first = created.secret.clone();
    transcript.secrets.push(first.clone());
    let key_id = created.key.unwrap().key_id;

    // List, show, update, verify.
    let r = admin
        .list_keys(bearer(ListKeysRequest::default(), &management))
        .await;
    transcript.response("ListKeys", &r);
    let r = admin
        .get_key(bearer(
            GetKeyRequest {
                key_id: key_id.clone(),
            },
            &management,
        ))
        .await;
    transcript.response("GetKey", &r);
    let r = admin
        .update_key(bearer(
            UpdateKeyRequest {
                key_id: key_id.clone(),
                name: "ci-runner-2".into(),
                scopes: vec!["datasets:read".into(), "datasets:write".into()],
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["name".into(), "scopes".into()],
                }),
                ..Default::default()
            },
            &management,
        ))
        .await;
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
    let rotated = admin
        .rotate_key(bearer(rotate.clone(), &management))
        .await
        .unwrap()
        .into_inner();
    let r = admin
        .rotate_key(bearer(rotate, &management))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.secret, rotated.secret, "the retried rotation's secret");
    let second = rotated.secret.clone();
    transcript.secrets.push(second.clone());
    for key in [&first, &second] {
        let r = verifier.verify_key(verify(key, &[])).await;
        transcript.response("VerifyKey after rotation", &r);
    }

    // Mistakes with secrets: each is refused, and no message repeats it.
    transcript.refused(
        "a secret as a scope",
        admin
            .create_key(bearer(
                CreateKeyRequest {
                    name: "oops".into(),
                    scopes: vec![second.clone()],
                    ..Default::default()
                },
                &management,
            ))
            .await,
    );
    transcript.refused(
        "a secret as a key id",
        admin
            .get_key(bearer(
                GetKeyRequest {
                    key_id: second.clone(),
                },
                &management,
            ))
            .await,
    );
    transcript.refused(
        "the part after the prefix as a key id",
        admin
            .get_key(bearer(
                GetKeyRequest {
                    key_id: second[13..].to_owned(),
                },
                &management,
            ))
            .await,
    );
    transcript.refused(
        "a secret in an update mask",
        admin
            .update_key(bearer(
                UpdateKeyRequest {
                    key_id: key_id.clone(),
                    update_mask: Some(prost_types::FieldMask {
                        paths: vec![second.clone()],
                    }),
                    ..Default::default()
                },
                &management,
            ))
            .await,
    );
    transcript.refused(
        "a secret as a client ip",
        verifier
            .verify_key(VerifyKeyRequest {
                key: second.clone(),
                client_ip: second.clone(),
                ..Default::default()
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
    transcript.refused(
        "a mistyped operator token",
        admin
            .list_keys(bearer(
                ListKeysRequest::default(),
                &OPERATOR_TOKEN.replace('Z', "z"),
            ))
            .await,
    );

    // Revoke, audit, and the operator's calls.
    let r = admin
        .revoke_key(bearer(
            RevokeKeyRequest {
                key_id: key_id.clone(),
                reason: "leaked in a build log".into(),
                ..Default::default()
            },
            &management,
        ))
        .await;
    assert!(r.is_ok(), "{r:?}");
    transcript.response("RevokeKey", &r);
    let r = verifier.verify_key(verify(&second, &[])).await;
    transcript.response("VerifyKey after revocation", &r);
    let r = admin
        .list_audit_events(bearer(ListAuditEventsRequest::default(), &management))
        .await;
    assert!(
        r.as_ref().is_ok_and(|r| r.get_ref().events.len() >= 4),
        "{r:?}"
    );
    transcript.response("ListAuditEvents", &r);
    let r = admin
        .set_account_tier(as_operator(
            SetAccountTierRequest {
                account_id: "ACME".into(),
                tier: Tier::Premium.into(),
            },
            "ACME",
        ))
        .await;
    assert!(r.is_ok(), "{r:?}");
    transcript.response("SetAccountTier", &r);
    let r = admin
        .get_account(as_operator(GetAccountRequest {}, "ACME"))
        .await;
    transcript.response("GetAccount", &r);
    // Usage (last use time and IP) reaches the store.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let r = admin
        .list_keys(bearer(
            ListKeysRequest {
                include_revoked: true,
                ..Default::default()
            },
            &management,
        ))
        .await;
    assert!(
        r.as_ref()
            .is_ok_and(|r| r.get_ref().keys.iter().any(|k| k.last_used_at.is_some())),
        "{r:?}"
    );
    transcript.response("ListKeys with revoked", &r);

    // Stop the server so that its log is complete.
    let _ = Command::new("kill")
        .args(["-TERM", &server.0.id().to_string()])
        .status();
    let mut server = server;
    let stopped = eventually_exits(&mut server.0).await;
    assert!(stopped, "the server did not stop on SIGTERM");

    let serve_log = std::fs::read_to_string(&log).unwrap();
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

async fn eventually_exits(child: &mut Child) -> bool {
    for _ in 0..200 {
        if child.try_wait().unwrap().is_some() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
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
