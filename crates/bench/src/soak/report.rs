//! The soak's report: per RPC calls, rates, percentiles and failures,
//! the verify codes by what was presented, and the samples, as tables and
//! as one JSON value.

use std::collections::BTreeMap;

use super::SoakArgs;
use super::calls::Record;
use super::sample::Sample;
use crate::stats::{ms, percentile};

pub(super) const RPCS: [&str; 8] = [
    "VerifyKey",
    "CreateKey",
    "UpdateKey",
    "GetKey",
    "RotateKey",
    "RevokeKey",
    "ListKeys",
    "ListAuditEvents",
];

pub(super) fn report(
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
                "succeeded": ok.len(),
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
        "refused_by_admin_rate_limit": last.rate_limited,
        "errors": last.errors,
        "verify_codes_by_class": codes,
        "samples": samples.iter().map(Sample::json).collect::<Vec<_>>(),
        "audit_events_added": audit_rows,
        "db_growth_bytes": db_growth,
        "db_bytes_per_audit_event": if audit_rows > 0 { db_growth / audit_rows } else { 0 },
        "rss_growth_kb": last.rss_kb as i64 - first.rss_kb as i64,
    })
}

/// A JSON value as table text (numbers and strings without quotes).
pub(super) fn cell(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

pub(super) fn kb(v: &serde_json::Value) -> String {
    format!("{:.0}", v.as_f64().unwrap_or(0.0) / 1024.0)
}

pub(super) fn print_tables(report: &serde_json::Value) {
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
        "overall: {} calls, {}/s; failed: {}; creates refused at the stored-key ceiling: {}; \
         refused by the admin rate limit: {}",
        report["calls"],
        report["calls_per_s"],
        report["errors"],
        report["refused_at_stored_key_ceiling"],
        report["refused_by_admin_rate_limit"]
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
