//! The value parsers the settings table applies: each takes the name the
//! value came under (the variable, or the file key when it came from the
//! file) and refuses a bad value with a message naming it.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

use vilvik_keys_domain::{PepperId, ScopeCatalogue};

use super::LogFormat;
use super::error::{ConfigError, invalid};

/// Shortest operator token accepted: a guessable token would open every account.
const MIN_OPERATOR_TOKEN_LEN: usize = 32;
/// Fewest distinct characters an operator token may hold: 32 × `a` is 32
/// characters long and no secret.
const MIN_OPERATOR_TOKEN_DISTINCT: usize = 16;

/// The most calls a second an admin rate may allow: GCRA spaces calls at
/// least a nanosecond apart, and a microsecond keeps its arithmetic exact.
const MAX_ADMIN_RATE: u32 = 1_000_000;

/// Why `token` is too weak to be the operator token, if it is. The message
/// never quotes the token.
pub(super) fn operator_token_weakness(token: &str) -> Option<String> {
    const MAKE_ONE: &str = "generate one with `openssl rand -base64 32`";
    if token.chars().count() < MIN_OPERATOR_TOKEN_LEN {
        return Some(format!(
            "the operator token must be at least {MIN_OPERATOR_TOKEN_LEN} characters; {MAKE_ONE}"
        ));
    }
    let distinct = token
        .chars()
        .collect::<std::collections::HashSet<_>>()
        .len();
    if distinct < MIN_OPERATOR_TOKEN_DISTINCT {
        return Some(format!(
            "the operator token holds only {distinct} distinct characters, and must hold at least {MIN_OPERATOR_TOKEN_DISTINCT} (a repeated or patterned token is guessable); {MAKE_ONE}"
        ));
    }
    if token
        .get(..vilvik_keys_domain::KEY_PREFIX.len())
        .is_some_and(|start| start.eq_ignore_ascii_case(vilvik_keys_domain::KEY_PREFIX))
    {
        return Some(format!(
            "the operator token must not start with `{}`: that is an API key, and an operator token must never be mistaken for one; {MAKE_ONE}",
            vilvik_keys_domain::KEY_PREFIX
        ));
    }
    None
}

/// A comma-separated catalogue of scope patterns.
pub(super) fn parse_catalogue(name: &str, value: &str) -> Result<ScopeCatalogue, ConfigError> {
    let patterns: Vec<&str> = list_items(value).collect();
    ScopeCatalogue::parse(&patterns).map_err(|(_, e)| invalid(name, e.to_string()))
}

/// A comma-separated list of IP addresses, each in its canonical form.
pub(super) fn parse_ips(name: &str, value: &str) -> Result<Vec<IpAddr>, ConfigError> {
    list_items(value)
        .map(|s| {
            s.parse::<IpAddr>()
                .map(|ip| ip.to_canonical())
                .map_err(|_| invalid(name, format!("'{s}' is not an IP address")))
        })
        .collect()
}

/// Header names, comma-separated, lower-cased; at least one.
pub(super) fn parse_header_names(
    name: &str,
    value: &str,
) -> Result<Vec<http::HeaderName>, ConfigError> {
    let names = list_items(value)
        .map(|s| {
            http::HeaderName::from_bytes(s.to_ascii_lowercase().as_bytes())
                .map_err(|_| invalid(name, format!("'{s}' is not an HTTP header name")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if names.is_empty() {
        return Err(invalid(
            name,
            "must name at least one header, such as authorization",
        ));
    }
    Ok(names)
}

/// Pepper ids (16 hex characters each), comma-separated.
pub(super) fn parse_pepper_ids(name: &str, value: &str) -> Result<Vec<PepperId>, ConfigError> {
    list_items(value)
        .map(|s| s.to_ascii_lowercase().parse().map_err(|e| invalid(name, e)))
        .collect()
}

/// `true`/`1` or `false`/`0`.
pub(super) fn parse_bool(name: &str, value: &str) -> Result<bool, ConfigError> {
    match value {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        other => Err(invalid(name, format!("'{other}' is not true or false"))),
    }
}

pub(super) fn parse_log_format(name: &str, value: &str) -> Result<LogFormat, ConfigError> {
    [LogFormat::Pretty, LogFormat::Json]
        .into_iter()
        .find(|format| format.name() == value)
        .ok_or_else(|| {
            invalid(
                name,
                format!("'{value}' is not a log format: use 'pretty' or 'json'"),
            )
        })
}

/// A comma-separated list of paths; blanks around each and empty entries
/// are dropped.
pub(super) fn split_paths(value: &str) -> Vec<PathBuf> {
    list_items(value).map(PathBuf::from).collect()
}

/// The items of a list setting: comma-separated (a file's list arrives
/// joined the same way), trimmed, empty ones dropped.
fn list_items(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').map(str::trim).filter(|s| !s.is_empty())
}

/// An interval in whole milliseconds, at least one; a zero is reported
/// under the file key `setting`.
pub(super) fn parse_interval(
    name: &str,
    setting: &str,
    value: &str,
) -> Result<Duration, ConfigError> {
    let interval = parse_millis(name, value)?;
    if interval.is_zero() {
        return Err(invalid(setting, "must be at least 1 millisecond"));
    }
    Ok(interval)
}

/// A count of at least one.
pub(super) fn parse_count(name: &str, value: &str) -> Result<usize, ConfigError> {
    match parse_number(name, value)? {
        0 => Err(invalid(name, "must be at least 1")),
        n => Ok(n as usize),
    }
}

pub(super) fn parse_addr(name: &str, value: &str) -> Result<SocketAddr, ConfigError> {
    value.parse().map_err(|_| {
        invalid(
            name,
            format!("'{value}' is not a socket address such as 127.0.0.1:50051"),
        )
    })
}

pub(super) fn parse_number(name: &str, value: &str) -> Result<u32, ConfigError> {
    value
        .parse()
        .map_err(|_| invalid(name, format!("'{value}' is not a whole number")))
}

pub(super) fn parse_millis(name: &str, value: &str) -> Result<Duration, ConfigError> {
    value.parse().map(Duration::from_millis).map_err(|_| {
        invalid(
            name,
            format!("'{value}' is not a whole number of milliseconds"),
        )
    })
}

/// A whole number of hours.
pub(super) fn parse_hours(name: &str, value: &str) -> Result<Duration, ConfigError> {
    let hours: u32 = parse_number(name, value)?;
    Ok(Duration::from_secs(u64::from(hours) * 3600))
}

/// An admin rate in calls a second, at least 1: a rate of 0 would refuse
/// every admin call, which no operator means (to lift the limit in effect,
/// set a high rate).
pub(super) fn parse_rate(name: &str, value: &str) -> Result<NonZeroU32, ConfigError> {
    let rate = parse_number(name, value)?;
    if rate > MAX_ADMIN_RATE {
        return Err(invalid(
            name,
            format!("must be at most {MAX_ADMIN_RATE} calls a second"),
        ));
    }
    NonZeroU32::new(rate).ok_or_else(|| {
        invalid(
            name,
            format!("must be at least 1 call a second: 0 would refuse every admin call (to lift the limit in effect, set it as high as {MAX_ADMIN_RATE})"),
        )
    })
}

/// An admin burst, at least 1: a burst of 0 would refuse every call.
pub(super) fn parse_burst(name: &str, value: &str) -> Result<NonZeroU32, ConfigError> {
    NonZeroU32::new(parse_number(name, value)?).ok_or_else(|| {
        invalid(
            name,
            "must be at least 1 call: a burst of 0 would refuse every admin call",
        )
    })
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret;

    use super::super::testing::{load, refusal, refusal_of_file};

    #[test]
    fn invalid_values_name_the_setting() {
        let err = refusal(&[("VILVIK_KEYS_VERIFY_ADDR", "localhost")]);
        assert!(err.starts_with("VILVIK_KEYS_VERIFY_ADDR"), "{err}");
        let err = refusal(&[("VILVIK_KEYS_OPERATOR_TOKEN", "short")]);
        assert!(err.contains("at least 32"), "{err}");
        assert!(
            !err.contains("short"),
            "the token must not be echoed: {err}"
        );
        let weak = [
            ("a".repeat(32), "only 1 distinct"),
            ("abcdefgh".repeat(4), "only 8 distinct"),
            ("0123456789abcde".repeat(3), "only 15 distinct"),
            (
                format!("vlk_{}", "Zq81Lw0Xc4Hs9Tb2Vn7Pm3Ry".repeat(2)),
                "must not start with `vlk_`",
            ),
            (
                format!("VLK_{}", "Zq81Lw0Xc4Hs9Tb2Vn7Pm3Ry".repeat(2)),
                "must not start with `vlk_`",
            ),
            // 32 bytes but 16 characters.
            ("éèêëēėęàâäáãåāçñ".to_owned(), "at least 32 characters"),
        ];
        for (token, reason) in weak {
            let err = refusal(&[("VILVIK_KEYS_OPERATOR_TOKEN", token.as_str())]);
            assert!(err.starts_with("VILVIK_KEYS_OPERATOR_TOKEN"), "{err}");
            assert!(err.contains(reason), "{token}: {err}");
            let middle: String = token.chars().skip(4).take(8).collect();
            assert!(!err.contains(&middle), "the token is echoed: {err}");
        }
        // 16 distinct characters are enough.
        let token = "0123456789abcdef".repeat(2);
        let c = load(&[("VILVIK_KEYS_OPERATOR_TOKEN", token.as_str())]);
        assert_eq!(c.operator_token.unwrap().expose_secret(), token);
        let err = refusal_of_file("log_format = \"xml\"\n");
        assert!(err.starts_with("log_format"), "{err}");
    }
}
