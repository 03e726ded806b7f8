//! `admin-flood`: what one account's flood of admin calls costs another
//! account. One account floods the admin listener with ListAuditEvents
//! while another account's GetKey latency is sampled, one call at a time;
//! first the victim alone, then under the flood. Prints the victim's percentiles in each phase and what the flood
//! got: admitted and refused (RESOURCE_EXHAUSTED) calls a second. The
//! flood retries at once, ignoring `retry-after`, as an attacker would.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use tonic::Code;
use vilvik_keys::proto::{GetKeyRequest, ListAuditEventsRequest, ListKeysRequest};

use crate::client::{admin_client, bearer, channels};
use crate::stats::{micros, ms, percentile};

#[derive(Debug, clap::Args)]
pub struct AdminFloodArgs {
    /// The admin listener, host:port.
    #[arg(long)]
    admin: String,
    /// The flooding account's management key.
    #[arg(long, env = "FLOOD_KEY")]
    flood_key: String,
    /// The other account's management key, whose GetKey is timed.
    #[arg(long, env = "VICTIM_KEY")]
    victim_key: String,
    /// A key id of the other account, to GetKey (default: its first key).
    #[arg(long)]
    victim_key_id: Option<String>,
    /// The victim's GetKey calls a second (one at a time, paced so that it
    /// stays inside its own admin rate).
    #[arg(long, default_value_t = 50)]
    victim_rate: u32,
    /// Flooding requests in flight.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// HTTP/2 connections the flood is spread over.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Duration of each phase.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
}

/// GetKey latencies of the victim, one call at a time, for `duration`.
async fn victim(
    args: &AdminFloodArgs,
    channel: &tonic::transport::Channel,
    key_id: &str,
    duration: Duration,
) -> anyhow::Result<serde_json::Value> {
    let mut client = admin_client(channel);
    let mut samples = Vec::new();
    let mut failures: BTreeMap<String, u64> = BTreeMap::new();
    let end = Instant::now() + duration;
    let mut pace = tokio::time::interval(Duration::from_secs(1) / args.victim_rate.max(1));
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while Instant::now() < end {
        pace.tick().await;
        let request = bearer(
            GetKeyRequest {
                key_id: key_id.to_owned(),
            },
            &args.victim_key,
        )?;
        let started = Instant::now();
        match client.get_key(request).await {
            Ok(_) => samples.push(micros(started.elapsed())),
            Err(status) => *failures.entry(format!("{:?}", status.code())).or_default() += 1,
        }
    }
    samples.sort_unstable();
    Ok(serde_json::json!({
        "get_key_calls": samples.len(),
        "p50_ms": ms(percentile(&samples, 0.50)),
        "p90_ms": ms(percentile(&samples, 0.90)),
        "p99_ms": ms(percentile(&samples, 0.99)),
        "failures": failures,
    }))
}

pub async fn run(args: AdminFloodArgs) -> anyhow::Result<()> {
    let duration = Duration::from_secs_f64(args.seconds);
    let victim_channel = channels(&args.admin, 1).await?.remove(0);
    let key_id = match &args.victim_key_id {
        Some(id) => id.clone(),
        None => admin_client(&victim_channel)
            .list_keys(bearer(ListKeysRequest::default(), &args.victim_key)?)
            .await
            .context("ListKeys with the victim's key")?
            .into_inner()
            .keys
            .first()
            .context("the victim's account has no key")?
            .key_id
            .clone(),
    };
    let alone = victim(&args, &victim_channel, &key_id, duration).await?;

    let flood_channels = channels(&args.admin, args.connections).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let (admitted, refused, other) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let mut flood = tokio::task::JoinSet::new();
    for i in 0..args.concurrency.max(1) {
        let mut client = admin_client(&flood_channels[i % flood_channels.len()]);
        let (stop, admitted, refused, other) = (
            stop.clone(),
            admitted.clone(),
            refused.clone(),
            other.clone(),
        );
        let key = args.flood_key.clone();
        flood.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let request = bearer(ListAuditEventsRequest::default(), &key)?;
                match client.list_audit_events(request).await {
                    Ok(_) => admitted.fetch_add(1, Ordering::Relaxed),
                    Err(s) if s.code() == Code::ResourceExhausted => {
                        refused.fetch_add(1, Ordering::Relaxed)
                    }
                    Err(_) => other.fetch_add(1, Ordering::Relaxed),
                };
            }
            anyhow::Ok(())
        });
    }
    let started = Instant::now();
    let flooded = victim(&args, &victim_channel, &key_id, duration).await?;
    stop.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    while let Some(done) = flood.join_next().await {
        done??;
    }
    let per_second = |n: &AtomicU64| (n.load(Ordering::Relaxed) as f64 / elapsed).round();
    let report = serde_json::json!({
        "victim_alone": alone,
        "victim_under_flood": flooded,
        "flood": {
            "concurrency": args.concurrency,
            "admitted_per_s": per_second(&admitted),
            "refused_per_s": per_second(&refused),
            "other_failures": other.load(Ordering::Relaxed),
        },
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
