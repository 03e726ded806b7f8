//! Bad input gets a precise status naming the field, and changes nothing.

use tonic::Code;
use tonic::metadata::MetadataValue;
use vilvik_keys::{headers, proto};
use vilvik_keys_test_support::requests::{get, mask};
use vilvik_keys_test_support::{
    OPERATOR_TOKEN, TestApp, as_operator, assert_status, days_from, without_usage,
};

crate::on_both_backends!(
    bad_input_is_rejected_precisely_and_changes_nothing,
    hostile_text_is_refused_alike_on_both_stores,
    oversized_messages_are_rejected
);

async fn bad_input_is_rejected_precisely_and_changes_nothing(mut app: TestApp) {
    let now = vilvik_keys_domain::Clock::now(app.clock.as_ref());
    let existing = app
        .create_key("ci-runner", &["datasets:read"])
        .await
        .unwrap();
    let key_id = existing.key.unwrap().key_id;
    let keys_before = without_usage(app.list_keys(true).await);
    let audit_before = app.audit("").await;

    let create =
        |name: &str, scopes: &[&str], description: &str, expires_at| proto::CreateKeyRequest {
            name: name.into(),
            description: description.into(),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            expires_at,
            ..Default::default()
        };
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
    ];
    for (request, expected) in cases {
        let result = app.admin.create_key(app.authed(request)).await;
        assert_status(result, Code::InvalidArgument, expected);
    }
    let too_many: Vec<String> = (0..51).map(|i| format!("r{i}:read")).collect();
    let request = proto::CreateKeyRequest {
        name: "x".into(),
        scopes: too_many,
        ..Default::default()
    };
    assert_status(
        app.admin.create_key(app.authed(request)).await,
        Code::InvalidArgument,
        "at most 50 scopes",
    );

    // Key ids.
    for (id, code, expected) in [
        ("", Code::InvalidArgument, "key_id: is required"),
        (
            "abc",
            Code::InvalidArgument,
            "key_id: 'abc' is not a key id",
        ),
        (
            "key_AAAAAAAAAAAAAAAAAAAA",
            Code::NotFound,
            "key key_AAAAAAAAAAAAAAAAAAAA not found",
        ),
    ] {
        assert_status(app.admin.get_key(app.authed(get(id))).await, code, expected);
    }
    let request = proto::RotateKeyRequest {
        key_id: "key_AAAAAAAAAAAAAAAAAAAA".into(),
        ..Default::default()
    };
    assert_status(
        app.admin.rotate_key(app.authed(request)).await,
        Code::NotFound,
        "not found",
    );

    // Paging.
    for page_size in [-1, 101] {
        let request = proto::ListKeysRequest {
            page_size,
            ..Default::default()
        };
        assert_status(
            app.admin.list_keys(app.authed(request)).await,
            Code::InvalidArgument,
            "page_size",
        );
    }
    let request = proto::ListAuditEventsRequest {
        page_token: "garbage".into(),
        ..Default::default()
    };
    assert_status(
        app.admin.list_audit_events(app.authed(request)).await,
        Code::InvalidArgument,
        "page_token",
    );

    // Updates.
    let update = |paths: &[&str], name: &str, expires_at| proto::UpdateKeyRequest {
        key_id: key_id.clone(),
        name: name.into(),
        expires_at,
        update_mask: mask(paths),
        ..Default::default()
    };
    let expired = Some(days_from(now, -3));
    for (request, expected) in [
        (update(&[], "x", None), "update_mask: is empty"),
        (update(&["prefix"], "x", None), "'prefix' cannot be updated"),
        (update(&["name"], " ", None), "name: name must not be empty"),
        (update(&["name", "expires_at"], "ok", expired), "expires_at"),
    ] {
        let result = app.admin.update_key(app.authed(request)).await;
        assert_status(result, Code::InvalidArgument, expected);
    }
    let request = proto::RevokeKeyRequest {
        key_id: key_id.clone(),
        reason: "r".repeat(501),
        ..Default::default()
    };
    assert_status(
        app.admin.revoke_key(app.authed(request)).await,
        Code::InvalidArgument,
        "reason",
    );

    // Verify requests.
    let request = proto::VerifyKeyRequest {
        key: existing.secret.clone(),
        required_scopes: vec!["Datasets:read".into()],
        client_ip: String::new(),
    };
    assert_status(
        app.verify.verify_key(request).await,
        Code::InvalidArgument,
        "required_scopes[0]",
    );
    let request = proto::VerifyKeyRequest {
        key: existing.secret.clone(),
        required_scopes: vec![],
        client_ip: "not-an-ip".into(),
    };
    assert_status(
        app.verify.verify_key(request).await,
        Code::InvalidArgument,
        "client_ip",
    );

    // Nothing changed.
    assert_eq!(without_usage(app.list_keys(true).await), keys_before);
    assert_eq!(app.audit("").await, audit_before);
}

/// NUL, terminal escapes, line breaks, bidirectional overrides and
/// zero-width characters in any text field: INVALID_ARGUMENT naming the
/// field before the store is touched, so SQLite and Postgres answer alike
/// (Postgres once failed a NUL reason with INTERNAL), and nothing changes.
async fn hostile_text_is_refused_alike_on_both_stores(mut app: TestApp) {
    let existing = app
        .create_key("ci-runner", &["datasets:read"])
        .await
        .unwrap();
    let key_id = existing.key.unwrap().key_id;
    let keys_before = without_usage(app.list_keys(true).await);
    let audit_before = app.audit("").await;

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
        let request = proto::CreateKeyRequest {
            name: name.into(),
            scopes: vec!["a:b".into()],
            ..Default::default()
        };
        assert_status(
            app.admin.create_key(app.authed(request)).await,
            Code::InvalidArgument,
            &format!("name: name must not contain {why}"),
        );
        let request = proto::UpdateKeyRequest {
            key_id: key_id.clone(),
            name: name.into(),
            update_mask: mask(&["name"]),
            ..Default::default()
        };
        assert_status(
            app.admin.update_key(app.authed(request)).await,
            Code::InvalidArgument,
            &format!("name: name must not contain {why}"),
        );
    }
    for (description, why) in [
        (nul, "control characters"),
        (ansi, "control characters"),
        ("line\r\nbreak", "control characters"),
        (rtl, "bidirectional controls"),
    ] {
        let request = proto::CreateKeyRequest {
            name: "x".into(),
            description: description.into(),
            scopes: vec!["a:b".into()],
            ..Default::default()
        };
        assert_status(
            app.admin.create_key(app.authed(request)).await,
            Code::InvalidArgument,
            &format!("description: description must not contain {why}"),
        );
    }
    for reason in [nul, ansi, crlf, rtl, "tab\there"] {
        let request = proto::RevokeKeyRequest {
            key_id: key_id.clone(),
            reason: reason.into(),
            ..Default::default()
        };
        assert_status(
            app.admin.revoke_key(app.authed(request)).await,
            Code::InvalidArgument,
            "reason: reason must be one line of printable text",
        );
    }
    for (scope, shown) in [
        ("datasets:read\0", "'datasets:read?'"),
        ("datasets\u{202E}:read", "'datasets?:read'"),
        ("data\u{200B}sets:read", "'data?sets:read'"),
    ] {
        let request = proto::CreateKeyRequest {
            name: "x".into(),
            scopes: vec![scope.into()],
            ..Default::default()
        };
        let status = assert_status(
            app.admin.create_key(app.authed(request)).await,
            Code::InvalidArgument,
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
        assert_status(
            app.admin
                .get_account(with_header(headers::ACTOR, actor))
                .await,
            Code::InvalidArgument,
            &format!("{}: {expected}", headers::ACTOR),
        );
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
    let status = assert_status(
        app.admin.get_account(request).await,
        Code::InvalidArgument,
        headers::ACCOUNT,
    );
    assert!(
        !status.message().contains(&existing.secret[4..]),
        "{status:?}"
    );
    let request = app.as_operator(
        proto::SetAccountTierRequest {
            account_id: "AC\0ME".into(),
            tier: proto::Tier::Premium.into(),
        },
        "ACME",
        "alice@example.com",
    );
    assert_status(
        app.admin.set_account_tier(request).await,
        Code::InvalidArgument,
        "account_id",
    );

    // Nothing changed: the key is still active, no event was written.
    assert_eq!(without_usage(app.list_keys(true).await), keys_before);
    assert_eq!(app.audit("").await, audit_before);
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
