//! Validation of the free-form fields of a key.

use std::fmt;
use std::str::FromStr;

use compact_str::CompactString;
use time::OffsetDateTime;

const MAX_NAME_CHARS: usize = 64;
const MAX_DESCRIPTION_CHARS: usize = 1000;
const MAX_REASON_CHARS: usize = 500;

/// A rejected field value, with a message a person can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FieldError {
    #[error("name must not be empty: name the key after the place that uses it, e.g. 'ci-runner'")]
    EmptyName,
    #[error("name is {0} characters long; the limit is {MAX_NAME_CHARS}")]
    NameTooLong(usize),
    #[error("name must not contain control characters such as newlines")]
    NameControlCharacter,
    #[error(
        "name must not contain invisible characters (zero-width spaces and joiners, soft hyphens, byte-order marks) or bidirectional controls: two names that look alike must be alike"
    )]
    NameInvisibleCharacter,
    #[error("description is {0} characters long; the limit is {MAX_DESCRIPTION_CHARS}")]
    DescriptionTooLong(usize),
    #[error("description must not contain control characters other than newlines and tabs")]
    DescriptionControlCharacter,
    #[error(
        "description must not contain bidirectional controls (U+202A-U+202E, U+2066-U+2069 and the like): they make text display in another order than it is stored"
    )]
    DescriptionBidiControl,
    #[error("reason is {0} characters long; the limit is {MAX_REASON_CHARS}")]
    ReasonTooLong(usize),
    #[error(
        "reason must be one line of printable text: no control characters (newlines, escapes, NUL) and no bidirectional controls"
    )]
    ReasonUnprintable,
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
        check_label(s).map_err(|e| match e {
            LabelError::Control => FieldError::NameControlCharacter,
            LabelError::Invisible => FieldError::NameInvisibleCharacter,
        })?;
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
        if s.chars().any(is_bidi_control) {
            return Err(FieldError::DescriptionBidiControl);
        }
        Ok(Self(s.to_owned()))
    }
}

/// Why a key was revoked, as the audit log keeps it: at most 500
/// characters of one printable line; may be empty.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reason(String);

impl Reason {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Reason {
    type Err = FieldError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let chars = s.chars().count();
        if chars > MAX_REASON_CHARS {
            return Err(FieldError::ReasonTooLong(chars));
        }
        if s.chars().any(|c| c.is_control() || is_bidi_control(c)) {
            return Err(FieldError::ReasonUnprintable);
        }
        Ok(Self(s.to_owned()))
    }
}

/// What makes text unfit to name something a person reads (`check_label`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LabelError {
    #[error("must not contain control characters")]
    Control,
    #[error("must not contain invisible characters or bidirectional controls")]
    Invisible,
}

/// Text a person reads as the name of something (a key's name, the actor
/// in the audit log): printable, without characters that hide or reorder
/// what is shown.
pub fn check_label(s: &str) -> Result<(), LabelError> {
    if s.chars().any(char::is_control) {
        return Err(LabelError::Control);
    }
    if s.chars().any(|c| is_invisible(c) || is_bidi_control(c)) {
        return Err(LabelError::Invisible);
    }
    Ok(())
}

/// The characters that make text display in another order than it is
/// stored ("Trojan Source", CVE-2021-42574): embeddings, overrides,
/// isolates and the directional marks.
pub(crate) fn is_bidi_control(c: char) -> bool {
    matches!(
        c,
        '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}'
    )
}

/// Characters that take no room: two names differing only by them look
/// the same.
pub(crate) fn is_invisible(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}' | '\u{180E}' | '\u{200B}'..='\u{200D}' | '\u{2060}'..='\u{2064}' | '\u{FEFF}'
    )
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
    fn names_refuse_invisible_and_reordering_characters() {
        for bad in [
            "ci\u{200B}runner",
            "ci\u{200D}runner",
            "\u{FEFF}ci-runner",
            "ci\u{00AD}runner",
            "ci-\u{202E}rennur",
            "ci-\u{2067}runner\u{2069}",
            "ci\u{200F}runner",
        ] {
            assert_eq!(
                bad.parse::<KeyName>(),
                Err(FieldError::NameInvisibleCharacter),
                "{bad:?}"
            );
        }
        for bad in [
            "ci\0runner",
            "ci\u{1b}[31mrunner",
            "ci\r\nrunner",
            "ci\u{85}x",
        ] {
            assert_eq!(
                bad.parse::<KeyName>(),
                Err(FieldError::NameControlCharacter),
                "{bad:?}"
            );
        }
        // Letters of any script are fine.
        assert!("ключ-ci 東京 مفتاح".parse::<KeyName>().is_ok());
    }

    #[test]
    fn descriptions_refuse_bidi_controls_and_nul() {
        assert_eq!(
            "see \u{202E}txt.exe".parse::<Description>(),
            Err(FieldError::DescriptionBidiControl)
        );
        assert_eq!(
            "a\0b".parse::<Description>(),
            Err(FieldError::DescriptionControlCharacter)
        );
        assert_eq!(
            "a\r\nb".parse::<Description>(),
            Err(FieldError::DescriptionControlCharacter)
        );
    }

    #[test]
    fn reasons_are_one_printable_line() {
        assert_eq!(" leaked ".parse::<Reason>().unwrap().as_str(), "leaked");
        assert_eq!("".parse::<Reason>().unwrap().as_str(), "");
        assert!("é".repeat(500).parse::<Reason>().is_ok());
        assert_eq!(
            "é".repeat(501).parse::<Reason>(),
            Err(FieldError::ReasonTooLong(501))
        );
        for bad in [
            "leaked\0",
            "leaked\nin CI",
            "\u{1b}[2Jleaked",
            "leaked\u{202E}",
            "a\tb",
        ] {
            assert_eq!(
                bad.parse::<Reason>(),
                Err(FieldError::ReasonUnprintable),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn labels_are_printable_and_visible() {
        assert!(check_label("alice@example.com").is_ok());
        assert!(check_label("al\u{200B}ice@example.com").is_err());
        assert!(check_label("alice\t").is_err());
        assert!(check_label("\u{202E}moc.elpmaxe@ecila").is_err());
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
