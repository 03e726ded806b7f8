//! The quick version of the benchmark's set-up, as an ordinary test: `seed`
//! writes keys the store can verify and a 0600 secrets file; `bodies`
//! writes gRPC frames h2load can post. (The load itself stays in
//! `bench/run.sh`.)

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use prost::Message;
use vilvik_keys::proto::VerifyKeyRequest;
use vilvik_keys_domain::ApiKey;
use vilvik_keys_store::{KeySource, SqliteStore};

fn bench() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_vilvik-keys-bench"));
    command.env_remove("DATABASE_URL");
    command
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

    let store = SqliteStore::open(&db).await.unwrap();
    let mut accounts = std::collections::BTreeSet::new();
    for secret in &secrets {
        let key: ApiKey = secret.parse().unwrap();
        let found = store.find_secret(key.prefix()).await.unwrap().unwrap();
        assert!(found.hash.matches(&key.hash()));
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
