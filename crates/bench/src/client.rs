//! gRPC clients over several HTTP/2 connections.

use anyhow::Context;
use tonic::transport::{Channel, Endpoint};
use vilvik_keys::proto::{
    VerifyKeyRequest, VerifyKeyResponse, key_admin_client::KeyAdminClient,
    key_verify_client::KeyVerifyClient,
};

/// Opens `n` separate connections to `addr` (`host:port`).
pub async fn channels(addr: &str, n: usize) -> anyhow::Result<Vec<Channel>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n.max(1) {
        out.push(connect(addr).await?);
    }
    Ok(out)
}

pub async fn connect(addr: &str) -> anyhow::Result<Channel> {
    let uri = if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    };
    Endpoint::from_shared(uri.clone())
        .with_context(|| format!("'{addr}' is not an address: use host:port"))?
        .tcp_nodelay(true)
        .connect_timeout(std::time::Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("cannot connect to {uri}"))
}

pub fn verify_client(channel: &Channel) -> KeyVerifyClient<Channel> {
    KeyVerifyClient::new(channel.clone())
}

pub fn admin_client(channel: &Channel) -> KeyAdminClient<Channel> {
    KeyAdminClient::new(channel.clone())
}

pub fn verify_request(key: &str, scope: &str) -> VerifyKeyRequest {
    VerifyKeyRequest {
        key: key.to_owned(),
        required_scopes: vec![scope.to_owned()],
        client_ip: String::new(),
    }
}

/// The code's proto name without its prefix, e.g. `VALID`.
pub fn code_name(response: &VerifyKeyResponse) -> String {
    let name = response.code().as_str_name();
    name.strip_prefix("VERIFY_CODE_").unwrap_or(name).to_owned()
}

/// Reads a secrets file written by `seed`: one key per line.
pub fn read_keys(path: &std::path::Path) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read keys file {}", path.display()))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect())
}
