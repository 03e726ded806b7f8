//! Compiles proto/ with protox (no system protoc) and writes the descriptor
//! set that the reflection service serves.

use std::path::PathBuf;

/// Keep in step with the `Debug` impls in `src/lib.rs`.
const SECRET_BEARING_MESSAGES: [&str; 3] = [
    ".vilvik.keys.v1.CreateKeyResponse",
    ".vilvik.keys.v1.RotateKeyResponse",
    ".vilvik.keys.v1.VerifyKeyRequest",
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
    tonic_prost_build::configure()
        // Messages that carry a secret get a hand-written, redacted Debug
        // (src/lib.rs), so no `{:?}` can ever print one.
        .skip_debug(SECRET_BEARING_MESSAGES)
        .compile_fds(descriptors)?;
    verify_server();
    Ok(())
}

/// The KeyVerify server once more, with the same service name, route and
/// wire format, but taking and returning the hand-written messages of
/// `src/server/verify_wire.rs`: they decode and encode the hot path's
/// messages without a heap allocation per field. The generated
/// `proto::key_verify_server` stays unused; clients use `proto` as usual.
fn verify_server() {
    use tonic_build::manual::{Builder, Method, Service};
    let service = Service::builder()
        .name("KeyVerify")
        .package("vilvik.keys.v1")
        .method(
            Method::builder()
                .name("verify_key")
                .route_name("VerifyKey")
                .input_type("crate::server::verify_wire::VerifyCall")
                .output_type("crate::server::verify_wire::VerifyAnswer")
                .codec_path("tonic_prost::ProstCodec")
                .build(),
        )
        .build();
    Builder::new().build_client(false).compile(&[service]);
}
