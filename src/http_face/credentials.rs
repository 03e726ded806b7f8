//! What an HTTP request presents: the key, from one of the configured
//! headers, and the scopes the route requires, from the query string
//! (`?scope=a&scope=b`) or a gateway's `x-vilvik-required-scopes`.

use http::{HeaderMap, HeaderName};
use smallvec::SmallVec;
use vilvik_keys_domain::{KEY_LENGTH, Scope};

use super::answer::Refusal;

/// A gateway's list of the scopes its route requires, comma-separated.
pub const REQUIRED_SCOPES: &str = "x-vilvik-required-scopes";

/// Most scopes one request may require (as KeyVerify's `required_scopes`).
const MAX_REQUIRED_SCOPES: usize = 50;

/// A request's header block, at most (HTTP/2's `SETTINGS_MAX_HEADER_LIST_SIZE`
/// on every listener; hyper's own HTTP/1.1 limit is far larger).
pub const MAX_HEADER_BYTES: usize = 16 * 1024;

/// The key bytes a request presents: `None` when it sends none.
pub fn presented_key<'a>(
    headers: &'a HeaderMap,
    key_headers: &[HeaderName],
) -> Result<Option<&'a [u8]>, Refusal> {
    let size: usize = headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 32)
        .sum();
    if size > MAX_HEADER_BYTES {
        return Err(Refusal::HeadersTooLarge {
            max: MAX_HEADER_BYTES,
        });
    }
    let mut found: Option<(&HeaderName, &[u8])> = None;
    for name in key_headers {
        for value in headers.get_all(name) {
            let Some(key) = key_in(name, value.as_bytes()) else {
                continue;
            };
            if key.len() > 4 * KEY_LENGTH {
                return Err(Refusal::KeyTooLong {
                    header: name.clone(),
                });
            }
            if !key.is_ascii() {
                return Err(Refusal::Unreadable {
                    header: name.clone(),
                });
            }
            match found {
                None => found = Some((name, key)),
                // The same key twice (a gateway adding what the client
                // sent) is still one key.
                Some((_, first)) if first == key => {}
                Some((first, _)) => {
                    return Err(Refusal::Ambiguous {
                        first: first.clone(),
                        second: name.clone(),
                    });
                }
            }
        }
    }
    Ok(found.map(|(_, key)| key))
}

/// The key a header's value carries: `Authorization` only as a bearer
/// token (another scheme is not ours to read), any other header whole.
fn key_in<'a>(name: &HeaderName, value: &'a [u8]) -> Option<&'a [u8]> {
    let value = value.trim_ascii();
    let key = if name == http::header::AUTHORIZATION {
        let (scheme, token) = value.split_at(value.iter().position(|b| *b == b' ')?);
        if !scheme.eq_ignore_ascii_case(b"bearer") {
            return None;
        }
        token.trim_ascii()
    } else {
        value
    };
    (!key.is_empty()).then_some(key)
}

/// The scopes a request requires: every `scope` in `query` and every item
/// of `x-vilvik-required-scopes` when `header` is read.
pub fn required_scopes(
    query: Option<&str>,
    headers: &HeaderMap,
    header: bool,
) -> Result<SmallVec<[Scope; 2]>, Refusal> {
    let mut scopes = SmallVec::new();
    let mut add = |text: &str, source: &'static str| -> Result<(), Refusal> {
        let text = text.trim();
        if text.is_empty() {
            return Ok(());
        }
        if scopes.len() == MAX_REQUIRED_SCOPES {
            return Err(Refusal::BadScope {
                source,
                problem: format!("at most {MAX_REQUIRED_SCOPES} scopes may be required"),
            });
        }
        let scope = text.parse::<Scope>().map_err(|e| Refusal::BadScope {
            source,
            problem: format!("'{}': {e}", vilvik_keys_domain::excerpt(text)),
        })?;
        scopes.push(scope);
        Ok(())
    };
    for pair in query.unwrap_or_default().split('&') {
        let Some(value) = pair.strip_prefix("scope=") else {
            continue;
        };
        let decoded = percent_encoding::percent_decode_str(&value.replace('+', " "))
            .decode_utf8()
            .map_err(|_| Refusal::BadScope {
                source: "the scope query parameter",
                problem: "it is not UTF-8 once decoded".to_owned(),
            })?
            .into_owned();
        add(&decoded, "the scope query parameter")?;
    }
    if header {
        for value in headers.get_all(REQUIRED_SCOPES) {
            let text = value.to_str().map_err(|_| Refusal::BadScope {
                source: REQUIRED_SCOPES,
                problem: "it is not readable text".to_owned(),
            })?;
            for scope in text.split(',') {
                add(scope, REQUIRED_SCOPES)?;
            }
        }
    }
    Ok(scopes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Vec<HeaderName> {
        vec![
            http::header::AUTHORIZATION,
            HeaderName::from_static("x-api-key"),
        ]
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        map
    }

    fn key_of(pairs: &[(&str, &str)]) -> Result<Option<String>, Refusal> {
        let map = headers(pairs);
        presented_key(&map, &names()).map(|key| key.map(|k| String::from_utf8(k.to_vec()).unwrap()))
    }

    #[test]
    fn a_key_comes_from_a_bearer_token_or_the_api_key_header() {
        assert_eq!(
            key_of(&[("authorization", "Bearer vlk_a")]).unwrap(),
            Some("vlk_a".into())
        );
        assert_eq!(
            key_of(&[("authorization", "bearer   vlk_a ")]).unwrap(),
            Some("vlk_a".into())
        );
        assert_eq!(
            key_of(&[("x-api-key", "vlk_b")]).unwrap(),
            Some("vlk_b".into())
        );
        // Another scheme, or an empty token, is no key of ours.
        assert_eq!(
            key_of(&[("authorization", "Basic dXNlcjpwYXNz")]).unwrap(),
            None
        );
        assert_eq!(key_of(&[("authorization", "Bearer ")]).unwrap(), None);
        assert_eq!(key_of(&[]).unwrap(), None);
        // The same key in both headers is one key.
        assert_eq!(
            key_of(&[("authorization", "Bearer vlk_a"), ("x-api-key", "vlk_a")]).unwrap(),
            Some("vlk_a".into())
        );
    }

    #[test]
    fn two_different_keys_are_ambiguous_and_named_by_header() {
        let refused = key_of(&[("authorization", "Bearer vlk_a"), ("x-api-key", "vlk_b")]);
        assert!(matches!(
            refused,
            Err(Refusal::Ambiguous { ref first, ref second })
                if first == "authorization" && second == "x-api-key"
        ));
        let refused = key_of(&[("x-api-key", "vlk_a"), ("x-api-key", "vlk_b")]);
        assert!(matches!(refused, Err(Refusal::Ambiguous { .. })));
    }

    #[test]
    fn an_over_long_key_or_header_block_is_refused() {
        let long = format!("Bearer {}", "a".repeat(4 * KEY_LENGTH + 1));
        assert!(matches!(
            key_of(&[("authorization", &long)]),
            Err(Refusal::KeyTooLong { .. })
        ));
        let filler = "x".repeat(MAX_HEADER_BYTES);
        assert!(matches!(
            key_of(&[("x-filler", &filler)]),
            Err(Refusal::HeadersTooLarge { .. })
        ));
    }

    #[test]
    fn required_scopes_come_from_the_query_and_the_gateway_header() {
        let map = headers(&[(REQUIRED_SCOPES, "datasets:read, billing:write")]);
        let scopes = required_scopes(Some("scope=keys%3Aread&x=1&scope=a:b"), &map, true).unwrap();
        let names: Vec<&str> = scopes.iter().map(|s| s.as_str()).collect();
        assert_eq!(
            names,
            ["keys:read", "a:b", "datasets:read", "billing:write"]
        );
        // The header is read only where the route reads it.
        assert_eq!(required_scopes(None, &map, false).unwrap().len(), 0);
        assert!(matches!(
            required_scopes(Some("scope=not a scope"), &map, false),
            Err(Refusal::BadScope { .. })
        ));
    }
}
