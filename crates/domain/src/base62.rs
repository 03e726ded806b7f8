//! Base62 helpers shared by key and id generation.

pub(crate) const ALPHABET: &[u8; 62] =
    b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

pub(crate) fn is_base62(byte: u8) -> bool {
    byte.is_ascii_alphanumeric()
}

/// Whether every byte is a base62 character; a table lookup per byte, as
/// this runs on every verify.
pub(crate) fn all_base62(bytes: &[u8]) -> bool {
    static IS_BASE62: [bool; 256] = {
        let mut table = [false; 256];
        let mut i = 0;
        while i < 256 {
            table[i] = (i as u8).is_ascii_alphanumeric();
            i += 1;
        }
        table
    };
    bytes.iter().all(|&b| IS_BASE62[usize::from(b)])
}

/// The value of one base62 character (0 for anything else; callers pass
/// only validated characters).
pub(crate) fn digit(byte: u8) -> u8 {
    match byte {
        b'0'..=b'9' => byte - b'0',
        b'A'..=b'Z' => byte - b'A' + 10,
        b'a'..=b'z' => byte - b'a' + 36,
        _ => 0,
    }
}

/// `len` uniformly random base62 characters from the operating system's CSPRNG.
///
/// Rejection sampling keeps the distribution uniform: bytes >= 248 (4 * 62)
/// are drawn again instead of being folded onto the first characters.
pub(crate) fn random(len: usize) -> String {
    let mut out = String::with_capacity(len);
    let mut buf = [0u8; 64];
    while out.len() < len {
        getrandom::fill(&mut buf).expect("the operating system's random number generator failed");
        for &byte in &buf {
            if out.len() == len {
                break;
            }
            if byte < 248 {
                out.push(ALPHABET[(byte % 62) as usize] as char);
            }
        }
    }
    out
}

/// The value of validated base62 digits, most significant first (at most
/// 10 digits fit a `u64`).
pub(crate) fn decode(digits: &str) -> u64 {
    digits
        .bytes()
        .fold(0u64, |acc, b| acc * 62 + u64::from(digit(b)))
}

/// Fixed-width base62 of a 32-bit value, most significant digit first.
pub(crate) fn encode_u32(mut value: u32, width: usize) -> String {
    let mut digits = vec![b'0'; width];
    for slot in digits.iter_mut().rev() {
        *slot = ALPHABET[(value % 62) as usize];
        value /= 62;
    }
    String::from_utf8(digits).expect("base62 digits are ASCII")
}
