//! `vilvik-keys-bench`: the tools behind `bench/run.sh` (see `BENCHMARKS.md`).
//!
//! - `seed` fills a store with many keys through `Store::import_keys`, the
//!   way the service connects (`DATABASE_URL`, else `VILVIK_KEYS_SQLITE_PATH`),
//!   and writes their secrets to a file: a benchmark artifact, mode 0600,
//!   never to be used outside a throw-away database.
//! - `bodies` writes gRPC-framed request bodies for h2load.
//! - `h2log` turns h2load `--log-file` output into percentiles.
//! - `probe` waits until a key is answered VALID (start-up time).
//! - `miss` drives the miss path: real keys not yet cached, and random
//!   well-formed keys with unknown prefixes (on VerifyKey, or as bearer
//!   tokens on the admin API).
//! - `timing` compares the latency of an unknown prefix with that of a
//!   known prefix with a wrong secret (both NOT_FOUND).
//! - `propagation` revokes keys through the admin node and polls every
//!   verify node until each rejects them.
//! - `admin-flood` floods one account's admin calls while timing another's.
//! - `soak` runs mixed admin and verify traffic for a long time and samples
//!   the server's RSS and the database's size (`bench/soak.sh`).
//!
//! Every load this tool makes targets the addresses it is given; `run.sh`
//! gives it only 127.0.0.1. Every loop is bounded in count and time.
#![forbid(unsafe_code)]

mod admin_flood;
mod bodies;
mod client;
mod h2log;
mod miss;
mod probe;
mod propagation;
mod seed;
mod soak;
mod stats;
mod timing;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "vilvik-keys-bench",
    version,
    about = "Benchmark tools for vilvik-keys (see BENCHMARKS.md)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Import N generated keys straight into the store and write their secrets to a file.
    Seed(seed::SeedArgs),
    /// Write gRPC-framed VerifyKey and health-check request bodies for h2load.
    Bodies(bodies::BodiesArgs),
    /// Percentiles and status counts from h2load --log-file files.
    H2log(h2log::H2logArgs),
    /// Wait until a key is answered VALID; print when.
    Probe(probe::ProbeArgs),
    /// Rate and latency of verifies that miss the cache.
    Miss(miss::MissArgs),
    /// Latency of unknown prefixes against known prefixes with wrong secrets.
    Timing(timing::TimingArgs),
    /// Revoke keys through the admin node and time until every verify node rejects them.
    Propagation(propagation::PropagationArgs),
    /// One account floods ListAuditEvents; another's GetKey latency, alone and under the flood.
    AdminFlood(admin_flood::AdminFloodArgs),
    /// Mixed admin and verify traffic for a long time; RSS and database size over time.
    Soak(soak::SoakArgs),
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Seed(args) => seed::run(args).await,
        Command::Bodies(args) => bodies::run(args),
        Command::H2log(args) => h2log::run(args),
        Command::Probe(args) => probe::run(args).await,
        Command::Miss(args) => miss::run(args).await,
        Command::Timing(args) => timing::run(args).await,
        Command::Propagation(args) => propagation::run(args).await,
        Command::AdminFlood(args) => admin_flood::run(args).await,
        Command::Soak(args) => soak::run(args).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
