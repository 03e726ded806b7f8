//! The API-key format: generation, parsing, hashing and comparison.
//!
//! ```text
//! vlk_AbCdEfGh_<32 base62 secret characters><6 base62 checksum characters>
//! \__________/
//!  prefix (12 characters, public, shown in listings)
//! ```
//!
//! The checksum is CRC32 over everything before it, so a typo or a random
//! string is rejected without a lookup, and secret scanners can tell a real
//! key from noise. Only a hash of the whole key is ever stored: keyed BLAKE3
//! with a [`Pepper`] kept outside the database (legacy hashes from before
//! peppers are unkeyed; they still verify, and are re-hashed when they do).

use std::fmt;
use std::str::FromStr;

use secrecy::{ExposeSecret, SecretString};
use zeroize::Zeroizing;

use crate::base62;
use crate::pepper::{Pepper, PepperId};

/// The literal every key starts with.
///
/// NEVER CHANGE THIS: it is part of every key ever issued, secret scanners
/// match on it, and changing it invalidates every key in the wild.
pub const KEY_PREFIX: &str = "vlk_";

/// Base62 characters after `vlk_` that make the key's public prefix unique.
/// NEVER CHANGE THIS (see [`KEY_PREFIX`]).
const PREFIX_ID_LEN: usize = 8;
/// Base62 characters of secret: 32 * log2(62) is about 190 bits.
/// NEVER CHANGE THIS (see [`KEY_PREFIX`]).
const SECRET_LEN: usize = 32;
/// Base62 characters of the CRC32 checksum (62^6 > 2^32).
/// NEVER CHANGE THIS (see [`KEY_PREFIX`]).
const CHECKSUM_LEN: usize = 6;

/// Length of a key prefix, `vlk_` included.
pub const PREFIX_LEN: usize = KEY_PREFIX.len() + PREFIX_ID_LEN;
/// Length of a whole key.
pub const KEY_LENGTH: usize = PREFIX_LEN + 1 + SECRET_LEN + CHECKSUM_LEN;

/// BLAKE3 `derive_key` context of the legacy, unkeyed hash stored before
/// peppers. NEVER CHANGE THIS: keys stored with it would stop verifying
/// before they could be re-hashed.
const LEGACY_HASH_CONTEXT: &str = "vilvik-keys 2026-11-26 api key secret hash v1";

/// Why a presented string is not a well-formed key. Carries no part of the
/// input, which may be a secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyFormatError {
    #[error("a key is {KEY_LENGTH} characters long; this one has {0}")]
    WrongLength(usize),
    #[error("a key starts with '{KEY_PREFIX}'")]
    WrongPrefix,
    #[error("a key holds only letters, digits and one '_' after the prefix")]
    InvalidCharacter,
    #[error("the key's checksum does not match: it was mistyped or truncated")]
    ChecksumMismatch,
}

/// The public first 12 characters of a key, e.g. `vlk_AbCdEfGh`. Held
/// inline (no heap).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyPrefix([u8; PREFIX_LEN]);

impl KeyPrefix {
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("a prefix is ASCII")
    }

    fn generate() -> Self {
        let prefix = format!("{KEY_PREFIX}{}", base62::random(PREFIX_ID_LEN));
        Self::from_validated(&prefix)
    }

    /// From 12 characters already checked to be `vlk_` + 8 base62.
    fn from_validated(s: &str) -> Self {
        Self(s.as_bytes().try_into().expect("a prefix has 12 characters"))
    }

    /// The prefix as a number (its 8 base62 characters read as one base-62
    /// value, below 62^8 < 2^48): distinct prefixes give distinct numbers,
    /// so compact in-memory indexes can key on 8 bytes instead of a string.
    pub fn packed(&self) -> u64 {
        base62::decode(&self.0[KEY_PREFIX.len()..])
    }
}

impl FromStr for KeyPrefix {
    type Err = KeyFormatError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != PREFIX_LEN {
            return Err(KeyFormatError::WrongLength(s.len()));
        }
        if !s.starts_with(KEY_PREFIX) {
            return Err(KeyFormatError::WrongPrefix);
        }
        if !base62::all_base62(&s.as_bytes()[KEY_PREFIX.len()..]) {
            return Err(KeyFormatError::InvalidCharacter);
        }
        Ok(Self::from_validated(s))
    }
}

impl fmt::Display for KeyPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for KeyPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyPrefix({})", self.as_str())
    }
}

/// The stored form of a key: a keyed BLAKE3 hash of the whole key (or, for
/// keys stored before peppers, a legacy unkeyed one). Equality, `==`
/// included, takes the same time however many bytes match
/// ([`SecretHash::matches`]).
#[derive(Clone, Copy)]
pub struct SecretHash([u8; 32]);

/// [`LEGACY_HASH_CONTEXT`] hashed once: `blake3::derive_key(LEGACY_HASH_CONTEXT, ..)`
/// without rehashing the context on every verify of a legacy key.
static LEGACY_CONTEXT_KEY: std::sync::LazyLock<blake3::hazmat::ContextKey> =
    std::sync::LazyLock::new(|| blake3::hazmat::hash_derive_key_context(LEGACY_HASH_CONTEXT));

impl SecretHash {
    /// The hash of `key` keyed with `pepper`: `blake3::keyed_hash` with the
    /// pepper's hash key. One BLAKE3 compression for a 51-byte key, as
    /// the unkeyed hash was.
    fn keyed(pepper: &Pepper, key: &[u8]) -> Self {
        Self(*blake3::keyed_hash(pepper.hash_key(), key).as_bytes())
    }

    /// The legacy unkeyed hash, `blake3::derive_key(LEGACY_HASH_CONTEXT, key)`:
    /// only for checking keys stored before peppers.
    fn legacy(key: &[u8]) -> Self {
        use blake3::hazmat::HasherExt;
        let mut hasher = blake3::Hasher::new_from_context_key(&LEGACY_CONTEXT_KEY);
        hasher.update(key);
        Self(*hasher.finalize().as_bytes())
    }

    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// Reads a stored hash; `None` when it is not 32 bytes.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        Some(Self(bytes.try_into().ok()?))
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Compares in constant time, so response timing says nothing about how
    /// much of a guessed key was right.
    pub fn matches(&self, other: &SecretHash) -> bool {
        // blake3::Hash's equality is constant-time.
        blake3::Hash::from_bytes(self.0) == blake3::Hash::from_bytes(other.0)
    }
}

impl PartialEq for SecretHash {
    fn eq(&self, other: &SecretHash) -> bool {
        self.matches(other)
    }
}

impl Eq for SecretHash {}

impl fmt::Debug for SecretHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretHash([REDACTED])")
    }
}

/// A well-formed key as presented by a caller: its public prefix and the
/// whole key, held inline (no heap) and zeroed when dropped. Hashed on
/// demand with whichever pepper its stored hash names
/// ([`ApiKey::hash_with`]).
#[derive(Clone)]
pub struct ApiKey {
    prefix: KeyPrefix,
    key: Zeroizing<[u8; KEY_LENGTH]>,
}

impl ApiKey {
    pub fn prefix(&self) -> &KeyPrefix {
        &self.prefix
    }

    /// The hash to compare with one stored with `pepper`; `None`: the
    /// legacy unkeyed hash of a key stored before peppers.
    pub fn hash_with(&self, pepper: Option<&Pepper>) -> SecretHash {
        match pepper {
            Some(pepper) => SecretHash::keyed(pepper, &self.key[..]),
            None => SecretHash::legacy(&self.key[..]),
        }
    }

    /// Parses a key presented as bytes, as the verify listener decodes it.
    /// Only the exact ASCII format passes, so no separate UTF-8 check is
    /// needed; a wrong length is counted in bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, KeyFormatError> {
        if bytes.len() != KEY_LENGTH {
            return Err(KeyFormatError::WrongLength(bytes.len()));
        }
        if !bytes.starts_with(KEY_PREFIX.as_bytes()) {
            return Err(KeyFormatError::WrongPrefix);
        }
        let well_formed = bytes[PREFIX_LEN] == b'_'
            && base62::all_base62(&bytes[KEY_PREFIX.len()..PREFIX_LEN])
            && base62::all_base62(&bytes[PREFIX_LEN + 1..]);
        if !well_formed {
            return Err(KeyFormatError::InvalidCharacter);
        }
        // The checksum is a function of the presented key alone, so a plain
        // comparison leaks nothing; decoding it avoids an allocation.
        let (body, checksum) = bytes.split_at(KEY_LENGTH - CHECKSUM_LEN);
        if base62::decode(checksum) != u64::from(crc32fast::hash(body)) {
            return Err(KeyFormatError::ChecksumMismatch);
        }
        let mut key = Zeroizing::new([0u8; KEY_LENGTH]);
        key.copy_from_slice(bytes);
        Ok(Self {
            prefix: KeyPrefix(
                bytes[..PREFIX_LEN]
                    .try_into()
                    .expect("a prefix has 12 characters"),
            ),
            key,
        })
    }
}

impl FromStr for ApiKey {
    type Err = KeyFormatError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() == KEY_LENGTH {
            return Self::from_bytes(s.as_bytes());
        }
        // A length in characters, as the message says; a string of the
        // right number of characters but not bytes holds one no key has.
        let chars = s.chars().count();
        if chars != KEY_LENGTH {
            return Err(KeyFormatError::WrongLength(chars));
        }
        if !s.starts_with(KEY_PREFIX) {
            return Err(KeyFormatError::WrongPrefix);
        }
        Err(KeyFormatError::InvalidCharacter)
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKey")
            .field("prefix", &self.prefix)
            .field("secret", &"[REDACTED]")
            .finish()
    }
}

/// A freshly generated key: the secret to hand out once, and what to store
/// (its hash under a pepper, and that pepper's id).
pub struct GeneratedKey {
    prefix: KeyPrefix,
    secret: SecretString,
    hash: SecretHash,
    pepper_id: PepperId,
}

impl GeneratedKey {
    /// A new key from the operating system's CSPRNG, hashed with `pepper`
    /// (the current one). The key is assembled in a buffer zeroed when
    /// dropped; the only other copy is the returned secret, zeroed too.
    pub fn generate(pepper: &Pepper) -> Self {
        let prefix = KeyPrefix::generate();
        let mut key = Zeroizing::new([0u8; KEY_LENGTH]);
        key[..PREFIX_LEN].copy_from_slice(prefix.as_str().as_bytes());
        key[PREFIX_LEN] = b'_';
        base62::fill_random(&mut key[PREFIX_LEN + 1..KEY_LENGTH - CHECKSUM_LEN]);
        let checksum = crc32fast::hash(&key[..KEY_LENGTH - CHECKSUM_LEN]);
        base62::encode_u32_into(checksum, &mut key[KEY_LENGTH - CHECKSUM_LEN..]);
        let text = std::str::from_utf8(&key[..]).expect("a generated key is ASCII");
        Self {
            prefix,
            hash: SecretHash::keyed(pepper, &key[..]),
            pepper_id: pepper.id(),
            secret: SecretString::from(text),
        }
    }

    pub fn prefix(&self) -> &KeyPrefix {
        &self.prefix
    }

    /// The hash to store, keyed with the pepper [`GeneratedKey::pepper_id`] names.
    pub fn hash(&self) -> SecretHash {
        self.hash
    }

    /// The id of the pepper the hash was made with.
    pub fn pepper_id(&self) -> PepperId {
        self.pepper_id
    }

    /// The whole key. Call only to return it to the creator, once.
    pub fn expose_secret(&self) -> &str {
        self.secret.expose_secret()
    }
}

impl fmt::Debug for GeneratedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GeneratedKey")
            .field("prefix", &self.prefix)
            .field("pepper_id", &self.pepper_id)
            .field("secret", &"[REDACTED]")
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// One pepper for the whole test binary: hashes are compared across tests.
    fn pepper() -> Pepper {
        static PEPPER: std::sync::LazyLock<Pepper> = std::sync::LazyLock::new(Pepper::generate);
        PEPPER.clone()
    }

    /// `==` is [`SecretHash::matches`]: constant time, the same answers.
    #[test]
    fn hashes_are_equal_exactly_when_they_match() {
        let a = SecretHash::from_bytes([7; 32]);
        for i in [0, 15, 31] {
            let mut bytes = [7; 32];
            bytes[i] ^= 1;
            let b = SecretHash::from_bytes(bytes);
            assert!(a != b && !a.matches(&b));
        }
        let same = SecretHash::from_slice(&[7; 32]).unwrap();
        assert!(a == same && a.matches(&same));
    }

    #[test]
    fn generated_key_has_the_documented_shape() {
        let key = GeneratedKey::generate(&pepper());
        let secret = key.expose_secret();
        assert_eq!(secret.len(), 51);
        assert!(secret.starts_with("vlk_"));
        assert_eq!(&secret[12..13], "_");
        assert_eq!(key.prefix().as_str(), &secret[..12]);
    }

    #[test]
    fn generated_keys_parse_and_hash_to_the_stored_hash() {
        let key = GeneratedKey::generate(&pepper());
        assert_eq!(key.pepper_id(), pepper().id());
        let parsed: ApiKey = key.expose_secret().parse().unwrap();
        assert_eq!(parsed.prefix(), key.prefix());
        assert!(parsed.hash_with(Some(&pepper())).matches(&key.hash()));
    }

    #[test]
    fn the_stored_hash_is_keyed_blake3_of_the_whole_key() {
        // The stored format: changing it would orphan every stored hash.
        let pepper = Pepper::from_bytes(&[7; 32]);
        let key = GeneratedKey::generate(&pepper);
        let hash_key = blake3::derive_key(
            "vilvik-keys 2026-12-02 api key secret hash v2 keyed",
            &[7; 32],
        );
        let expected = blake3::keyed_hash(&hash_key, key.expose_secret().as_bytes());
        assert_eq!(key.hash().as_bytes(), expected.as_bytes());
    }

    #[test]
    fn the_legacy_hash_is_blake3_derive_key_of_the_whole_key() {
        // Keys stored before peppers: changing it would orphan them before
        // they could be re-hashed.
        let key = GeneratedKey::generate(&pepper());
        let parsed: ApiKey = key.expose_secret().parse().unwrap();
        let expected = blake3::derive_key(LEGACY_HASH_CONTEXT, key.expose_secret().as_bytes());
        assert_eq!(parsed.hash_with(None).as_bytes(), &expected);
    }

    #[test]
    fn each_pepper_and_the_legacy_hash_give_another_digest() {
        let key = GeneratedKey::generate(&pepper());
        let parsed: ApiKey = key.expose_secret().parse().unwrap();
        let other = Pepper::generate();
        let digests = [
            parsed.hash_with(Some(&pepper())),
            parsed.hash_with(Some(&other)),
            parsed.hash_with(None),
        ];
        for (i, a) in digests.iter().enumerate() {
            for b in &digests[i + 1..] {
                assert!(!a.matches(b));
            }
        }
    }

    #[test]
    fn two_keys_differ() {
        let a = GeneratedKey::generate(&pepper());
        let b = GeneratedKey::generate(&pepper());
        assert_ne!(a.expose_secret(), b.expose_secret());
        assert_ne!(a.prefix(), b.prefix());
        assert!(!a.hash().matches(&b.hash()));
        let a_again: ApiKey = a.expose_secret().parse().unwrap();
        assert!(!a_again.hash_with(Some(&pepper())).matches(&b.hash()));
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let key = GeneratedKey::generate(&pepper());
        let secret = key.expose_secret().to_owned();
        let parsed: ApiKey = secret.parse().unwrap();
        for shown in [
            format!("{key:?}"),
            format!("{parsed:?}"),
            format!("{:?}", key.hash()),
        ] {
            assert!(!shown.contains(&secret[13..]), "{shown}");
            assert!(!shown.contains(&secret[13..20]), "{shown}");
        }
        assert!(format!("{parsed:?}").contains(key.prefix().as_str()));
    }

    #[test]
    fn rejects_each_kind_of_malformed_key() {
        let key = GeneratedKey::generate(&pepper());
        let good = key.expose_secret();
        assert_eq!(
            "".parse::<ApiKey>().unwrap_err(),
            KeyFormatError::WrongLength(0)
        );
        assert_eq!(
            good[..50].parse::<ApiKey>().unwrap_err(),
            KeyFormatError::WrongLength(50)
        );
        let wrong_prefix = format!("vlx_{}", &good[4..]);
        assert_eq!(
            wrong_prefix.parse::<ApiKey>().unwrap_err(),
            KeyFormatError::WrongPrefix
        );
        let no_separator = format!("{}-{}", &good[..12], &good[13..]);
        assert_eq!(
            no_separator.parse::<ApiKey>().unwrap_err(),
            KeyFormatError::InvalidCharacter
        );
        let bad_char = format!("{}!{}", &good[..20], &good[21..]);
        assert_eq!(
            bad_char.parse::<ApiKey>().unwrap_err(),
            KeyFormatError::InvalidCharacter
        );
    }

    #[test]
    fn a_key_long_enough_in_characters_but_not_bytes_is_not_refused_for_its_length() {
        // Lengths are counted in bytes: a 52-byte string of 51 characters
        // is refused for its characters, never as "51 characters long;
        // this one has 51".
        let key = GeneratedKey::generate(&pepper());
        let good = key.expose_secret();
        let accented = format!("{}é{}", &good[..30], &good[31..]);
        assert_eq!((accented.chars().count(), accented.len()), (KEY_LENGTH, 52));
        assert_eq!(
            accented.parse::<ApiKey>().unwrap_err(),
            KeyFormatError::InvalidCharacter
        );
        let wrong_prefix = format!("vlx_{}", &accented[4..]);
        assert_eq!(
            wrong_prefix.parse::<ApiKey>().unwrap_err(),
            KeyFormatError::WrongPrefix
        );
        let longer = format!("{accented}x");
        assert_eq!(
            longer.parse::<ApiKey>().unwrap_err(),
            KeyFormatError::WrongLength(52)
        );
    }

    #[test]
    fn error_messages_do_not_echo_the_input() {
        let key = GeneratedKey::generate(&pepper());
        let mut typo = key.expose_secret().to_owned();
        let replacement = if typo.ends_with('A') { "B" } else { "A" };
        typo.replace_range(50..51, replacement);
        let err = typo.parse::<ApiKey>().unwrap_err();
        assert_eq!(err, KeyFormatError::ChecksumMismatch);
        assert!(!err.to_string().contains(&typo[13..]));
    }

    #[test]
    fn packed_prefixes_are_distinct_numbers() {
        let low: KeyPrefix = "vlk_00000000".parse().unwrap();
        let one: KeyPrefix = "vlk_00000001".parse().unwrap();
        let high: KeyPrefix = "vlk_zzzzzzzz".parse().unwrap();
        assert_eq!(low.packed(), 0);
        assert_eq!(one.packed(), 1);
        assert_eq!(high.packed(), 62u64.pow(8) - 1);
        let a = GeneratedKey::generate(&pepper());
        let b = GeneratedKey::generate(&pepper());
        assert_ne!(a.prefix().packed(), b.prefix().packed());
    }

    #[test]
    fn prefix_parses_only_twelve_base62_characters_after_vlk() {
        assert!("vlk_AbCd1234".parse::<KeyPrefix>().is_ok());
        assert!("vlk_AbCd123".parse::<KeyPrefix>().is_err());
        assert!("vlk_AbCd123!".parse::<KeyPrefix>().is_err());
        assert!("abc_AbCd1234".parse::<KeyPrefix>().is_err());
    }

    proptest! {
        #[test]
        fn any_single_character_change_is_rejected(pos in 0usize..KEY_LENGTH, c in "[0-9A-Za-z_!-]") {
            let key = GeneratedKey::generate(&pepper());
            let original = key.expose_secret();
            prop_assume!(&original[pos..pos + 1] != c.as_str());
            let mut typo = original.to_owned();
            typo.replace_range(pos..pos + 1, &c);
            prop_assert!(typo.parse::<ApiKey>().is_err());
        }

        #[test]
        fn parsing_arbitrary_strings_never_panics(s in "\\PC{0,80}") {
            let _ = s.parse::<ApiKey>();
        }

        #[test]
        fn bytes_parse_as_their_string_does(s in "(vlk_)?[ -~]{41,51}") {
            let outcome = |k: Result<ApiKey, KeyFormatError>| k.map(|k| (k.prefix().clone(), k.hash_with(Some(&pepper()))));
            prop_assert_eq!(outcome(ApiKey::from_bytes(s.as_bytes())), outcome(s.parse()));
        }

        #[test]
        fn a_key_with_one_byte_not_ascii_is_malformed(pos in 4usize..KEY_LENGTH, byte in 0x80u8..) {
            let key = GeneratedKey::generate(&pepper());
            let mut bytes = key.expose_secret().as_bytes().to_vec();
            bytes[pos] = byte;
            prop_assert_eq!(ApiKey::from_bytes(&bytes).err(), Some(KeyFormatError::InvalidCharacter));
        }

        #[test]
        fn random_well_shaped_strings_fail_the_checksum(body in "[0-9A-Za-z]{8}_[0-9A-Za-z]{38}") {
            let candidate = format!("vlk_{body}");
            // A random 6-character tail matches the CRC with probability ~2^-32.
            prop_assert_eq!(candidate.parse::<ApiKey>().unwrap_err(), KeyFormatError::ChecksumMismatch);
        }

        #[test]
        fn every_generated_key_round_trips(_seed in 0u8..255) {
            let key = GeneratedKey::generate(&pepper());
            let parsed: ApiKey = key.expose_secret().parse().unwrap();
            prop_assert_eq!(parsed.prefix(), key.prefix());
            prop_assert!(parsed.hash_with(Some(&pepper())).matches(&key.hash()));
        }
    }
}
