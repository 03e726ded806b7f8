//! `miss`: the verify path when the node's cache does not hold the key:
//! (a) real keys, each asked once; (b) random well-formed keys whose
//! prefixes exist nowhere (each one a new prefix, so negative caching
//! cannot help: the worst case for the store).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use vilvik_keys_domain::GeneratedKey;

use crate::client::{channels, code_name, read_keys, verify_client, verify_request};
use crate::stats::{Summary, micros};

#[derive(Debug, clap::Args)]
pub struct MissArgs {
    /// The verify listener, host:port.
    #[arg(long)]
    verify: String,
    /// Secrets file written by `seed`; none of them may be cached yet.
    #[arg(long)]
    keys: PathBuf,
    /// Skip this many keys at the start of the file (e.g. those already
    /// used elsewhere).
    #[arg(long, default_value_t = 0)]
    skip: usize,
    /// Requests in flight.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// HTTP/2 connections the requests are spread over.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Duration of each of the two phases.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    #[arg(long, default_value = "datasets:read")]
    scope: String,
}

#[derive(Debug, Default)]
struct Outcome {
    latencies_us: Vec<u64>,
    codes: BTreeMap<String, u64>,
    errors: u64,
}

enum Source {
    Real(Arc<Vec<String>>),
    Random,
}

pub async fn run(args: MissArgs) -> anyhow::Result<()> {
    let keys: Vec<String> = read_keys(&args.keys)?.into_iter().skip(args.skip).collect();
    anyhow::ensure!(!keys.is_empty(), "no keys left after --skip {}", args.skip);
    let channels = channels(&args.verify, args.connections).await?;
    let real = phase(&args, &channels, Source::Real(Arc::new(keys)), "VALID").await?;
    let random = phase(&args, &channels, Source::Random, "NOT_FOUND").await?;
    println!(
        "{}",
        serde_json::json!({ "real_uncached": real, "random_unknown": random })
    );
    Ok(())
}

async fn phase(
    args: &MissArgs,
    channels: &[tonic::transport::Channel],
    source: Source,
    expected: &str,
) -> anyhow::Result<serde_json::Value> {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(args.seconds);
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..args.concurrency.max(1) {
        let mut client = verify_client(&channels[w % channels.len()]);
        let next = next.clone();
        let scope = args.scope.clone();
        let keys = match &source {
            Source::Real(keys) => Some(keys.clone()),
            Source::Random => None,
        };
        workers.spawn(async move {
            let mut out = Outcome::default();
            while Instant::now() < deadline {
                let key = match &keys {
                    Some(keys) => match keys.get(next.fetch_add(1, Ordering::Relaxed)) {
                        Some(k) => k.clone(),
                        None => break,
                    },
                    None => GeneratedKey::generate().expose_secret().to_owned(),
                };
                let t = Instant::now();
                let result = client.verify_key(verify_request(&key, &scope)).await;
                out.latencies_us.push(micros(t.elapsed()));
                match result {
                    Ok(r) => *out.codes.entry(code_name(r.get_ref())).or_default() += 1,
                    Err(_) => out.errors += 1,
                }
            }
            out
        });
    }
    let mut all = Outcome::default();
    while let Some(done) = workers.join_next().await {
        let done = done?;
        all.latencies_us.extend(done.latencies_us);
        for (code, n) in done.codes {
            *all.codes.entry(code).or_default() += n;
        }
        all.errors += done.errors;
    }
    let secs = started.elapsed().as_secs_f64();
    let requests = all.latencies_us.len();
    let unexpected = requests as u64 - all.codes.get(expected).copied().unwrap_or(0) - all.errors;
    let mut json = Summary::of(all.latencies_us).json();
    json["requests"] = requests.into();
    json["seconds"] = secs.into();
    json["rate_per_s"] = (requests as f64 / secs.max(1e-9)).into();
    json["codes"] = serde_json::json!(all.codes);
    json["errors"] = all.errors.into();
    json["expected_code"] = expected.into();
    json["unexpected"] = unexpected.into();
    Ok(json)
}
