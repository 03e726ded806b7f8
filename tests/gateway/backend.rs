//! A plain backend verifying the keys it receives with
//! `POST /v1/keys:verify`: the Python client of `docs/INTEGRATIONS.md`,
//! read out of the page with only its address changed, run by `python3`.

use std::process::{Command, Output};
use std::time::Duration;

use serde_json::{Value, json};
use vilvik_keys_test_support::{ACCOUNT, TestApp, on_both_backends};

use crate::doc;

on_both_backends!(the_documented_python_client_gets_a_verdict_or_fails_closed);

/// The backend's own caller, which the backend names as `clientIp`.
const CLIENT: &str = "203.0.113.7";

/// How long a use takes to show on GetKey.
const WRITTEN_WITHIN: Duration = Duration::from_secs(5);

async fn the_documented_python_client_gets_a_verdict_or_fails_closed(mut app: TestApp) {
    let client = doc::replace(
        &doc::block("python"),
        "\"http://127.0.0.1:50052/v1/keys:verify\"",
        &format!("\"http://{}/v1/keys:verify\"", app.verify_addr),
    );
    let reader = app.create_key("reader", &["datasets:read"]).await.unwrap();
    let reader_id = reader.key.unwrap().key_id;

    let (status, verdict) = ask(&client, &reader.secret, "datasets:read").await;
    assert_eq!(status, 200);
    assert_eq!(
        verdict,
        json!({
            "valid": true,
            "code": "VERIFY_CODE_VALID",
            "keyId": reader_id,
            "accountId": ACCOUNT,
            "name": "reader",
            "scopes": ["datasets:read"],
        })
    );
    app.wait_for_key(&reader_id, WRITTEN_WITHIN, "the use is written", |key| {
        key.valid_use_count == 1
    })
    .await;
    let key = app.get_key(&reader_id).await;
    assert_eq!(key.last_used_claimed_ip, CLIENT, "{key:?}");
    assert_eq!(key.last_used_observed_ip, "127.0.0.1", "{key:?}");

    let (status, verdict) = ask(&client, &reader.secret, "billing:write").await;
    assert_eq!(status, 403);
    assert_eq!(verdict["code"], "VERIFY_CODE_INSUFFICIENT_SCOPE");
    assert_eq!(verdict["missingScopes"], json!(["billing:write"]));

    app.revoke_key(&reader_id).await.unwrap();
    let (status, verdict) = ask(&client, &reader.secret, "").await;
    assert_eq!(status, 401);
    assert_eq!(verdict["valid"], false);
    assert_eq!(verdict["code"], "VERIFY_CODE_REVOKED");

    // No verdict: the client raises, and the backend refuses.
    app.stop().await;
    let out = run(&client, &reader.secret, "").await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("urllib.error.URLError"),
        "without vilvik-keys the client raises URLError: {out:?}"
    );
}

/// The page's `verify_key(key, scopes, client_ip=CLIENT)` and
/// `status_for` of its verdict.
async fn ask(client: &str, key: &str, scopes: &str) -> (u16, Value) {
    let out = run(client, key, scopes).await;
    assert!(out.status.success(), "the Python client failed: {out:?}");
    let printed: Value = serde_json::from_slice(&out.stdout).expect("the driver prints JSON");
    let status = printed["status"].as_u64().expect("a status") as u16;
    (status, printed["verdict"].clone())
}

/// Runs the page's client with a driver that asks about `key` needing
/// `scopes` (comma-separated) and prints the status and the verdict.
async fn run(client: &str, key: &str, scopes: &str) -> Output {
    let program = format!(
        "{client}\n\
         import sys\n\
         scopes = [s for s in sys.argv[2].split(',') if s]\n\
         verdict = verify_key(sys.argv[1], scopes, client_ip={CLIENT:?})\n\
         print(json.dumps({{\"status\": status_for(verdict), \"verdict\": verdict}}))\n"
    );
    let (key, scopes) = (key.to_owned(), scopes.to_owned());
    tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .args(["-c", &program, &key, &scopes])
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "python3 does not run ({e}), and this test runs the page's Python client: \
                     install it with `apt-get install python3`"
                )
            })
    })
    .await
    .expect("python3 ran")
}
