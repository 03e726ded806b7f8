//! `timing`: whether the answer's latency tells an unknown prefix from a
//! known prefix with a wrong secret (both must be NOT_FOUND, after the same
//! hash and constant-time comparison).
//!
//! On one connection, one request at a time (so each latency is the
//! server's work plus the loopback round trip), it alternates (a) a random
//! well-formed key (`GeneratedKey::generate(..)`, a fresh one each time:
//! its prefix exists nowhere) and (b) a seeded key's real prefix with
//! another secret and a valid checksum (each time another seeded key,
//! spread over the file). The order within each pair alternates too, so
//! drift and any first-or-second effect hit both kinds equally. Every
//! answer must be NOT_FOUND. It prints the p50/p90/p99 of each kind and
//! the ratios of their medians and p90s.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use vilvik_keys_domain::{ApiKey, GeneratedKey, KEY_LENGTH};

use crate::client::{code_name, connect, read_keys, verify_client, verify_request};
use crate::stats::percentile;

#[derive(Debug, clap::Args)]
pub struct TimingArgs {
    /// The verify listener, host:port (a node holding the seeded keys,
    /// e.g. one started with `--preload`).
    #[arg(long)]
    verify: String,
    /// Secrets file written by `seed`: the prefixes of case (b).
    #[arg(long)]
    keys: PathBuf,
    /// Measured requests of each kind.
    #[arg(long, default_value_t = 5000)]
    samples: usize,
    /// Discarded requests of each kind before measuring.
    #[arg(long, default_value_t = 500)]
    warmup: usize,
    #[arg(long, default_value = "datasets:read")]
    scope: String,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 120.0)]
    timeout_s: f64,
}

/// Base62 digits, in the order the key format uses.
const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
/// `vlk_` + 8 prefix characters.
const PREFIX_LEN: usize = 12;
const CHECKSUM_LEN: usize = 6;

/// CRC-32 (IEEE, as `crc32fast` computes it), bit by bit: this tool makes
/// a few thousand keys, so no table is needed.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// The key format's checksum of everything before it: CRC-32 as 6 base62
/// digits, most significant first.
fn checksum(body: &str) -> String {
    let mut value = crc32(body.as_bytes());
    let mut digits = [b'0'; CHECKSUM_LEN];
    for slot in digits.iter_mut().rev() {
        *slot = BASE62[(value % 62) as usize];
        value /= 62;
    }
    String::from_utf8(digits.to_vec()).expect("base62 digits are ASCII")
}

/// A well-formed key with `real`'s prefix and another secret: the secret
/// characters of a freshly generated key, and the checksum recomputed.
/// Checked with the service's own parser, so that a change of the key
/// format fails here instead of measuring MALFORMED answers.
pub fn wrong_secret_for(real: &str) -> anyhow::Result<String> {
    let prefix = real
        .get(..PREFIX_LEN)
        .filter(|_| real.len() == KEY_LENGTH)
        .ok_or_else(|| anyhow::anyhow!("a seeded key is not {KEY_LENGTH} characters long"))?;
    let fresh = GeneratedKey::generate(&vilvik_keys_domain::Pepper::generate());
    let secret = &fresh.expose_secret()[PREFIX_LEN + 1..KEY_LENGTH - CHECKSUM_LEN];
    let body = format!("{prefix}_{secret}");
    let key = format!("{body}{}", checksum(&body));
    let parsed: ApiKey = key.parse().map_err(|e| {
        anyhow::anyhow!(
            "the wrong-secret key is not well-formed ({e}): has the key format changed?"
        )
    })?;
    anyhow::ensure!(
        parsed.prefix().as_str() == prefix && key != real,
        "the wrong-secret key does not keep the seeded prefix with another secret"
    );
    Ok(key)
}

#[derive(Default)]
struct Kind {
    latencies_ns: Vec<u64>,
    codes: BTreeMap<String, u64>,
}

impl Kind {
    fn json(&mut self) -> serde_json::Value {
        self.latencies_ns.sort_unstable();
        let s = &self.latencies_ns;
        let us = |q: f64| percentile(s, q) as f64 / 1000.0;
        let mean = s.iter().sum::<u64>() as f64 / s.len().max(1) as f64 / 1000.0;
        serde_json::json!({
            "count": s.len(),
            "p50_us": us(0.50),
            "p90_us": us(0.90),
            "p99_us": us(0.99),
            "mean_us": (mean * 10.0).round() / 10.0,
            "codes": self.codes,
        })
    }
}

pub async fn run(args: TimingArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.samples > 0, "--samples must be at least 1");
    let seeded = read_keys(&args.keys)?;
    anyhow::ensure!(!seeded.is_empty(), "{} holds no key", args.keys.display());
    let total = args.warmup + args.samples;
    // Every key is made before the first request, so the timed loop only
    // sends and waits. Case (b) walks the whole file evenly.
    let stride = (seeded.len() / total).max(1);
    let mut unknown = Vec::with_capacity(total);
    let mut wrong = Vec::with_capacity(total);
    for i in 0..total {
        unknown.push(
            GeneratedKey::generate(&vilvik_keys_domain::Pepper::generate())
                .expose_secret()
                .to_owned(),
        );
        wrong.push(wrong_secret_for(&seeded[(i * stride) % seeded.len()])?);
    }

    let channel = connect(&args.verify).await?;
    let mut client = verify_client(&channel);
    let deadline = Instant::now() + Duration::from_secs_f64(args.timeout_s);
    let mut kinds = [Kind::default(), Kind::default()];
    for i in 0..total {
        anyhow::ensure!(
            Instant::now() < deadline,
            "timing took longer than {} s",
            args.timeout_s
        );
        let order = if i % 2 == 0 { [0, 1] } else { [1, 0] };
        for k in order {
            let key = if k == 0 { &unknown[i] } else { &wrong[i] };
            let request = verify_request(key, &args.scope);
            let t = Instant::now();
            let response = client.verify_key(request).await;
            let ns = t.elapsed().as_nanos().min(u128::from(u64::MAX)) as u64;
            let code = match response {
                Ok(r) => code_name(r.get_ref()),
                Err(status) => format!("error {:?}", status.code()),
            };
            if i >= args.warmup {
                kinds[k].latencies_ns.push(ns);
                *kinds[k].codes.entry(code).or_default() += 1;
            } else if code != "NOT_FOUND" {
                *kinds[k].codes.entry(code).or_default() += 1;
            }
        }
    }
    let [mut a, mut b] = kinds;
    let (a, b) = (a.json(), b.json());
    let ratio = |q: &str| a[q].as_f64().unwrap_or(0.0) / b[q].as_f64().unwrap_or(0.0).max(1e-9);
    let out = serde_json::json!({
        "samples_each": args.samples,
        "unknown_prefix": a,
        "wrong_secret": b,
        "p50_ratio": ratio("p50_us"),
        "p90_ratio": ratio("p90_us"),
    });
    println!("{out}");
    for (name, kind) in [
        ("unknown_prefix", &out["unknown_prefix"]),
        ("wrong_secret", &out["wrong_secret"]),
    ] {
        let codes = kind["codes"].as_object().cloned().unwrap_or_default();
        anyhow::ensure!(
            codes.len() == 1 && codes.contains_key("NOT_FOUND"),
            "{name}: every answer must be NOT_FOUND, got {}",
            serde_json::Value::Object(codes)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checksum_is_the_key_formats() {
        for _ in 0..100 {
            let key = GeneratedKey::generate(&vilvik_keys_domain::Pepper::generate());
            let secret = key.expose_secret();
            let (body, sum) = secret.split_at(KEY_LENGTH - CHECKSUM_LEN);
            assert_eq!(checksum(body), sum);
        }
    }

    #[test]
    fn a_wrong_secret_keeps_the_prefix_and_parses() {
        let pepper = vilvik_keys_domain::Pepper::generate();
        let real = GeneratedKey::generate(&pepper);
        let wrong = wrong_secret_for(real.expose_secret()).unwrap();
        let parsed: ApiKey = wrong.parse().unwrap();
        assert_eq!(parsed.prefix(), real.prefix());
        assert!(!parsed.hash_with(Some(&pepper)).matches(&real.hash()));
        assert!(wrong_secret_for("vlk_short").is_err());
    }
}
