//! Admin calls are rate-limited per account (GCRA): one account's flood is
//! refused with RESOURCE_EXHAUSTED and `retry-after`, changes nothing, and
//! leaves every other account's calls alone; a tier's own rate applies to
//! its accounts.
//!
//! The limiter runs on the real clock, so the rates here are low (one call
//! a second) and the assertions count calls with a second's margin for
//! each second the test took, rather than timing anything closely.

use std::time::{Duration, Instant};

use tonic::{Code, Status};
use vilvik_keys::config::{AdminRateLimits, AdminRateOverride};
use vilvik_keys::proto::{self, Tier};

use crate::helpers::{Backend, TestApp, assert_status, spawn_app_with, with_bearer, without_usage};

crate::on_both_backends!(
    by backend:
    one_accounts_flood_is_refused_with_retry_after_and_other_accounts_are_unaffected,
    a_refused_call_changes_nothing,
    a_tiers_own_rate_applies_to_its_accounts_as_soon_as_the_tier_is_set,
);

fn nz(n: u32) -> std::num::NonZeroU32 {
    std::num::NonZeroU32::new(n).unwrap()
}

/// What a refusal says, checked; returns its `retry-after-ms`.
#[track_caller]
fn assert_rate_limited(status: &Status, account: &str, limit: &str) -> Duration {
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let expected = format!("admin calls for account '{account}'{limit}; retry after ");
    assert!(
        status.message().starts_with(&expected) && status.message().ends_with(" ms"),
        "message {:?} should start with {expected:?}",
        status.message()
    );
    let header = |name: &str| -> u64 {
        status
            .metadata()
            .get(name)
            .unwrap_or_else(|| panic!("no {name} metadata: {status:?}"))
            .to_str()
            .unwrap()
            .parse()
            .unwrap()
    };
    let (secs, ms) = (header("retry-after"), header("retry-after-ms"));
    // At one call a second the wait is at most a second.
    assert!((1..=1_000).contains(&ms), "retry-after-ms {ms}");
    assert_eq!(
        secs,
        ms.div_ceil(1_000),
        "retry-after is whole seconds, rounded up"
    );
    assert!(
        status.message().contains(&format!("retry after {ms} ms")),
        "{status:?}"
    );
    Duration::from_millis(ms)
}

/// The most calls a rate of one a second with `burst` admits in `elapsed`
/// (GCRA: the burst, then one a second), with one to spare.
fn most_admitted(burst: u32, elapsed: Duration) -> u32 {
    burst + elapsed.as_secs() as u32 + 2
}

async fn list_audit(app: &mut TestApp) -> Result<(), Status> {
    let request = app.authed(proto::ListAuditEventsRequest::default());
    app.admin.list_audit_events(request).await.map(drop)
}

async fn one_accounts_flood_is_refused_with_retry_after_and_other_accounts_are_unaffected(
    backend: Backend,
) {
    let Some(mut app) = spawn_app_with(backend, |c| {
        c.admin_rates = AdminRateLimits::uniform(1, 5);
    })
    .await
    else {
        return;
    };
    // Another tenant with a management key of its own (the operator's
    // call counts against OTHER's rate, not ACME's).
    let create = app.as_operator(
        proto::CreateKeyRequest {
            name: "other admin".into(),
            scopes: vec!["keys:admin".into()],
            ..Default::default()
        },
        "OTHER",
        "alice@example.com",
    );
    let other_key = app
        .admin
        .create_key(create)
        .await
        .unwrap()
        .into_inner()
        .secret;

    // ACME floods ListAuditEvents, as in the finding.
    let started = Instant::now();
    let (mut admitted, mut refused) = (0, Vec::new());
    for _ in 0..30 {
        match list_audit(&mut app).await {
            Ok(()) => admitted += 1,
            Err(status) => refused.push(status),
        }
    }
    let elapsed = started.elapsed();
    assert!(
        (5..=most_admitted(5, elapsed)).contains(&admitted),
        "{admitted} of 30 calls admitted in {elapsed:?} at 1 a second with bursts of 5"
    );
    let mut wait = Duration::ZERO;
    for status in &refused {
        wait = assert_rate_limited(status, "ACME", " are limited to 1 per second (burst 5)");
    }

    // Meanwhile the other tenant has the rest of its burst (the operator's
    // CreateKey took one), at once.
    let mut other = app.admin.clone();
    for _ in 0..4 {
        other
            .list_keys(with_bearer(proto::ListKeysRequest::default(), &other_key))
            .await
            .expect("OTHER is not limited by ACME's flood");
    }
    let status = list_audit(&mut app).await.unwrap_err();
    wait = wait.max(assert_rate_limited(
        &status,
        "ACME",
        " are limited to 1 per second (burst 5)",
    ));

    // Waiting as told is enough.
    tokio::time::sleep(wait + Duration::from_millis(100)).await;
    list_audit(&mut app)
        .await
        .expect("admitted again after waiting retry-after-ms");
}

async fn a_refused_call_changes_nothing(backend: Backend) {
    let Some(mut app) = spawn_app_with(backend, |c| {
        c.admin_rates = AdminRateLimits::uniform(1, 3);
    })
    .await
    else {
        return;
    };
    let victim = app.create_key("victim", &["datasets:read"]).await.unwrap();
    let key = victim.key.unwrap();
    let before = without_usage(app.list_keys(true).await);
    // Use up the burst.
    let mut exhausted = None;
    for _ in 0..20 {
        let request = app.authed(proto::GetKeyRequest {
            key_id: key.key_id.clone(),
        });
        if let Err(status) = app.admin.get_key(request).await {
            exhausted = Some(status);
            break;
        }
    }
    let exhausted = exhausted.expect("20 calls at 1 a second are refused before the end");
    assert_rate_limited(&exhausted, "ACME", " are limited to 1 per second (burst 3)");

    // Each change is refused before anything is done for it, the next call
    // being almost a second away.
    let limit = "are limited to 1 per second (burst 3)";
    let create = app.authed(proto::CreateKeyRequest {
        name: "planted".into(),
        scopes: vec!["datasets:read".into()],
        ..Default::default()
    });
    assert_status(
        app.admin.create_key(create).await,
        Code::ResourceExhausted,
        limit,
    );
    let rotate = app.authed(proto::RotateKeyRequest {
        key_id: key.key_id.clone(),
        ..Default::default()
    });
    assert_status(
        app.admin.rotate_key(rotate).await,
        Code::ResourceExhausted,
        limit,
    );
    let revoke = app.authed(proto::RevokeKeyRequest {
        key_id: key.key_id.clone(),
        reason: "attacker".into(),
        ..Default::default()
    });
    assert_status(
        app.admin.revoke_key(revoke).await,
        Code::ResourceExhausted,
        limit,
    );
    let update = app.authed(proto::UpdateKeyRequest {
        key_id: key.key_id.clone(),
        name: "renamed".into(),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["name".into()],
        }),
        ..Default::default()
    });
    assert_status(
        app.admin.update_key(update).await,
        Code::ResourceExhausted,
        limit,
    );
    // Invalid requests are refused for the rate, not validated: a flood of
    // bad input costs no more than any other.
    let invalid = app.authed(proto::GetKeyRequest {
        key_id: "not a key id".into(),
    });
    assert_status(
        app.admin.get_key(invalid).await,
        Code::ResourceExhausted,
        limit,
    );

    // The old secret still verifies: it was neither rotated nor revoked.
    assert_eq!(
        app.verify_code(&victim.secret, &["datasets:read"]).await,
        proto::VerifyCode::Valid
    );
    // Room for two calls again.
    tokio::time::sleep(Duration::from_millis(2_200)).await;
    assert_eq!(without_usage(app.list_keys(true).await), before);
    let events = app.audit(&key.key_id).await;
    assert_eq!(
        events.iter().map(|e| e.action()).collect::<Vec<_>>(),
        [proto::AuditAction::Created],
        "{events:?}"
    );
}

async fn a_tiers_own_rate_applies_to_its_accounts_as_soon_as_the_tier_is_set(backend: Backend) {
    let Some(mut app) = spawn_app_with(backend, |c| {
        c.admin_rates = AdminRateLimits {
            per_second: nz(1),
            burst: nz(2),
            free: AdminRateOverride::default(),
            premium: AdminRateOverride {
                per_second: None,
                burst: Some(nz(12)),
            },
        };
    })
    .await
    else {
        return;
    };
    // Free: the global rate.
    let started = Instant::now();
    let mut admitted = 0;
    let refused = loop {
        match list_audit(&mut app).await {
            Ok(()) => admitted += 1,
            Err(status) => break status,
        }
        assert!(admitted <= 20, "a free account's calls are not limited");
    };
    assert!(
        admitted <= most_admitted(2, started.elapsed()),
        "{admitted}"
    );
    assert_rate_limited(
        &refused,
        "ACME",
        " (on the free tier) are limited to 1 per second (burst 2)",
    );

    // The operator, acting from its own account, moves ACME to premium;
    // ACME's own budget is spent and is not touched by this call.
    let promote = app.as_operator(
        proto::SetAccountTierRequest {
            account_id: "ACME".into(),
            tier: Tier::Premium.into(),
        },
        "OPS",
        "alice@example.com",
    );
    app.admin.set_account_tier(promote).await.unwrap();

    // At once, with no wait: premium's burst of 12.
    let started = Instant::now();
    let mut admitted = 0;
    let refused = loop {
        match list_audit(&mut app).await {
            Ok(()) => admitted += 1,
            Err(status) => break status,
        }
        assert!(admitted <= 100, "a premium account's calls are not limited");
    };
    assert!(
        (12..=most_admitted(12, started.elapsed())).contains(&admitted),
        "{admitted} calls admitted on the premium tier's burst of 12"
    );
    assert_rate_limited(
        &refused,
        "ACME",
        " (on the premium tier) are limited to 1 per second (burst 12)",
    );
}
