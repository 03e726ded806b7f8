//! `miss`: the verify path when the node's cache does not hold the key:
//! (a) real keys, each asked once; (b) random well-formed keys whose
//! prefixes exist nowhere (each one a new prefix, so negative caching
//! cannot help: without the set of known prefixes, the worst case for the
//! store); and, with `--admin`, (c) the same random keys presented as
//! management keys (`authorization: Bearer vlk_…` on ListKeys), which must
//! be UNAUTHENTICATED.
//!
//! `--phases` picks which run and in what order, so that `run.sh` can read
//! the store's transaction counters around one phase alone.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tonic::transport::Channel;
use vilvik_keys::proto::{
    ListKeysRequest, key_admin_client::KeyAdminClient, key_verify_client::KeyVerifyClient,
};
use vilvik_keys_domain::GeneratedKey;

use crate::client::{
    admin_client, bearer, channels, code_name, read_keys, verify_client, verify_request,
};
use crate::stats::{Summary, micros};

#[derive(Debug, clap::Args)]
pub struct MissArgs {
    /// The verify listener, host:port (phases `real` and `random`).
    #[arg(long)]
    verify: Option<String>,
    /// The admin listener, host:port (phase `bearer`).
    #[arg(long)]
    admin: Option<String>,
    /// Secrets file written by `seed`; none of them may be cached yet
    /// (phase `real`).
    #[arg(long)]
    keys: Option<PathBuf>,
    /// The phases to run, in this order: `real` (seeded keys, each once:
    /// VALID), `random` (random well-formed keys: NOT_FOUND), `bearer`
    /// (random well-formed keys as ListKeys bearer tokens: UNAUTHENTICATED).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "real,random")]
    phases: Vec<Phase>,
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
    /// Duration of each phase.
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Phase {
    Real,
    Random,
    Bearer,
}

impl Phase {
    /// The phase's name in the JSON output.
    fn name(self) -> &'static str {
        match self {
            Phase::Real => "real_uncached",
            Phase::Random => "random_unknown",
            Phase::Bearer => "random_bearer",
        }
    }

    fn expected(self) -> &'static str {
        match self {
            Phase::Real => "VALID",
            Phase::Random => "NOT_FOUND",
            Phase::Bearer => "UNAUTHENTICATED",
        }
    }
}

enum Source {
    Real(Arc<Vec<String>>),
    Random,
}

/// What each worker sends.
enum Call {
    Verify(KeyVerifyClient<Channel>),
    /// ListKeys with the key as the bearer token.
    Bearer(KeyAdminClient<Channel>),
}

impl Call {
    /// The answer's name: a VerifyKey code (`VALID`, ...) or, for ListKeys,
    /// the gRPC status (`OK`, `UNAUTHENTICATED`, ...). `Err` only when
    /// VerifyKey failed at the gRPC level.
    async fn send(&mut self, key: &str, scope: &str) -> Result<String, tonic::Status> {
        match self {
            Call::Verify(client) => client
                .verify_key(verify_request(key, scope))
                .await
                .map(|r| code_name(r.get_ref())),
            Call::Bearer(client) => {
                let request = bearer(ListKeysRequest::default(), key)?;
                Ok(match client.list_keys(request).await {
                    Ok(_) => "OK".to_owned(),
                    Err(status) => status_name(status.code()),
                })
            }
        }
    }
}

/// A gRPC status code as its proto name, e.g. `UNAUTHENTICATED`.
fn status_name(code: tonic::Code) -> String {
    let mut out = String::new();
    for (i, c) in format!("{code:?}").chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

pub async fn run(args: MissArgs) -> anyhow::Result<()> {
    anyhow::ensure!(!args.phases.is_empty(), "name at least one phase");
    let mut out = serde_json::Map::new();
    for &p in &args.phases {
        let (addr, flag) = match p {
            Phase::Real | Phase::Random => (&args.verify, "--verify"),
            Phase::Bearer => (&args.admin, "--admin"),
        };
        let addr = addr
            .as_deref()
            .ok_or_else(|| anyhow::anyhow!("phase {} needs {flag}", p.name()))?;
        let channels = channels(addr, args.connections).await?;
        let source = match p {
            Phase::Real => {
                let path = args
                    .keys
                    .as_ref()
                    .ok_or_else(|| anyhow::anyhow!("phase real needs --keys"))?;
                let keys: Vec<String> = read_keys(path)?.into_iter().skip(args.skip).collect();
                anyhow::ensure!(!keys.is_empty(), "no keys left after --skip {}", args.skip);
                Source::Real(Arc::new(keys))
            }
            Phase::Random | Phase::Bearer => Source::Random,
        };
        let result = phase(&args, &channels, p, source).await?;
        out.insert(p.name().to_owned(), result);
    }
    println!("{}", serde_json::Value::Object(out));
    Ok(())
}

async fn phase(
    args: &MissArgs,
    channels: &[Channel],
    kind: Phase,
    source: Source,
) -> anyhow::Result<serde_json::Value> {
    let expected = kind.expected();
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(args.seconds);
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..args.concurrency.max(1) {
        let channel = &channels[w % channels.len()];
        let mut call = match kind {
            Phase::Bearer => Call::Bearer(admin_client(channel)),
            Phase::Real | Phase::Random => Call::Verify(verify_client(channel)),
        };
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
                    None => GeneratedKey::generate(&vilvik_keys_domain::Pepper::generate())
                        .expose_secret()
                        .to_owned(),
                };
                let t = Instant::now();
                let result = call.send(&key, &scope).await;
                out.latencies_us.push(micros(t.elapsed()));
                match result {
                    Ok(code) => *out.codes.entry(code).or_default() += 1,
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
