//! `bodies`: gRPC-framed request bodies for h2load, which posts one body
//! per process.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use prost::Message;

use crate::client::{read_keys, verify_request};

#[derive(Debug, clap::Args)]
pub struct BodiesArgs {
    /// Secrets file written by `seed`.
    #[arg(long)]
    keys: PathBuf,
    /// How many keys to write bodies for, spread evenly over the file.
    #[arg(long)]
    count: usize,
    /// Directory to write `verify-00000.bin`, ..., `health.bin` and
    /// `keys.txt` (the chosen secrets, mode 0600) into.
    #[arg(long)]
    out: PathBuf,
    /// The scope each request requires.
    #[arg(long, default_value = "datasets:read")]
    scope: String,
}

/// A gRPC length-prefixed message: flag 0 (uncompressed), 4-byte big-endian
/// length, the protobuf bytes.
pub fn grpc_frame(message: &impl Message) -> Vec<u8> {
    let len = message.encoded_len();
    let mut out = Vec::with_capacity(5 + len);
    out.push(0);
    out.extend_from_slice(&(len as u32).to_be_bytes());
    message
        .encode(&mut out)
        .expect("a Vec grows as needed, so encoding cannot run out of room");
    out
}

pub fn run(args: BodiesArgs) -> anyhow::Result<()> {
    let keys = read_keys(&args.keys)?;
    anyhow::ensure!(
        args.count > 0 && args.count <= keys.len(),
        "--count must be between 1 and the {} keys in {}",
        keys.len(),
        args.keys.display()
    );
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let mut chosen = crate::seed::open_secret_file(&args.out.join("keys.txt"))?;
    for i in 0..args.count {
        let key = &keys[i * keys.len() / args.count];
        let body = grpc_frame(&verify_request(key, &args.scope));
        std::fs::write(args.out.join(format!("verify-{i:05}.bin")), body)?;
        writeln!(chosen, "{key}")?;
    }
    chosen.flush()?;
    // grpc.health.v1.HealthCheckRequest{service: ""} encodes to no bytes.
    std::fs::write(args.out.join("health.bin"), [0u8; 5])?;
    println!(
        "wrote {} VerifyKey bodies and health.bin to {}",
        args.count,
        args.out.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_carry_flag_length_and_message() {
        let request = verify_request("vlk_x", "datasets:read");
        let framed = grpc_frame(&request);
        assert_eq!(framed[0], 0);
        let len = u32::from_be_bytes(framed[1..5].try_into().unwrap()) as usize;
        assert_eq!(len, framed.len() - 5);
        let decoded = vilvik_keys::proto::VerifyKeyRequest::decode(&framed[5..]).unwrap();
        assert_eq!(decoded, request);
    }
}
