//! The `vilvik-keys` binary: the service (`serve`), its schema (`migrate`),
//! an account's first management key (`bootstrap`), the pepper's rotation
//! (`pepper status|new`), the audit log's check (`audit verify`), and the
//! admin CLI (`keys …`, `accounts …`).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use vilvik_keys::cli::{
    self, AccountsCommand, AuditCommand, ClientArgs, KeysCommand, PepperCommand,
};
use vilvik_keys::config::Config;
use vilvik_keys::runtime::Abandoned;
use vilvik_keys::startup::{self, Application, Role};

#[derive(Debug, Parser)]
#[command(
    name = "vilvik-keys",
    version,
    about = "The API-key service of the Vilvik platform"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the service: the admin API, the verify API, or both.
    Serve {
        /// Which listeners to serve; verify nodes scale out on their own.
        #[arg(long, value_enum, default_value_t = Role::All)]
        role: Role,
        /// Load every key into memory before serving (same as VILVIK_KEYS_PRELOAD=true).
        #[arg(long)]
        preload: bool,
        /// TOML configuration file; environment variables win over it.
        #[arg(long, env = "VILVIK_KEYS_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Create the store or bring its schema up to date, and exit (`serve` does both too).
    Migrate {
        #[arg(long, env = "VILVIK_KEYS_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Create an account's first management key (scope keys:admin) in an existing store and print it once.
    Bootstrap {
        /// The account, e.g. ACME.
        #[arg(long)]
        account: String,
        /// A name for the key.
        #[arg(long, default_value = "bootstrap")]
        name: String,
        /// Mint one more management key for an account that already has one.
        #[arg(long)]
        another: bool,
        /// Print {account_id, key_id, secret, store} as one JSON object.
        #[arg(long)]
        json: bool,
        #[arg(long, env = "VILVIK_KEYS_CONFIG")]
        config: Option<PathBuf>,
    },
    /// The pepper key hashes are keyed with: what each covers, and a new one for a rotation.
    Pepper {
        #[command(subcommand)]
        command: PepperCommand,
    },
    /// The audit log read directly from the store: check its hash chains.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Manage keys through the admin API.
    Keys {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Manage accounts through the admin API.
    Accounts {
        #[command(flatten)]
        client: ClientArgs,
        #[command(subcommand)]
        command: AccountsCommand,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.command).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.is::<Abandoned>() => {
            eprintln!("error: {e:#}");
            // At once, without waiting for a store call that will not return.
            std::process::exit(i32::from(Abandoned::EXIT_CODE));
        }
        Err(e) if e.is::<cli::Tampered>() => {
            eprintln!("error: {e:#}");
            ExitCode::from(cli::Tampered::EXIT_CODE)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load_config(path: Option<PathBuf>) -> anyhow::Result<Config> {
    let config = Config::load(path.as_deref()).context("invalid configuration")?;
    vilvik_keys::telemetry::init(config.log_format);
    Ok(config)
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve {
            role,
            preload,
            config,
        } => {
            let mut config = load_config(config)?;
            config.preload |= preload;
            let shutdown = shutdown_signal()?;
            let app = Application::build(config, role).await?;
            app.run_until(shutdown).await
        }
        Command::Migrate { config } => {
            let config = load_config(config)?;
            startup::open_store(&config).await?;
            eprintln!("store: {}", startup::store_description(&config));
            println!("migrations applied");
            Ok(())
        }
        Command::Bootstrap {
            account,
            name,
            another,
            json,
            config,
        } => {
            let config = load_config(config)?;
            let args = cli::BootstrapArgs {
                account: &account,
                name: &name,
                another,
                json,
            };
            cli::bootstrap(&config, args).await
        }
        Command::Pepper { command } => match command {
            PepperCommand::Status { json, config } => {
                let config = load_config(config)?;
                cli::pepper_status(&config, json).await
            }
            PepperCommand::New { path } => cli::pepper_new(&path),
        },
        Command::Audit {
            command: AuditCommand::Verify { account, config },
        } => {
            let config = load_config(config)?;
            cli::audit_verify(&config, account.as_deref()).await
        }
        Command::Keys { client, command } => cli::run_keys(client, command).await,
        Command::Accounts { client, command } => cli::run_accounts(client, command).await,
    }
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM. The handlers are installed
/// when this is called, not when the future is first polled, so that a
/// signal that arrives as soon as the listeners answer (before `run_until`
/// has got to waiting for it) still drains instead of killing the process.
#[cfg(unix)]
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    let mut terminate = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => {},
            _ = terminate.recv() => {},
        }
    })
}

#[cfg(not(unix))]
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
    })
}
