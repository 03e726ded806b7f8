//! The authorization matrix: every KeyAdmin operation with every kind of
//! credential, against the status each must get, on both stores. The rules
//! are the service layer's, so the matrix runs there
//! ([`vilvik_keys::service::Admin`] over the test app's store), as any
//! surface would call it; then each cell runs again over gRPC, where the
//! adapter must carry the credentials to the service and answer a refusal
//! with the very status the service's error becomes. A refused call
//! changes nothing, and another account's key id answers exactly like one
//! that does not exist.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tonic::transport::Channel;
use tonic::{Code, Request, Status};
use vilvik_keys::proto;
use vilvik_keys::proto::key_admin_client::KeyAdminClient;
use vilvik_keys::service::rate_limit::AdminRateLimiter;
use vilvik_keys::service::{
    Admin, ApiError, Caller, Credentials, Issued, NewKeyFields, OperatorOnly, Sent,
};
use vilvik_keys_domain::{
    Clock, GeneratedKey, KeyId, KeyPrefix, Pepper, ScopeCatalogue, ScopeSet, Tier,
};
use vilvik_keys_store::{AuditEvent, KeyChanges, KeyRecord};
use vilvik_keys_verify::{UsageConfig, UsageRecorder, Verifier, VerifierConfig};

use crate::helpers::{ACCOUNT, OPERATOR_TOKEN, TestApp};

const OTHER: &str = "OTHER";
const ACTOR: &str = "alice@example.com";

/// What a cell sends as metadata.
pub(crate) type Metadata = Vec<(&'static str, String)>;

fn on<T>(metadata: &Metadata, message: T) -> Request<T> {
    let mut request = Request::new(message);
    for (name, value) in metadata {
        request.metadata_mut().insert(*name, value.parse().unwrap());
    }
    request
}

/// The key a cell acts on, with everything an RPC may name a key by (its
/// id, its current secret's prefix), so that an RPC that names it another
/// way changes no signature here or in `auth.rs`.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub key_id: KeyId,
    pub prefix: KeyPrefix,
}

impl Target {
    pub(crate) fn of(key: &proto::Key) -> Self {
        Self {
            key_id: key.key_id.parse().unwrap(),
            prefix: key.prefix.parse().unwrap(),
        }
    }

    /// A key id and a prefix that no key has.
    fn missing() -> Self {
        Self {
            key_id: KeyId::generate(),
            prefix: GeneratedKey::generate(&Pepper::generate()).prefix().clone(),
        }
    }
}

/// One RPC, made with `metadata`, on the key `target` where it takes one.
pub(crate) type Call = fn(
    KeyAdminClient<Channel>,
    Metadata,
    Target,
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
    ("GetKey", |mut c, m, target| {
        Box::pin(async move {
            let key_id = target.key_id.to_string();
            c.get_key(on(&m, proto::GetKeyRequest { key_id }))
                .await
                .map(drop)
        })
    }),
    ("UpdateKey", |mut c, m, target| {
        Box::pin(async move {
            let request = proto::UpdateKeyRequest {
                key_id: target.key_id.to_string(),
                name: "renamed by the matrix".into(),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["name".into()],
                }),
                ..Default::default()
            };
            c.update_key(on(&m, request)).await.map(drop)
        })
    }),
    ("RotateKey", |mut c, m, target| {
        Box::pin(async move {
            c.rotate_key(on(
                &m,
                proto::RotateKeyRequest {
                    key_id: target.key_id.to_string(),
                    ..Default::default()
                },
            ))
            .await
            .map(drop)
        })
    }),
    ("RevokeKey", |mut c, m, target| {
        Box::pin(async move {
            let request = proto::RevokeKeyRequest {
                key_id: target.key_id.to_string(),
                reason: "matrix".into(),
                ..Default::default()
            };
            c.revoke_key(on(&m, request)).await.map(drop)
        })
    }),
    ("ListAuditEvents", |mut c, m, target| {
        Box::pin(async move {
            let request = proto::ListAuditEventsRequest {
                key_id: target.key_id.to_string(),
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

/// One operation of the service, by an admitted caller, on the key
/// `target` where it takes one.
type Operation = for<'a> fn(
    &'a Admin,
    &'a Caller,
    &'a Target,
) -> Pin<Box<dyn Future<Output = Result<(), ApiError>> + Send + 'a>>;

/// [`CALLS`] on the service: the same requests, as domain values.
const OPERATIONS: &[(&str, Operation)] = &[
    ("CreateKey", |s, c, _| {
        Box::pin(async move {
            let fields = NewKeyFields {
                name: "matrix".parse().unwrap(),
                description: "".parse().unwrap(),
                scopes: ScopeSet::parse(&["datasets:read"]).unwrap(),
                expires_at: None,
            };
            s.create_key(c, fields, None).await.map(drop)
        })
    }),
    ("ListKeys", |s, c, _| {
        Box::pin(async move { s.list_keys(c, false, None, 50).await.map(drop) })
    }),
    ("GetKey", |s, c, target| {
        Box::pin(async move { s.get_key(c, &target.key_id).await.map(drop) })
    }),
    ("UpdateKey", |s, c, target| {
        Box::pin(async move {
            let changes = KeyChanges {
                name: Some("renamed by the matrix".parse().unwrap()),
                ..KeyChanges::default()
            };
            s.update_key(c, &target.key_id, changes).await.map(drop)
        })
    }),
    ("RotateKey", |s, c, target| {
        Box::pin(async move { s.rotate_key(c, &target.key_id, None, None).await.map(drop) })
    }),
    ("RevokeKey", |s, c, target| {
        Box::pin(async move {
            let reason = "matrix".parse().unwrap();
            s.revoke_key(c, &target.key_id, reason, None)
                .await
                .map(drop)
        })
    }),
    ("ListAuditEvents", |s, c, target| {
        Box::pin(async move {
            s.list_audit_events(c, Some(&target.key_id), None, 50)
                .await
                .map(drop)
        })
    }),
    ("SetAccountTier", |s, c, _| {
        Box::pin(async move {
            let operator = c.operator(OperatorOnly::ChangeTier)?;
            s.set_account_tier(operator, c.account().clone(), Tier::Premium)
                .await
                .map(drop)
        })
    }),
    ("GetAccount", |s, c, _| {
        Box::pin(async move { s.get_account(c).await.map(drop) })
    }),
    ("SetAccountScopes", |s, c, _| {
        Box::pin(async move {
            let operator = c.operator(OperatorOnly::SetGrantableScopes)?;
            let all = ScopeCatalogue::parse(&["*:*"]).unwrap();
            s.set_account_scopes(operator, c.account().clone(), Some(all))
                .await
                .map(drop)
        })
    }),
];

/// The kinds of caller, each a row of the matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CallerKind {
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

const CALLERS: [CallerKind; 11] = [
    CallerKind::NoCredential,
    CallerKind::Malformed,
    CallerKind::UnknownKey,
    CallerKind::RevokedManagementKey,
    CallerKind::ExpiredManagementKey,
    CallerKind::KeyWithoutAdmin,
    CallerKind::OtherAccountsManagementKey,
    CallerKind::OperatorWithoutAccount,
    CallerKind::OperatorWithMalformedAccount,
    CallerKind::ManagementKey,
    CallerKind::Operator,
];

/// The RPCs that act on one key.
const ON_A_KEY: [&str; 5] = [
    "GetKey",
    "UpdateKey",
    "RotateKey",
    "RevokeKey",
    "ListAuditEvents",
];

/// The status `caller` must get from `rpc` on a key of ACME.
fn expected(caller: CallerKind, rpc: &str) -> Code {
    let operator_only = matches!(rpc, "SetAccountTier" | "SetAccountScopes");
    let on_a_key = ON_A_KEY.contains(&rpc);
    match caller {
        CallerKind::NoCredential
        | CallerKind::Malformed
        | CallerKind::UnknownKey
        | CallerKind::RevokedManagementKey
        | CallerKind::ExpiredManagementKey => Code::Unauthenticated,
        CallerKind::KeyWithoutAdmin => Code::PermissionDenied,
        CallerKind::OperatorWithoutAccount | CallerKind::OperatorWithMalformedAccount => {
            Code::InvalidArgument
        }
        CallerKind::OtherAccountsManagementKey if operator_only => Code::PermissionDenied,
        // Its own account, where ACME's key does not exist.
        CallerKind::OtherAccountsManagementKey if on_a_key => Code::NotFound,
        CallerKind::OtherAccountsManagementKey => Code::Ok,
        CallerKind::ManagementKey if operator_only => Code::PermissionDenied,
        CallerKind::ManagementKey | CallerKind::Operator => Code::Ok,
    }
}

/// The status a surface answers for `result`, and how the test shows it.
fn status_of(result: Result<(), ApiError>) -> (Result<(), Status>, String) {
    let shown = format!("{result:?}");
    (result.map_err(Status::from), shown)
}

/// What a row presents: a bearer credential and, with the operator token,
/// the account it names and the actor.
struct Presented {
    bearer: Option<String>,
    operator: bool,
    account: Option<&'static str>,
}

impl Presented {
    fn bearer(credential: &str) -> Self {
        Self {
            bearer: Some(credential.to_owned()),
            operator: false,
            account: None,
        }
    }

    fn operator(account: Option<&'static str>) -> Self {
        Self {
            bearer: Some(OPERATOR_TOKEN.to_owned()),
            operator: true,
            account,
        }
    }

    /// As the service takes them.
    fn credentials(&self) -> Credentials<'_> {
        let named = |value: Option<&'static str>| value.map_or(Sent::Missing, Sent::Text);
        Credentials {
            bearer: self.bearer.as_deref(),
            account: named(self.account),
            actor: named(self.operator.then_some(ACTOR)),
            ip: None,
        }
    }

    /// As gRPC metadata.
    fn metadata(&self) -> Metadata {
        let mut metadata = Metadata::new();
        if let Some(bearer) = &self.bearer {
            metadata.push(("authorization", format!("Bearer {bearer}")));
        }
        if self.operator {
            metadata.push(("x-vilvik-actor", ACTOR.to_owned()));
        }
        if let Some(account) = self.account {
            metadata.push(("x-vilvik-account", account.to_owned()));
        }
        metadata
    }
}

/// The credentials of every row, made once per app.
struct Secrets {
    revoked: String,
    expired: String,
    without_admin: String,
    other_account: String,
}

fn presented(caller: CallerKind, app: &TestApp, credentials: &Secrets) -> Presented {
    match caller {
        CallerKind::NoCredential => Presented {
            bearer: None,
            operator: false,
            account: None,
        },
        CallerKind::Malformed => Presented::bearer("vlk_short"),
        CallerKind::UnknownKey => {
            Presented::bearer(GeneratedKey::generate(&Pepper::generate()).expose_secret())
        }
        CallerKind::RevokedManagementKey => Presented::bearer(&credentials.revoked),
        CallerKind::ExpiredManagementKey => Presented::bearer(&credentials.expired),
        CallerKind::KeyWithoutAdmin => Presented::bearer(&credentials.without_admin),
        CallerKind::OtherAccountsManagementKey => Presented::bearer(&credentials.other_account),
        CallerKind::OperatorWithoutAccount => Presented::operator(None),
        CallerKind::OperatorWithMalformedAccount => Presented::operator(Some("not an account!")),
        CallerKind::ManagementKey => Presented::bearer(&app.management_key),
        CallerKind::Operator => Presented::operator(Some(ACCOUNT)),
    }
}

/// A service over the app's store and clock, as `startup` builds the
/// admin listener's: its verify engine reads every key from the store, so
/// it sees at once what the app's server changed.
async fn service(app: &TestApp) -> Admin {
    let config = &app.config;
    let store = vilvik_keys::startup::open_store(config).await.unwrap();
    let peppers = vilvik_keys::pepper::load(config, store.as_ref())
        .await
        .unwrap();
    let clock: Arc<dyn Clock> = app.clock.clone();
    let verifier = Verifier::new(
        store.clone(),
        clock.clone(),
        UsageRecorder::new(store.clone(), UsageConfig::default()),
        Arc::new(peppers),
        VerifierConfig::default(),
    );
    Admin::new(
        store.clone(),
        clock.clone(),
        verifier,
        config.policy(),
        config.operator_token.clone(),
        AdminRateLimiter::new(config.admin_rates, store, clock),
    )
}

/// The operator acting on `account`, admitted.
async fn as_operator(service: &Admin, account: &'static str) -> Caller {
    service
        .admit(Presented::operator(Some(account)).credentials())
        .await
        .unwrap()
}

async fn create_as_operator(
    service: &Admin,
    account: &'static str,
    name: &str,
    scopes: &[&str],
    expires_at: Option<time::OffsetDateTime>,
) -> Issued {
    let fields = NewKeyFields {
        name: name.parse().unwrap(),
        description: "".parse().unwrap(),
        scopes: ScopeSet::parse(scopes).unwrap(),
        expires_at,
    };
    let operator = as_operator(service, account).await;
    service.create_key(&operator, fields, None).await.unwrap()
}

/// A fresh key of ACME's for a cell to act on.
async fn target(service: &Admin) -> Target {
    let key = create_as_operator(service, ACCOUNT, "target", &["a:b"], None)
        .await
        .key;
    Target {
        key_id: key.key_id,
        prefix: key.prefix,
    }
}

/// The credentials, made through the app's server so that its verify
/// engine knows them at once, as the service's does.
async fn credentials(app: &mut TestApp) -> Secrets {
    let create = |account: &'static str,
                  name: &'static str,
                  scopes: &'static [&'static str],
                  expires_at: Option<prost_types::Timestamp>| {
        let request = on(
            &Presented::operator(Some(account)).metadata(),
            proto::CreateKeyRequest {
                name: name.into(),
                scopes: scopes.iter().map(|s| s.to_string()).collect(),
                expires_at,
                ..Default::default()
            },
        );
        let mut admin = app.admin.clone();
        async move { admin.create_key(request).await.unwrap().into_inner() }
    };
    let revoked = create(ACCOUNT, "revoked admin", &["keys:admin"], None).await;
    let in_a_day = crate::helpers::days_from(app.clock.now(), 1);
    let expired = create(ACCOUNT, "expiring admin", &["keys:admin"], Some(in_a_day)).await;
    let without_admin = create(ACCOUNT, "reader", &["datasets:read"], None).await;
    let other_account = create(OTHER, "other admin", &["keys:admin"], None).await;
    let request = on(
        &Presented::operator(Some(ACCOUNT)).metadata(),
        proto::RevokeKeyRequest {
            key_id: revoked.key.unwrap().key_id,
            reason: String::new(),
            ..Default::default()
        },
    );
    app.admin.revoke_key(request).await.unwrap();
    app.clock.advance(time::Duration::days(2));
    Secrets {
        revoked: revoked.secret,
        expired: expired.secret,
        without_admin: without_admin.secret,
        other_account: other_account.secret,
    }
}

/// Both accounts' keys (without last-use fields, which every call through
/// a management key updates in the background) and audit logs.
async fn snapshot(service: &Admin) -> Vec<(Vec<KeyRecord>, Vec<AuditEvent>)> {
    let mut accounts = Vec::new();
    for account in [ACCOUNT, OTHER] {
        let operator = as_operator(service, account).await;
        let mut keys = service
            .list_keys(&operator, true, None, 100)
            .await
            .unwrap()
            .items;
        for key in &mut keys {
            key.last_used_at = None;
            key.last_used_ip = None;
            key.usage = Default::default();
        }
        let events = service
            .list_audit_events(&operator, None, None, 100)
            .await
            .unwrap()
            .items;
        accounts.push((keys, events));
    }
    accounts
}

/// What the service answers `presented` for `operation` on `target`.
async fn answer(
    service: &Admin,
    operation: Operation,
    presented: &Presented,
    target: &Target,
) -> Result<(), ApiError> {
    let caller = service.admit(presented.credentials()).await?;
    operation(service, &caller, target).await
}

async fn every_operation_with_every_caller(mut app: TestApp) {
    let service = service(&app).await;
    let credentials = credentials(&mut app).await;
    let mut cells = 0;
    for (rpc, operation) in OPERATIONS {
        for caller in CALLERS {
            let want = expected(caller, rpc);
            // A fresh target for each cell, so that a change one cell
            // makes (a rotation, a revocation) cannot decide another.
            let target = target(&service).await;
            let before = snapshot(&service).await;
            let presented = presented(caller, &app, &credentials);
            let (result, shown) =
                status_of(answer(&service, *operation, &presented, &target).await);
            let got = result.err().map_or(Code::Ok, |s| s.code());
            assert_eq!(got, want, "{rpc} by {caller:?}: {shown}");
            if want != Code::Ok {
                assert_eq!(
                    snapshot(&service).await,
                    before,
                    "{rpc} by {caller:?} changed something"
                );
            }
            cells += 1;
        }
    }
    assert_eq!(cells, CALLS.len() * CALLERS.len());
}

async fn every_rpc_reaches_the_service_and_answers_its_status(mut app: TestApp) {
    let service = service(&app).await;
    let credentials = credentials(&mut app).await;
    let mut cells = 0;
    for ((rpc, call), (_, operation)) in CALLS.iter().zip(OPERATIONS) {
        for caller in CALLERS {
            let want = expected(caller, rpc);
            let target = target(&service).await;
            let before = snapshot(&service).await;
            let presented = presented(caller, &app, &credentials);
            let result = call(app.admin.clone(), presented.metadata(), target.clone()).await;
            let got = result.as_ref().err().map_or(Code::Ok, Status::code);
            assert_eq!(got, want, "{rpc} by {caller:?}: {result:?}");
            if let Err(status) = result {
                assert_eq!(
                    snapshot(&service).await,
                    before,
                    "{rpc} by {caller:?} changed something"
                );
                // Nothing changed, so the service refuses the same call on
                // the same key in the same words.
                let refusal = answer(&service, *operation, &presented, &target)
                    .await
                    .expect_err(rpc);
                let expected = Status::from(refusal);
                assert_eq!(
                    (status.code(), status.message()),
                    (expected.code(), expected.message()),
                    "{rpc} by {caller:?}"
                );
            }
            cells += 1;
        }
    }
    assert_eq!(cells, CALLS.len() * CALLERS.len());
}

/// The matrix's RPCs are exactly the proto's, and the service's operations
/// are the same.
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
    let in_service: Vec<&str> = OPERATIONS.iter().map(|(name, _)| *name).collect();
    assert_eq!(in_service, in_proto);
}

async fn another_accounts_key_answers_like_a_missing_one(app: TestApp) {
    let service = service(&app).await;
    let theirs = create_as_operator(&service, OTHER, "theirs", &["a:b"], None)
        .await
        .key;
    let theirs = Target {
        key_id: theirs.key_id,
        prefix: theirs.prefix,
    };
    let missing = Target::missing();
    let mine = Presented::bearer(&app.management_key);
    for ((rpc, call), (_, operation)) in CALLS.iter().zip(OPERATIONS) {
        if !ON_A_KEY.contains(rpc) {
            continue;
        }
        let seen = |result: Result<(), Status>, target: &Target| {
            let status = result.expect_err(rpc);
            let message = status.message();
            let message = message.replace(target.key_id.as_str(), "<key_id>");
            let message = message.replace(target.prefix.as_str(), "<prefix>");
            (status.code(), message)
        };
        // On the service, and over gRPC.
        let mut answers = Vec::new();
        for target in [&theirs, &missing] {
            let on_service = answer(&service, *operation, &mine, target).await;
            answers.push(seen(on_service.map_err(Status::from), target));
            let over_grpc = call(app.admin.clone(), mine.metadata(), target.clone()).await;
            answers.push(seen(over_grpc, target));
        }
        assert!(
            answers.iter().all(|a| *a == answers[0]),
            "{rpc}: {answers:?}"
        );
        assert_eq!(answers[0].0, Code::NotFound, "{rpc}");
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
    every_operation_with_every_caller,
    every_rpc_reaches_the_service_and_answers_its_status,
    another_accounts_key_answers_like_a_missing_one,
);
