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

mod admin;
mod calls;
mod pool;
mod report;
mod sample;
mod verify;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use vilvik_keys::proto::GetAccountRequest;

use self::admin::{Account, admin_task};
use self::calls::{Record, Shared, bearer};
use self::pool::Pool;
use self::report::{print_tables, report};
use self::sample::{connect_db, sample};
use self::verify::verify_task;
use crate::client::{admin_client, channels, connect};

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
        rate_limited: AtomicU64::new(0),
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
