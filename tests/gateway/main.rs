//! The service behind gateways, configured as `docs/INTEGRATIONS.md`
//! says: a real nginx running the configuration read out of that page
//! (`nginx`), the requests Traefik's ForwardAuth sends, field by field
//! (`traefik`), and the page's Python client of `POST /v1/keys:verify`
//! (`backend`). Each runs on SQLite and on Postgres.
//!
//! nginx (with `auth_request`: Debian's `nginx-light`) and `python3` must
//! be installed; without them these tests fail, saying what to install.

mod backend;
mod doc;
mod nginx;
mod traefik;
mod upstream;
