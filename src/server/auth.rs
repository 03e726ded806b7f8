//! A call's credentials, as the gRPC API carries them in metadata:
//! `authorization: Bearer <management key or operator token>`, with the
//! operator token `x-vilvik-account` and `x-vilvik-actor`, and the caller's
//! address (behind trusted proxies, from `x-forwarded-for`). What they are
//! worth is the service's to decide ([`crate::service::Admin::admit`]).

use std::net::{IpAddr, SocketAddr};

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
        ip: client_ip(
            metadata,
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

/// The caller's address. From a trusted proxy, `x-forwarded-for` is read
/// from the right, the end the proxies append to: the first hop that is
/// not itself a trusted proxy is the client. Hops further left were written
/// by the client or by proxies we do not know, so they are never believed.
/// A hop that does not parse stops the walk at the last address known.
pub fn client_ip(
    metadata: &MetadataMap,
    peer: Option<SocketAddr>,
    trusted_proxies: &[IpAddr],
) -> Option<IpAddr> {
    let mut client = peer?.ip().to_canonical();
    if !trusted_proxies.contains(&client) {
        return Some(client);
    }
    // Several headers count as one list, in the order received.
    let headers: Vec<&str> = metadata
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    for hop in headers.iter().rev().flat_map(|h| h.rsplit(',')) {
        let Some(ip) = parse_hop(hop) else { break };
        client = ip;
        if !trusted_proxies.contains(&ip) {
            break;
        }
    }
    Some(client)
}

/// One `x-forwarded-for` hop: an address, or an address and port.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim();
    hop.parse::<IpAddr>()
        .or_else(|_| hop.parse::<SocketAddr>().map(|a| a.ip()))
        .ok()
        .map(|ip| ip.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip_for(headers: &[&str], peer: &str, trusted: &[&str]) -> String {
        let mut md = MetadataMap::new();
        for h in headers {
            md.append("x-forwarded-for", h.parse().unwrap());
        }
        let trusted: Vec<IpAddr> = trusted.iter().map(|t| t.parse().unwrap()).collect();
        client_ip(&md, Some(peer.parse().unwrap()), &trusted)
            .unwrap()
            .to_string()
    }

    #[test]
    fn forwarded_for_is_used_only_behind_a_trusted_proxy() {
        let proxy = "10.0.0.2:5000";
        assert_eq!(
            ip_for(&["203.0.113.7"], proxy, &["10.0.0.2"]),
            "203.0.113.7"
        );
        assert_eq!(ip_for(&["203.0.113.7"], proxy, &[]), "10.0.0.2");
        assert_eq!(ip_for(&[], proxy, &["10.0.0.2"]), "10.0.0.2");
    }

    #[test]
    fn the_rightmost_hop_that_is_not_a_trusted_proxy_is_the_client() {
        let proxy = "10.0.0.2:5000";
        let trusted = ["10.0.0.2", "10.0.0.1"];
        // A client behind an appending proxy forges the leftmost hop.
        assert_eq!(
            ip_for(&["6.6.6.6, 203.0.113.7"], proxy, &trusted),
            "203.0.113.7"
        );
        // Trusted proxies in the chain are skipped.
        assert_eq!(
            ip_for(&["6.6.6.6, 203.0.113.7, 10.0.0.1"], proxy, &trusted),
            "203.0.113.7"
        );
        // Two headers are one list, in order; ports and spaces are allowed.
        assert_eq!(
            ip_for(&["6.6.6.6", " 203.0.113.7:443 ,10.0.0.1"], proxy, &trusted),
            "203.0.113.7"
        );
        assert_eq!(
            ip_for(&["6.6.6.6, [2001:db8::7]:443"], proxy, &trusted),
            "2001:db8::7"
        );
        // Garbage stops the walk at the last address known.
        assert_eq!(
            ip_for(&["6.6.6.6, junk, 10.0.0.1"], proxy, &trusted),
            "10.0.0.1"
        );
        assert_eq!(ip_for(&["6.6.6.6, junk"], proxy, &trusted), "10.0.0.2");
        // Only trusted proxies: the leftmost of them.
        assert_eq!(ip_for(&["10.0.0.1"], proxy, &trusted), "10.0.0.1");
        // IPv4 mapped into IPv6 is compared as IPv4.
        assert_eq!(
            ip_for(&["203.0.113.7"], "[::ffff:10.0.0.2]:5000", &trusted),
            "203.0.113.7"
        );
    }
}
