//! End-to-end tests: the real server over real sockets, on SQLite and on
//! Postgres, started by the harness (`vilvik-keys-test-support`). Postgres
//! variants need `VILVIK_KEYS_TEST_DATABASE_URL`; without it they print
//! that they were skipped (or fail, with `VILVIK_KEYS_REQUIRE_POSTGRES=1`).

/// The harness, also under the name `crate::helpers`.
mod helpers {
    pub use vilvik_keys_test_support::*;
}

use vilvik_keys_test_support::on_both_backends;

mod audit;
mod auth;
mod bad_input;
mod cluster;
mod connections;
mod encoding;
mod ext_authz;
mod frames;
mod framing;
mod history;
mod http;
mod http1_attacks;
mod lifecycle;
mod matrix;
mod outage;
mod pepper;
mod privilege;
mod protection;
mod rate_limit;
mod retries;
mod tls;
mod tour;
mod usage;
