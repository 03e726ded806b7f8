//! Base62 helpers shared by key and id generation.

pub(crate) const ALPHABET: &[u8; 62] =
    b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Each byte's base62 value, or [`NOT_BASE62`]: one table lookup per byte
/// validates and decodes, as this runs on every verify.
static VALUE: [u8; 256] = {
    let mut table = [NOT_BASE62; 256];
    let mut i = 0;
    while i < ALPHABET.len() {
        table[ALPHABET[i] as usize] = i as u8;
        i += 1;
    }
    table
};
const NOT_BASE62: u8 = u8::MAX;

/// Whether every byte is a base62 character.
pub(crate) fn all_base62(bytes: &[u8]) -> bool {
    bytes.iter().all(|&b| VALUE[usize::from(b)] != NOT_BASE62)
}

/// `len` uniformly random base62 characters from the operating system's CSPRNG.
pub(crate) fn random(len: usize) -> String {
    let mut out = vec![0u8; len];
    fill_random(&mut out);
    String::from_utf8(out).expect("base62 characters are ASCII")
}

/// Fills `out` with uniformly random base62 characters from the operating
/// system's CSPRNG. The random bytes drawn are zeroed afterwards: they are
/// a key's secret when `out` is one.
///
/// Rejection sampling keeps the distribution uniform: bytes >= 248 (4 * 62)
/// are drawn again instead of being folded onto the first characters.
pub(crate) fn fill_random(out: &mut [u8]) {
    let mut buf = zeroize::Zeroizing::new([0u8; 64]);
    let mut filled = 0;
    while filled < out.len() {
        getrandom::fill(&mut buf[..])
            .expect("the operating system's random number generator failed");
        for &byte in buf.iter() {
            if filled == out.len() {
                break;
            }
            if byte < 248 {
                out[filled] = ALPHABET[usize::from(byte % 62)];
                filled += 1;
            }
        }
    }
}

/// The value of validated base62 digits, most significant first (at most
/// 10 digits fit a `u64`; anything not base62 counts as 0).
pub(crate) fn decode(digits: &[u8]) -> u64 {
    digits.iter().fold(0u64, |acc, &b| {
        let value = match VALUE[usize::from(b)] {
            NOT_BASE62 => 0,
            value => value,
        };
        acc * 62 + u64::from(value)
    })
}

/// Fixed-width base62 of a 32-bit value, most significant digit first,
/// written into `out` (as many digits as it is long).
pub(crate) fn encode_u32_into(mut value: u32, out: &mut [u8]) {
    for slot in out.iter_mut().rev() {
        *slot = ALPHABET[(value % 62) as usize];
        value /= 62;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_accepts_exactly_ascii_letters_and_digits() {
        for byte in 0..=u8::MAX {
            assert_eq!(
                all_base62(&[byte]),
                byte.is_ascii_alphanumeric(),
                "byte {byte}"
            );
        }
    }

    #[test]
    fn decode_reads_digits_most_significant_first() {
        assert_eq!(decode(b"0"), 0);
        assert_eq!(decode(b"z"), 61);
        assert_eq!(decode(b"10"), 62);
        assert_eq!(decode(b"zz"), 62 * 62 - 1);
        for value in [0, 1, 61, 62, 3_843, 1_000_000, u32::MAX] {
            let mut digits = [0u8; 6];
            encode_u32_into(value, &mut digits);
            assert_eq!(decode(&digits), u64::from(value));
        }
    }
}
