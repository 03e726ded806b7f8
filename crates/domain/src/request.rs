//! Request ids: what makes a retried CreateKey or RotateKey safe.
//!
//! A client names each create or rotation with a [`RequestId`] of its own
//! choosing (a random UUID). The store keeps, for a day, the change that id
//! made and the secret it handed out, so that a retry whose first answer
//! was lost gets the same key and the same secret instead of a second one.
//! Neither the id nor the secret is kept in clear:
//!
//! - the id is kept as its [`RequestId::digest`] (BLAKE3, under the
//!   account's id), which cannot be turned back into the id;
//! - the secret is [`seal_secret`]ed with ChaCha20-Poly1305 under a key derived
//!   by HKDF-SHA256 from the pepper *and* the request id (and a random
//!   salt), so a copy of the database cannot open it, nor can the pepper
//!   alone: only a caller who presents the id again, to a node holding the
//!   pepper, gets the secret back.
//!
//! A request id is therefore key material for a day: it is never logged,
//! and its `Debug` shows nothing of it.

use std::fmt;
use std::str::FromStr;

use ring::{aead, hkdf};
use zeroize::Zeroizing;

use crate::{AccountId, Pepper};

/// How long a request id is remembered: a retry within this window
/// returns the first call's answer, a later one is a new request.
pub const REQUEST_ID_WINDOW: time::Duration = time::Duration::hours(24);

/// BLAKE3 `derive_key` context of a request id's digest.
/// NEVER CHANGE THIS: retries would stop finding the calls they repeat.
const DIGEST_CONTEXT: &str = "vilvik-keys 2026-12-04 request id digest v1";

/// HKDF `info` prefix of the key a sealed secret is sealed with.
/// NEVER CHANGE THIS: sealed secrets kept for retries would not open.
const SEAL_CONTEXT: &[u8] = b"vilvik-keys 2026-12-04 sealed secret v1";

/// The first byte of every sealed secret: its format.
const SEAL_VERSION: u8 = 1;
/// Bytes of random HKDF salt stored with each sealed secret.
const SALT_LEN: usize = 16;

/// A client's id for one create or rotation: a UUID, kept in its
/// lowercase hyphenated form.
#[derive(Clone, PartialEq, Eq)]
pub struct RequestId(String);

/// Why a request id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "'{0}' is not a UUID: send a new random UUID (such as \
     3f0e6a8c-1d2b-4c5e-9f70-0123456789ab) for each create or rotation, and the same one when you retry it"
)]
pub struct RequestIdError(String);

impl RequestId {
    /// A new random (version 4) UUID, from the operating system's CSPRNG.
    pub fn generate() -> Self {
        let mut bytes = [0u8; 16];
        getrandom::fill(&mut bytes).expect("the operating system's random number generator failed");
        bytes[6] = (bytes[6] & 0x0f) | 0x40;
        bytes[8] = (bytes[8] & 0x3f) | 0x80;
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        Self(format!(
            "{}-{}-{}-{}-{}",
            &hex[..8],
            &hex[8..12],
            &hex[12..16],
            &hex[16..20],
            &hex[20..]
        ))
    }

    /// The id as the client should send it again.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// What the store keeps instead of the id: a BLAKE3 digest of the id
    /// under its account, so that two accounts' ids never meet.
    pub fn digest(&self, account: &AccountId) -> [u8; 32] {
        let mut hasher = blake3::Hasher::new_derive_key(DIGEST_CONTEXT);
        hasher.update(account.as_str().as_bytes());
        hasher.update(&[0]);
        hasher.update(self.0.as_bytes());
        *hasher.finalize().as_bytes()
    }
}

impl FromStr for RequestId {
    type Err = RequestIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = s.as_bytes();
        let well_formed = bytes.len() == 36
            && bytes.iter().enumerate().all(|(i, b)| match i {
                8 | 13 | 18 | 23 => *b == b'-',
                _ => b.is_ascii_hexdigit(),
            });
        if well_formed {
            Ok(Self(s.to_ascii_lowercase()))
        } else {
            Err(RequestIdError(crate::excerpt(s).to_string()))
        }
    }
}

impl fmt::Debug for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RequestId([REDACTED])")
    }
}

/// A sealed secret that did not open: it was sealed for another request
/// id, account or context, under another pepper, or it was damaged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the sealed secret does not open with this request id and pepper")]
pub struct SealError;

/// The key `secret`s of `id` are sealed with, derived from the pepper, the
/// account, the id and `salt`.
fn sealing_key(
    pepper: &Pepper,
    account: &AccountId,
    id: &RequestId,
    salt: &[u8],
) -> aead::LessSafeKey {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, salt).extract(pepper.secret());
    let info = [
        SEAL_CONTEXT,
        account.as_str().as_bytes(),
        &[0],
        id.as_str().as_bytes(),
    ];
    let okm = prk
        .expand(&info, &aead::CHACHA20_POLY1305)
        .expect("a ChaCha20-Poly1305 key is a valid HKDF-SHA256 output length");
    aead::LessSafeKey::new(aead::UnboundKey::from(okm))
}

/// Seals `secret` for `id`: the result is safe to store, and only
/// [`open_sealed_secret`] with the same pepper, account, id and `context` (what the
/// secret belongs to, e.g. the method and key id) gives it back.
pub fn seal_secret(
    pepper: &Pepper,
    account: &AccountId,
    id: &RequestId,
    context: &[u8],
    secret: &str,
) -> Vec<u8> {
    let mut salt = [0u8; SALT_LEN];
    getrandom::fill(&mut salt).expect("the operating system's random number generator failed");
    let key = sealing_key(pepper, account, id, &salt);
    let mut sealed = Vec::with_capacity(1 + SALT_LEN + secret.len() + aead::MAX_TAG_LEN);
    sealed.push(SEAL_VERSION);
    sealed.extend_from_slice(&salt);
    let mut body = secret.as_bytes().to_vec();
    // Each salt gives a key of its own that seals this one message, so a
    // fixed nonce is never reused under a key.
    key.seal_in_place_append_tag(
        aead::Nonce::assume_unique_for_key([0; aead::NONCE_LEN]),
        aead::Aad::from(context),
        &mut body,
    )
    .expect("a secret fits in one ChaCha20-Poly1305 message");
    sealed.extend_from_slice(&body);
    sealed
}

/// Opens what [`seal_secret`] sealed.
pub fn open_sealed_secret(
    pepper: &Pepper,
    account: &AccountId,
    id: &RequestId,
    context: &[u8],
    sealed: &[u8],
) -> Result<Zeroizing<String>, SealError> {
    let [SEAL_VERSION, rest @ ..] = sealed else {
        return Err(SealError);
    };
    if rest.len() < SALT_LEN + aead::MAX_TAG_LEN {
        return Err(SealError);
    }
    let (salt, body) = rest.split_at(SALT_LEN);
    let key = sealing_key(pepper, account, id, salt);
    let mut buffer = Zeroizing::new(body.to_vec());
    let plain = key
        .open_in_place(
            aead::Nonce::assume_unique_for_key([0; aead::NONCE_LEN]),
            aead::Aad::from(context),
            &mut buffer,
        )
        .map_err(|_| SealError)?;
    let text = std::str::from_utf8(plain).map_err(|_| SealError)?;
    Ok(Zeroizing::new(text.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn account(name: &str) -> AccountId {
        AccountId::from_caller(name).unwrap()
    }

    #[test]
    fn request_ids_are_uuids_in_lowercase() {
        let id: RequestId = "3F0E6A8C-1D2B-4C5E-9F70-0123456789AB".parse().unwrap();
        assert_eq!(id.as_str(), "3f0e6a8c-1d2b-4c5e-9f70-0123456789ab");
        for bad in [
            "",
            "retry-1",
            "3f0e6a8c1d2b4c5e9f700123456789ab",
            "3f0e6a8c-1d2b-4c5e-9f70-0123456789abc",
            "3f0e6a8c-1d2b-4c5e-9f70_0123456789ab",
            "gf0e6a8c-1d2b-4c5e-9f70-0123456789ab",
        ] {
            assert!(bad.parse::<RequestId>().is_err(), "{bad:?} was accepted");
        }
        let generated = RequestId::generate();
        assert_eq!(
            generated.as_str().parse::<RequestId>(),
            Ok(generated.clone())
        );
        assert_ne!(generated, RequestId::generate());
        assert_eq!(format!("{generated:?}"), "RequestId([REDACTED])");
    }

    #[test]
    fn a_digest_belongs_to_one_account_and_one_id() {
        let id = RequestId::generate();
        assert_eq!(id.digest(&account("ACME")), id.digest(&account("ACME")));
        assert_ne!(id.digest(&account("ACME")), id.digest(&account("OTHER")));
        assert_ne!(
            id.digest(&account("ACME")),
            RequestId::generate().digest(&account("ACME"))
        );
    }

    #[test]
    fn a_sealed_secret_opens_only_with_its_pepper_account_id_and_context() {
        let (pepper, acme, id) = (Pepper::generate(), account("ACME"), RequestId::generate());
        let secret = "vlk_0123456789abcdefghijklmnopqrstuvwxyzABCDEFGH";
        let sealed = seal_secret(&pepper, &acme, &id, b"create k1", secret);
        assert!(!sealed.windows(secret.len()).any(|w| w == secret.as_bytes()));
        assert_eq!(
            open_sealed_secret(&pepper, &acme, &id, b"create k1", &sealed)
                .unwrap()
                .as_str(),
            secret
        );

        assert_eq!(
            open_sealed_secret(&Pepper::generate(), &acme, &id, b"create k1", &sealed),
            Err(SealError)
        );
        assert_eq!(
            open_sealed_secret(&pepper, &account("OTHER"), &id, b"create k1", &sealed),
            Err(SealError)
        );
        assert_eq!(
            open_sealed_secret(
                &pepper,
                &acme,
                &RequestId::generate(),
                b"create k1",
                &sealed
            ),
            Err(SealError)
        );
        assert_eq!(
            open_sealed_secret(&pepper, &acme, &id, b"rotate k1", &sealed),
            Err(SealError)
        );
        let mut damaged = sealed.clone();
        *damaged.last_mut().unwrap() ^= 1;
        assert_eq!(
            open_sealed_secret(&pepper, &acme, &id, b"create k1", &damaged),
            Err(SealError)
        );
        assert_eq!(
            open_sealed_secret(&pepper, &acme, &id, b"create k1", &sealed[..20]),
            Err(SealError)
        );
        // Two seals of one secret differ (a fresh salt each time).
        assert_ne!(
            seal_secret(&pepper, &acme, &id, b"create k1", secret),
            sealed
        );
    }
}
