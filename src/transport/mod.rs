//! The listeners' transport, below the RPCs: which connections a listener
//! keeps and for how long, what one connection may run at once
//! ([`connections`]), when a request may take a slot of the listener's
//! concurrency ([`admission`]: once its message has arrived), that a
//! request which is not a gRPC call is answered in HTTP and never with a
//! gRPC status ([`http_answers`]), and TLS with certificates reloaded while
//! serving ([`tls`]). Nothing here knows a service, a route or a proto
//! type (the gRPC services' names are given); it depends on `config` for
//! its settings and on nothing else of the crate, and `runtime::listener`
//! puts it together for each listener.

pub mod admission;
pub mod connections;
pub mod frames;
pub mod http_answers;
pub mod tls;

pub use connections::{peer_addr, peer_addr_in};
