//! End-to-end tests of the admin CLI: a real server in-process on free
//! ports over a temporary SQLite file, and the real `vilvik-keys` binary
//! driven the way a person or a script would drive it.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use vilvik_keys::headers;
use vilvik_keys_test_support::{
    ACCOUNT, Backend, OPERATOR_TOKEN, ServedBinary, TestApp, binary, eventually,
};

/// A server with nothing in its store, in process on a SQLite file: the
/// tests bootstrap their accounts through the binary. Each test ends with
/// [`TestApp::stop`], which checks that it shuts down cleanly.
async fn spawn_server() -> TestApp {
    TestApp::spawn_empty(Backend::Sqlite, |config| {
        config.usage_flush_interval = Duration::from_millis(50);
        config.shutdown_grace = Duration::from_secs(2);
    })
    .await
    .expect("SQLite is always there")
}

/// [`spawn_server`] with `account` bootstrapped; its management key.
async fn spawn_server_for(account: &str) -> (TestApp, String) {
    let server = spawn_server().await;
    let admin = bootstrap(&server, account);
    (server, admin)
}

/// `vilvik-keys bootstrap --account <account>` on the server's database;
/// returns the management key it prints (alone) on stdout.
fn bootstrap(server: &TestApp, account: &str) -> String {
    let env = [
        (
            "VILVIK_KEYS_SQLITE_PATH",
            server.config.sqlite_path.as_os_str(),
        ),
        ("RUST_LOG", "warn".as_ref()),
    ];
    binary::bootstrap(env, account).0
}

/// The binary with `token` in VILVIK_KEYS_TOKEN, pointed at `server`.
fn cli(server: &TestApp, token: &str, args: &[&str]) -> Output {
    let addr = format!("http://{}", server.admin_addr);
    run(Some(token), args, &["--addr", &addr])
}

/// Runs [`cli`] and asserts it fails; returns what it said on stderr.
fn cli_fails(server: &TestApp, token: &str, args: &[&str]) -> String {
    let output = cli(server, token, args);
    assert_failure(&output, &args.join(" "))
}

/// Like [`cli`] with `--json`; asserts success and parses stdout.
fn json(server: &TestApp, token: &str, args: &[&str]) -> (Value, String) {
    let mut args = args.to_vec();
    args.push("--json");
    let output = cli(server, token, &args);
    assert_success(&output, &args.join(" "));
    let text = stdout(&output);
    let value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("`{}` printed invalid JSON ({e}): {text}", args.join(" ")));
    (value, text)
}

/// The binary with a clean environment: only VILVIK_KEYS_TOKEN when given.
fn run(token: Option<&str>, args: &[&str], extra: &[&str]) -> Output {
    let mut command = binary::command();
    command.args(args).args(extra);
    if let Some(token) = token {
        command.env("VILVIK_KEYS_TOKEN", token);
    }
    command.output().unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8(output.stderr.clone()).unwrap()
}

fn assert_success(output: &Output, what: &str) {
    assert!(
        output.status.success(),
        "`{what}` failed ({}):\nstdout: {}\nstderr: {}",
        output.status,
        stdout(output),
        stderr(output)
    );
}

fn assert_failure(output: &Output, what: &str) -> String {
    assert!(
        !output.status.success(),
        "`{what}` should fail:\nstdout: {}",
        stdout(output)
    );
    stderr(output)
}

fn str_of<'a>(value: &'a Value, field: &str) -> &'a str {
    value[field]
        .as_str()
        .unwrap_or_else(|| panic!("{field} is not a string in {value}"))
}

fn time_of(value: &Value, field: &str) -> OffsetDateTime {
    OffsetDateTime::parse(str_of(value, field), &Rfc3339)
        .unwrap_or_else(|e| panic!("{field} is not RFC 3339 ({e}) in {value}"))
}

fn assert_secret_shape(secret: &str) {
    // vlk_ + 8 (prefix) + _ + 32 (secret) + 6 (checksum), all base62.
    assert_eq!(secret.len(), 51, "{secret}");
    assert!(secret.starts_with("vlk_"), "{secret}");
    assert_eq!(&secret[12..13], "_", "{secret}");
    assert!(
        secret[4..12]
            .chars()
            .chain(secret[13..].chars())
            .all(|c| c.is_ascii_alphanumeric()),
        "{secret}"
    );
}

/// Neither a whole secret nor its private part appears in `text`.
fn assert_no_secret(text: &str, secrets: &[&str], what: &str) {
    for secret in secrets {
        assert!(!text.contains(secret), "{what} shows a secret: {text}");
        assert!(
            !text.contains(&secret[13..]),
            "{what} shows part of a secret: {text}"
        );
    }
}

fn find_key<'a>(keys: &'a Value, key_id: &str) -> Option<&'a Value> {
    keys.as_array()
        .expect("a JSON array of keys")
        .iter()
        .find(|k| k["key_id"] == key_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_lives_its_whole_life_through_the_cli() {
    let (mut server, admin) = spawn_server_for(ACCOUNT).await;

    // The management key is listed; its id is the audit actor later.
    let (keys, _) = json(&server, &admin, &["keys", "list"]);
    let keys = keys.as_array().unwrap().clone();
    assert_eq!(keys.len(), 1, "{keys:?}");
    let admin_id = str_of(&keys[0], "key_id").to_owned();
    assert_eq!(keys[0]["scopes"], serde_json::json!(["keys:admin"]));
    assert_eq!(keys[0]["prefix"], &admin[..12]);

    // Create: the secret once, its prefix, the smoke test.
    let (created, _) = json(
        &server,
        &admin,
        &[
            "keys",
            "create",
            "--name",
            "ci-runner",
            "--description",
            "the CI pipeline",
            "--scope",
            "datasets:read",
            "--expires-in",
            "30d",
        ],
    );
    let secret = str_of(&created, "secret").to_owned();
    assert_secret_shape(&secret);
    let key = &created["key"];
    let key_id = str_of(key, "key_id").to_owned();
    assert_eq!(key["prefix"], &secret[..12]);
    assert_eq!(key["name"], "ci-runner");
    assert_eq!(key["description"], "the CI pipeline");
    assert_eq!(key["account_id"], ACCOUNT);
    assert_eq!(key["scopes"], serde_json::json!(["datasets:read"]));
    assert_eq!(key["state"], "active");
    assert_eq!(key["revoked_at"], Value::Null);
    let expires_in = time_of(key, "expires_at") - OffsetDateTime::now_utc();
    assert!(
        (time::Duration::days(30) - expires_in).abs() < time::Duration::minutes(1),
        "{expires_in}"
    );
    let smoke = str_of(&created, "smoke_test_command");
    assert!(
        smoke.contains(&secret) && smoke.contains(&server.verify_addr.to_string()),
        "{smoke}"
    );
    assert!(
        smoke.contains("vilvik.keys.v1.KeyVerify/VerifyKey"),
        "{smoke}"
    );
    let curl = str_of(&created, "curl_smoke_test_command");
    assert_eq!(
        curl,
        format!(
            "curl -fsS -H \"Authorization: Bearer {secret}\" http://{}/v1/keys/self",
            server.verify_addr
        )
    );

    // List (one key per page, so every page is followed) and show.
    let (keys, text) = json(&server, &admin, &["keys", "list", "--page-size", "1"]);
    assert_eq!(keys.as_array().unwrap().len(), 2, "{text}");
    let listed = find_key(&keys, &key_id).expect("the new key is listed");
    assert_eq!(listed["prefix"], &secret[..12]);
    assert_eq!(listed["state"], "active");
    assert_no_secret(&text, &[&secret, &admin], "keys list");
    let (shown, text) = json(&server, &admin, &["keys", "show", &key_id]);
    assert_eq!(shown["key_id"], key_id.as_str());
    assert_eq!(shown["name"], "ci-runner");
    assert_no_secret(&text, &[&secret, &admin], "keys show");

    // The management key's use by the CLI is recorded (written behind).
    eventually(
        Duration::from_secs(2),
        "the management key's use by the CLI is recorded",
        || {
            let (keys, _) = json(&server, &admin, &["keys", "list"]);
            let recorded = find_key(&keys, &admin_id).unwrap()["last_used_ip"] == "127.0.0.1";
            std::future::ready(recorded)
        },
    )
    .await;
    let (keys, _) = json(&server, &admin, &["keys", "list"]);
    let admin_key = find_key(&keys, &admin_id).unwrap();
    assert_eq!(admin_key["last_used_ip"], "127.0.0.1", "{admin_key}");
    time_of(admin_key, "last_used_at");
    // Seen by the admin listener, claimed by nobody, and counted.
    assert_eq!(admin_key["last_used_observed_ip"], "127.0.0.1");
    assert_eq!(admin_key["last_used_claimed_ip"], serde_json::Value::Null);
    assert!(
        admin_key["valid_use_count"].as_u64() >= Some(1),
        "{admin_key}"
    );

    // Update: scopes and name, then drop the expiry.
    let (updated, _) = json(
        &server,
        &admin,
        &[
            "keys",
            "update",
            &key_id,
            "--name",
            "ci-runner-2",
            "--scope",
            "datasets:write",
            "--scope",
            "datasets:read",
        ],
    );
    assert_eq!(updated["name"], "ci-runner-2");
    assert_eq!(
        updated["scopes"],
        serde_json::json!(["datasets:read", "datasets:write"])
    );
    assert_eq!(updated["description"], "the CI pipeline");
    let (updated, _) = json(&server, &admin, &["keys", "update", &key_id, "--no-expiry"]);
    assert_eq!(updated["expires_at"], Value::Null);

    // Rotate: a new secret and prefix; the id stays.
    let (rotated, _) = json(&server, &admin, &["keys", "rotate", &key_id]);
    let new_secret = str_of(&rotated, "secret").to_owned();
    assert_secret_shape(&new_secret);
    assert_ne!(new_secret, secret);
    assert_eq!(rotated["key"]["key_id"], key_id.as_str());
    assert_eq!(rotated["key"]["prefix"], &new_secret[..12]);
    assert_ne!(rotated["key"]["prefix"], &secret[..12]);
    time_of(&rotated["key"], "rotated_at");
    assert!(str_of(&rotated, "smoke_test_command").contains(&new_secret));
    assert!(str_of(&rotated, "curl_smoke_test_command").contains(&new_secret));

    // Revoke: final, and hidden from the default listing.
    let (revoked, _) = json(
        &server,
        &admin,
        &["keys", "revoke", &key_id, "--reason", "leaked in a log"],
    );
    assert_eq!(revoked["state"], "revoked");
    assert_eq!(revoked["revoke_reason"], "leaked in a log");
    time_of(&revoked, "revoked_at");
    let (keys, _) = json(&server, &admin, &["keys", "list"]);
    assert!(find_key(&keys, &key_id).is_none(), "{keys}");
    let (keys, text) = json(&server, &admin, &["keys", "list", "--include-revoked"]);
    assert_eq!(find_key(&keys, &key_id).unwrap()["state"], "revoked");
    assert_no_secret(&text, &[&secret, &new_secret, &admin], "keys list");
    let err = cli_fails(&server, &admin, &["keys", "rotate", &key_id]);
    assert!(err.starts_with("error: FAILED_PRECONDITION: "), "{err}");

    // Audit: every change, oldest first, by the management key, no secrets.
    let (events, text) = json(
        &server,
        &admin,
        &["keys", "audit", &key_id, "--page-size", "2"],
    );
    let events = events.as_array().unwrap();
    let actions: Vec<&str> = events.iter().map(|e| str_of(e, "action")).collect();
    assert_eq!(
        actions,
        ["created", "updated", "updated", "rotated", "revoked"],
        "{text}"
    );
    for event in events {
        assert_eq!(event["actor"], format!("key:{admin_id}"), "{event}");
        assert_eq!(event["key_id"], key_id.as_str());
        assert_eq!(event["actor_ip"], "127.0.0.1");
        time_of(event, "at");
    }
    let scopes_change = events[1]["changes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["field"] == "scopes")
        .expect("the update records the scopes");
    assert_eq!(scopes_change["old_value"], "datasets:read");
    assert_eq!(scopes_change["new_value"], "datasets:read datasets:write");
    assert_no_secret(&text, &[&secret, &new_secret, &admin], "keys audit");

    // The same as tables, for people.
    let output = cli(&server, &admin, &["keys", "list", "--include-revoked"]);
    assert_success(&output, "keys list (table)");
    let table = stdout(&output);
    let mut lines = table.lines();
    let header = lines.next().unwrap();
    assert_eq!(
        header.split_whitespace().collect::<Vec<_>>(),
        [
            "KEY", "ID", "NAME", "PREFIX", "STATE", "SCOPES", "EXPIRES", "LAST", "USED", "FROM",
            "CLAIMED", "IP", "USES", "REJECTED"
        ]
    );
    let row = lines
        .find(|l| l.starts_with(&key_id))
        .expect("a row for the key");
    assert_eq!(
        row.split_whitespace().collect::<Vec<_>>(),
        [
            key_id.as_str(),
            "ci-runner-2",
            &new_secret[..12],
            "revoked",
            "datasets:read,datasets:write",
            "-",
            "-",
            "-",
            "-",
            "0",
            "0"
        ],
        "{table}"
    );
    // Columns line up: every row's PREFIX starts where the header's does.
    let prefix_col = header.find("PREFIX").unwrap();
    assert_eq!(row.find(&new_secret[..12]), Some(prefix_col), "{table}");
    assert_no_secret(&table, &[&secret, &new_secret, &admin], "keys list (table)");
    let output = cli(&server, &admin, &["keys", "audit", &key_id]);
    assert_success(&output, "keys audit (table)");
    let table = stdout(&output);
    assert!(table.starts_with("AT "), "{table}");
    assert!(
        table.contains(r#"scopes: "datasets:read" -> "datasets:read datasets:write""#),
        "{table}"
    );

    // Human create output: the secret with its warning, then the smoke
    // tests, curl's first.
    let output = cli(&server, &admin, &["keys", "create", "--name", "human"]);
    assert_success(&output, "keys create (human)");
    let text = stdout(&output);
    let notice = text.find("shown once, store it now").expect(&text);
    let secret_line = text
        .lines()
        .map(str::trim)
        .find(|l| l.len() == 51 && l.starts_with("vlk_"))
        .expect("the secret on a line of its own");
    assert_secret_shape(secret_line);
    let secret_at = text.find(&format!("    {secret_line}\n")).expect(&text);
    let smoke_at = text
        .find(
            "Smoke test (run it from your terminal; it answers 200 with the key's details, \
             401 once the key is revoked):",
        )
        .expect(&text);
    let curl_at = text
        .find(&format!(
            "    curl -fsS -H \"Authorization: Bearer {secret_line}\" http://{}/v1/keys/self\n",
            server.verify_addr
        ))
        .expect(&text);
    let grpcurl_at = text.find("    grpcurl -plaintext ").expect(&text);
    assert!(
        notice < secret_at && secret_at < smoke_at && smoke_at < curl_at && curl_at < grpcurl_at,
        "{text}"
    );
    assert!(text.contains("prefix        vlk_"), "{text}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_show_their_tier_and_only_the_operator_changes_it() {
    let (mut server, admin) = spawn_server_for(ACCOUNT).await;

    let (account, _) = json(&server, &admin, &["accounts", "show"]);
    assert_eq!(
        account,
        serde_json::json!({
            "account_id": ACCOUNT,
            "tier": "free",
            "active_key_limit": 3,
            "grantable_scopes": ["*:*"],
            "grantable_scopes_default": true,
        })
    );

    // A management key cannot change its own tier.
    let err = cli_fails(
        &server,
        &admin,
        &["accounts", "set-tier", ACCOUNT, "premium"],
    );
    assert!(err.starts_with("error: PERMISSION_DENIED: "), "{err}");
    assert!(!err.contains(&admin), "{err}");

    // The operator token names the account and the person acting.
    let (account, _) = json(
        &server,
        OPERATOR_TOKEN,
        &[
            "accounts", "set-tier", ACCOUNT, "premium", "--actor", "alice",
        ],
    );
    assert_eq!(account["tier"], "premium");
    assert_eq!(account["active_key_limit"], 25);
    let (account, _) = json(&server, &admin, &["accounts", "show"]);
    assert_eq!(account["tier"], "premium");
    let (account, _) = json(
        &server,
        OPERATOR_TOKEN,
        &["accounts", "show", "--account", ACCOUNT, "--actor", "alice"],
    );
    assert_eq!(account["tier"], "premium");

    let output = cli(&server, &admin, &["accounts", "show"]);
    assert_success(&output, "accounts show (table)");
    let text = stdout(&output);
    assert!(
        text.contains("tier") && text.contains("premium") && text.contains("25"),
        "{text}"
    );

    // The account's audit log has the change, by the operator's actor.
    let (events, _) = json(&server, &admin, &["keys", "audit"]);
    let change = events
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["action"] == "tier_changed")
        .expect("a tier_changed event");
    assert_eq!(change["actor"], "operator:alice");
    assert_eq!(change["key_id"], Value::Null);

    // The operator token without --account/--actor is refused, naming the header.
    let err = cli_fails(&server, OPERATOR_TOKEN, &["accounts", "show"]);
    assert!(
        err.starts_with(&format!("error: INVALID_ARGUMENT: {}", headers::ACCOUNT)),
        "{err}"
    );
    assert!(!err.contains(OPERATOR_TOKEN), "{err}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_sets_an_accounts_grantable_scopes() {
    let (mut server, admin) = spawn_server_for(ACCOUNT).await;

    let err = cli_fails(
        &server,
        &admin,
        &["accounts", "set-scopes", ACCOUNT, "datasets:*"],
    );
    assert!(err.starts_with("error: PERMISSION_DENIED: "), "{err}");

    let (account, _) = json(
        &server,
        OPERATOR_TOKEN,
        &[
            "accounts",
            "set-scopes",
            ACCOUNT,
            "datasets:*",
            "reports:read",
            "--actor",
            "alice",
        ],
    );
    assert_eq!(
        account["grantable_scopes"],
        serde_json::json!(["datasets:*", "reports:read"])
    );
    assert_eq!(account["grantable_scopes_default"], false);
    let output = cli(&server, &admin, &["accounts", "show"]);
    assert_success(&output, "accounts show (table)");
    assert!(
        stdout(&output).contains("datasets:*, reports:read (this account's own)"),
        "{}",
        stdout(&output)
    );

    // A management key is held to it, and cannot mint a management key.
    for scope in ["billing:read", "keys:admin"] {
        let err = cli_fails(
            &server,
            &admin,
            &["keys", "create", "--name", "x", "--scope", scope],
        );
        assert!(
            err.starts_with("error: PERMISSION_DENIED: scopes: "),
            "{err}"
        );
    }

    let (account, _) = json(
        &server,
        OPERATOR_TOKEN,
        &[
            "accounts",
            "set-scopes",
            ACCOUNT,
            "--default",
            "--actor",
            "alice",
        ],
    );
    assert_eq!(account["grantable_scopes_default"], true);
    let err = cli_fails(
        &server,
        OPERATOR_TOKEN,
        &["accounts", "set-scopes", ACCOUNT, "--actor", "alice"],
    );
    assert!(
        err.contains("PATTERN") || err.contains("--default"),
        "{err}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_fails_with_an_actionable_message() {
    let (mut server, admin) = spawn_server_for(ACCOUNT).await;

    let output = cli(
        &server,
        &admin,
        &["keys", "create", "--name", "x", "--scope", "Datasets:Read"],
    );
    let err = assert_failure(&output, "an invalid scope");
    assert!(
        err.starts_with("error: INVALID_ARGUMENT: scopes[0]"),
        "{err}"
    );
    assert!(stdout(&output).is_empty());

    let err = cli_fails(&server, &admin, &["keys", "update", "k_unknown"]);
    assert!(err.contains("nothing to update"), "{err}");

    let err = cli_fails(
        &server,
        &admin,
        &["keys", "create", "--name", "x", "--expires-in", "30"],
    );
    assert!(err.contains("'30' is not a duration"), "{err}");

    let err = cli_fails(&server, "vlk_not-a-real-key", &["keys", "list"]);
    assert!(err.starts_with("error: UNAUTHENTICATED: "), "{err}");
    assert!(!err.contains("vlk_not-a-real-key"), "{err}");
    server.stop().await;
}

#[test]
fn a_missing_token_says_what_to_export() {
    let output = run(None, &["keys", "list"], &[]);
    let err = assert_failure(&output, "keys list without a token");
    assert!(err.contains("export VILVIK_KEYS_TOKEN"), "{err}");
    assert!(err.contains("vilvik-keys bootstrap"), "{err}");
    assert!(err.contains("operator token"), "{err}");
}

#[test]
fn an_unreachable_server_is_named_with_a_hint() {
    // Bind and drop a listener: a port that nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let output = run(
        Some("vlk_whatever"),
        &["keys", "list"],
        &["--addr", addr.as_str()],
    );
    let err = assert_failure(&output, "keys list against nothing");
    assert!(
        err.contains(&format!("cannot reach the admin API at http://{addr}")),
        "{err}"
    );
    assert!(err.contains("vilvik-keys serve"), "{err}");
    assert!(!err.contains("vlk_whatever"), "{err}");
}

fn mode_of(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// The binary run by `sh` after `umask 000`, so that nothing but the
/// program itself keeps a file private.
fn with_open_umask(args: &[&str]) -> Command {
    let mut command = Command::new("sh");
    command
        .env_clear()
        .arg("-c")
        .arg("umask 000 && exec \"$0\" \"$@\"")
        .arg(binary::path())
        .args(args);
    command
}

#[test]
fn pepper_new_writes_a_private_pepper_whatever_the_umask_and_never_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("next.pepper");
    let path_text = path.to_str().unwrap();
    let output = with_open_umask(&["pepper", "new", path_text])
        .output()
        .unwrap();
    assert_success(&output, "pepper new");
    assert_eq!(mode_of(&path), 0o600, "whatever the umask");
    let id = stdout(&output).trim().to_owned();
    assert_eq!(id.len(), 16, "the new pepper's id: {id}");
    assert!(id.chars().all(|c| c.is_ascii_hexdigit()), "{id}");
    assert!(stderr(&output).contains("docs/SECURITY.md"));
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(!stdout(&output).contains(text.trim()) && !stderr(&output).contains(text.trim()));

    let output = run(None, &["pepper", "new", path_text], &[]);
    let err = assert_failure(&output, "pepper new over an existing file");
    assert!(err.contains("refusing to overwrite"), "{err}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), text, "unchanged");
}

#[test]
fn the_generated_pepper_is_private_whatever_the_umask_and_says_where_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("keys.db");
    // The store is made first (bootstrap opens only an existing one).
    let output = with_open_umask(&["migrate"])
        .env("VILVIK_KEYS_SQLITE_PATH", &db)
        .output()
        .unwrap();
    assert_success(&output, "migrate");
    let output = with_open_umask(&["bootstrap", "--account", ACCOUNT])
        .env("VILVIK_KEYS_SQLITE_PATH", &db)
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    assert_success(&output, "bootstrap");
    let pepper = dir.path().join("keys.db.pepper");
    assert_eq!(mode_of(&pepper), 0o600, "the generated pepper file");
    assert_eq!(mode_of(&db), 0o600, "the database");
    let log = stderr(&output);
    assert!(log.contains("generated a new pepper"), "{log}");
    assert!(log.contains(pepper.to_str().unwrap()), "{log}");
    let text = std::fs::read_to_string(&pepper).unwrap();
    assert!(
        !log.contains(text.trim()),
        "the pepper is never logged: {log}"
    );

    // Reused, not regenerated, on the next start.
    let output = run_with_db(&db, &["bootstrap", "--account", "GLOBEX"], &[]);
    assert_success(&output, "a second bootstrap");
    assert_eq!(std::fs::read_to_string(&pepper).unwrap(), text);
}

/// The binary on the SQLite file `db`, with extra environment.
fn run_with_db(db: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = binary::command();
    command
        .env("VILVIK_KEYS_SQLITE_PATH", db)
        .env("VILVIK_KEYS_ADMIN_ADDR", "127.0.0.1:0")
        .env("VILVIK_KEYS_VERIFY_ADDR", "127.0.0.1:0")
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied())
        .args(args);
    binary::output_within(command, Duration::from_secs(30))
}

#[test]
fn bad_pepper_files_stop_the_start_naming_the_setting_and_the_path() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("keys.db");
    let write = |name: &str, text: &str, mode: u32| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let hex = "5ec2e75ec2e75ec2e75ec2e75ec2e75ec2e75ec2e75ec2e75ec2e75ec2e75ec2";
    let good = write("good.pepper", hex, 0o600);
    let other = dir.path().join("other.pepper");
    assert_success(
        &run(None, &["pepper", "new", other.to_str().unwrap()], &[]),
        "pepper new",
    );
    let other = other.to_str().unwrap().to_owned();
    let readable = write("readable.pepper", hex, 0o644);
    let short = write("short.pepper", &hex[..40], 0o600);
    let missing = dir
        .path()
        .join("missing.pepper")
        .to_str()
        .unwrap()
        .to_owned();
    let current = "pepper_file (VILVIK_KEYS_PEPPER_FILE)";
    let older = "pepper_files (VILVIK_KEYS_PEPPER_FILES)";
    // (pepper_file, pepper_files, the setting and file named, and why)
    let cases: [(&str, &str, &str, &str, &str); 6] = [
        (&readable, "", current, &readable, "chmod 600"),
        (&short, "", current, &short, "64 hex characters"),
        (
            &missing,
            "",
            current,
            &missing,
            "cannot read the pepper file",
        ),
        (&good, &readable, older, &readable, "chmod 600"),
        (
            &good,
            &format!("{other},{short}"),
            older,
            &short,
            "does not hold a pepper",
        ),
        (
            &other,
            &format!("{good},{other}"),
            older,
            &other,
            "the same pepper",
        ),
    ];
    for (file, files, setting, culprit, needle) in cases {
        let output = run_with_db(
            &db,
            &["serve"],
            &[
                ("VILVIK_KEYS_PEPPER_FILE", file),
                ("VILVIK_KEYS_PEPPER_FILES", files),
            ],
        );
        let err = assert_failure(&output, &format!("serve with {file} and [{files}]"));
        assert!(err.contains(setting), "{setting}: {err}");
        assert!(err.contains(culprit), "names {culprit}: {err}");
        assert!(err.contains(needle), "{needle}: {err}");
        assert!(!err.contains(&hex[..16]), "never the content: {err}");
        assert!(!err.contains("listening"), "{err}");
    }
    // A good file is accepted.
    let output = run_with_db(
        &db,
        &["bootstrap", "--account", ACCOUNT],
        &[("VILVIK_KEYS_PEPPER_FILE", &good)],
    );
    assert_success(&output, "bootstrap with a good pepper file");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pepper_status_says_what_each_pepper_covers() {
    let mut server = spawn_server().await;
    bootstrap(&server, ACCOUNT);
    let status = |env: &[(&str, &str)]| {
        let output = run_with_db(&server.config.sqlite_path, &["pepper", "status"], env);
        assert_success(&output, "pepper status");
        stdout(&output)
    };
    let pepper_file = PathBuf::from(format!("{}.pepper", server.config.sqlite_path.display()));
    let current = vilvik_keys::pepper::read(&pepper_file, "pepper_file")
        .unwrap()
        .id()
        .to_string();
    let text = status(&[]);
    let header = text.lines().next().unwrap();
    assert!(header.starts_with("PEPPER"), "{text}");
    assert!(
        header.contains("LIVE KEYS") && header.contains("ALL SECRETS"),
        "{text}"
    );
    let line = text.lines().find(|l| l.starts_with(&current)).expect(&text);
    let words: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(
        words[..4],
        [current.as_str(), "current", "1", "1"],
        "{text}"
    );

    // An older pepper that covers nothing can be retired.
    let dir = tempfile::tempdir().unwrap();
    let old = dir.path().join("old.pepper");
    assert_success(
        &run(None, &["pepper", "new", old.to_str().unwrap()], &[]),
        "pepper new",
    );
    let text = status(&[("VILVIK_KEYS_PEPPER_FILES", old.to_str().unwrap())]);
    let old_id = vilvik_keys::pepper::read(&old, "pepper_files")
        .unwrap()
        .id()
        .to_string();
    let line = text.lines().find(|l| l.starts_with(&old_id)).expect(&text);
    assert_eq!(line.split_whitespace().nth(1), Some("older"), "{text}");
    assert!(
        text.contains("covers no live key: it can be retired"),
        "{text}"
    );

    // With another current pepper, the existing keys are unknown to it.
    let text = status(&[("VILVIK_KEYS_PEPPER_FILE", old.to_str().unwrap())]);
    let line = text.lines().find(|l| l.starts_with(&current)).expect(&text);
    assert_eq!(line.split_whitespace().nth(1), Some("unknown"), "{text}");
    assert!(text.contains("which is not configured"), "{text}");

    // A store without a pepper yet: nothing is made.
    let fresh = dir.path().join("fresh.db");
    assert_success(&run_with_db(&fresh, &["migrate"], &[]), "migrate");
    let output = run_with_db(&fresh, &["pepper", "status"], &[]);
    assert_success(&output, "pepper status before the first start");
    assert!(
        stdout(&output).contains("no pepper file at"),
        "{}",
        stdout(&output)
    );
    assert!(!dir.path().join("fresh.db.pepper").exists());
    server.stop().await;
}

/// `vilvik-keys audit verify` on the server's SQLite file, as an operator
/// runs it beside the service: exit 0 when intact, 4 naming the first
/// broken link, 1 when it cannot check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_verify_exits_by_what_it_found() {
    let mut server = spawn_server().await;
    bootstrap(&server, ACCOUNT);
    bootstrap(&server, "globex");
    let verify = |extra: &[&str]| {
        let mut args = vec!["audit", "verify"];
        args.extend_from_slice(extra);
        run_with_db(&server.config.sqlite_path, &args, &[])
    };

    let intact = verify(&[]);
    assert_success(&intact, "audit verify");
    assert_eq!(
        stdout(&intact).trim(),
        "audit log intact: 2 accounts, 2 events and 2 keys checked"
    );
    let one = verify(&["--account", "globex"]);
    assert_success(&one, "audit verify --account globex");
    assert_eq!(
        stdout(&one).trim(),
        "audit log intact: account 'globex': 1 event and 1 key checked"
    );

    rusqlite::Connection::open(&server.config.sqlite_path)
        .unwrap()
        .execute(
            "UPDATE audit_events SET actor = 'operator:mallory' WHERE account_id = ?1",
            [ACCOUNT],
        )
        .unwrap();
    let broken = verify(&[]);
    assert_eq!(broken.status.code(), Some(4), "{}", stderr(&broken));
    assert!(
        stderr(&broken).contains(&format!(
            "account '{ACCOUNT}', event 1: its content does not match its hash (edited)"
        )),
        "{}",
        stderr(&broken)
    );
    assert!(stdout(&broken).is_empty(), "{}", stdout(&broken));
    // The other account's chain is intact on its own.
    assert_success(
        &verify(&["--account", "globex"]),
        "audit verify --account globex",
    );

    let bad = verify(&["--account", "not an account"]);
    assert_eq!(bad.status.code(), Some(1), "{}", stderr(&bad));
    assert!(stderr(&bad).contains("--account"), "{}", stderr(&bad));
    server.stop().await;
}

/// `audit verify` on `server`'s SQLite file (the server stopped): its
/// exit code and what it said on stderr.
fn audit_verify(server: &TestApp, extra: &[&str]) -> (Option<i32>, String) {
    let mut args = vec!["audit", "verify"];
    args.extend_from_slice(extra);
    let output = run_with_db(&server.config.sqlite_path, &args, &[]);
    (output.status.code(), stderr(&output))
}

/// Plain SQL on `server`'s SQLite file, as someone holding a copy would.
fn tamper(server: &TestApp, sql: &str) {
    rusqlite::Connection::open(&server.config.sqlite_path)
        .unwrap()
        .execute_batch(sql)
        .unwrap();
}

/// A key created, renamed and revoked with the CLI: its id.
async fn a_revoked_key(server: &TestApp, admin: &str) -> String {
    let (created, _) = json(
        server,
        admin,
        &["keys", "create", "--name", "ci", "--scope", "datasets:read"],
    );
    let key_id = str_of(&created["key"], "key_id").to_owned();
    json(
        server,
        admin,
        &["keys", "update", &key_id, "--name", "ci-2"],
    );
    json(
        server,
        admin,
        &["keys", "revoke", &key_id, "--reason", "leaked"],
    );
    key_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_verify_finds_the_newest_events_deleted_behind_a_moved_head() {
    let (mut server, admin) = spawn_server_for(ACCOUNT).await;
    let key_id = a_revoked_key(&server, &admin).await;
    server.stop().await;
    // Events 3 (renamed) and 4 (revoked) deleted, the head pointed at 2.
    tamper(
        &server,
        &format!(
            "DELETE FROM audit_events WHERE account_id = '{ACCOUNT}' AND account_seq > 2;
             UPDATE audit_heads SET last_seq = 2, last_hash = (SELECT hash FROM audit_events
                 WHERE account_id = '{ACCOUNT}' AND account_seq = 2) WHERE account_id = '{ACCOUNT}';"
        ),
    );
    let (code, said) = audit_verify(&server, &[]);
    assert_eq!(code, Some(4), "{said}");
    for needle in [
        format!("account '{ACCOUNT}', key {key_id}: name is 'ci-2' in the store but 'ci'"),
        format!("account '{ACCOUNT}', key {key_id}: revoked is 'yes"),
    ] {
        assert!(said.contains(&needle), "{needle} in {said}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_verify_finds_an_account_whose_log_was_deleted() {
    let mut server = spawn_server().await;
    bootstrap(&server, ACCOUNT);
    bootstrap(&server, "BRAVO");
    server.stop().await;
    tamper(
        &server,
        "DELETE FROM audit_events WHERE account_id = 'BRAVO';
         DELETE FROM audit_heads WHERE account_id = 'BRAVO';",
    );
    let missing = "account 'BRAVO', 1 stored key but no audit events and no head";
    for extra in [&[][..], &["--account", "BRAVO"]] {
        let (code, said) = audit_verify(&server, extra);
        assert_eq!(code, Some(4), "{extra:?}: {said}");
        assert!(said.contains(missing), "{extra:?}: {said}");
    }
    let (code, said) = audit_verify(&server, &["--account", ACCOUNT]);
    assert_eq!(code, Some(0), "{said}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_verify_finds_keys_changed_behind_the_log() {
    let (mut server, admin) = spawn_server_for(ACCOUNT).await;
    let revoked = a_revoked_key(&server, &admin).await;
    let (created, _) = json(
        &server,
        &admin,
        &[
            "keys",
            "create",
            "--name",
            "plain",
            "--scope",
            "datasets:read",
        ],
    );
    let plain = str_of(&created["key"], "key_id").to_owned();
    server.stop().await;
    tamper(
        &server,
        &format!(
            "UPDATE keys SET revoked_at = NULL, revoke_reason = NULL WHERE key_id = '{revoked}';
             UPDATE keys SET scopes = '[\"datasets:read\",\"keys:admin\"]' WHERE key_id = '{plain}';"
        ),
    );
    let (code, said) = audit_verify(&server, &[]);
    assert_eq!(code, Some(4), "{said}");
    for needle in [
        format!("key {revoked}: revoked is 'no' in the store but 'yes"),
        format!(
            "key {plain}: scopes is 'datasets:read keys:admin' in the store but 'datasets:read' \
             by the audit log"
        ),
    ] {
        assert!(said.contains(&needle), "{needle} in {said}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creates_are_retried_with_their_request_id_and_updates_check_the_etag() {
    let (mut server, admin) = spawn_server_for(ACCOUNT).await;

    // The same request id twice: one key, the same secret both times.
    let id = "3f0e6a8c-1d2b-4c5e-9f70-0123456789ab";
    let create = ["keys", "create", "--name", "retried", "--request-id", id];
    let (first, _) = json(&server, &admin, &create);
    let (again, _) = json(&server, &admin, &create);
    assert_eq!(first["secret"], again["secret"]);
    assert_eq!(first["key"]["key_id"], again["key"]["key_id"]);
    let (keys, _) = json(&server, &admin, &["keys", "list"]);
    assert_eq!(keys.as_array().unwrap().len(), 2, "{keys}");
    // Without --request-id each create is its own.
    let (other, _) = json(&server, &admin, &["keys", "create", "--name", "retried"]);
    assert_ne!(other["key"]["key_id"], first["key"]["key_id"]);

    // `keys update` sends the etag it read; a stale --etag is ABORTED.
    let key_id = str_of(&first["key"], "key_id").to_owned();
    let stale = str_of(&first["key"], "etag").to_owned();
    let (renamed, _) = json(
        &server,
        &admin,
        &["keys", "update", &key_id, "--name", "renamed"],
    );
    assert_ne!(str_of(&renamed, "etag"), stale);
    let refused = cli(
        &server,
        &admin,
        &[
            "keys", "update", &key_id, "--name", "lost", "--etag", &stale,
        ],
    );
    let message = assert_failure(&refused, "update with a stale etag");
    assert!(
        message.contains("ABORTED") && message.contains("was changed since you read it"),
        "{message}"
    );
    let (shown, _) = json(&server, &admin, &["keys", "show", &key_id]);
    assert_eq!(str_of(&shown, "name"), "renamed");
    assert_eq!(shown["etag"], renamed["etag"]);
    server.stop().await;
}

/// The binary run in `dir` with a clean environment (no store settings:
/// the default `./vilvik-keys.db`), `RUST_LOG=warn` and `env`.
fn run_in(dir: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = binary::command();
    command
        .current_dir(dir)
        .env("RUST_LOG", "warn")
        .env("VILVIK_KEYS_ADMIN_ADDR", "127.0.0.1:0")
        .env("VILVIK_KEYS_VERIFY_ADDR", "127.0.0.1:0")
        .envs(env.iter().copied())
        .args(args);
    binary::output_within(command, Duration::from_secs(30))
}

/// The names in `dir`, sorted.
fn names_in(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// The commands that read or write the store directly, but are not the
/// ones that make it.
const STORE_COMMANDS: [&[&str]; 3] = [
    &["bootstrap", "--account", ACCOUNT],
    &["pepper", "status"],
    &["audit", "verify"],
];

#[test]
fn store_commands_refuse_a_missing_store_naming_where_they_looked() {
    let dir = tempfile::tempdir().unwrap();
    let expected = dir.path().canonicalize().unwrap().join("vilvik-keys.db");
    for args in STORE_COMMANDS {
        let output = run_in(dir.path(), args, &[]);
        let err = assert_failure(&output, &args.join(" "));
        assert!(err.contains(expected.to_str().unwrap()), "{args:?}: {err}");
        assert!(err.contains("VILVIK_KEYS_SQLITE_PATH"), "{args:?}: {err}");
        assert!(err.contains("vilvik-keys migrate"), "{args:?}: {err}");
        assert!(stdout(&output).is_empty(), "{args:?}: {}", stdout(&output));
        assert_eq!(
            names_in(dir.path()),
            Vec::<String>::new(),
            "{args:?} made nothing"
        );
    }
    // A file that is not the service's store (empty: no schema) is not one.
    std::fs::write(&expected, "").unwrap();
    for args in STORE_COMMANDS {
        let err = assert_failure(&run_in(dir.path(), args, &[]), &args.join(" "));
        assert!(
            err.contains("holds no vilvik-keys schema"),
            "{args:?}: {err}"
        );
    }
    assert_eq!(
        std::fs::metadata(&expected).unwrap().len(),
        0,
        "left as it was"
    );
    std::fs::remove_file(&expected).unwrap();

    // `migrate` makes one; then each command says which store it used.
    let made = run_in(dir.path(), &["migrate"], &[]);
    assert_success(&made, "migrate");
    for args in STORE_COMMANDS {
        if args[0] == "audit" {
            continue; // an empty audit log: see the next test
        }
        let output = run_in(dir.path(), args, &[]);
        assert_success(&output, &args.join(" "));
        let err = stderr(&output);
        assert!(
            err.contains(&format!("store: SQLite database {}", expected.display())),
            "{args:?}: {err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_commands_refuse_a_postgres_database_without_the_schema() {
    let Some(database) = vilvik_keys_test_db::TestDatabase::create().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let pepper = dir.path().join("current.pepper");
    vilvik_keys::pepper::create(&pepper).unwrap();
    let env = [
        ("DATABASE_URL", database.url()),
        ("VILVIK_KEYS_PEPPER_FILE", pepper.to_str().unwrap()),
    ];
    for args in STORE_COMMANDS {
        let output = run_in(dir.path(), args, &env);
        let err = assert_failure(&output, &args.join(" "));
        assert!(
            err.contains("holds no vilvik-keys schema"),
            "{args:?}: {err}"
        );
        assert!(err.contains("DATABASE_URL"), "{args:?}: {err}");
        assert!(!err.contains("password"), "{args:?}: {err}");
    }
    let client = vilvik_keys_test_support::postgres_client(database.url()).await;
    let tables: i64 = client
        .query_one(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(tables, 0, "nothing was made in the database");
    assert_success(&run_in(dir.path(), &["migrate"], &env), "migrate");
    let output = run_in(dir.path(), &["bootstrap", "--account", ACCOUNT], &env);
    assert_success(&output, "bootstrap after migrate");
    let err = stderr(&output);
    assert!(err.contains("store: Postgres database '"), "{err}");
    assert!(err.contains(&format!("account {ACCOUNT}")), "{err}");
}

#[test]
fn audit_verify_fails_on_an_empty_store_or_an_unknown_account() {
    let dir = tempfile::tempdir().unwrap();
    assert_success(&run_in(dir.path(), &["migrate"], &[]), "migrate");
    let empty = run_in(dir.path(), &["audit", "verify"], &[]);
    let err = assert_failure(&empty, "audit verify of an empty store");
    assert_eq!(empty.status.code(), Some(1), "{err}");
    assert!(err.contains("holds no audit events"), "{err}");
    assert!(err.contains("SQLite database"), "names the store: {err}");

    assert_success(
        &run_in(dir.path(), &["bootstrap", "--account", ACCOUNT], &[]),
        "bootstrap",
    );
    let unknown = run_in(dir.path(), &["audit", "verify", "--account", "acme"], &[]);
    let err = assert_failure(&unknown, "audit verify --account acme");
    assert_eq!(unknown.status.code(), Some(1), "{err}");
    assert!(err.contains("account 'acme' has no audit events"), "{err}");
    assert!(err.contains("did you mean 'ACME'?"), "{err}");
    let known = run_in(dir.path(), &["audit", "verify", "--account", ACCOUNT], &[]);
    assert_success(&known, "audit verify --account ACME");
}

#[test]
fn bootstrap_makes_one_management_key_per_account_unless_asked_for_another() {
    let dir = tempfile::tempdir().unwrap();
    assert_success(&run_in(dir.path(), &["migrate"], &[]), "migrate");
    let first = run_in(dir.path(), &["bootstrap", "--account", "Beta"], &[]);
    assert_success(&first, "the first bootstrap");
    let err = stderr(&first);
    assert!(err.contains("account Beta"), "{err}");
    assert!(err.contains("store: SQLite database"), "{err}");

    // A provisioning script that "ensures" a first key, run again.
    let again = run_in(dir.path(), &["bootstrap", "--account", "Beta"], &[]);
    let err = assert_failure(&again, "bootstrap again");
    assert!(
        err.contains("already has an active management key"),
        "{err}"
    );
    assert!(err.contains("--another"), "{err}");
    assert!(stdout(&again).is_empty(), "no secret: {}", stdout(&again));

    // On purpose.
    let another = run_in(
        dir.path(),
        &[
            "bootstrap",
            "--account",
            "Beta",
            "--another",
            "--name",
            "second",
        ],
        &[],
    );
    assert_success(&another, "bootstrap --another");
    assert_secret_shape(stdout(&another).trim());

    // The same id but for case is another account: refused, naming it.
    for id in ["beta", "BETA"] {
        let output = run_in(dir.path(), &["bootstrap", "--account", id], &[]);
        let err = assert_failure(&output, &format!("bootstrap --account {id}"));
        assert!(err.contains("'Beta'"), "{id}: {err}");
        assert!(err.contains("only by case"), "{id}: {err}");
    }

    // Two management keys and their audit events, nothing else.
    let audit = run_in(dir.path(), &["audit", "verify"], &[]);
    assert_success(&audit, "audit verify");
    assert_eq!(
        stdout(&audit).trim(),
        "audit log intact: 1 account, 2 events and 2 keys checked"
    );

    let json = run_in(
        dir.path(),
        &["bootstrap", "--account", "Gamma", "--json"],
        &[],
    );
    assert_success(&json, "bootstrap --json");
    let value: Value = serde_json::from_str(&stdout(&json)).unwrap();
    assert_eq!(str_of(&value, "account_id"), "Gamma");
    assert_secret_shape(str_of(&value, "secret"));
    assert!(str_of(&value, "key_id").starts_with("key_"), "{value}");
    let expected = dir.path().canonicalize().unwrap().join("vilvik-keys.db");
    assert_eq!(
        str_of(&value, "store"),
        format!("SQLite database {}", expected.display())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_refuses_live_keys_hashed_with_a_pepper_it_is_not_given() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("keys.db");
    let db_text = db.to_str().unwrap();
    assert_success(&run_with_db(&db, &["migrate"], &[]), "migrate");
    // A key under the default pepper (keys.db.pepper, made now).
    assert_success(
        &run_with_db(&db, &["bootstrap", "--account", ACCOUNT], &[]),
        "bootstrap",
    );
    let old = dir.path().join("keys.db.pepper");
    // A rotation: the new pepper current, the default one older.
    let new = dir.path().join("new.pepper");
    let made = run(None, &["pepper", "new", new.to_str().unwrap()], &[]);
    assert_success(&made, "pepper new");
    let new_id = stdout(&made).trim().to_owned();
    let rotated = [
        ("VILVIK_KEYS_PEPPER_FILE", new.to_str().unwrap()),
        ("VILVIK_KEYS_PEPPER_FILES", old.to_str().unwrap()),
    ];
    assert_success(
        &run_with_db(&db, &["bootstrap", "--account", "GLOBEX"], &rotated),
        "bootstrap under the new pepper",
    );

    // Restarted without the rotation's settings: the old default file only.
    let output = run_with_db(&db, &["serve"], &[]);
    let err = assert_failure(&output, "serve without the new pepper");
    assert!(
        err.contains(&format!("1 live key(s) with pepper {new_id}")),
        "{err}"
    );
    assert!(err.contains("VILVIK_KEYS_PEPPER_FILES"), "{err}");
    assert!(err.contains("VILVIK_KEYS_RETIRED_PEPPERS"), "{err}");
    assert!(!err.contains("listening"), "{err}");

    // Retired on purpose: it starts, and says so.
    let served = ServedBinary::serve()
        .env("VILVIK_KEYS_SQLITE_PATH", db_text)
        .env("VILVIK_KEYS_RETIRED_PEPPERS", &new_id)
        .start()
        .await;
    assert!(served.log().contains("retired_peppers"), "{}", served.log());
    drop(served);

    // With the rotation's settings it starts as before.
    let served = ServedBinary::serve()
        .env("VILVIK_KEYS_SQLITE_PATH", db_text)
        .envs(rotated)
        .start()
        .await;
    drop(served);
}

#[test]
fn the_repository_ignores_pepper_files_and_the_tour_runs_in_a_scratch_directory() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    for name in [
        "vilvik-keys.db",
        "vilvik-keys.db.pepper",
        "vilvik-keys.pepper",
        "a/keys.db.pepper",
    ] {
        let status = Command::new("git")
            .current_dir(root)
            .args(["check-ignore", "-q", "--no-index", name])
            .status();
        match status {
            Ok(status) => assert!(status.success(), "git does not ignore {name}"),
            Err(_) => return, // no git here
        }
    }
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let tour = readme
        .split("## A five-minute tour")
        .nth(1)
        .and_then(|rest| rest.split("\n## ").next())
        .expect("the README has a tour");
    let scratch = tour
        .find("cd /tmp/vilvik-tour")
        .expect("the tour moves to a scratch directory");
    let first_use = tour
        .find("vilvik-keys serve")
        .expect("the tour starts the service");
    assert!(
        scratch < first_use,
        "the service starts in the scratch directory"
    );
    assert!(
        !tour.contains("cargo run"),
        "the service does not run in the repository"
    );
}
