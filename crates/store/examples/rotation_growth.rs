//! How much one key's rotations grow the embedded store, with the history
//! of rotated-away secrets bounded by `Policy::rotated_secrets_kept` and,
//! for comparison, with every rotated-away secret kept. Run from the
//! repository root:
//!
//!     cargo run --release -p vilvik-keys-store --example rotation_growth [ROTATIONS]
//!
//! Prints, per policy, the secret rows left and how much the database file
//! grew (after a checkpoint). No timings: keeping every secret is emulated
//! with a prune that keeps up to `u32::MAX`, which still runs its query at
//! each rotation.

use time::OffsetDateTime;
use vilvik_keys_domain::{GeneratedKey, KeyName, Pepper};
use vilvik_keys_store::{Actor, NewKey, NewSecret, Policy, SqliteStore, Store};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let rotations: u32 = std::env::args()
        .nth(1)
        .map_or(30_000, |n| n.parse().expect("ROTATIONS is a number"));
    for (label, kept) in [("kept: all", u32::MAX), ("kept: 10 (the default)", 10)] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("growth.db");
        let store = SqliteStore::open(&path).await.unwrap();
        store.migrate().await.unwrap();
        let pepper = Pepper::generate();
        let actor = Actor {
            name: "operator:rotation-growth".into(),
            ip: Some("127.0.0.1".into()),
            operator: true,
        };
        let policy = Policy {
            rotated_secrets_kept: kept,
            ..Policy::default()
        };
        let (new, _) = NewKey::builder("ACME".parse().unwrap())
            .name("rotated".parse::<KeyName>().unwrap())
            .build(&pepper);
        let key = store.create_key(new, &actor, &policy).await.unwrap();
        let empty = file_size(&path);
        for _ in 0..rotations {
            let secret = GeneratedKey::generate(&pepper);
            store
                .rotate_key(
                    &key.account_id,
                    &key.key_id,
                    &NewSecret::from(&secret),
                    &actor,
                    OffsetDateTime::now_utc(),
                    &policy,
                )
                .await
                .unwrap();
        }
        let secrets: u64 = store
            .secrets_by_pepper()
            .await
            .unwrap()
            .iter()
            .map(|u| u.total)
            .sum();
        drop(store);
        // Reopening checkpoints the WAL into the file.
        let reopened = SqliteStore::open(&path).await.unwrap();
        drop(reopened);
        let grown = file_size(&path).saturating_sub(empty);
        println!(
            "{label}: {rotations} rotations; {secrets} secret rows; database grew {:.1} MB ({} bytes per rotation)",
            grown as f64 / 1e6,
            grown / u64::from(rotations.max(1)),
        );
    }
}

/// The database file and its WAL, in bytes.
fn file_size(path: &std::path::Path) -> u64 {
    let wal = path.with_extension("db-wal");
    [path.to_path_buf(), wal]
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum()
}
