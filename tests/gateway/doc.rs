//! The configurations of `docs/INTEGRATIONS.md`, as the tests run them:
//! a code block between `<!-- test: NAME begins -->` and
//! `<!-- test: NAME ends -->`, with only its addresses replaced.

use std::path::Path;

/// The page the configurations are read from.
pub const PAGE: &str = "docs/INTEGRATIONS.md";

/// The code block of the page marked `name`, without its fences.
pub fn block(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(PAGE);
    let page = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let begins = format!("<!-- test: {name} begins -->");
    let ends = format!("<!-- test: {name} ends -->");
    let start = page
        .find(&begins)
        .unwrap_or_else(|| panic!("{PAGE} has no `{begins}` marker"))
        + begins.len();
    let len = page[start..]
        .find(&ends)
        .unwrap_or_else(|| panic!("{PAGE} has no `{ends}` marker after `{begins}`"));
    let marked = page[start..start + len].trim();
    let mut lines = marked.lines();
    let fence = lines.next().unwrap_or_default();
    assert!(
        fence.starts_with("```"),
        "the `{name}` block of {PAGE} must be one fenced code block, not {fence:?}"
    );
    let mut code: Vec<&str> = lines.collect();
    assert_eq!(
        code.pop(),
        Some("```"),
        "the `{name}` block of {PAGE} must end with its closing fence"
    );
    code.join("\n") + "\n"
}

/// `text` with every `from` replaced by `to`; panics unless `from` occurs,
/// so that the page and its test cannot drift apart unnoticed.
pub fn replace(text: &str, from: &str, to: &str) -> String {
    assert!(
        text.contains(from),
        "the block of {PAGE} under test no longer contains `{from}`: update the test with the page"
    );
    text.replace(from, to)
}
