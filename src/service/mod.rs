//! The admin service: every KeyAdmin operation and the rules around it,
//! for every surface that offers them (the gRPC API today; an HTTP face or
//! a web console call the same functions).
//!
//! A surface reads a call's [`Credentials`] and hands them to
//! [`Admin::admit`], which authenticates them and counts the call against
//! its account's admin rate; only then does the surface parse the call's
//! fields into domain values and call the operation with the admitted
//! [`Caller`]. So a refused call was not validated and changed nothing,
//! whichever surface it came through. An operation returns domain values
//! or an [`ApiError`], never a surface's types; each surface turns those
//! into its own answers in one place (gRPC: `server::convert` and
//! `server::error`).
//!
//! ```text
//! surface:  credentials ──> Admin::admit ──> parse fields ──> Admin::op ──> answer
//!                           (auth, rate)     (domain values)  (rules, store, audit,
//!                                                              verify engine told)
//! ```

mod accounts;
mod admin;
mod caller;
pub mod error;
pub mod etag;
mod keys;
pub mod rate_limit;
mod retry;

pub use accounts::{AccountView, Operator, OperatorOnly};
pub use admin::Admin;
pub use caller::{Caller, Credentials, Sent};
pub use error::ApiError;
pub use keys::{Issued, NewKeyFields};
pub use retry::{Retry, request_id};
