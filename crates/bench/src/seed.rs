//! `seed`: many keys straight into the store, their secrets into a file.

use std::collections::HashSet;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use time::OffsetDateTime;
use vilvik_keys_domain::{AccountId, Description, GeneratedKey, KeyName, Pepper, ScopeSet};
use vilvik_keys_store::{Actor, NewKey};

#[derive(Debug, clap::Args)]
pub struct SeedArgs {
    /// How many keys to create.
    #[arg(long)]
    keys: usize,
    /// Spread the keys over this many accounts (`bench-00000`, ...).
    #[arg(long, default_value_t = 100)]
    accounts: usize,
    /// Where to write the secrets, one per line (mode 0600). A benchmark
    /// artifact: it holds working credentials for the seeded database.
    #[arg(long)]
    out: PathBuf,
    /// The scope every key gets.
    #[arg(long, default_value = "datasets:read")]
    scope: String,
    /// Keys per `import_keys` call (one transaction each).
    #[arg(long, default_value_t = 10_000)]
    chunk: usize,
    /// Print the result as one JSON object.
    #[arg(long)]
    json: bool,
}

struct Chunk {
    keys: Vec<NewKey>,
    secrets: Vec<String>,
}

pub async fn run(args: SeedArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.accounts > 0, "--accounts must be at least 1");
    anyhow::ensure!(args.chunk > 0, "--chunk must be at least 1");
    let scopes = ScopeSet::parse(&[args.scope.as_str()])
        .map_err(|(_, e)| anyhow::anyhow!("--scope '{}': {e}", args.scope))?;
    // The service's own settings (DATABASE_URL, VILVIK_KEYS_SQLITE_PATH,
    // VILVIK_KEYS_PEPPER_FILE), so that it verifies what is seeded.
    let config = vilvik_keys::config::Config::load(None).context("invalid configuration")?;
    let database_url = config.database_url().map(str::to_owned);
    let store = vilvik_keys::startup::open_store(&config).await?;
    let pepper = vilvik_keys::pepper::load(&config, store.as_ref())
        .await?
        .current()
        .clone();

    let mut out = open_secret_file(&args.out)?;
    let actor = Actor {
        name: "operator:vilvik-keys-bench-seed".to_owned(),
        ip: None,
        operator: true,
    };

    // Generating (CSPRNG + BLAKE3) runs on its own thread, one chunk ahead
    // of the import.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<anyhow::Result<Chunk>>(2);
    let (total, accounts, chunk_size) = (args.keys, args.accounts, args.chunk);
    let generator = std::thread::spawn(move || {
        let mut seen = HashSet::with_capacity(total);
        let mut next = 0usize;
        while next < total {
            let n = chunk_size.min(total - next);
            let chunk = generate_chunk(next, n, accounts, &scopes, &pepper, &mut seen);
            next += n;
            if tx.blocking_send(chunk).is_err() {
                return;
            }
        }
    });

    let started = Instant::now();
    let mut import_secs = 0.0;
    let mut done = 0usize;
    while let Some(chunk) = rx.recv().await {
        let chunk = chunk?;
        let n = chunk.keys.len();
        let t = Instant::now();
        store
            .import_keys(chunk.keys, &actor)
            .await
            .with_context(|| format!("import_keys failed after {done} keys"))?;
        import_secs += t.elapsed().as_secs_f64();
        for secret in &chunk.secrets {
            writeln!(out, "{secret}")?;
        }
        done += n;
        let secs = started.elapsed().as_secs_f64();
        eprintln!(
            "seeded {done}/{total} keys ({:.0} keys/s)",
            done as f64 / secs.max(1e-9)
        );
    }
    out.flush()?;
    let _ = generator.join();
    let secs = started.elapsed().as_secs_f64();
    let rate = done as f64 / secs.max(1e-9);
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "keys": done,
                "accounts": accounts.min(done),
                "seconds": secs,
                "keys_per_s": rate,
                "import_seconds": import_secs,
                "backend": if database_url.is_some() { "postgres" } else { "sqlite" },
            })
        );
    } else {
        println!(
            "seeded {done} keys over {} accounts in {secs:.1} s: {rate:.0} keys/s \
             ({import_secs:.1} s in import_keys); secrets in {}",
            accounts.min(done),
            args.out.display()
        );
    }
    Ok(())
}

fn generate_chunk(
    first: usize,
    n: usize,
    accounts: usize,
    scopes: &ScopeSet,
    pepper: &Pepper,
    seen: &mut HashSet<String>,
) -> anyhow::Result<Chunk> {
    let now = OffsetDateTime::now_utc();
    let description: Description = "seeded by vilvik-keys-bench".parse()?;
    let account_ids = (0..accounts)
        .map(|a| format!("bench-{a:05}").parse::<AccountId>())
        .collect::<Result<Vec<_>, _>>()?;
    let mut chunk = Chunk {
        keys: Vec::with_capacity(n),
        secrets: Vec::with_capacity(n),
    };
    for i in first..first + n {
        // Prefixes are 8 random base62 characters: at 1M keys a repeat is
        // rare but possible, and one would fail its whole chunk.
        let generated = loop {
            let g = GeneratedKey::generate(pepper);
            if seen.insert(g.prefix().as_str().to_owned()) {
                break g;
            }
        };
        chunk.keys.push(
            NewKey::builder(account_ids[i % account_ids.len()].clone())
                .name(format!("bench-{i}").parse::<KeyName>()?)
                .description(description.clone())
                .scopes(scopes.clone())
                .created_at(now)
                .build_for(&generated),
        );
        chunk.secrets.push(generated.expose_secret().to_owned());
    }
    Ok(chunk)
}

/// Creates (or truncates) the secrets file readable by its owner only.
pub fn open_secret_file(path: &Path) -> anyhow::Result<std::io::BufWriter<std::fs::File>> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    Ok(std::io::BufWriter::new(file))
}
