//! Counters and a fault→resolved latency histogram, cheap enough for the fault path
//! (relaxed atomics, no locks).

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

const BUCKETS: usize = 48;

/// A log2-bucketed latency histogram in nanoseconds (bucket `b` holds `[2^b, 2^(b+1))`).
#[derive(Debug)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS],
    count: AtomicU64,
    sum_ns: AtomicU64,
    max_ns: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            count: AtomicU64::new(0),
            sum_ns: AtomicU64::new(0),
            max_ns: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    /// Records one sample.
    pub fn record(&self, d: Duration) {
        self.record_n(d, 1);
    }

    /// Records `n` samples of the same value (a batch resolved together).
    pub fn record_n(&self, d: Duration, n: u64) {
        if n == 0 {
            return;
        }
        let ns = d.as_nanos().min(u64::MAX as u128) as u64;
        let b = (63 - ns.max(1).leading_zeros() as usize).min(BUCKETS - 1);
        self.buckets[b].fetch_add(n, Relaxed);
        self.count.fetch_add(n, Relaxed);
        self.sum_ns.fetch_add(ns.saturating_mul(n), Relaxed);
        self.max_ns.fetch_max(ns, Relaxed);
    }

    /// Number of samples.
    pub fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }

    /// Upper bound of the bucket holding quantile `q` (0..=1), or zero with no samples.
    pub fn quantile(&self, q: f64) -> Duration {
        let n = self.count();
        if n == 0 {
            return Duration::ZERO;
        }
        let target = ((n as f64) * q.clamp(0.0, 1.0)).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (b, c) in self.buckets.iter().enumerate() {
            seen += c.load(Relaxed);
            if seen >= target {
                let upper = 1u64.checked_shl(b as u32 + 1).unwrap_or(u64::MAX);
                return Duration::from_nanos(upper.min(self.max_ns.load(Relaxed)));
            }
        }
        Duration::from_nanos(self.max_ns.load(Relaxed))
    }

    /// Mean of the samples.
    pub fn mean(&self) -> Duration {
        Duration::from_nanos(
            self.sum_ns
                .load(Relaxed)
                .checked_div(self.count())
                .unwrap_or(0),
        )
    }

    /// Largest sample.
    pub fn max(&self) -> Duration {
        Duration::from_nanos(self.max_ns.load(Relaxed))
    }
}

/// Runtime counters. All fields are monotonic.
#[derive(Debug, Default)]
pub struct Stats {
    /// Fault notifications received (exits, records, uffd messages).
    pub faults: AtomicU64,
    /// Faults on a page another filler was already filling.
    pub duplicate_faults: AtomicU64,
    /// Faults on a page already present (resolved before the fault was seen).
    pub already_present: AtomicU64,
    /// Pages filled because something faulted on them.
    pub demand_pages: AtomicU64,
    /// Pages filled by background prefetch.
    pub prefetched_pages: AtomicU64,
    /// Kernel calls that made pages visible (clear/resolve/COPY/CONTINUE), after coalescing.
    pub install_calls: AtomicU64,
    /// Fault → page visible latency of demand pages.
    pub latency: Histogram,
}

impl Stats {
    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    /// A one-paragraph summary.
    pub fn summary(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let l = &self.latency;
        write!(
            f,
            "faults {} (duplicates {}, already present {}), pages demand {} prefetch {}, \
             install calls {}; fault->resolved latency n={} mean {:?} p50 {:?} p99 {:?} max {:?}",
            self.faults.load(Relaxed),
            self.duplicate_faults.load(Relaxed),
            self.already_present.load(Relaxed),
            self.demand_pages.load(Relaxed),
            self.prefetched_pages.load(Relaxed),
            self.install_calls.load(Relaxed),
            l.count(),
            l.mean(),
            l.quantile(0.5),
            l.quantile(0.99),
            l.max()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_quantiles_bracket_samples() {
        let h = Histogram::default();
        assert_eq!(h.quantile(0.5), Duration::ZERO);
        for _ in 0..99 {
            h.record(Duration::from_nanos(1000));
        }
        h.record(Duration::from_millis(5));
        assert_eq!(h.count(), 100);
        let p50 = h.quantile(0.5);
        assert!(p50 >= Duration::from_nanos(1000) && p50 <= Duration::from_nanos(2048));
        assert_eq!(h.quantile(1.0), Duration::from_millis(5));
        assert_eq!(h.max(), Duration::from_millis(5));
        assert!(h.mean() > Duration::from_nanos(1000));
    }
}
