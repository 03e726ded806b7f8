//! Latency percentiles from raw samples (sorted; no histogram needed at
//! these sample counts).

use std::time::Duration;

/// Percentiles of a set of latencies, in microseconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct Summary {
    pub count: usize,
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
}

impl Summary {
    pub fn of(mut samples_us: Vec<u64>) -> Self {
        samples_us.sort_unstable();
        Self {
            count: samples_us.len(),
            p50_us: percentile(&samples_us, 0.50),
            p99_us: percentile(&samples_us, 0.99),
            max_us: samples_us.last().copied().unwrap_or(0),
        }
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "count": self.count,
            "p50_ms": ms(self.p50_us),
            "p99_ms": ms(self.p99_us),
            "max_ms": ms(self.max_us),
        })
    }
}

/// The nearest-rank percentile of sorted samples; 0 when there are none.
pub fn percentile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub fn micros(d: Duration) -> u64 {
    d.as_micros().min(u128::from(u64::MAX)) as u64
}

/// Microseconds as milliseconds with three decimals.
pub fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let s = Summary::of((1..=100).rev().collect());
        assert_eq!((s.count, s.p50_us, s.p99_us, s.max_us), (100, 50, 99, 100));
        assert_eq!(Summary::of(vec![7]).p99_us, 7);
        assert_eq!(Summary::of(vec![]).p50_us, 0);
    }
}
