//! A key's etag: its version as the API shows it (`v3`), which a caller
//! sends back to make a change conditional on the key being as it read it.

/// The etag of a key at `version`.
pub fn etag(version: i64) -> String {
    format!("v{version}")
}

/// An etag this service never issued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "'{0}' is not an etag of this service: send the etag of the key as GetKey or ListKeys \
     returned it (such as \"v3\"), or none"
)]
pub struct NotAnEtag(String);

/// The version an optional etag names; empty: none.
pub fn version(etag: &str) -> Result<Option<i64>, NotAnEtag> {
    if etag.is_empty() {
        return Ok(None);
    }
    etag.strip_prefix('v')
        .filter(|digits| digits.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|digits| digits.parse::<i64>().ok())
        .map(Some)
        .ok_or_else(|| NotAnEtag(vilvik_keys_domain::excerpt(etag)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_etag_is_the_version_after_a_v() {
        assert_eq!(version(&etag(42)), Ok(Some(42)));
        assert_eq!(version(""), Ok(None));
        for bad in [
            "42",
            "v",
            "v-1",
            "v+1",
            "V3",
            "v3 ",
            "v99999999999999999999",
        ] {
            assert!(version(bad).is_err(), "{bad}");
        }
        assert!(
            version("w7")
                .unwrap_err()
                .to_string()
                .starts_with("'w7' is not an etag of this service")
        );
    }
}
