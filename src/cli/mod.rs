//! The admin CLI: `bootstrap`, `pepper …` and `audit verify` (direct store access, for the
//! operator who runs the service) and `keys …` / `accounts …`, which talk to the admin
//! API through the generated client like any other tool.

mod audit;
mod bootstrap;
mod client;
mod output;
mod pepper;

pub use audit::{AuditCommand, ChainBroken, audit_verify};
pub use bootstrap::{BOOTSTRAP_ACTOR, bootstrap, create_management_key};
pub use client::{AccountsCommand, ClientArgs, KeysCommand, run_accounts, run_keys};
pub use pepper::{PepperCommand, pepper_new, pepper_status};
