//! The request and response headers (gRPC metadata) of the API, named once
//! for the server, the CLI and the tools, and the client's address they
//! carry behind trusted proxies. Their meaning: `docs/API.md`.

use std::net::{IpAddr, SocketAddr};

/// With the operator token: the account the call acts on.
pub const ACCOUNT: &str = "x-vilvik-account";

/// With the operator token: the person the audit log names as the actor.
pub const ACTOR: &str = "x-vilvik-actor";

/// A create's or rotation's request id, instead of its `request_id` field.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// On a call refused by the admin rate limit: whole seconds to wait.
pub const RETRY_AFTER: &str = "retry-after";

/// On a call refused by the admin rate limit: milliseconds to wait.
pub const RETRY_AFTER_MS: &str = "retry-after-ms";

/// From a trusted proxy: the addresses a request came through.
pub const FORWARDED_FOR: &str = "x-forwarded-for";

/// The caller's address. From a trusted proxy, `x-forwarded-for` is read
/// from the right, the end the proxies append to: the first hop that is
/// not itself a trusted proxy is the client. Hops further left were written
/// by the client or by proxies we do not know, so they are never believed.
/// A hop that does not parse stops the walk at the last address known.
pub fn client_ip(
    headers: &http::HeaderMap,
    peer: Option<SocketAddr>,
    trusted_proxies: &[IpAddr],
) -> Option<IpAddr> {
    let mut client = peer?.ip().to_canonical();
    if !trusted_proxies.contains(&client) {
        return Some(client);
    }
    // Several headers count as one list, in the order received.
    let forwarded: Vec<&str> = headers
        .get_all(FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    for hop in forwarded.iter().rev().flat_map(|h| h.rsplit(',')) {
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
        let mut md = http::HeaderMap::new();
        for h in headers {
            md.append(FORWARDED_FOR, h.parse().unwrap());
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
