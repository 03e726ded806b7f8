//! Faults injected for real: each test injects one against a Postgres
//! cluster it starts itself (`initdb`/`pg_ctl` on a free port in
//! a temp dir, never the shared server) and stops afterwards, and checks
//! what revocation and the staleness bound promise:
//!
//! - after a revoke is acknowledged by the admin node, a verify node that
//!   can still reach the database rejects the key within 1 s;
//! - one that cannot accepts it for no longer than the staleness bound
//!   plus one store deadline, and then never again;
//! - cached keys keep verifying within the bound.
//!
//! The faults: the whole cluster frozen (SIGSTOP), one verify node cut off
//! by a proxy (black hole, reset), and the change listener's session
//! terminated with or without the database accepting new connections.
//!
//! Tests that must wait out the bound take several seconds each and are
//! `#[ignore]`d in the default run; `.ci/run` runs them
//! (`cargo test --test faults -- --ignored`). Each prints the windows it
//! measured (`--nocapture` to see them).

mod harness;

mod freeze;
mod listener;
mod partition;
