//! What a storm's journals add up to: per method, calls by their first
//! answer and how the ambiguous ones resolved, and every failed attempt by
//! what it was told.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::journal::{Answer, Journal, Method};

/// Per method: calls by their first answer, and how ambiguous ones resolved.
#[derive(Default)]
pub struct Figures {
    by_method: BTreeMap<Method, Counts>,
    /// Every attempt not answered OK, by what it was told (the status and
    /// the message up to its first ';').
    failed_attempts: BTreeMap<String, usize>,
}

#[derive(Default, Debug)]
struct Counts {
    acknowledged: usize,
    refused: usize,
    nothing_changed: usize,
    ambiguous: usize,
    had_committed: usize,
    had_not: usize,
    attempts: usize,
}

impl Figures {
    pub fn of(journals: &[Journal]) -> Figures {
        let mut figures = Figures::default();
        for call in journals.iter().flat_map(|j| &j.calls) {
            for attempt in call
                .attempts
                .iter()
                .filter(|a| a.answer != Answer::Acknowledged)
            {
                // Refusals name the key; their status says enough.
                let key = match attempt.answer {
                    Answer::Refused(code) => format!("Refused({code:?})"),
                    ref answer => {
                        let told = attempt.message.split(';').next().unwrap_or_default();
                        format!("{answer:?}: {told}")
                    }
                };
                *figures.failed_attempts.entry(key).or_default() += 1;
            }
            let counts = figures.by_method.entry(call.method).or_default();
            counts.attempts += call.attempts.len();
            match call.first_answer() {
                Answer::Acknowledged => counts.acknowledged += 1,
                Answer::Refused(_) => counts.refused += 1,
                Answer::NothingChanged => counts.nothing_changed += 1,
                Answer::Ambiguous(_) => {
                    counts.ambiguous += 1;
                    match call.committed_before_resolution {
                        Some(true) => counts.had_committed += 1,
                        Some(false) => counts.had_not += 1,
                        None => {}
                    }
                }
            }
        }
        figures
    }

    /// Calls whose first answer was ambiguous or "nothing was changed".
    pub fn caught_by_a_fault(&self) -> usize {
        self.by_method
            .values()
            .map(|c| c.ambiguous + c.nothing_changed)
            .sum()
    }

    pub fn table(&self) -> String {
        let mut out = String::from(
            "method  calls  acknowledged  refused  nothing-changed  ambiguous (had committed / had not)  attempts\n",
        );
        for (method, c) in &self.by_method {
            let calls = c.acknowledged + c.refused + c.nothing_changed + c.ambiguous;
            writeln!(
                out,
                "{:<7} {calls:>5}  {:>12}  {:>7}  {:>15}  {:>9} ({} / {})  {:>8}",
                format!("{method:?}"),
                c.acknowledged,
                c.refused,
                c.nothing_changed,
                c.ambiguous,
                c.had_committed,
                c.had_not,
                c.attempts
            )
            .unwrap();
        }
        out.push_str("attempts not answered OK:\n");
        for (told, count) in &self.failed_attempts {
            writeln!(out, "{count:>6}  {told}").unwrap();
        }
        out
    }
}
