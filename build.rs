//! Compiles proto/ with protox (no system protoc) and writes the descriptor
//! set that the reflection service serves.

use std::path::PathBuf;

/// Keep in step with the `Debug` impls in `src/lib.rs`.
const SECRET_BEARING_MESSAGES: [&str; 5] = [
    ".vilvik.keys.v1.CreateKeyResponse",
    ".vilvik.keys.v1.RotateKeyResponse",
    ".vilvik.keys.v1.VerifyKeyRequest",
    // Their request id opens the secret kept for retries.
    ".vilvik.keys.v1.CreateKeyRequest",
    ".vilvik.keys.v1.RotateKeyRequest",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/vilvik/keys/v1/keys.proto";
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile([proto], ["proto"])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out_dir.join("vilvik_keys_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    let admin = admin_server(&descriptors)?;
    tonic_prost_build::configure()
        // Messages that carry a secret get a hand-written, redacted Debug
        // (src/lib.rs), so no `{:?}` can ever print one.
        .skip_debug(SECRET_BEARING_MESSAGES)
        // Both servers are generated below, with the request codec.
        .build_server(false)
        .compile_fds(descriptors)?;
    tonic_build::manual::Builder::new()
        .build_client(false)
        .compile(&[admin, verify_server(), ext_authz_server()]);
    Ok(())
}

/// Decodes requests so that a field that does not decode (e.g. a string
/// that is not UTF-8) is the caller's INVALID_ARGUMENT naming the field.
const REQUEST_CODEC: &str = "crate::server::codec::RequestCodec";

/// The KeyAdmin server, method by method from the proto's descriptor (so
/// it cannot drift from it), taking the generated messages but decoding
/// them with [`REQUEST_CODEC`].
fn admin_server(
    descriptors: &prost_types::FileDescriptorSet,
) -> Result<tonic_build::manual::Service, Box<dyn std::error::Error>> {
    use tonic_build::manual::{Method, Service};
    let service = descriptors
        .file
        .iter()
        .flat_map(|f| &f.service)
        .find(|s| s.name() == "KeyAdmin")
        .ok_or("proto: no service KeyAdmin")?;
    let rust_type = |proto: &str| {
        let name = proto.strip_prefix(".vilvik.keys.v1.").unwrap_or(proto);
        format!("crate::proto::{name}")
    };
    let mut builder = Service::builder()
        .name("KeyAdmin")
        .package("vilvik.keys.v1");
    for method in &service.method {
        builder = builder.method(
            Method::builder()
                .name(snake_case(method.name()))
                .route_name(method.name())
                .input_type(rust_type(method.input_type()))
                .output_type(rust_type(method.output_type()))
                .codec_path(REQUEST_CODEC)
                .build(),
        );
    }
    Ok(builder.build())
}

/// `ListAuditEvents` -> `list_audit_events`, as tonic names handlers.
fn snake_case(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 4);
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

/// The KeyVerify server, with the proto's service name, route and wire
/// format, but taking and returning the hand-written messages of
/// `src/server/verify_wire.rs`: they decode and encode the hot path's
/// messages without a heap allocation per field. Clients use the
/// generated `proto` module as usual.
fn verify_server() -> tonic_build::manual::Service {
    use tonic_build::manual::{Method, Service};
    Service::builder()
        .name("KeyVerify")
        .package("vilvik.keys.v1")
        .method(
            Method::builder()
                .name("verify_key")
                .route_name("VerifyKey")
                .input_type("crate::server::verify_wire::VerifyCall")
                .output_type("crate::server::verify_wire::VerifyAnswer")
                .codec_path(REQUEST_CODEC)
                .build(),
        )
        .build()
}

/// Envoy's `envoy.service.auth.v3.Authorization` server (its `ext_authz`
/// check), on the messages of the `envoy-types` crate, but decoding the
/// request with [`REQUEST_CODEC`] into `server::ext_authz::CheckCall`, the
/// `CheckRequest` with a `Debug` that shows no header value (a key is one).
fn ext_authz_server() -> tonic_build::manual::Service {
    use tonic_build::manual::{Method, Service};
    Service::builder()
        .name("Authorization")
        .package("envoy.service.auth.v3")
        .method(
            Method::builder()
                .name("check")
                .route_name("Check")
                .input_type("crate::server::ext_authz::CheckCall")
                .output_type("envoy_types::pb::envoy::service::auth::v3::CheckResponse")
                .codec_path(REQUEST_CODEC)
                .build(),
        )
        .build()
}
