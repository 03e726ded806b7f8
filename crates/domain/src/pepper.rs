//! The pepper: 32 secret bytes kept outside the database, with which every
//! stored key hash is keyed, so that a copy of the database alone cannot
//! confirm a guessed key.
//!
//! Each pepper has a public [`PepperId`] derived from it, stored next to
//! every hash made with it: two nodes given the same file agree on the id
//! without any configuration, and a verifier knows which pepper to hash a
//! presented key with. [`Peppers`] is what a node is configured with: the
//! current pepper (new keys, rotations, and re-hashes use it) and older
//! ones whose keys still verify until they have moved to the current one.
//! A hash stored without a pepper id is a legacy hash from before peppers
//! (unkeyed, see [`crate::ApiKey::hash_with`]).
//!
//! Reading and writing pepper files is the binary's business (`src/pepper.rs`);
//! this module does no I/O beyond the operating system's random generator.

use std::fmt;
use std::num::NonZeroU64;

use zeroize::Zeroizing;

/// Bytes in a pepper.
pub const PEPPER_LEN: usize = 32;

/// BLAKE3 `derive_key` context of a pepper's public id.
/// NEVER CHANGE THIS: stored pepper ids would stop matching their peppers.
const ID_CONTEXT: &str = "vilvik-keys 2026-12-02 pepper id v1";

/// BLAKE3 `derive_key` context of the key that key hashes are keyed with,
/// derived from the pepper so that the pepper itself can key other things
/// later without any risk of the two uses colliding.
/// NEVER CHANGE THIS: stored hashes would stop matching.
const HASH_KEY_CONTEXT: &str = "vilvik-keys 2026-12-02 api key secret hash v2 keyed";

/// The public id of a pepper: the first 8 bytes (big-endian) of
/// `blake3::derive_key(ID_CONTEXT, pepper)`. Shown as 16 hex characters,
/// stored as a signed 64-bit integer with the same bits. Never zero (the
/// one derivation in 2^64 that gives zero is given 1), so that an
/// `Option<PepperId>` takes 8 bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PepperId(NonZeroU64);

impl PepperId {
    fn of(pepper: &[u8; PEPPER_LEN]) -> Self {
        let derived = Zeroizing::new(blake3::derive_key(ID_CONTEXT, pepper));
        let first: [u8; 8] = derived[..8].try_into().expect("8 bytes");
        Self(NonZeroU64::new(u64::from_be_bytes(first)).unwrap_or(NonZeroU64::MIN))
    }

    /// The id as the store keeps it; `None` for 0, which no pepper has.
    pub fn from_stored(stored: i64) -> Option<Self> {
        NonZeroU64::new(stored as u64).map(Self)
    }

    /// The id as the store keeps it (the same 64 bits, signed).
    pub fn to_stored(self) -> i64 {
        self.0.get() as i64
    }
}

impl fmt::Display for PepperId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0.get())
    }
}

/// A pepper id as shown (16 hex characters), e.g. in a setting.
impl std::str::FromStr for PepperId {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hex = s.len() == 16 && s.bytes().all(|b| b.is_ascii_hexdigit());
        hex.then(|| u64::from_str_radix(s, 16).ok())
            .flatten()
            .and_then(NonZeroU64::new)
            .map(Self)
            // Not repeated: a pepper pasted here by mistake is 64 hex characters.
            .ok_or_else(|| {
                format!(
                    "a value of {} characters is not a pepper id: 16 hex characters, as \
                     `vilvik-keys pepper status` shows them",
                    s.chars().count()
                )
            })
    }
}

impl fmt::Debug for PepperId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PepperId({self})")
    }
}

/// Why a pepper file's text is not a pepper. Carries no part of the text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PepperFormatError {
    #[error("a pepper is 64 hex characters (32 bytes) and nothing else; this holds {0} characters")]
    WrongLength(usize),
    #[error("a pepper holds only the hex characters 0-9 and a-f")]
    NotHex,
}

/// A pepper: 32 secret bytes, zeroed when dropped, whose `Debug` shows
/// only its id.
#[derive(Clone)]
pub struct Pepper {
    secret: Zeroizing<[u8; PEPPER_LEN]>,
    /// `derive_key(HASH_KEY_CONTEXT, secret)`, derived once: what key
    /// hashes are keyed with.
    hash_key: Zeroizing<[u8; PEPPER_LEN]>,
    id: PepperId,
}

impl Pepper {
    /// A new pepper from the operating system's CSPRNG.
    pub fn generate() -> Self {
        let mut secret = Zeroizing::new([0u8; PEPPER_LEN]);
        getrandom::fill(&mut secret[..])
            .expect("the operating system's random number generator failed");
        Self::from_secret(secret)
    }

    /// The pepper with these bytes.
    pub fn from_bytes(bytes: &[u8; PEPPER_LEN]) -> Self {
        Self::from_secret(Zeroizing::new(*bytes))
    }

    /// Parses a pepper file's text: 64 hex characters (either case),
    /// surrounding ASCII whitespace ignored.
    pub fn from_hex(text: &[u8]) -> Result<Self, PepperFormatError> {
        let text = text.trim_ascii();
        if text.len() != 2 * PEPPER_LEN {
            return Err(PepperFormatError::WrongLength(text.len()));
        }
        let mut secret = Zeroizing::new([0u8; PEPPER_LEN]);
        for (byte, pair) in secret.iter_mut().zip(text.chunks_exact(2)) {
            let (Some(high), Some(low)) = (hex_value(pair[0]), hex_value(pair[1])) else {
                return Err(PepperFormatError::NotHex);
            };
            *byte = high << 4 | low;
        }
        Ok(Self::from_secret(secret))
    }

    fn from_secret(secret: Zeroizing<[u8; PEPPER_LEN]>) -> Self {
        Self {
            hash_key: Zeroizing::new(blake3::derive_key(HASH_KEY_CONTEXT, &secret[..])),
            id: PepperId::of(&secret),
            secret,
        }
    }

    pub fn id(&self) -> PepperId {
        self.id
    }

    /// The pepper file's text: 64 lowercase hex characters and a newline.
    /// Call only to write a new pepper file.
    pub fn to_hex(&self) -> Zeroizing<String> {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut text = Zeroizing::new(String::with_capacity(2 * PEPPER_LEN + 1));
        for byte in self.secret.iter() {
            text.push(char::from(DIGITS[usize::from(byte >> 4)]));
            text.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
        }
        text.push('\n');
        text
    }

    /// What key hashes are keyed with.
    pub(crate) fn hash_key(&self) -> &[u8; PEPPER_LEN] {
        &self.hash_key
    }

    /// The pepper itself, as key material for other derivations (sealed
    /// responses, `request.rs`), each under its own context.
    pub(crate) fn secret(&self) -> &[u8; PEPPER_LEN] {
        &self.secret
    }
}

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

impl fmt::Debug for Pepper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pepper")
            .field("id", &self.id)
            .field("secret", &"[REDACTED]")
            .finish()
    }
}

/// A hash stored with a pepper id that is not configured: the key cannot
/// be checked (its pepper was retired, or the node lacks a file).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("pepper {0} is not configured")]
pub struct UnknownPepper(pub PepperId);

/// The same pepper given twice: once as the current one or an older one
/// (`first`), and again as an older one (`again`). Positions count the
/// current pepper as 0 and older ones from 1, in the order given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("pepper {id} is given twice (positions {first} and {again})")]
pub struct DuplicatePepper {
    pub id: PepperId,
    pub first: usize,
    pub again: usize,
}

/// The peppers a node is configured with: the current one, which new keys,
/// rotations and re-hashes use, and older ones whose keys still verify.
#[derive(Clone)]
pub struct Peppers {
    current: Pepper,
    older: Vec<Pepper>,
}

impl Peppers {
    /// Refuses the same pepper twice: it would make one of the two
    /// settings meaningless, and is most likely a copy-and-paste mistake.
    pub fn new(current: Pepper, older: Vec<Pepper>) -> Result<Self, DuplicatePepper> {
        let all: Vec<PepperId> = std::iter::once(current.id())
            .chain(older.iter().map(Pepper::id))
            .collect();
        for (again, id) in all.iter().enumerate().skip(1) {
            if let Some(first) = all[..again].iter().position(|seen| seen == id) {
                return Err(DuplicatePepper {
                    id: *id,
                    first,
                    again,
                });
            }
        }
        Ok(Self { current, older })
    }

    /// Just one pepper, the current one.
    pub fn only(current: Pepper) -> Self {
        Self {
            current,
            older: Vec::new(),
        }
    }

    pub fn current(&self) -> &Pepper {
        &self.current
    }

    pub fn older(&self) -> &[Pepper] {
        &self.older
    }

    /// The pepper a hash stored with `stored` was keyed with: `Ok(None)`
    /// for a legacy unkeyed hash (no pepper id), or the configured pepper
    /// with that id. The current pepper is tried first.
    pub fn resolve(&self, stored: Option<PepperId>) -> Result<Option<&Pepper>, UnknownPepper> {
        let Some(id) = stored else {
            return Ok(None);
        };
        if id == self.current.id {
            return Ok(Some(&self.current));
        }
        self.older
            .iter()
            .find(|p| p.id == id)
            .map(Some)
            .ok_or(UnknownPepper(id))
    }

    /// Whether a hash stored with `stored` is keyed with the current pepper
    /// (otherwise, once it matched, it is re-hashed with it).
    pub fn is_current(&self, stored: Option<PepperId>) -> bool {
        stored == Some(self.current.id)
    }
}

impl fmt::Debug for Peppers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Peppers")
            .field("current", &self.current.id)
            .field(
                "older",
                &self.older.iter().map(Pepper::id).collect::<Vec<_>>(),
            )
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    #[test]
    fn a_pepper_id_reads_back_from_its_display_and_nothing_else_parses() {
        let id = Pepper::generate().id();
        assert_eq!(PepperId::from_str(&id.to_string()), Ok(id));
        let hex = Pepper::generate().to_hex();
        for bad in [
            "",
            "0000000000000000",
            "12345",
            "zzzzzzzzzzzzzzzz",
            hex.trim(),
        ] {
            let err = PepperId::from_str(bad).unwrap_err();
            assert!(err.contains("not a pepper id"), "{err}");
            assert!(
                bad.is_empty() || !err.contains(bad),
                "never repeated: {err}"
            );
        }
    }
    use super::*;

    const HEX: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

    #[test]
    fn a_pepper_file_is_64_hex_characters_with_whitespace_around_ignored() {
        let pepper = Pepper::from_hex(format!("  {HEX}\n\n").as_bytes()).unwrap();
        assert_eq!(pepper.to_hex().as_str(), format!("{HEX}\n"));
        let upper = Pepper::from_hex(HEX.to_ascii_uppercase().as_bytes()).unwrap();
        assert_eq!(upper.id(), pepper.id());
        assert_eq!(
            Pepper::from_hex(&HEX.as_bytes()[..63]).unwrap_err(),
            PepperFormatError::WrongLength(63)
        );
        assert_eq!(
            Pepper::from_hex(format!("{HEX}00").as_bytes()).unwrap_err(),
            PepperFormatError::WrongLength(66)
        );
        assert_eq!(
            Pepper::from_hex(b"").unwrap_err(),
            PepperFormatError::WrongLength(0)
        );
        let not_hex = format!("g{}", &HEX[1..]);
        assert_eq!(
            Pepper::from_hex(not_hex.as_bytes()).unwrap_err(),
            PepperFormatError::NotHex
        );
        let inner_space = format!("{} {}", &HEX[..31], &HEX[32..]);
        assert!(Pepper::from_hex(inner_space.as_bytes()).is_err());
    }

    #[test]
    fn the_id_is_fixed_by_the_pepper_alone() {
        // The stored format: changing the derivation orphans every stored id.
        let pepper = Pepper::from_hex(HEX.as_bytes()).unwrap();
        let derived = blake3::derive_key(ID_CONTEXT, pepper.secret.as_ref());
        let expected = u64::from_be_bytes(derived[..8].try_into().unwrap());
        assert_eq!(pepper.id().to_stored() as u64, expected);
        assert_eq!(pepper.id().to_string(), format!("{expected:016x}"));
        assert_eq!(pepper.id().to_string().len(), 16);
        assert_eq!(
            Pepper::from_hex(HEX.as_bytes()).unwrap().id(),
            pepper.id(),
            "two nodes with the same file agree"
        );
        assert_ne!(Pepper::generate().id(), pepper.id());
    }

    #[test]
    fn ids_round_trip_through_their_stored_form() {
        for _ in 0..100 {
            let id = Pepper::generate().id();
            assert_eq!(PepperId::from_stored(id.to_stored()), Some(id));
        }
        assert_eq!(PepperId::from_stored(0), None);
        let high = PepperId::from_stored(-1).unwrap();
        assert_eq!(high.to_string(), "ffffffffffffffff");
    }

    #[test]
    fn debug_shows_the_id_and_never_the_bytes() {
        let pepper = Pepper::from_hex(HEX.as_bytes()).unwrap();
        let peppers = Peppers::only(pepper.clone());
        for shown in [format!("{pepper:?}"), format!("{peppers:?}")] {
            assert!(shown.contains(&pepper.id().to_string()), "{shown}");
            assert!(!shown.contains("0a0b0c"), "{shown}");
            assert!(!shown.contains("10, 11, 12"), "{shown}");
        }
    }

    #[test]
    fn peppers_resolve_current_older_legacy_and_unknown() {
        let (a, b, c) = (Pepper::generate(), Pepper::generate(), Pepper::generate());
        let peppers = Peppers::new(b.clone(), vec![a.clone()]).unwrap();
        assert_eq!(peppers.resolve(Some(b.id())).unwrap().unwrap().id(), b.id());
        assert_eq!(peppers.resolve(Some(a.id())).unwrap().unwrap().id(), a.id());
        assert!(peppers.resolve(None).unwrap().is_none());
        assert_eq!(
            peppers.resolve(Some(c.id())).unwrap_err(),
            UnknownPepper(c.id())
        );
        assert!(peppers.is_current(Some(b.id())));
        assert!(!peppers.is_current(Some(a.id())));
        assert!(!peppers.is_current(None));
    }

    #[test]
    fn the_same_pepper_twice_is_refused() {
        let (a, b) = (Pepper::generate(), Pepper::generate());
        let err = Peppers::new(a.clone(), vec![b.clone(), a.clone()]).unwrap_err();
        assert_eq!(
            err,
            DuplicatePepper {
                id: a.id(),
                first: 0,
                again: 2
            }
        );
        let err = Peppers::new(a.clone(), vec![b.clone(), b.clone()]).unwrap_err();
        assert_eq!((err.first, err.again), (1, 2));
        assert!(Peppers::new(a, vec![b]).is_ok());
    }
}
