//! The quick version of the benchmark's set-up, as an ordinary test: `seed`
//! writes keys the store can verify and a 0600 secrets file; `bodies`
//! writes gRPC frames h2load can post; `timing`, `miss` and `probe
//! --any-answer` work against a small preloaded server in this process.
//! (The load itself stays in `bench/run.sh`.)

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use prost::Message;
use vilvik_keys::config::Config;
use vilvik_keys::proto::VerifyKeyRequest;
use vilvik_keys::startup::{Application, Role};
use vilvik_keys_domain::ApiKey;
use vilvik_keys_store::{KeySource, SqliteStore};

fn bench() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_vilvik-keys-bench"));
    command.env_remove("DATABASE_URL");
    command
}

fn seed(db: &std::path::Path, keys: &std::path::Path, n: usize) {
    let status = bench()
        .env("VILVIK_KEYS_SQLITE_PATH", db)
        .args(["seed", "--keys", &n.to_string(), "--out"])
        .arg(keys)
        .status()
        .unwrap();
    assert!(status.success());
}

/// Runs the bench binary and parses its one line of JSON.
fn bench_json(args: &[&str]) -> serde_json::Value {
    let out = bench().args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn timing_miss_and_probe_against_a_preloaded_server() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("bench.db");
    let keys = dir.path().join("keys.txt");
    seed(&db, &keys, 20);
    let keys = keys.to_str().unwrap();

    let config = Config {
        admin_addr: "127.0.0.1:0".parse().unwrap(),
        verify_addr: "127.0.0.1:0".parse().unwrap(),
        sqlite_path: db,
        preload: true,
        shutdown_grace: std::time::Duration::from_secs(2),
        ..Config::default()
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let app = runtime
        .block_on(Application::build(config, Role::All))
        .expect("the server starts");
    let verify = app.verify_addr().unwrap().to_string();
    let admin = app.admin_addr().unwrap().to_string();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = std::thread::spawn(move || {
        runtime.block_on(app.run_until(async {
            let _ = stopped.await;
        }))
    });

    let timing = bench_json(&[
        "timing",
        "--verify",
        &verify,
        "--keys",
        keys,
        "--samples",
        "40",
        "--warmup",
        "4",
    ]);
    assert_eq!(timing["samples_each"], 40);
    for kind in ["unknown_prefix", "wrong_secret"] {
        assert_eq!(timing[kind]["count"], 40, "{timing}");
        assert_eq!(timing[kind]["codes"], serde_json::json!({"NOT_FOUND": 40}));
        assert!(timing[kind]["p50_us"].as_f64().unwrap() > 0.0);
    }
    assert!(timing["p50_ratio"].as_f64().unwrap() > 0.0);

    let miss = bench_json(&[
        "miss",
        "--phases",
        "random,bearer",
        "--verify",
        &verify,
        "--admin",
        &admin,
        "--seconds",
        "0.2",
        "--concurrency",
        "2",
        "--connections",
        "1",
    ]);
    for (phase, code) in [
        ("random_unknown", "NOT_FOUND"),
        ("random_bearer", "UNAUTHENTICATED"),
    ] {
        let p = &miss[phase];
        assert!(p["requests"].as_u64().unwrap() > 0, "{miss}");
        assert_eq!(p["unexpected"], 0, "{miss}");
        assert_eq!(p["codes"][code], p["requests"], "{miss}");
    }
    assert!(miss.get("real_uncached").is_none());

    let probe = bench_json(&["probe", "--any-answer", "--verify", &verify]);
    assert_eq!(probe["code"], "NOT_FOUND");

    stop.send(()).unwrap();
    server.join().unwrap().unwrap();
}

#[tokio::test]
async fn seed_then_bodies_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("bench.db");
    let keys = dir.path().join("keys.txt");
    let status = bench()
        .env("VILVIK_KEYS_SQLITE_PATH", &db)
        .args([
            "seed",
            "--keys",
            "25",
            "--accounts",
            "3",
            "--chunk",
            "10",
            "--out",
        ])
        .arg(&keys)
        .status()
        .unwrap();
    assert!(status.success());

    let mode = std::fs::metadata(&keys).unwrap().permissions().mode();
    assert_eq!(
        mode & 0o777,
        0o600,
        "the secrets file is for its owner only"
    );
    let secrets: Vec<String> = std::fs::read_to_string(&keys)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(secrets.len(), 25);

    // Hashed with the pepper the service uses on this database: the
    // default one, which the seed generated beside it.
    let pepper_file = std::path::PathBuf::from(format!("{}.pepper", db.display()));
    let pepper = vilvik_keys::pepper::read(&pepper_file, "pepper_file").unwrap();
    let store = SqliteStore::open(&db).await.unwrap();
    let mut accounts = std::collections::BTreeSet::new();
    for secret in &secrets {
        let key: ApiKey = secret.parse().unwrap();
        let found = store.find_secret(key.prefix()).await.unwrap().unwrap();
        assert_eq!(found.pepper_id, Some(pepper.id()));
        assert!(found.hash.matches(&key.hash_with(Some(&pepper))));
        assert_eq!(found.key.scopes.to_strings(), vec!["datasets:read"]);
        accounts.insert(found.key.account_id.as_str().to_owned());
    }
    assert_eq!(accounts.len(), 3);

    let out = dir.path().join("bodies");
    let status = bench()
        .args(["bodies", "--count", "5", "--keys"])
        .arg(&keys)
        .arg("--out")
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(std::fs::read(out.join("health.bin")).unwrap(), [0u8; 5]);
    let body = std::fs::read(out.join("verify-00004.bin")).unwrap();
    assert_eq!(body[0], 0);
    assert_eq!(
        u32::from_be_bytes(body[1..5].try_into().unwrap()) as usize,
        body.len() - 5
    );
    let request = VerifyKeyRequest::decode(&body[5..]).unwrap();
    assert!(secrets.contains(&request.key));
    assert_eq!(request.required_scopes, vec!["datasets:read"]);
}
