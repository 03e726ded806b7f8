//! Stored hashes are keyed with a pepper kept outside the database. A copy of the database alone confirms no guessed key; a
//! rotation of the pepper moves keys over as they verify, old and new
//! keys verifying throughout; legacy unkeyed hashes move too; a retired
//! pepper's keys are NOT_FOUND. `vilvik-keys pepper status` (the real
//! binary) reports what each pepper still covers.

use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::ExposeSecret;
use serde_json::Value;
use sha2::Digest;
use vilvik_keys::proto::VerifyCode;
use vilvik_keys::startup::{Application, Role};
use vilvik_keys_test_support::{Backend, TestApp, binary, eventually};

/// The context of the unkeyed hash stored before peppers.
const LEGACY_CONTEXT: &str = "vilvik-keys 2026-11-26 api key secret hash v1";

crate::on_both_backends!(
    the_stored_digest_is_no_unkeyed_hash_of_the_secret,
    a_rotation_moves_keys_to_the_new_pepper_as_they_verify,
    a_legacy_unkeyed_hash_verifies_and_moves_to_the_current_pepper,
    a_retired_peppers_keys_are_not_found_until_it_is_given_back,
);

/// The stored hash and pepper id of the secret with `prefix`, read the way
/// an operator (or whoever holds a copy) would: with SQL.
async fn stored(app: &TestApp, prefix: &str) -> (Vec<u8>, Option<i64>) {
    match app.backend {
        Backend::Sqlite => stored_in_sqlite(&app.config.sqlite_path, prefix),
        Backend::Postgres => {
            let client = app.postgres_client().await;
            let row = client
                .query_one(
                    "SELECT hash, pepper_id FROM key_secrets WHERE prefix = $1",
                    &[&prefix],
                )
                .await
                .unwrap();
            (row.get(0), row.get(1))
        }
    }
}

fn stored_in_sqlite(db: &Path, prefix: &str) -> (Vec<u8>, Option<i64>) {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.query_row(
        "SELECT hash, pepper_id FROM key_secrets WHERE prefix = ?1",
        [prefix],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .unwrap()
}

/// Waits until the secret with `prefix` is stored under pepper `id`.
async fn wait_until_stored_under(app: &TestApp, prefix: &str, id: i64) {
    let what = format!("{prefix} is re-hashed with pepper {id:016x}");
    eventually(Duration::from_secs(5), &what, || async {
        stored(app, prefix).await.1 == Some(id)
    })
    .await;
}

/// The current pepper's file and id.
fn current_pepper(app: &TestApp) -> (PathBuf, vilvik_keys_domain::Pepper) {
    let (path, _) = vilvik_keys::pepper::current_file(&app.config);
    let pepper = vilvik_keys::pepper::read(&path, "pepper_file").unwrap();
    (path, pepper)
}

/// `vilvik-keys pepper new PATH`, the real binary; returns the new id.
fn pepper_new(path: &Path) -> String {
    let output = binary::command()
        .arg("pepper")
        .arg("new")
        .arg(path)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

/// `vilvik-keys pepper status --json`, the real binary, with the app's
/// store and pepper settings.
fn pepper_status(app: &TestApp) -> Value {
    let mut command = binary::command();
    command
        .env("RUST_LOG", "error")
        .args(["pepper", "status", "--json"]);
    match &app.config.database_url {
        Some(url) => command.env("DATABASE_URL", url.expose_secret()),
        None => command.env("VILVIK_KEYS_SQLITE_PATH", &app.config.sqlite_path),
    };
    if let Some(file) = &app.config.pepper_file {
        command.env("VILVIK_KEYS_PEPPER_FILE", file);
    }
    let older: Vec<String> = app
        .config
        .pepper_files
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    command.env("VILVIK_KEYS_PEPPER_FILES", older.join(","));
    let output = command.output().unwrap();
    assert!(output.status.success(), "pepper status: {output:?}");
    serde_json::from_slice(&output.stdout).unwrap()
}

/// `(role, live keys, all secrets)` of pepper `id` in a status, if listed.
fn status_of(status: &Value, id: Option<&str>) -> Option<(String, u64, u64)> {
    status["peppers"].as_array().unwrap().iter().find_map(|p| {
        (p["pepper_id"].as_str() == id).then(|| {
            (
                p["role"].as_str().unwrap().to_owned(),
                p["live_keys"].as_u64().unwrap(),
                p["all_secrets"].as_u64().unwrap(),
            )
        })
    })
}

/// Asserts that `status` lists each of `peppers` as `(id, role, live
/// keys, all secrets)`.
#[track_caller]
fn assert_listed(status: &Value, peppers: &[(&str, &str, u64, u64)]) {
    for &(id, role, live, all) in peppers {
        assert_eq!(
            status_of(status, Some(id)),
            Some((role.to_owned(), live, all)),
            "pepper {id}: {status}"
        );
    }
}

fn advice(status: &Value) -> String {
    status["advice"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect::<Vec<_>>()
        .join("\n")
}

fn stored_id(pepper: &vilvik_keys_domain::Pepper) -> i64 {
    pepper.id().to_stored()
}

async fn the_stored_digest_is_no_unkeyed_hash_of_the_secret(mut app: TestApp) {
    let created = app
        .create_key("guessable", &["datasets:read"])
        .await
        .unwrap();
    let (secret, prefix) = (created.secret.clone(), created.key.unwrap().prefix);
    assert_eq!(app.verify_code(&secret, &[]).await, VerifyCode::Valid);

    // What a copy of the database holds: on SQLite, the files themselves,
    // copied while the service runs.
    let digest = match app.backend {
        Backend::Sqlite => {
            let copy = tempfile::tempdir().unwrap();
            for suffix in ["", "-wal", "-shm"] {
                let from = PathBuf::from(format!("{}{suffix}", app.config.sqlite_path.display()));
                if from.exists() {
                    std::fs::copy(&from, copy.path().join(format!("keys.db{suffix}"))).unwrap();
                }
            }
            let copied = copy.path().join("keys.db");
            let (digest, _) = stored_in_sqlite(&copied, &prefix);
            assert_a_copy_verifies_nothing(&app, &copied, &secret).await;
            digest
        }
        Backend::Postgres => stored(&app, &prefix).await.0,
    };
    assert_eq!(digest.len(), 32);
    let candidates: [(&str, Vec<u8>); 4] = [
        (
            "BLAKE3",
            blake3::hash(secret.as_bytes()).as_bytes().to_vec(),
        ),
        ("SHA-256", sha2::Sha256::digest(secret.as_bytes()).to_vec()),
        (
            "the pre-pepper derive_key",
            blake3::derive_key(LEGACY_CONTEXT, secret.as_bytes()).to_vec(),
        ),
        (
            "BLAKE3 keyed with zeros",
            blake3::keyed_hash(&[0; 32], secret.as_bytes())
                .as_bytes()
                .to_vec(),
        ),
    ];
    for (name, candidate) in candidates {
        assert_ne!(
            digest, candidate,
            "the stored digest is {name} of the secret"
        );
    }
    // With the pepper, it is the keyed hash (and the service still verifies).
    let (_, pepper) = current_pepper(&app);
    let presented: vilvik_keys_domain::ApiKey = secret.parse().unwrap();
    assert_eq!(
        &digest[..],
        &presented.hash_with(Some(&pepper)).as_bytes()[..]
    );
    assert_eq!(app.verify_code(&secret, &[]).await, VerifyCode::Valid);
}

/// A service started on a copy of the database files, without the pepper:
/// it refuses to make one of its own while the copy holds peppered keys,
/// and with another pepper it cannot confirm the key.
async fn assert_a_copy_verifies_nothing(app: &TestApp, copied: &Path, secret: &str) {
    let mut config = app.config.clone();
    config.sqlite_path = copied.to_owned();
    config.verify_addr = "127.0.0.1:0".parse().unwrap();
    config.pepper_file = None;
    let err = Application::build(config.clone(), Role::Verify)
        .await
        .expect_err("no pepper: the copy does not start");
    let err = format!("{err:#}");
    assert!(
        err.contains("pepper_file (VILVIK_KEYS_PEPPER_FILE) is not set"),
        "{err}"
    );
    assert!(err.contains("Restore its file"), "{err}");
    let other = copied.with_file_name("other.pepper");
    pepper_new(&other);
    // Another pepper: the start is refused while live keys need the one
    // that is missing, unless it is retired on purpose.
    config.pepper_file = Some(other.clone());
    let err = Application::build(config, Role::Verify)
        .await
        .expect_err("live keys under a pepper not given: the copy does not start");
    assert!(format!("{err:#}").contains("refusing to start"), "{err:#}");
    let (_, original) = current_pepper(app);
    let mut node = app
        .spawn_verify_node(|c| {
            c.sqlite_path = copied.to_owned();
            c.pepper_file = Some(other);
            c.retired_peppers = vec![original.id()];
        })
        .await;
    assert_eq!(node.verify_code(secret).await, VerifyCode::NotFound);
}

async fn a_rotation_moves_keys_to_the_new_pepper_as_they_verify(mut app: TestApp) {
    // Pepper A: the one the app started with (on SQLite the generated
    // default beside the database).
    let (a_file, a) = current_pepper(&app);
    let k1 = app.create_key("k1", &["datasets:read"]).await.unwrap();
    let (k1_secret, k1_prefix) = (k1.secret.clone(), k1.key.unwrap().prefix);
    assert_eq!(app.verify_code(&k1_secret, &[]).await, VerifyCode::Valid);
    let a_id = a.id().to_string();
    let status = pepper_status(&app);
    assert_eq!(
        status_of(&status, Some(&a_id)),
        Some(("current".into(), 2, 2)),
        "k1 and the management key: {status}"
    );

    // Pepper B, current; A still accepted.
    let b_file = app.dir.join("b.pepper");
    let b_id = pepper_new(&b_file);
    app.config.pepper_file = Some(b_file.clone());
    app.config.pepper_files = vec![a_file.clone()];
    app.restart().await;
    let b = vilvik_keys::pepper::read(&b_file, "pepper_file").unwrap();
    assert_eq!(b.id().to_string(), b_id);
    let status = pepper_status(&app);
    assert_listed(&status, &[(&a_id, "older", 2, 2), (&b_id, "current", 0, 0)]);
    assert!(
        advice(&status).contains("still covers 2 live key(s)"),
        "{status}"
    );

    // A new key is made under B; the management key that made it moves.
    let k2 = app.create_key("k2", &[]).await.unwrap();
    let k2_prefix = k2.key.unwrap().prefix;
    assert_eq!(stored(&app, &k2_prefix).await.1, Some(stored_id(&b)));
    assert_eq!(app.verify_code(&k2.secret, &[]).await, VerifyCode::Valid);
    let management = app.management_key[..12].to_owned();
    wait_until_stored_under(&app, &management, stored_id(&b)).await;
    // k1 stays under A until it verifies.
    assert_eq!(stored(&app, &k1_prefix).await.1, Some(stored_id(&a)));
    let status = pepper_status(&app);
    assert_listed(&status, &[(&a_id, "older", 1, 1), (&b_id, "current", 2, 2)]);

    assert_eq!(app.verify_code(&k1_secret, &[]).await, VerifyCode::Valid);
    wait_until_stored_under(&app, &k1_prefix, stored_id(&b)).await;
    let status = pepper_status(&app);
    assert_listed(&status, &[(&a_id, "older", 0, 0), (&b_id, "current", 3, 3)]);
    assert!(
        advice(&status).contains(&format!(
            "older pepper {a_id} covers no live key: it can be retired"
        )),
        "{status}"
    );
    assert_eq!(app.verify_code(&k1_secret, &[]).await, VerifyCode::Valid);

    // A retired: both keys, and the management key, still work.
    app.config.pepper_files.clear();
    app.restart().await;
    assert_eq!(app.verify_code(&k1_secret, &[]).await, VerifyCode::Valid);
    assert_eq!(app.verify_code(&k2.secret, &[]).await, VerifyCode::Valid);
    assert_eq!(app.list_keys(false).await.len(), 3);
    let status = pepper_status(&app);
    assert_eq!(status_of(&status, Some(&a_id)), None, "{status}");
    assert_listed(&status, &[(&b_id, "current", 3, 3)]);
}

async fn a_legacy_unkeyed_hash_verifies_and_moves_to_the_current_pepper(mut app: TestApp) {
    let created = app
        .create_key("from-before", &["datasets:read"])
        .await
        .unwrap();
    let (secret, prefix) = (created.secret.clone(), created.key.unwrap().prefix);
    // What a database from before peppers holds: the unkeyed hash, no id.
    let legacy = blake3::derive_key(LEGACY_CONTEXT, secret.as_bytes()).to_vec();
    match app.backend {
        Backend::Sqlite => {
            let conn = rusqlite::Connection::open(&app.config.sqlite_path).unwrap();
            let changed = conn
                .execute(
                    "UPDATE key_secrets SET hash = ?1, pepper_id = NULL WHERE prefix = ?2",
                    rusqlite::params![legacy, prefix],
                )
                .unwrap();
            assert_eq!(changed, 1);
        }
        Backend::Postgres => {
            let client = app.postgres_client().await;
            let changed = client
                .execute(
                    "UPDATE key_secrets SET hash = $1, pepper_id = NULL WHERE prefix = $2",
                    &[&legacy, &prefix],
                )
                .await
                .unwrap();
            assert_eq!(changed, 1);
        }
    }
    // A node that has not cached the key yet.
    app.restart().await;
    let status = pepper_status(&app);
    assert_eq!(
        status_of(&status, None),
        Some(("legacy".into(), 1, 1)),
        "{status}"
    );
    assert!(advice(&status).contains("1 live key(s) still have a legacy unkeyed hash"));

    let answer = app.verify_key(&secret, &["datasets:read"]).await;
    assert_eq!(answer.code(), VerifyCode::Valid);
    let (_, pepper) = current_pepper(&app);
    wait_until_stored_under(&app, &prefix, stored_id(&pepper)).await;
    let presented: vilvik_keys_domain::ApiKey = secret.parse().unwrap();
    assert_eq!(
        stored(&app, &prefix).await.0,
        presented.hash_with(Some(&pepper)).as_bytes().to_vec()
    );
    assert_eq!(status_of(&pepper_status(&app), None), None);
    app.restart().await;
    assert_eq!(app.verify_code(&secret, &[]).await, VerifyCode::Valid);
}

async fn a_retired_peppers_keys_are_not_found_until_it_is_given_back(mut app: TestApp) {
    let (a_file, a) = current_pepper(&app);
    let created = app.create_key("left-behind", &[]).await.unwrap();
    let secret = created.secret.clone();
    assert_eq!(app.verify_code(&secret, &[]).await, VerifyCode::Valid);

    // B alone: refused at start while A covers live keys, naming it.
    let b_file = app.dir.join("b.pepper");
    pepper_new(&b_file);
    app.config.pepper_file = Some(b_file);
    let mut refused = app.config.clone();
    (refused.admin_addr, refused.verify_addr) = (
        "127.0.0.1:0".parse().unwrap(),
        "127.0.0.1:0".parse().unwrap(),
    );
    let err = Application::build(refused, Role::All)
        .await
        .expect_err("live keys under a pepper not given");
    let err = format!("{err:#}");
    assert!(
        err.contains(&format!("2 live key(s) with pepper {}", a.id())),
        "{err}"
    );
    assert!(err.contains("VILVIK_KEYS_RETIRED_PEPPERS"), "{err}");
    // Retired on purpose, too early.
    app.config.retired_peppers = vec![a.id()];
    app.restart().await;
    for _ in 0..3 {
        assert_eq!(app.verify_code(&secret, &[]).await, VerifyCode::NotFound);
    }
    let status = pepper_status(&app);
    let a_id = a.id().to_string();
    assert_eq!(
        status_of(&status, Some(&a_id)),
        Some(("unknown".into(), 2, 2)),
        "the key and the management key: {status}"
    );
    assert!(
        advice(&status).contains("which is not configured"),
        "{status}"
    );
    // Nothing was re-hashed behind the operator's back.
    let prefix = created.key.unwrap().prefix;
    assert_eq!(stored(&app, &prefix).await.1, Some(stored_id(&a)));

    // Given back as an older pepper: the key verifies again.
    app.config.retired_peppers.clear();
    app.config.pepper_files = vec![a_file];
    app.restart().await;
    assert_eq!(app.verify_code(&secret, &[]).await, VerifyCode::Valid);
}
