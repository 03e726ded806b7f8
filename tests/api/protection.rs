//! The verify listener fails fast when saturated instead of queueing.

use tonic::Code;
use vilvik_keys::proto;
use vilvik_keys_domain::GeneratedKey;

use vilvik_keys_test_support::requests::verify;
use vilvik_keys_test_support::{Backend, spawn_app_with};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saturated_verify_listener_sheds_load() {
    let app = spawn_app_with(Backend::Sqlite, |c| c.verify_concurrency_limit = 1)
        .await
        .unwrap();
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..200 {
        let mut client = app.verify.clone();
        // Unknown keys: each is a store lookup, so requests overlap.
        let key = GeneratedKey::generate(&vilvik_keys_domain::Pepper::generate())
            .expose_secret()
            .to_owned();
        calls.spawn(async move { client.verify_key(verify(&key, &[])).await });
    }
    let (mut answered, mut shed) = (0, 0);
    while let Some(result) = calls.join_next().await {
        match result.unwrap() {
            Ok(response) => {
                assert_eq!(response.into_inner().code(), proto::VerifyCode::NotFound);
                answered += 1;
            }
            Err(status) if status.code() == Code::ResourceExhausted => shed += 1,
            Err(status) => panic!("unexpected status {status:?}"),
        }
    }
    assert!(answered > 0, "nothing was answered");
    assert!(
        shed > 0,
        "nothing was shed with a limit of 1 and 200 concurrent calls"
    );
}
