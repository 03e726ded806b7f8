//! The admin CLI: `bootstrap`, `pepper …` and `audit verify` (direct store access, for the
//! operator who runs the service) and `keys …` / `accounts …`, which talk to the admin
//! API through the generated client like any other tool.
//!
//! `keys …` and `accounts …` by job: `args` (their clap arguments), `keys` and
//! `accounts` (the commands), `transport` (the address, TLS and the credential every
//! request carries), `retry` (creates and rotations tried again with their request id),
//! `errors` (a failed call as the message printed) and `output` (tables, blocks, JSON).

mod accounts;
mod args;
mod audit;
mod bootstrap;
mod errors;
mod keys;
mod output;
mod pepper;
mod retry;
mod transport;

pub use accounts::run_accounts;
pub use args::{AccountsCommand, ClientArgs, KeysCommand};
pub use audit::{AuditCommand, Tampered, audit_verify};
pub use bootstrap::{BOOTSTRAP_ACTOR, BootstrapArgs, bootstrap, create_management_key};
pub use keys::run_keys;
pub use pepper::{PepperCommand, pepper_new, pepper_status};
