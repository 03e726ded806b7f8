//! vilvik-keys: the API-key service of the Vilvik platform.
//!
//! This crate is the `vilvik-keys` binary's library: configuration, the
//! gRPC services (the only place proto types meet domain types), startup
//! and shutdown, and the admin CLI. The rules live in the crates below it:
//! `vilvik-keys-domain` (key format, scopes, validation), `vilvik-keys-store`
//! (SQLite and Postgres) and `vilvik-keys-verify` (the verify engine).
#![forbid(unsafe_code)]

pub mod cli;
pub mod config;
pub mod server;
pub mod startup;
pub mod telemetry;

/// Code generated from `proto/vilvik/keys/v1/keys.proto`.
#[allow(missing_debug_implementations, clippy::all)]
pub mod proto {
    tonic::include_proto!("vilvik.keys.v1");

    /// Descriptor set served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("vilvik_keys_descriptor");

    // The messages that carry a secret print it redacted (build.rs skips
    // their generated Debug).
    const REDACTED: &str = "[REDACTED]";

    impl std::fmt::Debug for CreateKeyResponse {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("CreateKeyResponse")
                .field("key", &self.key)
                .field("secret", &REDACTED)
                .field("smoke_test_command", &REDACTED)
                .finish()
        }
    }

    impl std::fmt::Debug for RotateKeyResponse {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("RotateKeyResponse")
                .field("key", &self.key)
                .field("secret", &REDACTED)
                .field("smoke_test_command", &REDACTED)
                .finish()
        }
    }

    impl std::fmt::Debug for VerifyKeyRequest {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("VerifyKeyRequest")
                .field("key", &REDACTED)
                .field("required_scopes", &self.required_scopes)
                .field("client_ip", &self.client_ip)
                .finish()
        }
    }
}

/// RFC 3339, as used in messages and the CLI.
pub fn format_time(at: time::OffsetDateTime) -> String {
    at.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| at.to_string())
}
