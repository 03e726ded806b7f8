//! Samples of the server's RSS and the database's size, and the running
//! call totals, at a fixed interval.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use anyhow::Context;

use super::calls::Shared;

/// One sample of the server's and the database's size.
#[derive(Debug, Clone)]
pub(super) struct Sample {
    pub(super) at_s: f64,
    pub(super) rss_kb: u64,
    pub(super) db_bytes: i64,
    /// Bytes of each table with its indexes and TOAST.
    pub(super) tables_bytes: BTreeMap<String, i64>,
    /// Rows of each table.
    pub(super) rows: BTreeMap<String, i64>,
    pub(super) verify_calls: u64,
    pub(super) admin_calls: u64,
    pub(super) errors: u64,
    pub(super) refused: u64,
    pub(super) rate_limited: u64,
}

impl Sample {
    pub(super) fn json(&self) -> serde_json::Value {
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
            "rate_limited": self.rate_limited,
        })
    }
}

pub(super) const TABLES: [&str; 5] = [
    "keys",
    "key_secrets",
    "audit_events",
    "key_changes",
    "accounts",
];

pub(super) fn rss_kb(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("cannot read /proc/{pid}/status: is the server running?"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS in /proc/<pid>/status")
}

pub(super) async fn sample(
    shared: &Shared,
    db: &tokio_postgres::Client,
    pid: u32,
) -> anyhow::Result<Sample> {
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
        rate_limited: shared.rate_limited.load(Ordering::Relaxed),
    })
}

pub(super) async fn connect_db(url: &str) -> anyhow::Result<tokio_postgres::Client> {
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
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_rss_of_a_running_process() {
        let kb = rss_kb(std::process::id()).unwrap();
        assert!(kb > 0);
        assert!(rss_kb(u32::MAX).is_err());
    }
}
