//! The authorization matrix (issue 10, point 9): every KeyAdmin RPC with
//! every kind of credential, against the status each must get, on both
//! stores. A refused call changes nothing, and another account's key id
//! answers exactly like one that does not exist.

use std::future::Future;
use std::pin::Pin;

use tonic::transport::Channel;
use tonic::{Code, Request, Status};
use vilvik_keys::proto;
use vilvik_keys::proto::key_admin_client::KeyAdminClient;
use vilvik_keys_domain::{Clock, GeneratedKey, KeyId, Pepper};

use crate::helpers::{ACCOUNT, OPERATOR_TOKEN, TestApp, without_usage};

const OTHER: &str = "OTHER";
const ACTOR: &str = "alice@example.com";

/// What a cell sends as metadata.
pub(crate) type Metadata = Vec<(&'static str, String)>;

fn bearer(credential: &str) -> Metadata {
    vec![("authorization", format!("Bearer {credential}"))]
}

fn operator(account: Option<&str>) -> Metadata {
    let mut metadata = bearer(OPERATOR_TOKEN);
    metadata.push(("x-vilvik-actor", ACTOR.to_owned()));
    if let Some(account) = account {
        metadata.push(("x-vilvik-account", account.to_owned()));
    }
    metadata
}

fn on<T>(metadata: &Metadata, message: T) -> Request<T> {
    let mut request = Request::new(message);
    for (name, value) in metadata {
        request.metadata_mut().insert(*name, value.parse().unwrap());
    }
    request
}

/// One RPC, made with `metadata`, on the key `key_id` where it takes one.
pub(crate) type Call = fn(
    KeyAdminClient<Channel>,
    Metadata,
    String,
) -> Pin<Box<dyn Future<Output = Result<(), Status>> + Send>>;

/// Every RPC of `service KeyAdmin`, with a request a management key (or,
/// for the operator-only ones, the operator) could make; `auth.rs` sends
/// them with bad credentials too.
pub(crate) const CALLS: &[(&str, Call)] = &[
    ("CreateKey", |mut c, m, _| {
        Box::pin(async move {
            let request = proto::CreateKeyRequest {
                name: "matrix".into(),
                scopes: vec!["datasets:read".into()],
                ..Default::default()
            };
            c.create_key(on(&m, request)).await.map(drop)
        })
    }),
    ("ListKeys", |mut c, m, _| {
        Box::pin(async move {
            c.list_keys(on(&m, proto::ListKeysRequest::default()))
                .await
                .map(drop)
        })
    }),
    ("GetKey", |mut c, m, key_id| {
        Box::pin(async move {
            c.get_key(on(&m, proto::GetKeyRequest { key_id }))
                .await
                .map(drop)
        })
    }),
    ("UpdateKey", |mut c, m, key_id| {
        Box::pin(async move {
            let request = proto::UpdateKeyRequest {
                key_id,
                name: "renamed by the matrix".into(),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["name".into()],
                }),
                ..Default::default()
            };
            c.update_key(on(&m, request)).await.map(drop)
        })
    }),
    ("RotateKey", |mut c, m, key_id| {
        Box::pin(async move {
            c.rotate_key(on(
                &m,
                proto::RotateKeyRequest {
                    key_id,
                    ..Default::default()
                },
            ))
            .await
            .map(drop)
        })
    }),
    ("RevokeKey", |mut c, m, key_id| {
        Box::pin(async move {
            let request = proto::RevokeKeyRequest {
                key_id,
                reason: "matrix".into(),
                ..Default::default()
            };
            c.revoke_key(on(&m, request)).await.map(drop)
        })
    }),
    ("ListAuditEvents", |mut c, m, key_id| {
        Box::pin(async move {
            let request = proto::ListAuditEventsRequest {
                key_id,
                ..Default::default()
            };
            c.list_audit_events(on(&m, request)).await.map(drop)
        })
    }),
    ("SetAccountTier", |mut c, m, _| {
        Box::pin(async move {
            let request = proto::SetAccountTierRequest {
                account_id: String::new(),
                tier: proto::Tier::Premium.into(),
            };
            c.set_account_tier(on(&m, request)).await.map(drop)
        })
    }),
    ("GetAccount", |mut c, m, _| {
        Box::pin(async move {
            c.get_account(on(&m, proto::GetAccountRequest {}))
                .await
                .map(drop)
        })
    }),
    ("SetAccountScopes", |mut c, m, _| {
        Box::pin(async move {
            let request = proto::SetAccountScopesRequest {
                grantable_scopes: vec!["*:*".into()],
                ..Default::default()
            };
            c.set_account_scopes(on(&m, request)).await.map(drop)
        })
    }),
];

/// The kinds of caller, each a row of the matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Caller {
    NoCredential,
    Malformed,
    UnknownKey,
    RevokedManagementKey,
    ExpiredManagementKey,
    KeyWithoutAdmin,
    OtherAccountsManagementKey,
    OperatorWithoutAccount,
    OperatorWithMalformedAccount,
    ManagementKey,
    Operator,
}

const CALLERS: [Caller; 11] = [
    Caller::NoCredential,
    Caller::Malformed,
    Caller::UnknownKey,
    Caller::RevokedManagementKey,
    Caller::ExpiredManagementKey,
    Caller::KeyWithoutAdmin,
    Caller::OtherAccountsManagementKey,
    Caller::OperatorWithoutAccount,
    Caller::OperatorWithMalformedAccount,
    Caller::ManagementKey,
    Caller::Operator,
];

/// The status `caller` must get from `rpc` on a key of ACME.
fn expected(caller: Caller, rpc: &str) -> Code {
    let operator_only = matches!(rpc, "SetAccountTier" | "SetAccountScopes");
    let on_a_key = matches!(
        rpc,
        "GetKey" | "UpdateKey" | "RotateKey" | "RevokeKey" | "ListAuditEvents"
    );
    match caller {
        Caller::NoCredential
        | Caller::Malformed
        | Caller::UnknownKey
        | Caller::RevokedManagementKey
        | Caller::ExpiredManagementKey => Code::Unauthenticated,
        Caller::KeyWithoutAdmin => Code::PermissionDenied,
        Caller::OperatorWithoutAccount | Caller::OperatorWithMalformedAccount => {
            Code::InvalidArgument
        }
        Caller::OtherAccountsManagementKey if operator_only => Code::PermissionDenied,
        // Its own account, where ACME's key does not exist.
        Caller::OtherAccountsManagementKey if on_a_key => Code::NotFound,
        Caller::OtherAccountsManagementKey => Code::Ok,
        Caller::ManagementKey if operator_only => Code::PermissionDenied,
        Caller::ManagementKey | Caller::Operator => Code::Ok,
    }
}

/// The credentials of every row, made once per app.
struct Credentials {
    revoked: String,
    expired: String,
    without_admin: String,
    other_account: String,
}

async fn create_as_operator(
    app: &mut TestApp,
    account: &str,
    name: &str,
    scopes: &[&str],
    expires_at: Option<prost_types::Timestamp>,
) -> proto::CreateKeyResponse {
    let request = on(
        &operator(Some(account)),
        proto::CreateKeyRequest {
            name: name.into(),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            expires_at,
            ..Default::default()
        },
    );
    app.admin.create_key(request).await.unwrap().into_inner()
}

async fn credentials(app: &mut TestApp) -> Credentials {
    let revoked = create_as_operator(app, ACCOUNT, "revoked admin", &["keys:admin"], None).await;
    let request = on(
        &operator(Some(ACCOUNT)),
        proto::RevokeKeyRequest {
            key_id: revoked.key.unwrap().key_id,
            reason: String::new(),
            ..Default::default()
        },
    );
    app.admin.revoke_key(request).await.unwrap();
    let in_a_day = crate::helpers::days_from(app.clock.now(), 1);
    let expired = create_as_operator(
        app,
        ACCOUNT,
        "expiring admin",
        &["keys:admin"],
        Some(in_a_day),
    )
    .await;
    app.clock.advance(time::Duration::days(2));
    let without_admin = create_as_operator(app, ACCOUNT, "reader", &["datasets:read"], None).await;
    let other_account = create_as_operator(app, OTHER, "other admin", &["keys:admin"], None).await;
    Credentials {
        revoked: revoked.secret,
        expired: expired.secret,
        without_admin: without_admin.secret,
        other_account: other_account.secret,
    }
}

fn metadata(caller: Caller, app: &TestApp, credentials: &Credentials) -> Metadata {
    match caller {
        Caller::NoCredential => Vec::new(),
        Caller::Malformed => bearer("vlk_short"),
        Caller::UnknownKey => bearer(GeneratedKey::generate(&Pepper::generate()).expose_secret()),
        Caller::RevokedManagementKey => bearer(&credentials.revoked),
        Caller::ExpiredManagementKey => bearer(&credentials.expired),
        Caller::KeyWithoutAdmin => bearer(&credentials.without_admin),
        Caller::OtherAccountsManagementKey => bearer(&credentials.other_account),
        Caller::OperatorWithoutAccount => operator(None),
        Caller::OperatorWithMalformedAccount => operator(Some("not an account!")),
        Caller::ManagementKey => bearer(&app.management_key),
        Caller::Operator => operator(Some(ACCOUNT)),
    }
}

/// Both accounts' keys (without last-use fields) and audit logs.
async fn snapshot(app: &mut TestApp) -> Vec<(Vec<proto::Key>, Vec<proto::AuditEvent>)> {
    let mut accounts = Vec::new();
    for account in [ACCOUNT, OTHER] {
        let request = on(
            &operator(Some(account)),
            proto::ListKeysRequest {
                include_revoked: true,
                page_size: 100,
                ..Default::default()
            },
        );
        let keys = app
            .admin
            .list_keys(request)
            .await
            .unwrap()
            .into_inner()
            .keys;
        let request = on(
            &operator(Some(account)),
            proto::ListAuditEventsRequest {
                page_size: 100,
                ..Default::default()
            },
        );
        let events = app
            .admin
            .list_audit_events(request)
            .await
            .unwrap()
            .into_inner()
            .events;
        accounts.push((without_usage(keys), events));
    }
    accounts
}

async fn every_rpc_with_every_caller(mut app: TestApp) {
    let credentials = credentials(&mut app).await;
    let mut cells = 0;
    for (rpc, call) in CALLS {
        for caller in CALLERS {
            let want = expected(caller, rpc);
            // A fresh target for each cell, so that a change one cell
            // makes (a rotation, a revocation) cannot decide another.
            let target = create_as_operator(&mut app, ACCOUNT, "target", &["a:b"], None).await;
            let key_id = target.key.unwrap().key_id;
            let before = snapshot(&mut app).await;
            let result = call(
                app.admin.clone(),
                metadata(caller, &app, &credentials),
                key_id,
            )
            .await;
            let got = result.as_ref().err().map_or(Code::Ok, Status::code);
            assert_eq!(got, want, "{rpc} by {caller:?}: {result:?}");
            if want != Code::Ok {
                assert_eq!(
                    snapshot(&mut app).await,
                    before,
                    "{rpc} by {caller:?} changed something"
                );
            }
            cells += 1;
        }
    }
    assert_eq!(cells, 10 * 11);
}

/// The matrix's RPCs are exactly the proto's.
#[test]
fn the_matrix_names_every_admin_rpc() {
    let proto = include_str!("../../proto/vilvik/keys/v1/keys.proto");
    let service = proto.split("service KeyAdmin {").nth(1).unwrap();
    let body = &service[..service.find('}').unwrap()];
    let in_proto: Vec<&str> = body
        .lines()
        .filter_map(|line| line.trim().strip_prefix("rpc "))
        .map(|rest| rest[..rest.find('(').unwrap()].trim())
        .collect();
    let in_matrix: Vec<&str> = CALLS.iter().map(|(name, _)| *name).collect();
    assert_eq!(in_matrix, in_proto);
}

async fn another_accounts_key_answers_like_a_missing_one(mut app: TestApp) {
    let theirs = create_as_operator(&mut app, OTHER, "theirs", &["a:b"], None).await;
    let theirs = theirs.key.unwrap().key_id;
    let missing = KeyId::generate().to_string();
    for (rpc, call) in CALLS {
        if !matches!(
            *rpc,
            "GetKey" | "UpdateKey" | "RotateKey" | "RevokeKey" | "ListAuditEvents"
        ) {
            continue;
        }
        let mine = bearer(&app.management_key);
        let answer = |result: Result<(), Status>, key_id: &str| {
            let status = result.expect_err(rpc);
            (status.code(), status.message().replace(key_id, "<key_id>"))
        };
        let other = answer(
            call(app.admin.clone(), mine.clone(), theirs.clone()).await,
            &theirs,
        );
        let absent = answer(
            call(app.admin.clone(), mine, missing.clone()).await,
            &missing,
        );
        assert_eq!(other, absent, "{rpc}");
        assert_eq!(other.0, Code::NotFound, "{rpc}");
    }
}

/// Room for the matrix's ~1,000 calls in a few seconds: under the tier
/// caps, and under the admin rate limit (its own tests are in rate_limit.rs).
fn roomy(config: &mut vilvik_keys::config::Config) {
    config.tier_limits.free = 1000;
    config.tier_limits.premium = 1000;
    config.admin_rates = vilvik_keys::config::AdminRateLimits::uniform(1_000_000, 1_000_000);
}

crate::on_both_backends!(
    configured by roomy:
    every_rpc_with_every_caller,
    another_accounts_key_answers_like_a_missing_one,
);
