//! Which scopes an account's keys may be granted: a catalogue of scope
//! patterns, set server-wide (`allowed_scopes`) or for one account by the
//! operator. Scopes on the service's own resource (`keys`, which makes
//! management keys) are never in a catalogue: only the operator grants them.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use crate::scope::{MANAGEMENT_RESOURCE, Scope};

/// Longest pattern accepted, as for a scope.
const MAX_PATTERN_LEN: usize = 128;
/// Most patterns one catalogue may hold.
pub const MAX_PATTERNS: usize = 100;

/// Why a pattern or a catalogue was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error(
        "'{0}' is not a scope pattern: use resource:action where either part may be '*', e.g. 'datasets:read', 'datasets:*' or '*:*'"
    )]
    Invalid(String),
    #[error(
        "'{0}' names the service's own '{MANAGEMENT_RESOURCE}' scopes, which no catalogue holds: only the operator token grants them"
    )]
    Reserved(String),
    #[error("a catalogue holds at most {MAX_PATTERNS} patterns; {0} were given")]
    TooMany(usize),
}

/// One `resource:action` pattern; `*` for either part matches any.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ScopePattern {
    text: String,
    colon: usize,
}

impl ScopePattern {
    pub fn as_str(&self) -> &str {
        &self.text
    }

    fn resource(&self) -> &str {
        &self.text[..self.colon]
    }

    fn action(&self) -> &str {
        &self.text[self.colon + 1..]
    }

    /// Whether the pattern matches `scope`. `datasets:*` (every action) is
    /// matched only by a pattern whose action is `*`.
    pub fn covers(&self, scope: &Scope) -> bool {
        let part = |pattern: &str, value: &str| pattern == "*" || pattern == value;
        part(self.resource(), scope.resource()) && part(self.action(), scope.action())
    }
}

impl FromStr for ScopePattern {
    type Err = PatternError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let name = |part: &str| {
            part == "*"
                || (!part.is_empty()
                    && part.bytes().all(|b| {
                        b.is_ascii_lowercase()
                            || b.is_ascii_digit()
                            || matches!(b, b'_' | b'.' | b'-')
                    }))
        };
        let colon = s
            .find(':')
            .filter(|&colon| {
                s.len() <= MAX_PATTERN_LEN && name(&s[..colon]) && name(&s[colon + 1..])
            })
            .ok_or_else(|| PatternError::Invalid(crate::excerpt(s)))?;
        if &s[..colon] == MANAGEMENT_RESOURCE {
            return Err(PatternError::Reserved(s.to_owned()));
        }
        Ok(Self {
            text: s.to_owned(),
            colon,
        })
    }
}

impl fmt::Display for ScopePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// The patterns an account's keys may be granted scopes from: sorted,
/// without duplicates. The default is `*:*`: every scope but the service's
/// own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScopeCatalogue(BTreeSet<ScopePattern>);

impl Default for ScopeCatalogue {
    fn default() -> Self {
        Self(BTreeSet::from(["*:*".parse().expect("*:* is a pattern")]))
    }
}

impl ScopeCatalogue {
    /// Parses a list, naming the first bad entry by its index. An empty
    /// list is a catalogue that grants nothing.
    pub fn parse<S: AsRef<str>>(patterns: &[S]) -> Result<Self, (usize, PatternError)> {
        if patterns.len() > MAX_PATTERNS {
            return Err((MAX_PATTERNS, PatternError::TooMany(patterns.len())));
        }
        patterns
            .iter()
            .enumerate()
            .map(|(i, p)| p.as_ref().parse().map_err(|e| (i, e)))
            .collect::<Result<BTreeSet<_>, _>>()
            .map(Self)
    }

    /// Whether a key of the account may be granted `scope`: some pattern
    /// covers it, and it is not one of the service's own.
    pub fn covers(&self, scope: &Scope) -> bool {
        scope.resource() != MANAGEMENT_RESOURCE && self.0.iter().any(|p| p.covers(scope))
    }

    pub fn to_strings(&self) -> Vec<String> {
        self.0.iter().map(|p| p.as_str().to_owned()).collect()
    }

    /// Checks that a caller may grant `scope`: the service's own scopes need
    /// the operator's authority, every other scope a pattern that covers it.
    pub fn check_grant(&self, scope: &Scope, by_operator: bool) -> Result<(), GrantError> {
        if scope.resource() == MANAGEMENT_RESOURCE {
            return if by_operator {
                Ok(())
            } else {
                Err(GrantError::OperatorOnly(scope.clone()))
            };
        }
        if self.covers(scope) {
            Ok(())
        } else {
            Err(GrantError::OutsideCatalogue {
                scope: scope.clone(),
                catalogue: self.clone(),
            })
        }
    }
}

impl fmt::Display for ScopeCatalogue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("none");
        }
        for (i, pattern) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            f.write_str(pattern.as_str())?;
        }
        Ok(())
    }
}

/// Why a scope may not be granted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrantError {
    #[error(
        "'{0}' is one of the service's own scopes ('{MANAGEMENT_RESOURCE}:admin' makes a management key): only the operator token may grant it, not a management key"
    )]
    OperatorOnly(Scope),
    #[error(
        "'{scope}' is outside the scopes this account's keys may be granted ({catalogue}); the operator can widen them with `vilvik-keys accounts set-scopes`"
    )]
    OutsideCatalogue {
        scope: Scope,
        catalogue: ScopeCatalogue,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope(s: &str) -> Scope {
        s.parse().unwrap()
    }

    fn catalogue(patterns: &[&str]) -> ScopeCatalogue {
        ScopeCatalogue::parse(patterns).unwrap()
    }

    #[test]
    fn patterns_match_by_part() {
        let cases = [
            ("datasets:read", "datasets:read", true),
            ("datasets:read", "datasets:write", false),
            ("datasets:read", "datasets:*", false),
            ("datasets:*", "datasets:*", true),
            ("datasets:*", "datasets:write", true),
            ("datasets:*", "models:read", false),
            ("*:read", "models:read", true),
            ("*:read", "models:*", false),
            ("*:*", "models:*", true),
        ];
        for (pattern, s, covered) in cases {
            let pattern: ScopePattern = pattern.parse().unwrap();
            assert_eq!(pattern.covers(&scope(s)), covered, "{pattern} / {s}");
        }
    }

    #[test]
    fn the_default_covers_every_scope_but_the_services_own() {
        let default = ScopeCatalogue::default();
        assert!(default.covers(&scope("billing:*")));
        assert!(default.covers(&scope("payments:write")));
        for own in ["keys:admin", "keys:*", "keys:read"] {
            assert!(!default.covers(&scope(own)), "{own}");
        }
        assert_eq!(default.to_string(), "*:*");
    }

    #[test]
    fn bad_patterns_are_named() {
        for bad in [
            "",
            "datasets",
            "Datasets:read",
            "datasets:re*d",
            "**:read",
            "a:b:c",
        ] {
            assert_eq!(
                bad.parse::<ScopePattern>(),
                Err(PatternError::Invalid(crate::excerpt(bad))),
                "{bad}"
            );
        }
        for reserved in ["keys:admin", "keys:*"] {
            let err = reserved.parse::<ScopePattern>().unwrap_err();
            assert_eq!(err, PatternError::Reserved(reserved.into()));
            assert!(err.to_string().contains("only the operator token"), "{err}");
        }
        let (index, _) = ScopeCatalogue::parse(&["a:b", "A:b"]).unwrap_err();
        assert_eq!(index, 1);
        let many: Vec<String> = (0..=MAX_PATTERNS).map(|i| format!("r{i}:*")).collect();
        assert_eq!(
            ScopeCatalogue::parse(&many).unwrap_err().1,
            PatternError::TooMany(MAX_PATTERNS + 1)
        );
    }

    #[test]
    fn grants_need_a_pattern_or_the_operator() {
        let narrow = catalogue(&["reports:read", "datasets:*"]);
        assert_eq!(narrow.check_grant(&scope("datasets:write"), false), Ok(()));
        let err = narrow
            .check_grant(&scope("billing:write"), false)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "'billing:write' is outside the scopes this account's keys may be granted \
             (datasets:*, reports:read); the operator can widen them with `vilvik-keys accounts set-scopes`"
        );
        // The operator is held to the catalogue too, but for the service's own scopes.
        assert!(narrow.check_grant(&scope("billing:write"), true).is_err());
        for own in ["keys:admin", "keys:*"] {
            assert_eq!(
                narrow.check_grant(&scope(own), false),
                Err(GrantError::OperatorOnly(scope(own)))
            );
            assert_eq!(narrow.check_grant(&scope(own), true), Ok(()));
        }
        assert_eq!(catalogue(&[]).to_string(), "none");
    }
}
