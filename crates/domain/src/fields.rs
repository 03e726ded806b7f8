//! Validation of the free-form fields of a key.

use std::fmt;
use std::str::FromStr;

use compact_str::CompactString;
use time::OffsetDateTime;

const MAX_NAME_CHARS: usize = 64;
const MAX_DESCRIPTION_CHARS: usize = 1000;

/// A rejected field value, with a message a person can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FieldError {
    #[error("name must not be empty: name the key after the place that uses it, e.g. 'ci-runner'")]
    EmptyName,
    #[error("name is {0} characters long; the limit is {MAX_NAME_CHARS}")]
    NameTooLong(usize),
    #[error("name must not contain control characters such as newlines")]
    NameControlCharacter,
    #[error("description is {0} characters long; the limit is {MAX_DESCRIPTION_CHARS}")]
    DescriptionTooLong(usize),
    #[error("description must not contain control characters other than newlines and tabs")]
    DescriptionControlCharacter,
    #[error(
        "expires_at {expires_at} is not in the future (now is {now}): pick a later time, or leave it unset for a key that does not expire"
    )]
    ExpiryNotInFuture {
        expires_at: OffsetDateTime,
        now: OffsetDateTime,
    },
}

/// A key's label: 1 to 64 characters after trimming, no control characters.
///
/// Held inline up to 24 bytes (most names): verify nodes keep one per
/// cached key and copy it into every answer.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyName(CompactString);

impl KeyName {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0.into_string()
    }
}

impl FromStr for KeyName {
    type Err = FieldError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let chars = s.chars().count();
        if chars == 0 {
            return Err(FieldError::EmptyName);
        }
        if chars > MAX_NAME_CHARS {
            return Err(FieldError::NameTooLong(chars));
        }
        if s.chars().any(char::is_control) {
            return Err(FieldError::NameControlCharacter);
        }
        Ok(Self(CompactString::from(s)))
    }
}

impl fmt::Display for KeyName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for KeyName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyName({:?})", self.0)
    }
}

/// An optional longer note: at most 1,000 characters; may be empty.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Description(String);

impl Description {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Description {
    type Err = FieldError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let chars = s.chars().count();
        if chars > MAX_DESCRIPTION_CHARS {
            return Err(FieldError::DescriptionTooLong(chars));
        }
        if s.chars().any(|c| c.is_control() && c != '\n' && c != '\t') {
            return Err(FieldError::DescriptionControlCharacter);
        }
        Ok(Self(s.to_owned()))
    }
}

/// An expiry must lie in the future when it is set.
pub fn validate_expiry(expires_at: OffsetDateTime, now: OffsetDateTime) -> Result<(), FieldError> {
    if expires_at <= now {
        return Err(FieldError::ExpiryNotInFuture { expires_at, now });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn names_are_trimmed_and_bounded() {
        assert_eq!(
            "  ci-runner ".parse::<KeyName>().unwrap().as_str(),
            "ci-runner"
        );
        assert_eq!("".parse::<KeyName>(), Err(FieldError::EmptyName));
        assert_eq!("   ".parse::<KeyName>(), Err(FieldError::EmptyName));
        assert!("é".repeat(64).parse::<KeyName>().is_ok());
        assert_eq!(
            "é".repeat(65).parse::<KeyName>(),
            Err(FieldError::NameTooLong(65))
        );
        assert_eq!(
            "a\nb".parse::<KeyName>(),
            Err(FieldError::NameControlCharacter)
        );
    }

    #[test]
    fn descriptions_may_be_empty_and_hold_newlines() {
        assert_eq!("".parse::<Description>().unwrap().as_str(), "");
        assert!("line one\nline two".parse::<Description>().is_ok());
        assert!("x".repeat(1000).parse::<Description>().is_ok());
        assert_eq!(
            "x".repeat(1001).parse::<Description>(),
            Err(FieldError::DescriptionTooLong(1001))
        );
        assert_eq!(
            "bell\u{7}".parse::<Description>(),
            Err(FieldError::DescriptionControlCharacter)
        );
    }

    #[test]
    fn expiry_must_be_after_now() {
        let now = datetime!(2026-11-26 10:00 UTC);
        assert!(validate_expiry(datetime!(2026-11-26 10:00:01 UTC), now).is_ok());
        assert!(validate_expiry(now, now).is_err());
        let err = validate_expiry(datetime!(2020-01-01 0:00 UTC), now).unwrap_err();
        assert!(err.to_string().contains("not in the future"));
    }
}
