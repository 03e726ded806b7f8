//! Identifiers of keys and accounts.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use arrayvec::ArrayString;

use crate::base62;

const KEY_ID_TAG: &str = "key_";
const KEY_ID_RANDOM_LEN: usize = 20;
const MAX_ACCOUNT_LEN: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error(
        "'{0}' is not a key id: key ids look like 'key_' followed by 20 letters and digits, as returned by CreateKey or ListKeys"
    )]
    MalformedKeyId(String),
    #[error(
        "'{0}' is not an account id: use 1 to 64 letters, digits, '_', '.' or '-', starting with a letter or digit"
    )]
    MalformedAccountId(String),
    #[error(
        "that account id looks like a credential (an API key or the operator token), so it is not used or repeated: an account id names an account, e.g. 'ACME'"
    )]
    CredentialAsAccountId,
}

const KEY_ID_LEN: usize = KEY_ID_TAG.len() + KEY_ID_RANDOM_LEN;

/// The stable identity of a key; survives rotation. E.g. `key_3kTMd8sQ0Lr6bA2xYv9Z`.
///
/// Held inline (24 ASCII bytes, no heap): verify nodes keep one per cached
/// key, and read it as a `&str` on every verify without re-checking UTF-8.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(ArrayString<KEY_ID_LEN>);

impl KeyId {
    pub fn generate() -> Self {
        let id = format!("{KEY_ID_TAG}{}", base62::random(KEY_ID_RANDOM_LEN));
        Self(ArrayString::from(&id).expect("a generated key id has the fixed length"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for KeyId {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let well_formed = s.len() == KEY_ID_LEN
            && s.starts_with(KEY_ID_TAG)
            && base62::all_base62(&s.as_bytes()[KEY_ID_TAG.len()..]);
        match ArrayString::from(s) {
            Ok(id) if well_formed => Ok(Self(id)),
            _ => Err(IdError::MalformedKeyId(crate::excerpt(s))),
        }
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({})", self.as_str())
    }
}

/// The account (tenant) that owns keys, as named by the platform, e.g. `ACME`.
///
/// Shared, not copied, when cloned: verify nodes hold one per cached key.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AccountId(Arc<str>);

impl AccountId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl AccountId {
    /// An account id as a caller gives it: well formed, and not something
    /// that looks like a credential (which would then be stored, logged
    /// and shown as an account's name). Stored ids are read with `parse`.
    pub fn from_caller(s: &str) -> Result<Self, IdError> {
        if crate::echo::looks_like_a_credential(s) {
            return Err(IdError::CredentialAsAccountId);
        }
        s.parse()
    }
}

impl FromStr for AccountId {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let well_formed = !s.is_empty()
            && s.len() <= MAX_ACCOUNT_LEN
            && s.as_bytes()[0].is_ascii_alphanumeric()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        if !well_formed {
            return Err(IdError::MalformedAccountId(crate::excerpt(s)));
        }
        Ok(Self(Arc::from(s)))
    }
}

impl fmt::Display for AccountId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for AccountId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AccountId({})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_key_ids_parse() {
        let id = KeyId::generate();
        assert_eq!(id.as_str().len(), 24);
        assert_eq!(id.as_str().parse::<KeyId>().unwrap(), id);
    }

    #[test]
    fn malformed_key_ids_are_rejected() {
        for bad in [
            "",
            "key_",
            "key_short",
            "kez_3kTMd8sQ0Lr6bA2xYv9Z",
            "key_3kTMd8sQ0Lr6bA2xYv9!",
        ] {
            assert!(bad.parse::<KeyId>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_secret_pasted_as_key_id_is_not_echoed() {
        let secret = crate::GeneratedKey::generate(&crate::Pepper::generate());
        let err = secret.expose_secret().parse::<KeyId>().unwrap_err();
        assert!(!err.to_string().contains(&secret.expose_secret()[13..]));
    }

    #[test]
    fn account_ids() {
        assert!("ACME".parse::<AccountId>().is_ok());
        assert!("acme-corp.eu_1".parse::<AccountId>().is_ok());
        for bad in ["", "-acme", "acme corp", &"a".repeat(65)] {
            assert!(bad.parse::<AccountId>().is_err(), "{bad}");
        }
    }
}
