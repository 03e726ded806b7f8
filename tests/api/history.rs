//! A stolen management key cannot grow the store without bound: rotations
//! keep only the newest few old secrets, and revoked keys count toward a
//! ceiling on stored keys.

use tonic::Code;
use vilvik_keys::proto;
use vilvik_keys::proto::VerifyCode;
use vilvik_keys_test_support::{Backend, TestApp, assert_status, spawn_app_with};

crate::on_both_backends!(
    by backend:
    rotations_keep_only_the_newest_old_secrets,
    a_node_forgets_the_secrets_a_rotation_prunes,
    churn_stops_at_the_stored_key_ceiling,
);

async fn rotate(app: &mut TestApp, key_id: &str) -> String {
    app.rotate_key(key_id).await.unwrap().secret
}

async fn rotations_keep_only_the_newest_old_secrets(backend: Backend) {
    let Some(mut app) = spawn_app_with(backend, |c| c.rotated_secrets_kept = 2).await else {
        return;
    };
    let created = app.create_key("rotated", &["a:b"]).await.unwrap();
    let key_id = created.key.unwrap().key_id;
    let mut secrets = vec![created.secret];
    for _ in 0..5 {
        secrets.push(rotate(&mut app, &key_id).await);
    }
    // Oldest first: pruned (unknown), pruned, pruned, kept, kept, current.
    let mut codes = Vec::new();
    for secret in &secrets {
        codes.push(app.verify_code(secret, &[]).await);
    }
    use VerifyCode::{NotFound, Rotated, Valid};
    assert_eq!(
        codes,
        [NotFound, NotFound, NotFound, Rotated, Rotated, Valid]
    );
    // The audit log keeps every rotation.
    let rotations = app
        .audit(&key_id)
        .await
        .iter()
        .filter(|e| e.action() == proto::AuditAction::Rotated)
        .count();
    assert_eq!(rotations, 5);
}

/// A secret the node holds as rotated away, which a later rotation prunes,
/// is forgotten by the node: the pruned prefixes are published with the
/// rotation that prunes them, so the node answers NOT_FOUND rather than
/// ROTATED from memory, and its cache does not grow with rotations.
async fn a_node_forgets_the_secrets_a_rotation_prunes(backend: Backend) {
    let Some(mut app) = spawn_app_with(backend, |c| c.rotated_secrets_kept = 1).await else {
        return;
    };
    let created = app.create_key("rotated", &["a:b"]).await.unwrap();
    let key_id = created.key.unwrap().key_id;
    let first = created.secret;
    rotate(&mut app, &key_id).await;
    // Cached as rotated away.
    assert_eq!(app.verify_code(&first, &[]).await, VerifyCode::Rotated);
    // The next rotation prunes it (one old secret is kept).
    rotate(&mut app, &key_id).await;
    assert_eq!(app.verify_code(&first, &[]).await, VerifyCode::NotFound);
}

async fn churn_stops_at_the_stored_key_ceiling(backend: Backend) {
    let Some(mut app) = spawn_app_with(backend, |c| c.stored_keys_per_active_key = 2).await else {
        return;
    };
    // Free tier: 3 active keys, so 6 stored; the management key is one.
    for i in 0..5 {
        let key = app.create_key(&format!("churn {i}"), &[]).await.unwrap();
        app.revoke_key(&key.key.unwrap().key_id).await.unwrap();
    }
    let before = app.list_keys(true).await.len();
    assert_status(
        app.create_key("one too many", &[]).await,
        Code::ResourceExhausted,
        "the account stores 6 keys, revoked and expired ones included",
    );
    assert_eq!(app.list_keys(true).await.len(), before);
}
