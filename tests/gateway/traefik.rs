//! What Traefik's ForwardAuth middleware asks and reads, configured as
//! `docs/INTEGRATIONS.md` configures it (Traefik itself is not installed
//! here): a GET to the middleware's `address` over HTTP/1.1, carrying the
//! client's headers named in `authRequestHeaders` and Traefik's
//! `X-Forwarded-*`. Traefik relays a non-2xx answer to the client as it
//! is (status, headers, body), so every field of it is checked.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::json;
use vilvik_keys::config::Config;
use vilvik_keys_test_support::http::{self, Answer, HttpVersion};
use vilvik_keys_test_support::{ACCOUNT, TestApp, on_both_backends};

use crate::doc;

/// Traefik connects from 127.0.0.1, listed as a trusted proxy.
fn behind_traefik(config: &mut Config) {
    config.trusted_proxies = vec!["127.0.0.1".parse().unwrap()];
}

on_both_backends!(
    configured by behind_traefik:
    forward_auth_reads_what_traefik_relays,
);

/// The end client, as Traefik saw it.
const CLIENT: &str = "203.0.113.7";

/// How long a use takes to show on GetKey.
const WRITTEN_WITHIN: Duration = Duration::from_secs(5);

async fn forward_auth_reads_what_traefik_relays(mut app: TestApp) {
    let traefik = Traefik::documented(app.verify_addr);
    let reader = app.create_key("reader", &["datasets:read"]).await.unwrap();
    let reader_id = reader.key.unwrap().key_id;
    let bearer = format!("Bearer {}", reader.secret);

    // Valid, the scope in the address: 200, the identity in the headers
    // Traefik copies (authResponseHeaders), nothing else to relay.
    let allowed = traefik
        .check("vilvik-datasets-read", &[("Authorization", &bearer)])
        .await;
    assert_eq!(allowed.status, 200, "{allowed:?}");
    assert_eq!(
        header_names(&allowed),
        [
            "cache-control",
            "content-length",
            "x-vilvik-account-id",
            "x-vilvik-key-id",
            "x-vilvik-key-name",
            "x-vilvik-scopes",
        ]
    );
    assert_eq!(allowed.header("x-vilvik-key-id"), reader_id);
    assert_eq!(allowed.header("x-vilvik-account-id"), ACCOUNT);
    assert_eq!(allowed.header("x-vilvik-key-name"), "reader");
    assert_eq!(allowed.header("x-vilvik-scopes"), "datasets:read");
    assert_eq!(allowed.header("cache-control"), "no-store");
    assert_eq!(allowed.header("content-length"), "0");
    assert_eq!(allowed.body, "");

    // The last use names the client Traefik forwarded for.
    app.wait_for_key(&reader_id, WRITTEN_WITHIN, "the use is written", |key| {
        key.valid_use_count == 1
    })
    .await;
    let key = app.get_key(&reader_id).await;
    assert_eq!(key.last_used_observed_ip, CLIENT, "{key:?}");

    // A missing scope, the scopes set by the page's `headers` middleware:
    // 403 with the challenge and the JSON body Traefik relays, and no
    // identity.
    let scopes = traefik.billing_scopes.clone();
    let refused = traefik
        .check(
            "vilvik",
            &[
                ("Authorization", &bearer),
                ("X-Vilvik-Required-Scopes", &scopes),
            ],
        )
        .await;
    assert_eq!(refused.status, 403, "{refused:?}");
    assert_eq!(
        header_names(&refused),
        [
            "cache-control",
            "content-length",
            "content-type",
            "www-authenticate"
        ]
    );
    let message = "the key lacks the scopes billing:read, billing:write that this request requires: grant it to the key, or use a key that has it";
    assert_eq!(
        refused.header("www-authenticate"),
        format!(
            "Bearer realm=\"vilvik\", error=\"insufficient_scope\", error_description=\"{message}\", scope=\"billing:read billing:write\""
        )
    );
    assert_eq!(refused.header("content-type"), "application/json");
    assert_eq!(refused.header("cache-control"), "no-store");
    assert_eq!(
        refused.json(),
        json!({ "code": "INSUFFICIENT_SCOPE", "message": message })
    );

    // A client's own X-Vilvik-Required-Scopes adds to the address's scope.
    let refused = traefik
        .check(
            "vilvik-datasets-read",
            &[
                ("Authorization", &bearer),
                ("X-Vilvik-Required-Scopes", "billing:write"),
            ],
        )
        .await;
    assert_eq!(refused.status, 403, "{refused:?}");
    assert!(
        refused
            .header("www-authenticate")
            .ends_with("scope=\"datasets:read billing:write\""),
        "{refused:?}"
    );

    // A revoked key, in X-Api-Key: 401.
    let revoked = app.create_key("revoked", &["datasets:read"]).await.unwrap();
    app.revoke_key(&revoked.key.unwrap().key_id).await.unwrap();
    let refused = traefik
        .check("vilvik-datasets-read", &[("X-Api-Key", &revoked.secret)])
        .await;
    assert_eq!(refused.status, 401, "{refused:?}");
    assert_eq!(
        header_names(&refused),
        [
            "cache-control",
            "content-length",
            "content-type",
            "www-authenticate"
        ]
    );
    let message = "the key was revoked; revocation is final: create a new key";
    assert_eq!(
        refused.header("www-authenticate"),
        format!(
            "Bearer realm=\"vilvik\", error=\"invalid_token\", error_description=\"{message}\""
        )
    );
    assert_eq!(refused.header("content-type"), "application/json");
    assert_eq!(refused.header("cache-control"), "no-store");
    assert_eq!(
        refused.json(),
        json!({ "code": "REVOKED", "message": message })
    );

    // No key: 401 with a challenge without an error.
    let refused = traefik.check("vilvik-datasets-read", &[]).await;
    assert_eq!(refused.status, 401, "{refused:?}");
    assert_eq!(
        header_names(&refused),
        [
            "cache-control",
            "content-length",
            "content-type",
            "www-authenticate"
        ]
    );
    assert_eq!(
        refused.header("www-authenticate"),
        "Bearer realm=\"vilvik\""
    );
    assert_eq!(refused.header("content-type"), "application/json");
    assert_eq!(refused.header("cache-control"), "no-store");
    assert_eq!(
        refused.json(),
        json!({
            "code": "MISSING_KEY",
            "message": "no key was sent: send one as Authorization: Bearer vlk_… or x-api-key: vlk_…",
        })
    );
}

/// Traefik as the page's dynamic configuration sets it up.
struct Traefik {
    verify: SocketAddr,
    /// Each ForwardAuth middleware's `address`, by middleware name.
    addresses: Vec<(String, String)>,
    /// What the `require-billing` headers middleware sets.
    billing_scopes: String,
}

impl Traefik {
    /// Reads the middlewares of the page's Traefik configuration.
    fn documented(verify: SocketAddr) -> Self {
        let config = doc::block("traefik");
        let mut addresses = Vec::new();
        let mut billing_scopes = None;
        let mut middleware = "";
        for line in config.lines() {
            // A middleware's name: `    name:` under `middlewares:`.
            if let Some(name) = line.strip_prefix("    ").and_then(|l| l.strip_suffix(':'))
                && !name.starts_with(' ')
            {
                middleware = name;
            }
            let setting = line.trim();
            if let Some(address) = setting.strip_prefix("address: ") {
                addresses.push((middleware.to_owned(), unquote(address)));
            }
            if middleware == "require-billing"
                && let Some(scopes) = setting.strip_prefix("X-Vilvik-Required-Scopes: ")
            {
                billing_scopes = Some(unquote(scopes));
            }
        }
        Self {
            verify,
            addresses,
            billing_scopes: billing_scopes.expect("the page's require-billing middleware"),
        }
    }

    /// The request the ForwardAuth middleware `middleware` sends for a
    /// client's `POST https://api.example.com/datasets/42?page=2` carrying
    /// `client_headers` (those of `authRequestHeaders`), and the answer.
    async fn check(&self, middleware: &str, client_headers: &[(&str, &str)]) -> Answer {
        let address = &self
            .addresses
            .iter()
            .find(|(name, _)| name == middleware)
            .unwrap_or_else(|| panic!("the page has no ForwardAuth middleware {middleware}"))
            .1;
        let path = doc::replace(address, "http://127.0.0.1:50052", "");
        let mut headers = client_headers.to_vec();
        headers.extend([
            // Go's HTTP client adds these two.
            ("User-Agent", "Go-http-client/1.1"),
            ("Accept-Encoding", "gzip"),
            ("X-Forwarded-For", CLIENT),
            ("X-Forwarded-Method", "POST"),
            ("X-Forwarded-Proto", "https"),
            ("X-Forwarded-Host", "api.example.com"),
            ("X-Forwarded-Uri", "/datasets/42?page=2"),
        ]);
        http::send(self.verify, HttpVersion::Http1, http::get(&path, &headers)).await
    }
}

/// A YAML string's value, without its double quotes.
fn unquote(value: &str) -> String {
    value.trim().trim_matches('"').to_owned()
}

/// The answer's header names, sorted, but `date` (which changes).
fn header_names(answer: &Answer) -> Vec<&str> {
    let mut names: Vec<&str> = answer
        .headers
        .keys()
        .map(|n| n.as_str())
        .filter(|n| *n != "date")
        .collect();
    names.sort_unstable();
    names.dedup();
    names
}
