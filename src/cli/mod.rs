//! The admin CLI: `bootstrap` and `pepper …` (direct store access, for the
//! operator who runs the service) and `keys …` / `accounts …`, which talk to the admin
//! API through the generated client like any other tool.

mod bootstrap;
mod client;
mod output;
mod pepper;

pub use bootstrap::{BOOTSTRAP_ACTOR, bootstrap, create_management_key};
pub use client::{AccountsCommand, ClientArgs, KeysCommand, run_accounts, run_keys};
pub use pepper::{PepperCommand, pepper_new, pepper_status};
