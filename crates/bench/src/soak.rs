//! `soak`: mixed admin and verify traffic against one server for a long
//! time, to see that nothing creeps: latency, errors, the server's RSS and
//! the database's size, sampled at a fixed interval.
//!
//! - Admin tasks (few) each own some accounts and cycle through the key
//!   lifecycle at a fixed pace: revoke the oldest key when the account is
//!   one below its tier cap (its management key counts), create, update,
//!   get, rotate, list keys, list audit events. Creates keep going when the
//!   account reaches its stored-key ceiling (`stored_keys_per_active_key`
//!   times the cap): the refusals (RESOURCE_EXHAUSTED) are the bound on the
//!   keys table, counted apart from other errors.
//! - Verify tasks (many) ask VerifyKey about a mix of secrets the admin
//!   tasks hand them: current ones (VALID), rotated-away ones (ROTATED, or
//!   NOT_FOUND once pruned past `rotated_secrets_kept`: counted apart, as
//!   `rotated_away_pruned`), revoked ones
//!   (REVOKED) and random well-formed keys nobody issued (NOT_FOUND, each a
//!   new prefix, so a store lookup every time).
//!
//! Prints a table per RPC and the samples, then one JSON line. Every call
//! has a deadline and every loop ends at `--seconds`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};
use vilvik_keys::proto::{
    CreateKeyRequest, GetAccountRequest, GetKeyRequest, ListAuditEventsRequest, ListKeysRequest,
    RevokeKeyRequest, RotateKeyRequest, UpdateKeyRequest, key_admin_client::KeyAdminClient,
};
use vilvik_keys_domain::{GeneratedKey, Pepper};

use crate::client::{admin_client, channels, code_name, connect, verify_client, verify_request};
use crate::stats::{micros, ms, percentile};

#[derive(Debug, clap::Args)]
pub struct SoakArgs {
    /// The admin listener, host:port.
    #[arg(long)]
    admin: String,
    /// The verify listener, host:port.
    #[arg(long)]
    verify: String,
    /// One management key per account, comma-separated.
    #[arg(
        long,
        env = "SOAK_MANAGEMENT_KEYS",
        hide_env_values = true,
        value_delimiter = ','
    )]
    management_keys: Vec<String>,
    /// The server's database, for its size (pg_database_size).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,
    /// The server's process id, for its RSS (/proc/<pid>/status).
    #[arg(long)]
    server_pid: u32,
    /// How long to run.
    #[arg(long, default_value_t = 600.0)]
    seconds: f64,
    /// Seconds between samples of RSS, database size and rates.
    #[arg(long, default_value_t = 60.0)]
    sample_seconds: f64,
    /// Admin tasks (each one call at a time, over its own connection).
    #[arg(long, default_value_t = 2)]
    admin_tasks: usize,
    /// Admin calls a second per admin task.
    #[arg(long, default_value_t = 20.0)]
    admin_rate: f64,
    /// Verify tasks (each one call at a time).
    #[arg(long, default_value_t = 12)]
    verify_tasks: usize,
    /// Verify calls a second over all verify tasks; 0: as fast as they can.
    #[arg(long, default_value_t = 2000.0)]
    verify_rate: f64,
    /// HTTP/2 connections the verify tasks are spread over.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// The server's `rotated_secrets_kept`, to tell which rotated-away
    /// secrets the store has pruned.
    #[arg(long, env = "VILVIK_KEYS_ROTATED_SECRETS_KEPT", default_value_t = 10)]
    rotated_secrets_kept: u32,
    /// The scope keys are created with and verifies require.
    #[arg(long, default_value = "datasets:read")]
    scope: String,
}

/// Deadline of every call: a hung call is counted as DEADLINE_EXCEEDED.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Rotated-away and revoked secrets the verify tasks keep to present.
const OLD_SECRETS_KEPT: usize = 512;

/// What a verify task presents, in percent of its calls.
const MIX: [(Class, u64); 4] = [
    (Class::Current, 70),
    (Class::Rotated, 10),
    (Class::Revoked, 10),
    (Class::Unknown, 10),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Class {
    Current,
    Rotated,
    /// Rotated away so long ago that the store has pruned it
    /// (`rotated_secrets_kept` newer ones): the store knows it no more.
    Pruned,
    Revoked,
    Unknown,
}

impl Class {
    fn name(self) -> &'static str {
        match self {
            Class::Current => "current",
            Class::Rotated => "rotated_away",
            Class::Pruned => "rotated_away_pruned",
            Class::Revoked => "revoked",
            Class::Unknown => "unknown",
        }
    }
}

/// The secrets the admin tasks hand the verify tasks.
struct Pool {
    /// (key id, secret) of every key the soak holds active.
    current: Vec<(String, String)>,
    rotated: VecDeque<RotatedAway>,
    revoked: VecDeque<String>,
    /// Rotations so far, per key id.
    rotations: HashMap<String, u64>,
    /// The server's `rotated_secrets_kept`.
    kept: u64,
}

struct RotatedAway {
    key_id: String,
    /// Which of its key's rotations replaced it (1 for the first).
    rotation: u64,
    secret: String,
}

impl Pool {
    fn new(kept: u64) -> Self {
        Self {
            current: Vec::new(),
            rotated: VecDeque::new(),
            revoked: VecDeque::new(),
            rotations: HashMap::new(),
            kept,
        }
    }

    /// A secret of `class`, and its class now (a rotated-away secret may
    /// have been pruned since).
    fn pick(&self, class: Class, rng: &mut Rng) -> Option<(Class, String)> {
        let pick = |n: usize, rng: &mut Rng| (rng.next() % n as u64) as usize;
        match class {
            Class::Current if !self.current.is_empty() => {
                Some((class, self.current[pick(self.current.len(), rng)].1.clone()))
            }
            Class::Rotated if !self.rotated.is_empty() => {
                let r = &self.rotated[pick(self.rotated.len(), rng)];
                // The store keeps the newest `kept` rotated-away secrets.
                let since = self.rotations.get(&r.key_id).copied().unwrap_or(0) - r.rotation;
                let class = if since >= self.kept {
                    Class::Pruned
                } else {
                    Class::Rotated
                };
                Some((class, r.secret.clone()))
            }
            Class::Revoked if !self.revoked.is_empty() => {
                Some((class, self.revoked[pick(self.revoked.len(), rng)].clone()))
            }
            _ => None,
        }
    }

    fn retire(&mut self, key_id: &str, into_revoked: bool) -> Option<String> {
        let at = self.current.iter().position(|(id, _)| id == key_id)?;
        let (_, secret) = self.current.swap_remove(at);
        if into_revoked {
            self.revoked.push_back(secret.clone());
            if self.revoked.len() > OLD_SECRETS_KEPT {
                self.revoked.pop_front();
            }
        } else {
            let rotation = self.rotations.entry(key_id.to_owned()).or_default();
            *rotation += 1;
            self.rotated.push_back(RotatedAway {
                key_id: key_id.to_owned(),
                rotation: *rotation,
                secret: secret.clone(),
            });
            if self.rotated.len() > OLD_SECRETS_KEPT {
                self.rotated.pop_front();
            }
        }
        Some(secret)
    }
}

/// SplitMix64: enough to pick keys and operations, no dependency needed.
struct Rng(u64);

impl Rng {
    fn seeded(salt: u64) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Self(nanos ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15))
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// One task's record: latencies per RPC and sample interval, errors per
/// RPC and status, verify codes per class.
#[derive(Default)]
struct Record {
    latencies_us: HashMap<(&'static str, usize), Vec<u64>>,
    errors: BTreeMap<(&'static str, String), u64>,
    codes: BTreeMap<(Class, String), u64>,
    refused_at_ceiling: u64,
}

impl Record {
    fn merge(&mut self, other: Record) {
        for (k, mut v) in other.latencies_us {
            self.latencies_us.entry(k).or_default().append(&mut v);
        }
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
        for (k, v) in other.codes {
            *self.codes.entry(k).or_default() += v;
        }
        self.refused_at_ceiling += other.refused_at_ceiling;
    }
}

/// What every task shares: the clock, the stop flag and running totals.
struct Shared {
    started: Instant,
    sample: Duration,
    stop: AtomicBool,
    verify_calls: AtomicU64,
    admin_calls: AtomicU64,
    /// Calls failed, creates refused at the stored-key ceiling apart.
    errors: AtomicU64,
    refused: AtomicU64,
    pool: RwLock<Pool>,
}

impl Shared {
    fn bucket(&self) -> usize {
        (self.started.elapsed().as_secs_f64() / self.sample.as_secs_f64()) as usize
    }

    /// Times one call and files it: latency on success, status otherwise.
    async fn call<T>(
        &self,
        record: &mut Record,
        rpc: &'static str,
        call: impl Future<Output = Result<tonic::Response<T>, Status>>,
    ) -> Result<T, Status> {
        let bucket = self.bucket();
        let started = Instant::now();
        let result = call.await;
        let elapsed = micros(started.elapsed());
        let counter = if rpc == "VerifyKey" {
            &self.verify_calls
        } else {
            &self.admin_calls
        };
        counter.fetch_add(1, Ordering::Relaxed);
        match result {
            Ok(response) => {
                record
                    .latencies_us
                    .entry((rpc, bucket))
                    .or_default()
                    .push(elapsed);
                Ok(response.into_inner())
            }
            Err(status) => {
                let counter = if at_stored_key_ceiling(&status) {
                    &self.refused
                } else {
                    &self.errors
                };
                counter.fetch_add(1, Ordering::Relaxed);
                *record
                    .errors
                    .entry((rpc, format!("{:?}", status.code())))
                    .or_default() += 1;
                Err(status)
            }
        }
    }
}

/// CreateKey refused because the account stores as many keys as it may
/// (its message names the history, unlike the active-key cap's).
fn at_stored_key_ceiling(status: &Status) -> bool {
    status.code() == Code::ResourceExhausted && status.message().contains("history")
}

fn with_timeout<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.set_timeout(CALL_TIMEOUT);
    request
}

fn bearer<T>(message: T, key: &str) -> anyhow::Result<Request<T>> {
    let mut request = with_timeout(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {key}")
            .parse()
            .context("a management key is not a valid header value")?,
    );
    Ok(request)
}

/// An account an admin task drives: its management key, its tier cap and
/// the keys the soak holds active in it, oldest first.
struct Account {
    management_key: String,
    cap: u32,
    active: VecDeque<String>,
    created: u64,
    full: bool,
}

async fn admin_task(
    shared: Arc<Shared>,
    channel: Channel,
    mut accounts: Vec<Account>,
    rate: f64,
    scope: String,
    salt: u64,
) -> anyhow::Result<Record> {
    let mut client = admin_client(&channel);
    let mut record = Record::default();
    let mut rng = Rng::seeded(salt);
    let mut pace = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(0.1)));
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut step = 0usize;
    'run: loop {
        for account in &mut accounts {
            for op in CYCLE {
                if shared.stop.load(Ordering::Relaxed) {
                    break 'run;
                }
                // Revoke only to make room; a full account keeps its keys.
                let needed = match op {
                    Op::Revoke => !account.full && account.active.len() + 1 >= account.cap as usize,
                    Op::Create => true,
                    _ => !account.active.is_empty(),
                };
                if !needed {
                    continue;
                }
                pace.tick().await;
                step += 1;
                admin_op(
                    &shared,
                    &mut client,
                    &mut record,
                    account,
                    op,
                    &scope,
                    step,
                    &mut rng,
                )
                .await?;
            }
        }
    }
    Ok(record)
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Revoke,
    Create,
    Update,
    Get,
    Rotate,
    ListKeys,
    ListAudit,
}

/// One pass over an account.
const CYCLE: [Op; 7] = [
    Op::Revoke,
    Op::Create,
    Op::Update,
    Op::Get,
    Op::Rotate,
    Op::ListKeys,
    Op::ListAudit,
];

// `..Default::default()` on every request, so that fields issue 11 adds
// (request ids, etags) need no change here.
#[allow(clippy::too_many_arguments, clippy::needless_update)]
async fn admin_op(
    shared: &Shared,
    client: &mut KeyAdminClient<Channel>,
    record: &mut Record,
    account: &mut Account,
    op: Op,
    scope: &str,
    step: usize,
    rng: &mut Rng,
) -> anyhow::Result<()> {
    let key = account.management_key.clone();
    let any_active = |rng: &mut Rng, account: &Account| {
        account.active[(rng.next() % account.active.len() as u64) as usize].clone()
    };
    match op {
        Op::Revoke => {
            let key_id = account.active[0].clone();
            let request = bearer(
                RevokeKeyRequest {
                    key_id: key_id.clone(),
                    reason: "vilvik-keys-bench soak".to_owned(),
                    ..Default::default()
                },
                &key,
            )?;
            if shared
                .call(record, "RevokeKey", client.revoke_key(request))
                .await
                .is_ok()
            {
                account.active.pop_front();
                shared.pool.write().unwrap().retire(&key_id, true);
            }
        }
        Op::Create => {
            let request = bearer(
                CreateKeyRequest {
                    name: format!("soak-{}", account.created),
                    description: "vilvik-keys-bench soak".to_owned(),
                    scopes: vec![scope.to_owned()],
                    ..Default::default()
                },
                &key,
            )?;
            match shared
                .call(record, "CreateKey", client.create_key(request))
                .await
            {
                Ok(created) => {
                    let key_id = created.key.context("CreateKey answered no key")?.key_id;
                    account.created += 1;
                    account.active.push_back(key_id.clone());
                    shared
                        .pool
                        .write()
                        .unwrap()
                        .current
                        .push((key_id, created.secret));
                }
                Err(s) if at_stored_key_ceiling(&s) => {
                    account.full = true;
                    record.refused_at_ceiling += 1;
                }
                Err(_) => {}
            }
        }
        Op::Update => {
            let request = bearer(
                UpdateKeyRequest {
                    key_id: any_active(rng, account),
                    description: format!("vilvik-keys-bench soak, update {step}"),
                    update_mask: Some(prost_types::FieldMask {
                        paths: vec!["description".to_owned()],
                    }),
                    ..Default::default()
                },
                &key,
            )?;
            let _ = shared
                .call(record, "UpdateKey", client.update_key(request))
                .await;
        }
        Op::Get => {
            let request = bearer(
                GetKeyRequest {
                    key_id: any_active(rng, account),
                },
                &key,
            )?;
            let _ = shared.call(record, "GetKey", client.get_key(request)).await;
        }
        Op::Rotate => {
            let key_id = any_active(rng, account);
            let request = bearer(
                RotateKeyRequest {
                    key_id: key_id.clone(),
                    ..Default::default()
                },
                &key,
            )?;
            if let Ok(rotated) = shared
                .call(record, "RotateKey", client.rotate_key(request))
                .await
            {
                let mut pool = shared.pool.write().unwrap();
                pool.retire(&key_id, false);
                pool.current.push((key_id, rotated.secret));
            }
        }
        Op::ListKeys => {
            let request = bearer(
                ListKeysRequest {
                    page_size: 50,
                    include_revoked: step.is_multiple_of(2),
                    ..Default::default()
                },
                &key,
            )?;
            let _ = shared
                .call(record, "ListKeys", client.list_keys(request))
                .await;
        }
        Op::ListAudit => {
            // The account's log, or one key's.
            let key_id = if step.is_multiple_of(2) {
                String::new()
            } else {
                any_active(rng, account)
            };
            let request = bearer(
                ListAuditEventsRequest {
                    key_id,
                    page_size: 50,
                    ..Default::default()
                },
                &key,
            )?;
            let _ = shared
                .call(record, "ListAuditEvents", client.list_audit_events(request))
                .await;
        }
    }
    Ok(())
}

async fn verify_task(
    shared: Arc<Shared>,
    channel: Channel,
    rate: f64,
    scope: String,
    salt: u64,
) -> anyhow::Result<Record> {
    let mut client = verify_client(&channel);
    let mut record = Record::default();
    let mut rng = Rng::seeded(salt);
    let unknown_pepper = Pepper::generate();
    let mut pace = (rate > 0.0).then(|| {
        let mut pace = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
        pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        pace
    });
    while !shared.stop.load(Ordering::Relaxed) {
        if let Some(pace) = &mut pace {
            pace.tick().await;
        }
        let roll = rng.next() % 100;
        let mut class = Class::Unknown;
        let mut total = 0;
        for (c, share) in MIX {
            total += share;
            if roll < total {
                class = c;
                break;
            }
        }
        // Until the admin tasks have handed out such a secret, an unknown one.
        let picked = shared.pool.read().unwrap().pick(class, &mut rng);
        let (class, secret) = match picked {
            Some(picked) => picked,
            None => (
                Class::Unknown,
                GeneratedKey::generate(&unknown_pepper)
                    .expose_secret()
                    .to_owned(),
            ),
        };
        let request = with_timeout(verify_request(&secret, &scope));
        if let Ok(response) = shared
            .call(&mut record, "VerifyKey", client.verify_key(request))
            .await
        {
            *record
                .codes
                .entry((class, code_name(&response)))
                .or_default() += 1;
        }
    }
    Ok(record)
}

/// One sample of the server's and the database's size.
#[derive(Debug, Clone)]
struct Sample {
    at_s: f64,
    rss_kb: u64,
    db_bytes: i64,
    /// Bytes of each table with its indexes and TOAST.
    tables_bytes: BTreeMap<String, i64>,
    /// Rows of each table.
    rows: BTreeMap<String, i64>,
    verify_calls: u64,
    admin_calls: u64,
    errors: u64,
    refused: u64,
}

impl Sample {
    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "at_s": self.at_s,
            "rss_kb": self.rss_kb,
            "db_bytes": self.db_bytes,
            "tables_bytes": self.tables_bytes,
            "rows": self.rows,
            "verify_calls": self.verify_calls,
            "admin_calls": self.admin_calls,
            "errors": self.errors,
            "refused": self.refused,
        })
    }
}

const TABLES: [&str; 5] = [
    "keys",
    "key_secrets",
    "audit_events",
    "key_changes",
    "accounts",
];

fn rss_kb(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("cannot read /proc/{pid}/status: is the server running?"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS in /proc/<pid>/status")
}

async fn sample(shared: &Shared, db: &tokio_postgres::Client, pid: u32) -> anyhow::Result<Sample> {
    let db_bytes: i64 = db
        .query_one("SELECT pg_database_size(current_database())", &[])
        .await?
        .get(0);
    let mut tables_bytes = BTreeMap::new();
    let mut rows = BTreeMap::new();
    for table in TABLES {
        // Table names from the fixed list above, never from input.
        let row = db
            .query_one(
                &format!(
                    "SELECT pg_total_relation_size('{table}'), (SELECT count(*) FROM {table})"
                ),
                &[],
            )
            .await
            .with_context(|| format!("cannot measure table {table}"))?;
        tables_bytes.insert(table.to_owned(), row.get(0));
        rows.insert(table.to_owned(), row.get(1));
    }
    Ok(Sample {
        at_s: (shared.started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
        rss_kb: rss_kb(pid)?,
        db_bytes,
        tables_bytes,
        rows,
        verify_calls: shared.verify_calls.load(Ordering::Relaxed),
        admin_calls: shared.admin_calls.load(Ordering::Relaxed),
        errors: shared.errors.load(Ordering::Relaxed),
        refused: shared.refused.load(Ordering::Relaxed),
    })
}

async fn connect_db(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .context("cannot connect to the database to measure it")?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            eprintln!("soak: the measuring connection failed: {e}");
        }
    });
    Ok(client)
}

pub async fn run(args: SoakArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        !args.management_keys.is_empty(),
        "give at least one management key (--management-keys or SOAK_MANAGEMENT_KEYS)"
    );
    anyhow::ensure!(
        args.admin_tasks > 0 && args.verify_tasks > 0,
        "tasks must be at least 1"
    );
    anyhow::ensure!(
        args.sample_seconds > 0.0,
        "--sample-seconds must be positive"
    );
    let db = connect_db(&args.database_url).await?;
    let admin_channel = connect(&args.admin).await?;
    let verify_channels = channels(&args.verify, args.connections).await?;

    let mut accounts = Vec::new();
    for key in &args.management_keys {
        let account = admin_client(&admin_channel)
            .get_account(bearer(GetAccountRequest {}, key)?)
            .await
            .context("GetAccount with a management key")?
            .into_inner();
        accounts.push(Account {
            management_key: key.clone(),
            cap: account.active_key_limit,
            active: VecDeque::new(),
            created: 0,
            full: false,
        });
    }
    let account_count = accounts.len();
    let caps: Vec<u32> = accounts.iter().map(|a| a.cap).collect();

    let shared = Arc::new(Shared {
        started: Instant::now(),
        sample: Duration::from_secs_f64(args.sample_seconds),
        stop: AtomicBool::new(false),
        verify_calls: AtomicU64::new(0),
        admin_calls: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        refused: AtomicU64::new(0),
        pool: RwLock::new(Pool::new(u64::from(args.rotated_secrets_kept))),
    });
    let mut samples = vec![sample(&shared, &db, args.server_pid).await?];
    eprintln!(
        "soak: {} s, {} accounts (caps {caps:?}), {} admin tasks at {}/s, {} verify tasks at {}",
        args.seconds,
        account_count,
        args.admin_tasks,
        args.admin_rate,
        args.verify_tasks,
        if args.verify_rate > 0.0 {
            format!("{}/s in all", args.verify_rate)
        } else {
            "full speed".to_owned()
        }
    );

    let mut tasks = tokio::task::JoinSet::new();
    let mut per_task: Vec<Vec<Account>> = (0..args.admin_tasks).map(|_| Vec::new()).collect();
    for (i, account) in accounts.into_iter().enumerate() {
        per_task[i % args.admin_tasks].push(account);
    }
    for (i, owned) in per_task.into_iter().enumerate() {
        if owned.is_empty() {
            continue;
        }
        let channel = if i == 0 {
            admin_channel.clone()
        } else {
            connect(&args.admin).await?
        };
        tasks.spawn(admin_task(
            shared.clone(),
            channel,
            owned,
            args.admin_rate,
            args.scope.clone(),
            i as u64,
        ));
    }
    let per_verify_task = args.verify_rate / args.verify_tasks as f64;
    for i in 0..args.verify_tasks {
        tasks.spawn(verify_task(
            shared.clone(),
            verify_channels[i % verify_channels.len()].clone(),
            per_verify_task,
            args.scope.clone(),
            1000 + i as u64,
        ));
    }

    let end = shared.started + Duration::from_secs_f64(args.seconds);
    let mut next = shared.started + shared.sample;
    while next < end {
        tokio::time::sleep_until(next.into()).await;
        let s = sample(&shared, &db, args.server_pid).await?;
        eprintln!(
            "soak: {:>6.0} s  rss {:>7} kB  db {:>10} B  audit rows {:>7}  verify {:>9}  admin {:>7}  errors {}  refused {}",
            s.at_s,
            s.rss_kb,
            s.db_bytes,
            s.rows["audit_events"],
            s.verify_calls,
            s.admin_calls,
            s.errors,
            s.refused
        );
        samples.push(s);
        next += shared.sample;
    }
    tokio::time::sleep_until(end.into()).await;
    shared.stop.store(true, Ordering::Relaxed);
    let elapsed = shared.started.elapsed().as_secs_f64();
    let mut record = Record::default();
    while let Some(done) = tasks.join_next().await {
        record.merge(done??);
    }
    samples.push(sample(&shared, &db, args.server_pid).await?);

    let report = report(&args, &record, &samples, elapsed, account_count, &caps);
    print_tables(&report);
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

const RPCS: [&str; 8] = [
    "VerifyKey",
    "CreateKey",
    "UpdateKey",
    "GetKey",
    "RotateKey",
    "RevokeKey",
    "ListKeys",
    "ListAuditEvents",
];

fn report(
    args: &SoakArgs,
    record: &Record,
    samples: &[Sample],
    elapsed: f64,
    accounts: usize,
    caps: &[u32],
) -> serde_json::Value {
    let mut rpcs = serde_json::Map::new();
    let mut total_calls = 0u64;
    for rpc in RPCS {
        let mut ok: Vec<u64> = record
            .latencies_us
            .iter()
            .filter(|((r, _), _)| *r == rpc)
            .flat_map(|(_, v)| v.iter().copied())
            .collect();
        ok.sort_unstable();
        let errors: BTreeMap<&str, u64> = record
            .errors
            .iter()
            .filter(|((r, _), _)| *r == rpc)
            .map(|((_, code), n)| (code.as_str(), *n))
            .collect();
        let calls = ok.len() as u64 + errors.values().sum::<u64>();
        total_calls += calls;
        // p99 per sample interval: a latency that creeps shows here.
        let buckets = record
            .latencies_us
            .keys()
            .filter(|(r, _)| *r == rpc)
            .map(|(_, b)| *b)
            .max()
            .map_or(0, |b| b + 1);
        let p99_by_interval: Vec<f64> = (0..buckets)
            .map(|b| {
                let mut v = record
                    .latencies_us
                    .get(&(rpc, b))
                    .cloned()
                    .unwrap_or_default();
                v.sort_unstable();
                ms(percentile(&v, 0.99))
            })
            .collect();
        rpcs.insert(
            rpc.to_owned(),
            serde_json::json!({
                "calls": calls,
                "per_s": (calls as f64 / elapsed * 10.0).round() / 10.0,
                "p50_ms": ms(percentile(&ok, 0.50)),
                "p99_ms": ms(percentile(&ok, 0.99)),
                "max_ms": ms(ok.last().copied().unwrap_or(0)),
                "errors": errors,
                "p99_ms_by_interval": p99_by_interval,
            }),
        );
    }
    let mut codes = serde_json::Map::new();
    for ((class, code), n) in &record.codes {
        let entry = codes
            .entry(class.name())
            .or_insert_with(|| serde_json::json!({}));
        entry[code.as_str()] = (*n).into();
    }
    let (first, last) = (&samples[0], &samples[samples.len() - 1]);
    let audit_rows = last.rows["audit_events"] - first.rows["audit_events"];
    let db_growth = last.db_bytes - first.db_bytes;
    serde_json::json!({
        "seconds": (elapsed * 10.0).round() / 10.0,
        "accounts": accounts,
        "tier_caps": caps,
        "admin_tasks": args.admin_tasks,
        "admin_rate_per_task": args.admin_rate,
        "verify_tasks": args.verify_tasks,
        "verify_rate": args.verify_rate,
        "calls": total_calls,
        "calls_per_s": (total_calls as f64 / elapsed).round(),
        "rpcs": rpcs,
        "refused_at_stored_key_ceiling": record.refused_at_ceiling,
        "verify_codes_by_class": codes,
        "samples": samples.iter().map(Sample::json).collect::<Vec<_>>(),
        "audit_events_added": audit_rows,
        "db_growth_bytes": db_growth,
        "db_bytes_per_audit_event": if audit_rows > 0 { db_growth / audit_rows } else { 0 },
        "rss_growth_kb": last.rss_kb as i64 - first.rss_kb as i64,
    })
}

/// A JSON value as table text (numbers and strings without quotes).
fn cell(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn kb(v: &serde_json::Value) -> String {
    format!("{:.0}", v.as_f64().unwrap_or(0.0) / 1024.0)
}

fn print_tables(report: &serde_json::Value) {
    println!(
        "\n{:<16} {:>9} {:>8} {:>8} {:>8} {:>8}  errors",
        "rpc", "calls", "per s", "p50 ms", "p99 ms", "max ms"
    );
    for (rpc, r) in report["rpcs"].as_object().into_iter().flatten() {
        println!(
            "{:<16} {:>9} {:>8} {:>8.2} {:>8.2} {:>8.1}  {}",
            rpc,
            cell(&r["calls"]),
            cell(&r["per_s"]),
            r["p50_ms"].as_f64().unwrap_or(0.0),
            r["p99_ms"].as_f64().unwrap_or(0.0),
            r["max_ms"].as_f64().unwrap_or(0.0),
            r["errors"]
        );
    }
    println!(
        "overall: {} calls, {}/s; creates refused at the stored-key ceiling: {}",
        report["calls"], report["calls_per_s"], report["refused_at_stored_key_ceiling"]
    );
    println!(
        "verify codes by what was presented: {}",
        report["verify_codes_by_class"]
    );
    println!(
        "secrets the store had pruned, answered ROTATED from the node's memory: {}",
        report["verify_codes_by_class"]["rotated_away_pruned"]["ROTATED"]
    );
    println!(
        "\n{:>6} {:>8} {:>8} {:>6} {:>6} {:>7} {:>6} {:>7} {:>6} {:>7} {:>6} {:>8} {:>7} {:>6} {:>7}",
        "at s",
        "rss kB",
        "db kB",
        "keys",
        "kB",
        "secrets",
        "kB",
        "audit",
        "kB",
        "changes",
        "kB",
        "verify/s",
        "admin/s",
        "errors",
        "refused",
    );
    let samples = report["samples"].as_array().cloned().unwrap_or_default();
    let mut previous: Option<&serde_json::Value> = None;
    for s in &samples {
        let rate = |field: &str| match previous {
            Some(p) => {
                let dt = s["at_s"].as_f64().unwrap_or(0.0) - p["at_s"].as_f64().unwrap_or(0.0);
                let dn = s[field].as_f64().unwrap_or(0.0) - p[field].as_f64().unwrap_or(0.0);
                if dt > 0.0 { (dn / dt).round() } else { 0.0 }
            }
            None => 0.0,
        };
        let (rows, bytes) = (&s["rows"], &s["tables_bytes"]);
        println!(
            "{:>6} {:>8} {:>8} {:>6} {:>6} {:>7} {:>6} {:>7} {:>6} {:>7} {:>6} {:>8} {:>7} {:>6} {:>7}",
            cell(&s["at_s"]),
            cell(&s["rss_kb"]),
            kb(&s["db_bytes"]),
            cell(&rows["keys"]),
            kb(&bytes["keys"]),
            cell(&rows["key_secrets"]),
            kb(&bytes["key_secrets"]),
            cell(&rows["audit_events"]),
            kb(&bytes["audit_events"]),
            cell(&rows["key_changes"]),
            kb(&bytes["key_changes"]),
            rate("verify_calls"),
            rate("admin_calls"),
            cell(&s["errors"]),
            cell(&s["refused"]),
        );
        previous = Some(s);
    }
    println!(
        "database growth: {} bytes for {} audit events ({} bytes per event); RSS growth {} kB\n",
        report["db_growth_bytes"],
        report["audit_events_added"],
        report["db_bytes_per_audit_event"],
        report["rss_growth_kb"]
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retired_secrets_move_to_their_list_and_stay_bounded() {
        let mut pool = Pool::new(10);
        for i in 0..OLD_SECRETS_KEPT + 5 {
            pool.current.push((format!("k{i}"), format!("s{i}")));
            let into_revoked = i % 2 == 0;
            assert_eq!(
                pool.retire(&format!("k{i}"), into_revoked),
                Some(format!("s{i}"))
            );
        }
        assert!(pool.current.is_empty());
        assert_eq!(pool.retire("k0", true), None, "a key is retired once");
        assert_eq!(
            pool.revoked.len() + pool.rotated.len(),
            OLD_SECRETS_KEPT + 5
        );
        let even = |s: &str| s[1..].parse::<usize>().unwrap() % 2 == 0;
        assert!(pool.revoked.iter().all(|s| even(s)));
        assert!(pool.rotated.iter().all(|r| !even(&r.secret)));
        for _ in 0..OLD_SECRETS_KEPT {
            pool.current.push(("again".to_owned(), "x".to_owned()));
            pool.retire("again", true);
        }
        assert_eq!(pool.revoked.len(), OLD_SECRETS_KEPT);
    }

    #[test]
    fn a_secret_rotated_away_kept_times_ago_counts_as_pruned() {
        let mut pool = Pool::new(2);
        let mut rng = Rng::seeded(1);
        pool.current.push(("k".to_owned(), "s0".to_owned()));
        pool.retire("k", false);
        assert_eq!(
            pool.pick(Class::Rotated, &mut rng),
            Some((Class::Rotated, "s0".to_owned()))
        );
        for i in 1..=2 {
            pool.current.push(("k".to_owned(), format!("s{i}")));
            pool.retire("k", false);
        }
        // s0 has two newer rotated-away secrets: the store kept only those.
        let classes: Vec<_> = (0..200)
            .filter_map(|_| pool.pick(Class::Rotated, &mut rng))
            .map(|(class, secret)| (secret, class))
            .collect::<std::collections::BTreeMap<_, _>>()
            .into_iter()
            .collect();
        assert_eq!(
            classes,
            [
                ("s0".to_owned(), Class::Pruned),
                ("s1".to_owned(), Class::Rotated),
                ("s2".to_owned(), Class::Rotated),
            ]
        );
        assert_eq!(pool.pick(Class::Revoked, &mut rng), None);
    }

    #[test]
    fn reads_the_rss_of_a_running_process() {
        let kb = rss_kb(std::process::id()).unwrap();
        assert!(kb > 0);
        assert!(rss_kb(u32::MAX).is_err());
    }
}
