//! Admin calls are rate-limited per account (GCRA): one account's flood is
//! refused with RESOURCE_EXHAUSTED and `retry-after`, changes nothing, and
//! leaves every other account's calls alone; a tier's own rate applies to
//! its accounts.
//!
//! The limiter reads the service's clock, the app's manual clock: time
//! stands still unless a test advances it, so the counts are exact and
//! waiting as told takes no time.

use std::time::Duration;

use tonic::{Code, Status};
use vilvik_keys::config::{AdminRateLimits, AdminRateOverride};
use vilvik_keys::headers;
use vilvik_keys::proto::{self, Tier};
use vilvik_keys_test_support::requests::{create, get, rename, revoke, rotate};
use vilvik_keys_test_support::{
    Backend, TestApp, assert_status, bearer, spawn_app_with, without_usage,
};

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
    let (secs, ms) = (
        header(headers::RETRY_AFTER),
        header(headers::RETRY_AFTER_MS),
    );
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

/// Moves the app's clock on by `by`.
fn wait(app: &TestApp, by: Duration) {
    app.clock
        .advance(time::Duration::try_from(by).expect("a short wait"));
}

async fn list_audit(app: &mut TestApp) -> Result<(), Status> {
    let request = app.authed(proto::ListAuditEventsRequest::default());
    app.admin.list_audit_events(request).await.map(drop)
}

/// Lists audit events until one is refused, at most `most` times: how many
/// were admitted, and the refusal.
async fn until_refused(app: &mut TestApp, most: u32) -> (u32, Status) {
    for admitted in 0..=most {
        if let Err(status) = list_audit(app).await {
            return (admitted, status);
        }
    }
    panic!(
        "{} calls were admitted: the account is not limited",
        most + 1
    );
}

async fn app_with_rate(backend: Backend, rates: AdminRateLimits) -> Option<TestApp> {
    spawn_app_with(backend, |c| c.admin_rates = rates).await
}

async fn one_accounts_flood_is_refused_with_retry_after_and_other_accounts_are_unaffected(
    backend: Backend,
) {
    let Some(mut app) = app_with_rate(backend, AdminRateLimits::uniform(1, 5)).await else {
        return;
    };
    // Another tenant with a management key of its own (the operator's
    // call counts against OTHER's rate, not ACME's).
    let other_key = app
        .create_key_as_operator("OTHER", "other admin", &["keys:admin"])
        .await
        .secret;

    // ACME floods ListAuditEvents: its burst, and then nothing.
    let (mut admitted, mut refused) = (0, Vec::new());
    for _ in 0..30 {
        match list_audit(&mut app).await {
            Ok(()) => admitted += 1,
            Err(status) => refused.push(status),
        }
    }
    assert_eq!(
        admitted, 5,
        "calls admitted of 30 at 1 a second with bursts of 5"
    );
    let mut retry_after = Duration::ZERO;
    for status in &refused {
        retry_after = assert_rate_limited(status, "ACME", " are limited to 1 per second (burst 5)");
    }

    // Meanwhile the other tenant has the rest of its burst (the operator's
    // CreateKey took one), at once.
    let mut other = app.admin.clone();
    for _ in 0..4 {
        other
            .list_keys(bearer(proto::ListKeysRequest::default(), &other_key))
            .await
            .expect("OTHER is not limited by ACME's flood");
    }
    let status = list_audit(&mut app).await.unwrap_err();
    retry_after = retry_after.max(assert_rate_limited(
        &status,
        "ACME",
        " are limited to 1 per second (burst 5)",
    ));

    // Waiting as told is enough.
    wait(&app, retry_after);
    list_audit(&mut app)
        .await
        .expect("admitted again after waiting retry-after-ms");
}

async fn a_refused_call_changes_nothing(backend: Backend) {
    let Some(mut app) = app_with_rate(backend, AdminRateLimits::uniform(1, 3)).await else {
        return;
    };
    let victim = app.create_key("victim", &["datasets:read"]).await.unwrap();
    let key_id = victim.key.unwrap().key_id;
    let before = without_usage(app.list_keys(true).await);
    // Use up the burst.
    let mut exhausted = None;
    for _ in 0..20 {
        if let Err(status) = app.admin.get_key(app.authed(get(&key_id))).await {
            exhausted = Some(status);
            break;
        }
    }
    let exhausted = exhausted.expect("20 calls at 1 a second are refused before the end");
    assert_rate_limited(&exhausted, "ACME", " are limited to 1 per second (burst 3)");

    // Each change is refused before anything is done for it, the next call
    // being a second away.
    let limited = |result: Result<(), Status>| {
        let limit = "are limited to 1 per second (burst 3)";
        assert_status(result, Code::ResourceExhausted, limit);
    };
    let mut admin = app.admin.clone();
    let planted = create("planted", &["datasets:read"]);
    limited(admin.create_key(app.authed(planted)).await.map(drop));
    limited(
        admin
            .rotate_key(app.authed(rotate(&key_id)))
            .await
            .map(drop),
    );
    let revocation = proto::RevokeKeyRequest {
        reason: "attacker".into(),
        ..revoke(&key_id)
    };
    limited(admin.revoke_key(app.authed(revocation)).await.map(drop));
    let renamed = rename(&key_id, "renamed");
    limited(admin.update_key(app.authed(renamed)).await.map(drop));
    // Invalid requests are refused for the rate, not validated: a flood of
    // bad input costs no more than any other.
    limited(
        admin
            .get_key(app.authed(get("not a key id")))
            .await
            .map(drop),
    );

    // The old secret still verifies: it was neither rotated nor revoked.
    assert_eq!(
        app.verify_code(&victim.secret, &["datasets:read"]).await,
        proto::VerifyCode::Valid
    );
    // Room for two calls again.
    wait(&app, Duration::from_secs(2));
    assert_eq!(without_usage(app.list_keys(true).await), before);
    let events = app.audit(&key_id).await;
    assert_eq!(
        events.iter().map(|e| e.action()).collect::<Vec<_>>(),
        [proto::AuditAction::Created],
        "{events:?}"
    );
}

async fn a_tiers_own_rate_applies_to_its_accounts_as_soon_as_the_tier_is_set(backend: Backend) {
    let rates = AdminRateLimits {
        per_second: nz(1),
        burst: nz(2),
        free: AdminRateOverride::default(),
        premium: AdminRateOverride {
            per_second: None,
            burst: Some(nz(12)),
        },
    };
    let Some(mut app) = app_with_rate(backend, rates).await else {
        return;
    };
    // Free: the global rate.
    let (admitted, refused) = until_refused(&mut app, 20).await;
    assert_eq!(admitted, 2, "calls admitted on the free tier's burst of 2");
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
    let (admitted, refused) = until_refused(&mut app, 100).await;
    assert_eq!(
        admitted, 12,
        "calls admitted on the premium tier's burst of 12"
    );
    assert_rate_limited(
        &refused,
        "ACME",
        " (on the premium tier) are limited to 1 per second (burst 12)",
    );
}
