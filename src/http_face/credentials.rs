//! What a request presents: the key, from one of the configured headers,
//! and the scopes the route requires, from the query string
//! (`?scope=a&scope=b`) or a gateway's `x-vilvik-required-scopes`. Envoy's
//! check ([`crate::server::ext_authz`]) reads its request's headers and its
//! route's list of scopes with the same functions.

use http::{HeaderMap, HeaderName};
use smallvec::SmallVec;
use vilvik_keys_domain::{KEY_LENGTH, MAX_REQUIRED_SCOPES, Scope};

use super::answer::Refusal;

/// A gateway's list of the scopes its route requires, comma-separated.
pub const REQUIRED_SCOPES: &str = "x-vilvik-required-scopes";

/// A request's header block, at most (HTTP/2's `SETTINGS_MAX_HEADER_LIST_SIZE`
/// on every listener; hyper's own HTTP/1.1 limit is far larger).
pub const MAX_HEADER_BYTES: usize = 16 * 1024;

/// The key bytes a request presents: `None` when it sends none.
pub fn presented_key<'a>(
    headers: &'a HeaderMap,
    key_headers: &[HeaderName],
) -> Result<Option<&'a [u8]>, Refusal> {
    // The usual request: one key header, once, holding one key; the
    // general way below reads anything else.
    let mut present = key_headers
        .iter()
        .filter(|name| headers.contains_key(*name));
    if let (Some(name), None) = (present.next(), present.next()) {
        let mut values = headers.get_all(name).iter();
        if let (Some(value), None) = (values.next(), values.next())
            && !value.as_bytes().contains(&b',')
            && header_bytes(headers) <= MAX_HEADER_BYTES
        {
            return one_key(name, value.as_bytes());
        }
    }
    key_in_headers(
        || {
            headers
                .iter()
                .map(|(name, value)| (name.as_str(), value.as_bytes()))
        },
        key_headers,
    )
}

/// The key bytes a request's headers present, given as (name, value)
/// pairs in the order received (`headers` makes a fresh iterator over
/// them each time it is called): `None` when they hold none. A key is read
/// from the headers `key_headers` names, in that order (names compared
/// without case). A value may be several values joined by commas (as a
/// proxy may join repeated headers, and as Envoy's check request does), and
/// a key never holds a comma, so each item is read on its own: two
/// different keys, in one header or two, are refused as ambiguous.
pub(crate) fn key_in_headers<'a, I>(
    headers: impl Fn() -> I,
    key_headers: &[HeaderName],
) -> Result<Option<&'a [u8]>, Refusal>
where
    I: Iterator<Item = (&'a str, &'a [u8])>,
{
    let size: usize = headers()
        .map(|(name, value)| entry_bytes(name, value))
        .sum();
    if size > MAX_HEADER_BYTES {
        return Err(Refusal::HeadersTooLarge {
            max: MAX_HEADER_BYTES,
        });
    }
    let mut found: Option<(&HeaderName, &[u8])> = None;
    for name in key_headers {
        let items = headers()
            .filter(|(header, _)| header.eq_ignore_ascii_case(name.as_str()))
            .flat_map(|(_, value)| value.split(|b| *b == b','));
        for item in items {
            let Some(key) = one_key(name, item)? else {
                continue;
            };
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

/// A header's size as HTTP/2 counts it against the header list size.
fn entry_bytes(name: &str, value: &[u8]) -> usize {
    name.len() + value.len() + 32
}

fn header_bytes(headers: &HeaderMap) -> usize {
    headers
        .iter()
        .map(|(name, value)| entry_bytes(name.as_str(), value.as_bytes()))
        .sum()
}

/// The key one item of header `name` carries, checked: `None` when it
/// carries none.
fn one_key<'a>(name: &HeaderName, item: &'a [u8]) -> Result<Option<&'a [u8]>, Refusal> {
    let Some(key) = key_in(name, item) else {
        return Ok(None);
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
    Ok(Some(key))
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
    let mut scopes = Required::default();
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
        scopes.add(&decoded, "the scope query parameter")?;
    }
    if header {
        for value in headers.get_all(REQUIRED_SCOPES) {
            let text = value.to_str().map_err(|_| Refusal::BadScope {
                source: REQUIRED_SCOPES,
                problem: "it is not readable text".to_owned(),
            })?;
            scopes.add_list(text, REQUIRED_SCOPES)?;
        }
    }
    Ok(scopes.0)
}

/// The scopes a comma-separated `list` requires (blank items skipped), a
/// bad one refused naming `source`, where the list came from.
pub(crate) fn listed_scopes(
    list: &str,
    source: &'static str,
) -> Result<SmallVec<[Scope; 2]>, Refusal> {
    let mut scopes = Required::default();
    scopes.add_list(list, source)?;
    Ok(scopes.0)
}

/// Required scopes as they are read, at most [`MAX_REQUIRED_SCOPES`].
#[derive(Default)]
struct Required(SmallVec<[Scope; 2]>);

impl Required {
    fn add(&mut self, text: &str, source: &'static str) -> Result<(), Refusal> {
        let text = text.trim();
        if text.is_empty() {
            return Ok(());
        }
        if self.0.len() == MAX_REQUIRED_SCOPES {
            return Err(Refusal::BadScope {
                source,
                problem: format!("at most {MAX_REQUIRED_SCOPES} scopes may be required"),
            });
        }
        let scope = text.parse::<Scope>().map_err(|e| Refusal::BadScope {
            source,
            problem: format!("'{}': {e}", vilvik_keys_domain::excerpt(text)),
        })?;
        self.0.push(scope);
        Ok(())
    }

    fn add_list(&mut self, list: &str, source: &'static str) -> Result<(), Refusal> {
        list.split(',').try_for_each(|item| self.add(item, source))
    }
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
    fn each_item_of_a_comma_joined_value_is_read_on_its_own() {
        // As Envoy joins repeated headers, and some proxies do.
        assert_eq!(
            key_of(&[("x-api-key", "vlk_a, vlk_a")]).unwrap(),
            Some("vlk_a".into())
        );
        assert_eq!(
            key_of(&[("authorization", "Basic dXNlcjpwYXNz,Bearer vlk_a")]).unwrap(),
            Some("vlk_a".into())
        );
        assert!(matches!(
            key_of(&[("x-api-key", "vlk_a,vlk_b")]),
            Err(Refusal::Ambiguous { ref first, ref second })
                if first == "x-api-key" && second == "x-api-key"
        ));
        assert_eq!(key_of(&[("x-api-key", " , ")]).unwrap(), None);
    }

    #[test]
    fn header_pairs_are_read_as_a_header_map_is() {
        // Envoy's names are lower-case; any case is the same header.
        let pairs = [
            (":authority", b"api.example.com".as_slice()),
            ("X-Api-Key", b"vlk_b".as_slice()),
        ];
        assert_eq!(
            key_in_headers(|| pairs.iter().copied(), &names()).unwrap(),
            Some(b"vlk_b".as_slice())
        );
        let two = [
            ("x-api-key", b"vlk_b".as_slice()),
            ("authorization", b"Bearer vlk_a".as_slice()),
        ];
        assert!(matches!(
            key_in_headers(|| two.iter().copied(), &names()),
            Err(Refusal::Ambiguous { ref first, ref second })
                if first == "authorization" && second == "x-api-key"
        ));
    }

    #[test]
    fn a_listed_scope_that_is_not_a_scope_is_named_by_its_source() {
        let scopes = listed_scopes(" datasets:read,,billing:write ", "the list").unwrap();
        let names: Vec<&str> = scopes.iter().map(|s| s.as_str()).collect();
        assert_eq!(names, ["datasets:read", "billing:write"]);
        assert!(matches!(
            listed_scopes("datasets:read,Not A Scope", "the list"),
            Err(Refusal::BadScope {
                source: "the list",
                ..
            })
        ));
        assert!(listed_scopes("", "the list").unwrap().is_empty());
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
