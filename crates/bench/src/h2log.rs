//! `h2log`: h2load prints no percentiles, but `--log-file` writes one line
//! per request: start time (µs since the epoch), HTTP status, duration (µs).

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context;

use crate::stats::Summary;

#[derive(Debug, clap::Args)]
pub struct H2logArgs {
    /// h2load --log-file outputs; all are pooled.
    #[arg(required = true)]
    files: Vec<PathBuf>,
}

pub fn run(args: H2logArgs) -> anyhow::Result<()> {
    let mut durations = Vec::new();
    let mut statuses: BTreeMap<String, u64> = BTreeMap::new();
    for path in &args.files {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        for line in text.lines() {
            let mut cols = line.split('\t');
            let (Some(_start), Some(status), Some(duration)) =
                (cols.next(), cols.next(), cols.next())
            else {
                continue;
            };
            *statuses.entry(status.to_owned()).or_default() += 1;
            if let Ok(us) = duration.trim().parse::<u64>() {
                durations.push(us);
            }
        }
    }
    let summary = Summary::of(durations);
    let mut json = summary.json();
    json["statuses"] = serde_json::json!(statuses);
    println!("{json}");
    Ok(())
}
