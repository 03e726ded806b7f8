//! A call's credentials, as the gRPC API carries them in metadata:
//! `authorization: Bearer <management key or operator token>`, with the
//! operator token `x-vilvik-account` and `x-vilvik-actor`, and the caller's
//! address (behind trusted proxies, from `x-forwarded-for`). What they are
//! worth is the service's to decide ([`crate::service::Admin::admit`]).

use std::net::IpAddr;

use tonic::metadata::MetadataMap;

use crate::headers;
use crate::service::{Credentials, Sent};

/// The credentials `request` carries, read but not checked.
pub fn credentials<'a, T>(
    request: &'a tonic::Request<T>,
    trusted_proxies: &[IpAddr],
) -> Credentials<'a> {
    let metadata = request.metadata();
    Credentials {
        bearer: bearer(metadata),
        account: sent(metadata, headers::ACCOUNT),
        actor: sent(metadata, headers::ACTOR),
        ip: headers::client_ip(
            metadata.as_ref(),
            crate::transport::peer_addr(request),
            trusted_proxies,
        ),
    }
}

/// The bearer credential; `None` when there is none to read.
fn bearer(metadata: &MetadataMap) -> Option<&str> {
    let value = metadata.get("authorization")?.to_str().ok()?;
    value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .map(str::trim)
        .filter(|v| !v.is_empty())
}

/// A header as sent: trimmed, and missing when blank.
fn sent<'a>(metadata: &'a MetadataMap, name: &str) -> Sent<'a> {
    let Some(value) = metadata.get(name) else {
        return Sent::Missing;
    };
    match value.to_str().map(str::trim) {
        Err(_) => Sent::Unreadable,
        Ok("") => Sent::Missing,
        Ok(value) => Sent::Text(value),
    }
}
