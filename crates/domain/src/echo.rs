//! What of a caller's input an error message may repeat back.
//!
//! Messages that quote the offending value are easier to act on, but a
//! message travels further than the request did: into the caller's logs,
//! error trackers and screenshots. So a value that could be a credential
//! (anything holding `vlk_`, or the operator token, or a long piece of
//! it) is never quoted, and anything else is cut to a short excerpt with
//! its control and direction-changing characters shown as `?`.

use std::sync::RwLock;

use secrecy::{ExposeSecret, SecretString};

/// Characters of a value an excerpt keeps.
const EXCERPT_CHARS: usize = 32;

/// A run this long of a never-echoed value counts as that value.
const SECRET_RUN: usize = 8;

/// Letters and digits in a row that look like a key's secret part.
const RANDOM_RUN: usize = 24;

/// Values no message may quote, such as the operator token; registered at
/// start by whoever holds them ([`never_echo`]).
static NEVER_ECHOED: RwLock<Vec<SecretString>> = RwLock::new(Vec::new());

/// Registers `secret` as a value no [`excerpt`] may quote, in whole or in
/// runs of 8 characters or more.
pub fn never_echo(secret: &SecretString) {
    let mut secrets = NEVER_ECHOED.write().unwrap_or_else(|e| e.into_inner());
    let known = secrets
        .iter()
        .any(|s| s.expose_secret() == secret.expose_secret());
    if !known {
        secrets.push(secret.clone());
    }
}

/// The part of `input` an error message may quote: nothing when it could
/// be a credential, else at most 32 characters, made printable.
pub fn excerpt(input: &str) -> String {
    if looks_like_a_credential(input) {
        return "[a value that looks like a credential, not repeated]".to_owned();
    }
    let mut excerpt: String = input
        .chars()
        .take(EXCERPT_CHARS)
        .map(|c| if unsafe_to_show(c) { '?' } else { c })
        .collect();
    if input.chars().nth(EXCERPT_CHARS).is_some() {
        excerpt.push('…');
    }
    excerpt
}

/// Whether `input` holds a key, something shaped like a key's secret
/// part, or a run of a never-echoed value.
pub fn looks_like_a_credential(input: &str) -> bool {
    let holds_a_key = input
        .as_bytes()
        .windows(crate::KEY_PREFIX.len())
        .any(|w| w.eq_ignore_ascii_case(crate::KEY_PREFIX.as_bytes()));
    holds_a_key || holds_random_looking_run(input) || holds_a_run_of_a_secret(input)
}

/// A key's secret part without its prefix: 24 or more letters and digits
/// in a row, mixing upper case, lower case and digits. (A key id's random
/// part has 20.)
fn holds_random_looking_run(input: &str) -> bool {
    input
        .split(|c: char| !c.is_ascii_alphanumeric())
        .any(|run| {
            run.len() >= RANDOM_RUN
                && run.bytes().any(|b| b.is_ascii_uppercase())
                && run.bytes().any(|b| b.is_ascii_lowercase())
                && run.bytes().any(|b| b.is_ascii_digit())
        })
}

fn holds_a_run_of_a_secret(input: &str) -> bool {
    let secrets = NEVER_ECHOED.read().unwrap_or_else(|e| e.into_inner());
    secrets.iter().any(|secret| {
        secret
            .expose_secret()
            .as_bytes()
            .windows(SECRET_RUN)
            .any(|run| input.as_bytes().windows(SECRET_RUN).any(|w| w == run))
    })
}

/// Control characters, and those that reorder or hide the text around
/// them (bidirectional overrides and isolates, zero-width characters).
fn unsafe_to_show(c: char) -> bool {
    c.is_control() || crate::fields::is_invisible(c) || crate::fields::is_bidi_control(c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::GeneratedKey;

    #[test]
    fn anything_holding_a_key_is_not_repeated() {
        let key = GeneratedKey::generate(&crate::Pepper::generate());
        let secret = key.expose_secret();
        for input in [
            secret.to_owned(),
            format!("Bearer {secret}"),
            secret.to_uppercase(),
            secret[..20].to_owned(),
            format!("VLK_{}", &secret[4..]),
            secret[13..].to_owned(),
        ] {
            let shown = excerpt(&input);
            assert!(!shown.contains(&secret[12..20]), "{shown}");
            assert!(shown.contains("not repeated"), "{shown}");
        }
    }

    #[test]
    fn the_operator_token_and_long_runs_of_it_are_not_repeated() {
        let token = "echo-test-token-0123456789-abcdefghijkl";
        never_echo(&SecretString::from(token));
        for input in [
            token.to_owned(),
            format!("prefix {token}"),
            token[5..20].to_owned(),
        ] {
            assert!(excerpt(&input).contains("not repeated"), "{input}");
        }
        // Shorter runs are not secret enough to hide.
        assert_eq!(excerpt("operator"), "operator");
    }

    #[test]
    fn other_input_is_cut_short_and_made_printable() {
        assert_eq!(excerpt("datasets:re*d"), "datasets:re*d");
        assert_eq!(
            excerpt("key_3kTMd8sQ0Lr6bA2xYv9Z"),
            "key_3kTMd8sQ0Lr6bA2xYv9Z"
        );
        assert_eq!(excerpt("a\u{1b}[2Jb\r\nc\u{202e}d"), "a?[2Jb??c?d");
        let long = "x".repeat(100);
        assert_eq!(excerpt(&long), format!("{}…", "x".repeat(32)));
        assert_eq!(excerpt(""), "");
    }
}
