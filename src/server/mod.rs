//! The gRPC services. This module alone converts between proto and domain
//! types and turns failures into statuses.

pub mod admin;
pub mod auth;
pub mod codec;
pub mod convert;
pub mod error;
pub mod ext_authz;
pub mod verify;
pub mod verify_wire;
