//! `probe`: polls VerifyKey until a key is answered VALID, for start-up time.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

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
}

pub async fn run(args: ProbeArgs) -> anyhow::Result<()> {
    let key = match (&args.key, &args.keys) {
        (Some(k), _) => k.clone(),
        (None, Some(path)) => crate::client::read_keys(path)?
            .into_iter()
            .next()
            .ok_or_else(|| anyhow::anyhow!("{} holds no key", path.display()))?,
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
                Ok(r) if r.get_ref().valid => {
                    let epoch_ms = SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .map(|d| d.as_millis())
                        .unwrap_or(0);
                    println!(
                        "{}",
                        serde_json::json!({
                            "valid_at_epoch_ms": epoch_ms as u64,
                            "probe_waited_ms": started.elapsed().as_millis() as u64,
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
        "no VALID answer from {} within {} s (last: {last})",
        args.verify,
        args.timeout_s
    )
}
