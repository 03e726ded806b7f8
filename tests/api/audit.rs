//! The audit log through the real server: event ids and page tokens are
//! per account, and the product tour and every feature of the CLI run as
//! a Postgres role with exactly the grants of docs/SECURITY.md, which may
//! only INSERT and SELECT audit rows.

use std::time::Duration;

use vilvik_keys::proto;

use vilvik_keys_test_support::{
    ACCOUNT, Backend, OPERATOR_TOKEN, TestApp, binary, eventually, postgres_client, spawn_app,
};

crate::on_both_backends!(event_ids_and_page_tokens_are_per_account);

async fn event_ids_and_page_tokens_are_per_account(mut app: TestApp) {
    // ACME has its bootstrap event and more; globex starts now.
    for name in ["one", "two"] {
        app.create_key(name, &["datasets:read"]).await.unwrap();
    }
    for name in ["theirs", "also-theirs"] {
        app.create_key_as_operator("globex", name, &["datasets:read"])
            .await;
    }
    let first_page = |account: &str| {
        app.as_operator(
            proto::ListAuditEventsRequest {
                page_size: 1,
                ..Default::default()
            },
            account,
            "alice@example.com",
        )
    };
    let (acme, globex) = (first_page(ACCOUNT), first_page("globex"));
    let acme = app
        .admin
        .list_audit_events(acme)
        .await
        .unwrap()
        .into_inner();
    let globex = app
        .admin
        .list_audit_events(globex)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(acme.events[0].event_id, "1");
    assert_eq!(
        globex.events[0].event_id, "1",
        "globex counts its own events"
    );
    assert_eq!(
        acme.next_page_token, globex.next_page_token,
        "a page token says where in one's own log it is, nothing about others"
    );
    let all: Vec<String> = app
        .audit("")
        .await
        .into_iter()
        .map(|e| e.event_id)
        .collect();
    assert_eq!(all, ["1", "2", "3"]);
}

/// docs/SECURITY.md shows the grants the test role is made with, as they
/// are: the two cannot drift.
#[test]
fn the_documented_grants_are_the_tested_ones() {
    let docs = include_str!("../../docs/SECURITY.md");
    let grants = vilvik_keys_store::SERVICE_GRANTS;
    assert!(
        docs.contains(&format!("\n{grants}```")),
        "docs/SECURITY.md must show crates/store/src/postgres/grants.sql verbatim:\n{grants}"
    );
}

/// A login role of its own (roles are cluster-wide), dropped at the end
/// even when the test fails.
struct ServiceRole {
    name: String,
    owner_url: String,
}

impl Drop for ServiceRole {
    fn drop(&mut self) {
        let (name, url) = (self.name.clone(), self.owner_url.clone());
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                    .await
                    .unwrap();
                let connection = tokio::spawn(connection);
                let dropped = client
                    .batch_execute(&format!("DROP OWNED BY {name}; DROP ROLE {name};"))
                    .await;
                if let Err(e) = dropped {
                    eprintln!("warning: role {name} was not dropped: {e}");
                }
                drop(client);
                let _ = connection.await;
            })
        })
        .join();
    }
}

/// `url` with its user replaced by `role` (trust authentication in tests).
fn as_role(url: &str, role: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap();
    let host = rest.split_once('@').map_or(rest, |(_, host)| host);
    format!("{scheme}://{role}@{host}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tour_runs_as_a_role_that_cannot_rewrite_the_audit_log() {
    use secrecy::{ExposeSecret, SecretString};
    let Some(mut app) = spawn_app(Backend::Postgres).await else {
        return;
    };
    // Migrated and bootstrapped as the owner; from here on the service
    // runs as a role with the documented grants only.
    let owner_url = app
        .config
        .database_url
        .as_ref()
        .unwrap()
        .expose_secret()
        .to_owned();
    let owner = app.postgres_client().await;
    let database: String = owner
        .query_one("SELECT current_database()", &[])
        .await
        .unwrap()
        .get(0);
    // RandomState is seeded at random: a name no other test run uses.
    let random =
        std::hash::BuildHasher::build_hasher(&std::collections::hash_map::RandomState::new());
    let role = ServiceRole {
        name: format!("vk_service_{:016x}", std::hash::Hasher::finish(&random)),
        owner_url: owner_url.clone(),
    };
    owner
        .batch_execute(&format!("CREATE ROLE {} LOGIN", role.name))
        .await
        .unwrap();
    owner
        .batch_execute(&vilvik_keys_store::service_grants(&database, &role.name))
        .await
        .unwrap();
    let role_url = as_role(&owner_url, &role.name);
    app.config.database_url = Some(SecretString::from(role_url.clone()));
    // A rotation then prunes the key's older secrets in its transaction.
    app.config.rotated_secrets_kept = 1;
    // `serve` migrates on start: with nothing to apply it needs no CREATE.
    app.restart().await;

    crate::tour::walk_the_tour(&mut app).await;

    // The CLI sends every create and rotation with a request id: the role
    // records one, and answers its retry with the first call's secret.
    let create = proto::CreateKeyRequest {
        name: "retried".into(),
        request_id: "0b6f2a5e-2f43-4c8e-9a55-3c1d2e4f5a6b".into(),
        ..Default::default()
    };
    let retried = |app: &TestApp| {
        let mut admin = app.admin.clone();
        let request = app.as_operator(create.clone(), "RETRIES", "alice@example.com");
        async move { admin.create_key(request).await.unwrap().into_inner() }
    };
    let (first, again) = (retried(&app).await, retried(&app).await);
    assert_eq!(first.secret, again.secret);
    assert_eq!(first.key, again.key);

    let revoked = walk_the_cli(&app, &role_url).await;
    prune_as_the_service_does(&mut app, &owner).await;

    // The role may read and append, never rewrite.
    let client = postgres_client(&role_url).await;
    let events: i64 = client
        .query_one("SELECT COUNT(*) FROM audit_events", &[])
        .await
        .unwrap()
        .get(0);
    assert!(events >= 7, "{events}");
    for sql in [
        "UPDATE audit_events SET actor = 'someone else'",
        "DELETE FROM audit_events",
        "TRUNCATE audit_events",
    ] {
        let err = client.batch_execute(sql).await.expect_err(sql);
        assert_eq!(
            err.code(),
            Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
            "{sql}: {err}"
        );
    }
    // What the tour wrote verifies.
    let store = vilvik_keys_store::PostgresStore::connect(&owner_url)
        .await
        .unwrap();
    let mut check = vilvik_keys_store::ChainCheck::new();
    vilvik_keys_store::Store::stream_audit_chain(&store, None, 100, &mut |rows| {
        rows.into_iter().for_each(|r| check.push(r))
    })
    .await
    .unwrap();
    let summary = check.finish().expect("the chain is intact");
    assert_eq!(summary.events, events as u64);

    // What the role may do without an event: un-revoke a key, give a key
    // `keys:admin`. `audit verify` names both.
    let ordinary = app
        .create_key_as_operator("CLI", "ordinary", &["datasets:read"])
        .await;
    let ordinary = ordinary.key.unwrap().key_id;
    client
        .execute(
            "UPDATE keys SET revoked_at = NULL, revoke_reason = NULL WHERE key_id = $1",
            &[&revoked],
        )
        .await
        .unwrap();
    client
        .execute(
            "UPDATE keys SET scopes = array_append(scopes, 'keys:admin') WHERE key_id = $1",
            &[&ordinary],
        )
        .await
        .unwrap();
    let (code, said) = audit_verify(&role_url);
    assert_eq!(code, Some(4), "{said}");
    for needle in [
        format!("key {revoked}: revoked is 'no' in the store but 'yes ("),
        format!(
            "key {ordinary}: scopes is 'datasets:read keys:admin' in the store but 'datasets:read'"
        ),
    ] {
        assert!(said.contains(&needle), "{needle} in {said}");
    }
    // Before the role goes: no session of it may remain.
    app.stop().await;
}

/// `vilvik-keys` with `args`, acting on the account `CLI` of `app` with
/// the operator token.
fn cli(app: &TestApp, args: &[&str]) -> serde_json::Value {
    let addr = format!("http://{}", app.admin_addr);
    let output = binary::command()
        .args(args)
        .args([
            "--addr",
            &addr,
            "--json",
            "--account",
            "CLI",
            "--actor",
            "alice",
        ])
        .env("VILVIK_KEYS_TOKEN", OPERATOR_TOKEN)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "`{}`: {said}", args.join(" "));
    serde_json::from_slice(&output.stdout).unwrap()
}

/// Every command of the CLI that writes or reads the store, as the
/// service's role: a create (the CLI always sends a request id), an
/// update with the etag it read, rotations that prune older secrets, a
/// revocation, the key's audit log, and `audit verify` on the role's own
/// connection.
async fn walk_the_cli(app: &TestApp, role_url: &str) -> String {
    let created = cli(
        app,
        &[
            "keys",
            "create",
            "--name",
            "by-cli",
            "--scope",
            "datasets:read",
        ],
    );
    let key_id = created["key"]["key_id"].as_str().unwrap().to_owned();
    let renamed = cli(
        app,
        &["keys", "update", &key_id, "--name", "by-cli-renamed"],
    );
    assert_eq!(renamed["name"], "by-cli-renamed", "{renamed}");
    for _ in 0..3 {
        cli(app, &["keys", "rotate", &key_id]);
    }
    cli(app, &["keys", "revoke", &key_id, "--reason", "done"]);
    let events = cli(app, &["keys", "audit", &key_id]);
    let actions: Vec<&str> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        [
            "created", "updated", "rotated", "rotated", "rotated", "revoked"
        ]
    );
    let (code, said) = audit_verify(role_url);
    assert_eq!(code, Some(0), "audit verify as the role: {said}");
    key_id
}

/// `vilvik-keys audit verify` on `database_url`: its exit code and stderr.
fn audit_verify(database_url: &str) -> (Option<i32>, String) {
    let verified = binary::command()
        .args(["audit", "verify"])
        .env("DATABASE_URL", database_url)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&verified.stderr).into_owned();
    (verified.status.code(), said)
}

/// The admin node's pruning (at start, then hourly) as the role: request
/// ids past their 24 hours, the change log and rotated-away secrets past
/// their retention are deleted.
async fn prune_as_the_service_does(app: &mut TestApp, owner: &tokio_postgres::Client) {
    app.clock.advance(time::Duration::days(30));
    app.restart().await;
    let count = |sql: &'static str| async move {
        let row = owner.query_one(sql, &[]).await.unwrap();
        row.get::<_, i64>(0)
    };
    eventually(
        Duration::from_secs(10),
        "every kind of history is pruned",
        || async {
            count("SELECT COUNT(*) FROM requests").await == 0
                && count("SELECT COUNT(*) FROM key_secrets WHERE superseded_at IS NOT NULL").await
                    == 0
                && count("SELECT pruned_through FROM change_log_floor").await > 0
        },
    )
    .await;
}
