//! Bad input gets a precise status naming the field, and changes nothing.

use tonic::metadata::MetadataValue;
use tonic::{Code, Status};
use vilvik_keys::{headers, proto};
use vilvik_keys_test_support::requests::{create, get, mask, rename, revoke, rotate, verify};
use vilvik_keys_test_support::{
    OPERATOR_TOKEN, TestApp, as_operator, assert_status, days_from, without_usage,
};

crate::on_both_backends!(
    bad_input_is_rejected_precisely_and_changes_nothing,
    hostile_text_is_refused_alike_on_both_stores,
    oversized_messages_are_rejected
);

/// Asserts the call was refused as INVALID_ARGUMENT naming `needle`.
#[track_caller]
fn invalid<T: std::fmt::Debug>(result: Result<T, Status>, needle: &str) -> Status {
    assert_status(result, Code::InvalidArgument, needle)
}

/// The account's keys (without last-use fields) and audit log: what a
/// refused call must leave as it was.
async fn snapshot(app: &mut TestApp) -> (Vec<proto::Key>, Vec<proto::AuditEvent>) {
    (
        without_usage(app.list_keys(true).await),
        app.audit("").await,
    )
}

/// A key of the account, and the snapshot taken once it exists.
async fn existing_key(
    app: &mut TestApp,
) -> (
    proto::CreateKeyResponse,
    (Vec<proto::Key>, Vec<proto::AuditEvent>),
) {
    let existing = app
        .create_key("ci-runner", &["datasets:read"])
        .await
        .unwrap();
    let before = snapshot(app).await;
    (existing, before)
}

async fn bad_input_is_rejected_precisely_and_changes_nothing(mut app: TestApp) {
    let now = vilvik_keys_domain::Clock::now(app.clock.as_ref());
    let (existing, before) = existing_key(&mut app).await;
    let key_id = existing.key.as_ref().unwrap().key_id.clone();

    let create =
        |name: &str, scopes: &[&str], description: &str, expires_at| proto::CreateKeyRequest {
            description: description.into(),
            expires_at,
            ..create(name, scopes)
        };
    let too_many: Vec<String> = (0..51).map(|i| format!("r{i}:read")).collect();
    let too_many: Vec<&str> = too_many.iter().map(String::as_str).collect();
    let cases = [
        (
            create("", &["a:b"], "", None),
            "name: name must not be empty",
        ),
        (
            create(&"n".repeat(65), &["a:b"], "", None),
            "name: name is 65 characters long; the limit is 64",
        ),
        (
            create("x", &["a:b"], &"d".repeat(1001), None),
            "description: description is 1001 characters",
        ),
        (
            create("x", &["datasets:read", "Datasets:read"], "", None),
            "scopes[1]: 'Datasets:read' is not a valid scope: use lowercase resource:action",
        ),
        (
            create("x", &["datasets"], "", None),
            "scopes[0]: 'datasets' is not a valid scope",
        ),
        (
            create("x", &["a:b"], "", Some(days_from(now, -1))),
            "expires_at: expires_at",
        ),
        (create("x", &too_many, "", None), "at most 50 scopes"),
    ];
    for (request, expected) in cases {
        invalid(app.admin.create_key(app.authed(request)).await, expected);
    }

    // Key ids.
    let unknown = "key_AAAAAAAAAAAAAAAAAAAA";
    invalid(
        app.admin.get_key(app.authed(get(""))).await,
        "key_id: is required",
    );
    let abc = app.admin.get_key(app.authed(get("abc"))).await;
    invalid(abc, "key_id: 'abc' is not a key id");
    let missing = app.admin.get_key(app.authed(get(unknown))).await;
    assert_status(missing, Code::NotFound, &format!("key {unknown} not found"));
    let missing = app.admin.rotate_key(app.authed(rotate(unknown))).await;
    assert_status(missing, Code::NotFound, "not found");

    // Paging.
    for page_size in [-1, 101] {
        let page = proto::ListKeysRequest {
            page_size,
            ..Default::default()
        };
        invalid(app.admin.list_keys(app.authed(page)).await, "page_size");
    }
    let garbage = proto::ListAuditEventsRequest {
        page_token: "garbage".into(),
        ..Default::default()
    };
    invalid(
        app.admin.list_audit_events(app.authed(garbage)).await,
        "page_token",
    );

    // Updates.
    let update = |paths: &[&str], name: &str, expires_at| proto::UpdateKeyRequest {
        expires_at,
        update_mask: mask(paths),
        ..rename(&key_id, name)
    };
    let expired = Some(days_from(now, -3));
    for (request, expected) in [
        (update(&[], "x", None), "update_mask: is empty"),
        (update(&["prefix"], "x", None), "'prefix' cannot be updated"),
        (update(&["name"], " ", None), "name: name must not be empty"),
        (update(&["name", "expires_at"], "ok", expired), "expires_at"),
    ] {
        invalid(app.admin.update_key(app.authed(request)).await, expected);
    }
    let long_reason = proto::RevokeKeyRequest {
        reason: "r".repeat(501),
        ..revoke(&key_id)
    };
    invalid(
        app.admin.revoke_key(app.authed(long_reason)).await,
        "reason",
    );

    // Verify requests.
    let bad_scope = verify(&existing.secret, &["Datasets:read"]);
    invalid(app.verify.verify_key(bad_scope).await, "required_scopes[0]");
    let bad_ip = proto::VerifyKeyRequest {
        client_ip: "not-an-ip".into(),
        ..verify(&existing.secret, &[])
    };
    invalid(app.verify.verify_key(bad_ip).await, "client_ip");

    // Nothing changed.
    assert_eq!(snapshot(&mut app).await, before);
}

/// NUL, terminal escapes, line breaks, bidirectional overrides and
/// zero-width characters in any text field: INVALID_ARGUMENT naming the
/// field before the store is touched, so SQLite and Postgres answer alike
/// (a NUL would otherwise reach Postgres, which refuses it with an error
/// the caller would see as INTERNAL), and nothing changes.
async fn hostile_text_is_refused_alike_on_both_stores(mut app: TestApp) {
    let (existing, before) = existing_key(&mut app).await;
    let key_id = existing.key.as_ref().unwrap().key_id.clone();

    let nul = "ci\0runner";
    let ansi = "\u{1b}[31mci-runner\u{1b}[0m";
    let crlf = "ci-runner\r\nkey revoked by admin";
    let rtl = "ci-\u{202E}rennur";
    let zero_width = "ci\u{200B}runner";
    for (name, why) in [
        (nul, "control characters"),
        (ansi, "control characters"),
        (crlf, "control characters"),
        (rtl, "invisible characters"),
        (zero_width, "invisible characters"),
    ] {
        let expected = format!("name: name must not contain {why}");
        let created = app
            .admin
            .create_key(app.authed(create(name, &["a:b"])))
            .await;
        invalid(created, &expected);
        let renamed = app
            .admin
            .update_key(app.authed(rename(&key_id, name)))
            .await;
        invalid(renamed, &expected);
    }
    for (description, why) in [
        (nul, "control characters"),
        (ansi, "control characters"),
        ("line\r\nbreak", "control characters"),
        (rtl, "bidirectional controls"),
    ] {
        let request = proto::CreateKeyRequest {
            description: description.into(),
            ..create("x", &["a:b"])
        };
        invalid(
            app.admin.create_key(app.authed(request)).await,
            &format!("description: description must not contain {why}"),
        );
    }
    for reason in [nul, ansi, crlf, rtl, "tab\there"] {
        let request = proto::RevokeKeyRequest {
            reason: reason.into(),
            ..revoke(&key_id)
        };
        invalid(
            app.admin.revoke_key(app.authed(request)).await,
            "reason: reason must be one line of printable text",
        );
    }
    for (scope, shown) in [
        ("datasets:read\0", "'datasets:read?'"),
        ("datasets\u{202E}:read", "'datasets?:read'"),
        ("data\u{200B}sets:read", "'data?sets:read'"),
    ] {
        let status = invalid(
            app.admin
                .create_key(app.authed(create("x", &[scope])))
                .await,
            &format!("scopes[0]: {shown} is not a valid scope"),
        );
        assert!(
            !status.message().chars().any(char::is_control),
            "{status:?}"
        );
    }

    // The operator's headers: the actor and the account.
    let get = || proto::GetAccountRequest {};
    let with_header = |name: &'static str, value: &str| {
        let mut request = as_operator(get(), OPERATOR_TOKEN, "ACME", "alice@example.com");
        let value = MetadataValue::try_from(value.as_bytes()).unwrap();
        request.metadata_mut().insert(name, value);
        request
    };
    for (actor, expected) in [
        ("alice\t@example.com", "must not contain control characters"),
        ("alice\u{202E}@example.com", "must be printable ASCII"),
    ] {
        let refused = app
            .admin
            .get_account(with_header(headers::ACTOR, actor))
            .await;
        invalid(refused, &format!("{}: {expected}", headers::ACTOR));
    }
    for account in ["AC\tME", "ACME\u{200B}", "-ACME"] {
        let request = with_header(headers::ACCOUNT, account);
        assert_eq!(
            app.admin.get_account(request).await.unwrap_err().code(),
            Code::InvalidArgument,
            "{account:?}"
        );
    }
    // A whole secret as the account: refused and not repeated.
    let request = app.as_operator(get(), &existing.secret, "alice@example.com");
    let status = invalid(app.admin.get_account(request).await, headers::ACCOUNT);
    assert!(
        !status.message().contains(&existing.secret[4..]),
        "{status:?}"
    );
    let tier = proto::SetAccountTierRequest {
        account_id: "AC\0ME".into(),
        tier: proto::Tier::Premium.into(),
    };
    let request = app.as_operator(tier, "ACME", "alice@example.com");
    invalid(app.admin.set_account_tier(request).await, "account_id");

    // Nothing changed: the key is still active, no event was written.
    assert_eq!(snapshot(&mut app).await, before);
    assert_eq!(
        app.verify_code(&existing.secret, &[]).await,
        proto::VerifyCode::Valid
    );
}

async fn oversized_messages_are_rejected(mut app: TestApp) {
    let keys_before = without_usage(app.list_keys(true).await);
    let request = proto::CreateKeyRequest {
        name: "big".into(),
        description: "x".repeat(70 * 1024),
        scopes: vec!["a:b".into()],
        expires_at: None,
        ..Default::default()
    };
    let status = app.admin.create_key(app.authed(request)).await.unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(status.message().contains("too large"), "{status:?}");
    let request = proto::VerifyKeyRequest {
        key: "k".repeat(70 * 1024),
        ..Default::default()
    };
    let status = app.verify.verify_key(request).await.unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert_eq!(without_usage(app.list_keys(true).await), keys_before);
}
