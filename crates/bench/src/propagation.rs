//! `propagation`: revoke keys one at a time through the admin node and poll
//! every verify node until it rejects the key.
//!
//! For each key: every node first answers VALID (so it holds the key in its
//! cache); then the revoke RPC runs; the moment it returns, each node is
//! polled back to back until it answers not-valid. The time reported is
//! from the revoke RPC's return to the first rejecting answer. A VALID
//! answer to a poll sent after the revoke returned is counted per node; on
//! the node in the admin's own process (`--same-process`) it must be 0.
//!
//! Keys it creates itself (no `--keys`) also give the other window: from
//! the CreateKey RPC's return until each node first answers VALID (a node
//! learns a new prefix from the change feed; until then it says NOT_FOUND).
//!
//! A call the admin rate limit refuses is sent again after the wait it
//! names (`bench/run.sh` lifts the limit on its admin node, so there it
//! never waits); the revoke's time counts from the try that was admitted.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use tonic::transport::Channel;
use vilvik_keys::proto::{CreateKeyRequest, RevokeKeyRequest};

use crate::client::{
    admin_client, admitted, code_name, connect, operator, read_keys, verify_client, verify_request,
};
use crate::stats::{Summary, micros};

#[derive(Debug, clap::Args)]
pub struct PropagationArgs {
    /// The admin listener, host:port.
    #[arg(long)]
    admin: String,
    /// Every verify listener to watch, comma-separated host:port.
    #[arg(long, value_delimiter = ',', required = true)]
    verify: Vec<String>,
    /// Which of the --verify addresses is served by the admin's own process.
    #[arg(long)]
    same_process: Option<String>,
    /// Operator token (VILVIK_KEYS_OPERATOR_TOKEN of the admin node).
    #[arg(long, env = "VILVIK_KEYS_OPERATOR_TOKEN", hide_env_values = true)]
    token: String,
    /// How many keys to revoke.
    #[arg(long, default_value_t = 1000)]
    count: usize,
    /// Account to create the keys in (its active-key limit must allow
    /// --count keys, e.g. VILVIK_KEYS_FREE_TIER_LIMIT on the admin node).
    #[arg(long, default_value = "bench-propagation")]
    account: String,
    /// Use seeded keys from this file instead of creating new ones.
    #[arg(long)]
    keys: Option<PathBuf>,
    /// With --keys: skip this many keys at the start of the file.
    #[arg(long, default_value_t = 0)]
    skip: usize,
    /// Give up on a node after this long without a rejection.
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
    #[arg(long, default_value = "datasets:read")]
    scope: String,
}

struct Target {
    secret: String,
    key_id: String,
    account_id: String,
}

#[derive(Debug, Default)]
struct NodeResult {
    until_rejected_us: Vec<u64>,
    valid_after_return: u64,
    timeouts: u64,
    errors: u64,
    polls: u64,
    codes: std::collections::BTreeMap<String, u64>,
}

pub async fn run(args: PropagationArgs) -> anyhow::Result<()> {
    let admin = connect(&args.admin).await?;
    let mut nodes = Vec::new();
    for addr in &args.verify {
        nodes.push((addr.clone(), connect(addr).await?));
    }
    if let Some(same) = &args.same_process {
        anyhow::ensure!(
            args.verify.contains(same),
            "--same-process {same} is not one of --verify"
        );
    }
    let (targets, created_until_valid) = targets(&args, &admin, &nodes).await?;
    eprintln!("revoking {} keys", targets.len());

    let mut results: Vec<NodeResult> = nodes.iter().map(|_| NodeResult::default()).collect();
    let mut revoke_us = Vec::with_capacity(targets.len());
    let timeout = Duration::from_millis(args.timeout_ms);
    for (i, target) in targets.iter().enumerate() {
        // Every node holds the key as VALID before the revoke.
        for (addr, channel) in &nodes {
            wait_valid(channel, &target.secret, &args.scope)
                .await
                .with_context(|| format!("key {} never VALID on {addr}", target.key_id))?;
        }
        let revoke = RevokeKeyRequest {
            key_id: target.key_id.clone(),
            reason: "vilvik-keys-bench propagation".to_owned(),
            ..Default::default()
        };
        let (_, sent) = admitted(|| {
            let mut client = admin_client(&admin);
            let request = operator(revoke.clone(), &args.token, &target.account_id);
            async move { client.revoke_key(request?).await }
        })
        .await
        .with_context(|| format!("RevokeKey {} failed", target.key_id))?;
        let returned = Instant::now();
        revoke_us.push(micros(returned - sent));
        let mut polls = tokio::task::JoinSet::new();
        for (n, (_, channel)) in nodes.iter().enumerate() {
            let channel = channel.clone();
            let secret = target.secret.clone();
            let scope = args.scope.clone();
            polls.spawn(async move {
                (
                    n,
                    poll_until_rejected(channel, secret, scope, returned, timeout).await,
                )
            });
        }
        while let Some(done) = polls.join_next().await {
            let (n, one) = done?;
            let r = &mut results[n];
            r.polls += one.polls;
            r.errors += one.errors;
            r.valid_after_return += one.valid_after_return;
            match one.rejected {
                Some((us, code)) => {
                    r.until_rejected_us.push(us);
                    *r.codes.entry(code).or_default() += 1;
                }
                None => r.timeouts += 1,
            }
        }
        if (i + 1) % 100 == 0 {
            eprintln!("revoked {}/{}", i + 1, targets.len());
        }
    }

    let mut per_node = serde_json::Map::new();
    let mut same_process_valid = None;
    for ((addr, _), r) in nodes.iter().zip(results) {
        let same = args.same_process.as_deref() == Some(addr.as_str());
        if same {
            same_process_valid = Some(r.valid_after_return);
        }
        let mut json = Summary::of(r.until_rejected_us).json();
        json["same_process_as_admin"] = same.into();
        json["valid_after_revoke_returned"] = r.valid_after_return.into();
        json["timeouts"] = r.timeouts.into();
        json["errors"] = r.errors.into();
        json["polls"] = r.polls.into();
        json["rejected_codes"] = serde_json::json!(r.codes);
        per_node.insert(addr.clone(), json);
    }
    println!(
        "{}",
        serde_json::json!({
            "keys": targets.len(),
            "revoke_rpc": Summary::of(revoke_us).json(),
            "created_until_valid": created_until_valid,
            "nodes": per_node,
            "same_process_valid_after_revoke": same_process_valid,
        })
    );
    Ok(())
}

/// The keys to revoke: created through the admin API, or seeded ones whose
/// id and account VerifyKey tells. With created keys, also how long after
/// each CreateKey returned every node first answered VALID (per node, JSON).
async fn targets(
    args: &PropagationArgs,
    admin: &Channel,
    nodes: &[(String, Channel)],
) -> anyhow::Result<(Vec<Target>, serde_json::Value)> {
    let mut out = Vec::with_capacity(args.count);
    let mut until_valid: Vec<Vec<u64>> = nodes.iter().map(|_| Vec::new()).collect();
    match &args.keys {
        Some(path) => {
            let keys = read_keys(path)?;
            let mut client = verify_client(&nodes[0].1);
            for secret in keys.into_iter().skip(args.skip).take(args.count) {
                let r = client
                    .verify_key(verify_request(&secret, &args.scope))
                    .await?
                    .into_inner();
                anyhow::ensure!(
                    r.valid,
                    "seeded key {} is {}, not VALID",
                    &secret[..12],
                    code_name(&r)
                );
                out.push(Target {
                    secret,
                    key_id: r.key_id,
                    account_id: r.account_id,
                });
            }
        }
        None => {
            for i in 0..args.count {
                let create = CreateKeyRequest {
                    name: format!("propagation-{i}"),
                    description: "vilvik-keys-bench propagation".to_owned(),
                    scopes: vec![args.scope.clone()],
                    expires_at: None,
                    ..Default::default()
                };
                let (created, _) = admitted(|| {
                    let mut client = admin_client(admin);
                    let request = operator(create.clone(), &args.token, &args.account);
                    async move { client.create_key(request?).await }
                })
                .await
                .with_context(|| {
                    format!(
                        "CreateKey #{i} in account {} failed (raise the admin node's \
                         VILVIK_KEYS_FREE_TIER_LIMIT, or pass --keys)",
                        args.account
                    )
                })?;
                let returned = Instant::now();
                let mut polls = tokio::task::JoinSet::new();
                for (n, (_, channel)) in nodes.iter().enumerate() {
                    let (channel, secret) = (channel.clone(), created.secret.clone());
                    let scope = args.scope.clone();
                    polls.spawn(async move {
                        (
                            n,
                            poll_until_valid(&channel, &secret, &scope, returned).await,
                        )
                    });
                }
                while let Some(done) = polls.join_next().await {
                    let (n, valid_after) = done?;
                    let valid_after = valid_after.with_context(|| {
                        format!("created key #{i} never VALID on {}", nodes[n].0)
                    })?;
                    until_valid[n].push(valid_after);
                }
                let key = created
                    .key
                    .ok_or_else(|| anyhow::anyhow!("CreateKey returned no key"))?;
                out.push(Target {
                    secret: created.secret,
                    key_id: key.key_id,
                    account_id: key.account_id,
                });
            }
        }
    }
    anyhow::ensure!(!out.is_empty(), "no keys to revoke");
    let mut created = serde_json::Map::new();
    if args.keys.is_none() {
        for ((addr, _), us) in nodes.iter().zip(until_valid) {
            created.insert(addr.clone(), Summary::of(us).json());
        }
    }
    Ok((out, created.into()))
}

/// Polls back to back until `secret` is VALID; microseconds since
/// `returned`.
async fn poll_until_valid(
    channel: &Channel,
    secret: &str,
    scope: &str,
    returned: Instant,
) -> anyhow::Result<u64> {
    let mut client = verify_client(channel);
    loop {
        let r = client.verify_key(verify_request(secret, scope)).await?;
        if r.get_ref().valid {
            return Ok(micros(returned.elapsed()));
        }
        anyhow::ensure!(
            returned.elapsed() < Duration::from_secs(5),
            "last answer {}",
            code_name(r.get_ref())
        );
    }
}

async fn wait_valid(channel: &Channel, secret: &str, scope: &str) -> anyhow::Result<()> {
    let mut client = verify_client(channel);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = client.verify_key(verify_request(secret, scope)).await;
        match r {
            Ok(r) if r.get_ref().valid => return Ok(()),
            Ok(r) if Instant::now() > deadline => {
                anyhow::bail!("last answer {}", code_name(r.get_ref()))
            }
            Err(status) if Instant::now() > deadline => return Err(status.into()),
            _ => tokio::time::sleep(Duration::from_millis(1)).await,
        }
    }
}

#[derive(Debug, Default)]
struct Poll {
    rejected: Option<(u64, String)>,
    valid_after_return: u64,
    errors: u64,
    polls: u64,
}

async fn poll_until_rejected(
    channel: Channel,
    secret: String,
    scope: String,
    returned: Instant,
    timeout: Duration,
) -> Poll {
    let mut client = verify_client(&channel);
    let mut out = Poll::default();
    while returned.elapsed() < timeout {
        out.polls += 1;
        match client.verify_key(verify_request(&secret, &scope)).await {
            Ok(r) if r.get_ref().valid => out.valid_after_return += 1,
            Ok(r) => {
                out.rejected = Some((micros(returned.elapsed()), code_name(r.get_ref())));
                break;
            }
            Err(_) => {
                out.errors += 1;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    }
    out
}
