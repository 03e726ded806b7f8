//! Scopes: `resource:action` strings a key is granted, and the rule that
//! decides whether a set of granted scopes covers a required one.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use compact_str::CompactString;

/// Longest scope accepted.
const MAX_SCOPE_LEN: usize = 128;
/// The resource of the service's own scopes (`keys:admin`): granted by the
/// operator alone, never through a scope catalogue.
pub const MANAGEMENT_RESOURCE: &str = "keys";
/// Most scopes one key may hold.
pub const MAX_SCOPES: usize = 50;

/// Why a scope or a scope list was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScopeError {
    #[error(
        "'{0}' is not a valid scope: use lowercase resource:action, e.g. 'datasets:read' or 'datasets:*' ([a-z0-9_.-]+:[a-z0-9_.-]+, or * as the whole action)"
    )]
    Invalid(String),
    #[error("a scope is at most {MAX_SCOPE_LEN} characters long; this one has {0}")]
    TooLong(usize),
    #[error("a key holds at most {MAX_SCOPES} scopes; {0} were given")]
    TooMany(usize),
    #[error("'{0}' is not a valid scope: '*' stands only for a whole action, as in 'datasets:*'")]
    PartialWildcard(String),
}

/// One `resource:action` scope, e.g. `datasets:read`. An action of `*`
/// grants every action on the resource.
///
/// Held inline up to 24 bytes (most scopes): a verify that requires scopes
/// parses them without a heap allocation each.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Scope {
    value: CompactString,
    colon: usize,
}

impl Scope {
    pub fn as_str(&self) -> &str {
        &self.value
    }

    pub fn resource(&self) -> &str {
        &self.value[..self.colon]
    }

    pub fn action(&self) -> &str {
        &self.value[self.colon + 1..]
    }

    /// Whether holding this scope makes a management key.
    pub fn is_management(&self) -> bool {
        self.resource() == MANAGEMENT_RESOURCE
            && (self.action() == "*" || self.as_str() == crate::ADMIN_SCOPE)
    }

    /// Whether holding `self` allows what `required` asks for.
    pub fn grants(&self, required: &Scope) -> bool {
        self == required || (self.action() == "*" && self.resource() == required.resource())
    }
}

impl Scope {
    /// Parses a scope read back from the store, by the rule keys were
    /// created under before `*` had to be a whole action (`datasets:re*d`
    /// was accepted then, and only ever granted itself): such a key still
    /// loads, but no new one gets such a scope.
    pub fn from_stored(s: &str) -> Result<Self, ScopeError> {
        let colon = validate(s, Wildcards::Anywhere)?;
        Ok(Self {
            value: CompactString::from(s),
            colon,
        })
    }
}

impl FromStr for Scope {
    type Err = ScopeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let colon = validate(s, Wildcards::WholeAction)?;
        Ok(Self {
            value: CompactString::from(s),
            colon,
        })
    }
}

/// Where an action may hold `*`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Wildcards {
    /// Only as the whole action: `datasets:*`.
    WholeAction,
    /// Anywhere in the action: what stored keys may hold (see [`Scope::from_stored`]).
    Anywhere,
}

/// Checks `resource:action` and returns where the colon is. Runs on every
/// verify that requires scopes, hence the table.
fn validate(s: &str, wildcards: Wildcards) -> Result<usize, ScopeError> {
    if s.len() > MAX_SCOPE_LEN {
        let chars = s.chars().count();
        if chars > MAX_SCOPE_LEN {
            return Err(ScopeError::TooLong(chars));
        }
        // Too long in bytes only: not ASCII, so not a scope at all.
        return Err(ScopeError::Invalid(crate::excerpt(s)));
    }
    let bytes = s.as_bytes();
    let colon = bytes.iter().position(|&b| b == b':');
    let valid = colon.is_some_and(|colon| {
        let (resource, action) = (&bytes[..colon], &bytes[colon + 1..]);
        !resource.is_empty()
            && !action.is_empty()
            && resource
                .iter()
                .all(|&b| CHARS[usize::from(b)] & RESOURCE != 0)
            && action.iter().all(|&b| CHARS[usize::from(b)] & ACTION != 0)
    });
    match colon {
        Some(colon) if valid => {
            let action = &bytes[colon + 1..];
            if wildcards == Wildcards::WholeAction && action != b"*" && action.contains(&b'*') {
                return Err(ScopeError::PartialWildcard(crate::excerpt(s)));
            }
            Ok(colon)
        }
        _ => Err(ScopeError::Invalid(crate::excerpt(s))),
    }
}

/// Which part of a scope each byte may appear in: `[a-z0-9_.-]` in both,
/// `*` in the action only.
static CHARS: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        if c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'_' | b'.' | b'-') {
            table[b] = RESOURCE | ACTION;
        } else if c == b'*' {
            table[b] = ACTION;
        }
        b += 1;
    }
    table
};
const RESOURCE: u8 = 1;
const ACTION: u8 = 2;

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.value)
    }
}

impl fmt::Debug for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Scope({})", self.value)
    }
}

/// The scopes of one key: sorted, without duplicates, at most [`MAX_SCOPES`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct ScopeSet(BTreeSet<Scope>);

impl ScopeSet {
    /// Parses a list, naming the first bad entry by its index.
    pub fn parse<S: AsRef<str>>(scopes: &[S]) -> Result<Self, (usize, ScopeError)> {
        if scopes.len() > MAX_SCOPES {
            return Err((MAX_SCOPES, ScopeError::TooMany(scopes.len())));
        }
        scopes
            .iter()
            .enumerate()
            .map(|(i, s)| s.as_ref().parse::<Scope>().map_err(|e| (i, e)))
            .collect::<Result<BTreeSet<_>, _>>()
            .map(Self)
    }

    /// Parses scopes read back from the store (see [`Scope::from_stored`]).
    pub fn from_stored<S: AsRef<str>>(scopes: &[S]) -> Result<Self, ScopeError> {
        scopes
            .iter()
            .map(|s| Scope::from_stored(s.as_ref()))
            .collect::<Result<BTreeSet<_>, _>>()
            .map(Self)
    }

    /// Whether the set makes a management key: one that grants
    /// [`crate::ADMIN_SCOPE`] (`keys:admin` itself, or `keys:*`).
    pub fn is_management(&self) -> bool {
        self.0.iter().any(Scope::is_management)
    }

    /// Scopes in `self` that `before` does not hold.
    pub fn added_since<'a>(&'a self, before: &'a ScopeSet) -> impl Iterator<Item = &'a Scope> {
        self.0.difference(&before.0)
    }

    /// Whether every scope in `required` is granted by some scope in `self`.
    pub fn grants_all<'a>(&self, required: impl IntoIterator<Item = &'a Scope>) -> bool {
        required
            .into_iter()
            .all(|needed| self.0.iter().any(|held| held.grants(needed)))
    }

    pub fn iter(&self) -> impl Iterator<Item = &Scope> {
        self.0.iter()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn to_strings(&self) -> Vec<String> {
        self.0.iter().map(|s| s.as_str().to_owned()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn scope(s: &str) -> Scope {
        s.parse().unwrap()
    }

    #[test]
    fn parses_resource_and_action() {
        let s = scope("datasets:read");
        assert_eq!(s.resource(), "datasets");
        assert_eq!(s.action(), "read");
    }

    #[test]
    fn rejects_bad_scopes_with_a_remedy() {
        for bad in [
            "",
            "datasets",
            ":read",
            "datasets:",
            "Datasets:read",
            "data sets:read",
            "a:b:c",
            "*:read",
        ] {
            let err = bad.parse::<Scope>().unwrap_err();
            assert_eq!(err, ScopeError::Invalid(crate::excerpt(bad)), "{bad}");
            assert!(err.to_string().contains("lowercase resource:action"));
        }
        assert!(matches!(
            "a:".repeat(100).parse::<Scope>(),
            Err(ScopeError::TooLong(200))
        ));
    }

    #[test]
    fn a_scope_too_long_in_bytes_but_not_characters_is_invalid_not_too_long() {
        // Found by the fuzz target `scope` (fuzz/): 128 characters, one of
        // them two bytes, was "at most 128 characters long; this one has 128".
        let accented = format!("datasets:{}é", "r".repeat(118));
        assert_eq!((accented.chars().count(), accented.len()), (128, 129));
        assert_eq!(
            accented.parse::<Scope>(),
            Err(ScopeError::Invalid(crate::excerpt(&accented)))
        );
        let longer = format!("{accented}x");
        assert_eq!(longer.parse::<Scope>(), Err(ScopeError::TooLong(129)));
    }

    #[test]
    fn a_long_non_ascii_scope_is_quoted_as_an_excerpt() {
        // Found by the fuzz target `scope`: this path quoted the whole
        // input, so a secret-shaped run in it was repeated in the message.
        let secret_like = format!("{}ééé:r", "Ab3".repeat(41));
        assert!(secret_like.len() > 128 && secret_like.chars().count() <= 128);
        let Err(ScopeError::Invalid(shown)) = secret_like.parse::<Scope>() else {
            panic!("not invalid");
        };
        assert!(shown.contains("not repeated"), "{shown}");
    }

    #[test]
    fn a_wildcard_is_a_whole_action_or_nothing() {
        for bad in [
            "datasets:re*d",
            "datasets:**",
            "datasets:*read",
            "datasets:read*",
        ] {
            let err = bad.parse::<Scope>().unwrap_err();
            assert_eq!(
                err,
                ScopeError::PartialWildcard(crate::excerpt(bad)),
                "{bad}"
            );
            assert!(err.to_string().contains("'datasets:*'"), "{err}");
            // A key stored under the old rule still loads.
            assert_eq!(Scope::from_stored(bad).unwrap().as_str(), bad);
        }
        assert!("datasets:*".parse::<Scope>().is_ok());
        assert_eq!(
            Scope::from_stored("Datasets:read"),
            Err(ScopeError::Invalid(crate::excerpt("Datasets:read")))
        );
    }

    #[test]
    fn management_scopes_are_keys_admin_and_keys_star() {
        for (text, management) in [
            ("keys:admin", true),
            ("keys:*", true),
            ("keys:read", false),
            ("datasets:*", false),
            ("keysx:admin", false),
        ] {
            assert_eq!(scope(text).is_management(), management, "{text}");
        }
        assert!(ScopeSet::parse(&["a:b", "keys:*"]).unwrap().is_management());
        assert!(!ScopeSet::parse(&["a:b"]).unwrap().is_management());
    }

    #[test]
    fn added_since_lists_only_new_scopes() {
        let before = ScopeSet::parse(&["a:b", "c:d"]).unwrap();
        let after = ScopeSet::parse(&["c:d", "e:f"]).unwrap();
        let added: Vec<_> = after.added_since(&before).map(Scope::as_str).collect();
        assert_eq!(added, ["e:f"]);
    }

    #[test]
    fn wildcard_grants_every_action_on_its_resource_only() {
        let all = scope("datasets:*");
        assert!(all.grants(&scope("datasets:read")));
        assert!(all.grants(&scope("datasets:write")));
        assert!(all.grants(&scope("datasets:*")));
        assert!(!all.grants(&scope("models:read")));
        assert!(!scope("datasets:read").grants(&scope("datasets:*")));
        assert!(!scope("datasets:read").grants(&scope("datasets:write")));
    }

    #[test]
    fn set_needs_every_required_scope() {
        let set = ScopeSet::parse(&["datasets:read", "models:*"]).unwrap();
        assert!(set.grants_all(&[scope("datasets:read"), scope("models:write")]));
        assert!(!set.grants_all(&[scope("datasets:read"), scope("datasets:write")]));
        assert!(set.grants_all(&[]));
    }

    #[test]
    fn set_deduplicates_sorts_and_names_the_bad_index() {
        let set = ScopeSet::parse(&["b:x", "a:y", "b:x"]).unwrap();
        assert_eq!(set.to_strings(), vec!["a:y", "b:x"]);
        let (index, _) = ScopeSet::parse(&["a:b", "A:b"]).unwrap_err();
        assert_eq!(index, 1);
        let many: Vec<String> = (0..51).map(|i| format!("r{i}:read")).collect();
        assert_eq!(
            ScopeSet::parse(&many).unwrap_err().1,
            ScopeError::TooMany(51)
        );
    }

    proptest! {
        #[test]
        fn valid_scopes_round_trip(resource in "[a-z0-9_.-]{1,20}", action in "[a-z0-9_.-]{1,20}|\\*") {
            let text = format!("{resource}:{action}");
            let parsed: Scope = text.parse().unwrap();
            prop_assert_eq!(parsed.as_str(), text.as_str());
            prop_assert!(parsed.grants(&parsed));
        }

        #[test]
        fn accepts_exactly_the_documented_pattern(text in "[a-z0-9_.*:A-Z -]{0,12}") {
            let pattern = text.split_once(':').is_some_and(|(resource, action)| {
                !resource.is_empty()
                    && !action.is_empty()
                    && resource.bytes().all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'.' | b'-'))
                    && (action == "*"
                        || action.bytes().all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'.' | b'-')))
            });
            prop_assert_eq!(text.parse::<Scope>().is_ok(), pattern, "{}", text);
        }
    }
}
