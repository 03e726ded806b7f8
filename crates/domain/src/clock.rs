//! Time as a dependency, so that expiry logic can be tested without
//! sleeping, and the one way a point in time is written for people.

use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// `at` in RFC 3339, as every message, audit change and CLI line writes it.
pub fn format_time(at: OffsetDateTime) -> String {
    at.format(&Rfc3339).unwrap_or_else(|_| at.to_string())
}

/// Where "now" comes from.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// The time of day, as the wall clock says: what is stored and shown.
    fn now(&self) -> OffsetDateTime;

    /// How long this clock has run: a reading that never goes back and
    /// does not follow the wall clock's jumps, for measuring intervals
    /// (rate limits).
    fn elapsed(&self) -> Duration;
}

/// The wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }

    /// Since this process first asked.
    fn elapsed(&self) -> Duration {
        static START: OnceLock<Instant> = OnceLock::new();
        START.get_or_init(Instant::now).elapsed()
    }
}

/// A clock that only moves when told to; for tests.
#[derive(Debug)]
pub struct ManualClock {
    start: OffsetDateTime,
    now: Mutex<OffsetDateTime>,
}

impl ManualClock {
    pub fn new(start: OffsetDateTime) -> Self {
        Self {
            start,
            now: Mutex::new(start),
        }
    }

    pub fn advance(&self, by: time::Duration) {
        *self.now.lock().unwrap() += by;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> OffsetDateTime {
        *self.now.lock().unwrap()
    }

    /// How far it was advanced since it was made (none while it stands
    /// before its start).
    fn elapsed(&self) -> Duration {
        (self.now() - self.start).try_into().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_has_run_as_far_as_it_was_advanced_and_never_less_than_nothing() {
        let clock = ManualClock::new(OffsetDateTime::UNIX_EPOCH + time::Duration::days(1));
        assert_eq!(clock.elapsed(), Duration::ZERO);
        clock.advance(time::Duration::milliseconds(1_500));
        assert_eq!(clock.elapsed(), Duration::from_millis(1_500));
        clock.advance(time::Duration::seconds(-10));
        assert_eq!(clock.elapsed(), Duration::ZERO);
    }

    #[test]
    fn the_system_clock_never_runs_back() {
        let first = SystemClock.elapsed();
        assert!(SystemClock.elapsed() >= first);
    }
}
