//! `probe`: polls VerifyKey until a key is answered VALID, for start-up time
//! (or, with `--any-answer`, until the node answers at all: a node on an
//! empty store has no key to answer VALID).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use vilvik_keys_domain::GeneratedKey;

use crate::client::{code_name, connect, verify_client, verify_request};

#[derive(Debug, clap::Args)]
pub struct ProbeArgs {
    /// The verify listener, host:port.
    #[arg(long)]
    verify: String,
    /// The secret to verify (read from a seed file with `--keys` instead).
    #[arg(long, conflicts_with = "keys")]
    key: Option<String>,
    /// Secrets file; the first line is used.
    #[arg(long)]
    keys: Option<std::path::PathBuf>,
    #[arg(long, default_value = "datasets:read")]
    scope: String,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 120.0)]
    timeout_s: f64,
    /// Stop at the first VerifyKey answer, whatever its code; without
    /// `--key` or `--keys`, the key is a random well-formed one.
    #[arg(long)]
    any_answer: bool,
}

pub async fn run(args: ProbeArgs) -> anyhow::Result<()> {
    let key = match (&args.key, &args.keys) {
        (Some(k), _) => k.clone(),
        (None, Some(path)) => crate::client::read_keys(path)?
            .into_iter()
            .next()
            .ok_or_else(|| anyhow::anyhow!("{} holds no key", path.display()))?,
        (None, None) if args.any_answer => {
            GeneratedKey::generate(&vilvik_keys_domain::Pepper::generate())
                .expose_secret()
                .to_owned()
        }
        (None, None) => anyhow::bail!("name the key with --key or --keys"),
    };
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(args.timeout_s);
    let mut last = String::from("no answer");
    while Instant::now() < deadline {
        let Ok(channel) = connect(&args.verify).await else {
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        };
        let mut client = verify_client(&channel);
        while Instant::now() < deadline {
            match client.verify_key(verify_request(&key, &args.scope)).await {
                Ok(r) if r.get_ref().valid || args.any_answer => {
                    let epoch_ms = SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .map(|d| d.as_millis())
                        .unwrap_or(0);
                    println!(
                        "{}",
                        serde_json::json!({
                            "valid_at_epoch_ms": epoch_ms as u64,
                            "probe_waited_ms": started.elapsed().as_millis() as u64,
                            "code": code_name(r.get_ref()),
                        })
                    );
                    return Ok(());
                }
                Ok(r) => last = code_name(r.get_ref()),
                Err(status) => last = format!("{:?}: {}", status.code(), status.message()),
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    anyhow::bail!(
        "no {} answer from {} within {} s (last: {last})",
        if args.any_answer {
            "VerifyKey"
        } else {
            "VALID"
        },
        args.verify,
        args.timeout_s
    )
}
