//! The harness of the `vilvik-keys` package's own tests (`tests/`): every
//! test starts the service, and talks to it, through this crate, so that a
//! test says what it checks and nothing about how a server is started.
//!
//! - [`TestApp`] ([`spawn_app`], [`spawn_app_with`]): the service in
//!   process (`Application::build_with_clock`) on free ports, on a fresh
//!   SQLite file or a fresh Postgres database (dropped afterwards), its
//!   clock a [`ManualClock`](vilvik_keys_domain::ManualClock) that only the
//!   test moves, account [`ACCOUNT`] bootstrapped with a management key,
//!   and the generated KeyAdmin and KeyVerify clients connected.
//!   [`TestApp::spawn_verify_node`] adds verify-only nodes on the same
//!   store; [`Server`] is one in-process node on its own, for tests that
//!   wire several nodes themselves.
//! - [`ServedBinary`]: the real `vilvik-keys serve` process, started with
//!   the environment a test gives it on free ports (read from its log's
//!   "listening" lines), signalled, awaited, its log read; [`binary`]
//!   runs the binary's other commands (`bootstrap`, `pepper`, the CLI).
//! - [`bearer`], [`as_operator`]: requests carrying a credential;
//!   [`assert_status`], [`days_from`], [`without_usage`] and the request
//!   builders of [`requests`]: what tests send and compare;
//!   [`eventually`]: the one way a test waits for something that happens
//!   in the background (no test sleeps a fixed time and then asserts).
//! - [`http`]: one request to the verify listener's HTTP face, over
//!   HTTP/1.1 or HTTP/2, plaintext or TLS.
//! - [`on_both_backends!`]: a test written once, run on SQLite and on
//!   Postgres.
//!
//! Postgres needs `VILVIK_KEYS_TEST_DATABASE_URL` (see
//! `vilvik-keys-test-db`); without it the Postgres variants are skipped
//! (`spawn_app` answers `None`), or fail under
//! `VILVIK_KEYS_REQUIRE_POSTGRES=1`. `TEST_LOG=1` shows the in-process
//! servers' logs.
//!
//! A test reads:
//!
//! ```no_run
//! # async fn example() {
//! use vilvik_keys::proto::VerifyCode;
//! use vilvik_keys_test_support::{Backend, spawn_app};
//!
//! let Some(mut app) = spawn_app(Backend::Postgres).await else {
//!     return; // skipped: no Postgres configured
//! };
//! let created = app.create_key("ci-runner", &["datasets:read"]).await.unwrap();
//! assert_eq!(app.verify_code(&created.secret, &[]).await, VerifyCode::Valid);
//! app.clock.advance(time::Duration::days(400));
//! # }
//! ```
#![forbid(unsafe_code)]

mod app;
pub mod binary;
pub mod http;
mod macros;
mod postgres;
pub mod requests;
mod server;

pub use app::{Backend, TestApp, VerifyNode, spawn_app, spawn_app_with};
pub use binary::{Exit, ServedBinary, StoreSettings};
pub use postgres::{postgres_client, test_server_addr, through_proxy};
pub use requests::{as_operator, assert_status, bearer, days_from, without_usage};
pub use server::{Server, bootstrap_account, channel, init_logging, lazy_channel, sent_first};
pub use vilvik_keys_test_db::eventually;

/// The account every [`TestApp`] is bootstrapped with.
pub const ACCOUNT: &str = "ACME";

/// The operator token of every [`TestApp`].
pub const OPERATOR_TOKEN: &str = "test-operator-token-0123456789abcdef";
