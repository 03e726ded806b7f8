//! The shared Postgres server of the tests, seen from outside the service:
//! a session to look into a test's database, and the way to put a proxy
//! between a node and it.

use std::net::SocketAddr;

use tokio_postgres::config::Host;
use vilvik_keys_test_db::URL_VAR;

/// A session on the Postgres database at `url` (no TLS), for looking at
/// it the way an operator would.
pub async fn postgres_client(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("the test database accepts a session");
    tokio::spawn(connection);
    client
}

/// The TCP address of the server `VILVIK_KEYS_TEST_DATABASE_URL` names;
/// `None` when it is not set (the Postgres tests are skipped).
pub fn test_server_addr() -> Option<SocketAddr> {
    let (host, port) = test_server()?;
    Some(
        format!("{host}:{port}")
            .parse()
            .unwrap_or_else(|e| panic!("{URL_VAR}: {host}:{port} is not an address: {e}")),
    )
}

/// `url`, a database on the server `VILVIK_KEYS_TEST_DATABASE_URL` names,
/// reached through `proxy` instead, in clear so that the proxy sees the
/// protocol go by.
pub fn through_proxy(url: &str, proxy: SocketAddr) -> String {
    let (host, port) = test_server().expect("a test database server");
    let server = format!("{host}:{port}");
    assert!(url.contains(&server), "{url} is not on {server}");
    let url = url.replace(&server, &proxy.to_string());
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}sslmode=disable")
}

fn test_server() -> Option<(String, u16)> {
    let url = std::env::var(URL_VAR).ok()?;
    let config: tokio_postgres::Config = url.parse().expect("a Postgres URL");
    match (config.get_hosts().first(), config.get_ports().first()) {
        (Some(Host::Tcp(host)), Some(port)) => Some((host.clone(), *port)),
        _ => panic!("{URL_VAR} must name a TCP host and port"),
    }
}
