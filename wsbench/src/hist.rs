//! Latency histograms (HDR, microseconds) and their percentile summaries.

use std::sync::{Arc, Mutex};

use hdrhistogram::Histogram;
use serde_json::{json, Value};

/// Largest value kept exactly (an hour, in µs); larger ones are clamped.
const MAX_US: u64 = 3_600_000_000;

/// An HDR histogram of microseconds with 3 significant digits.
#[derive(Clone)]
pub struct Hist(Histogram<u64>);

impl Default for Hist {
    fn default() -> Self {
        Hist(Histogram::new_with_bounds(1, MAX_US, 3).expect("valid histogram bounds"))
    }
}

impl Hist {
    pub fn record(&mut self, us: u64) {
        self.0.saturating_record(us.clamp(1, MAX_US));
    }

    pub fn merge(&mut self, other: &Hist) {
        // Same bounds on both sides: cannot fail.
        let _ = self.0.add(&other.0);
    }

    pub fn summary(&self) -> Summary {
        let h = &self.0;
        if h.is_empty() {
            return Summary::default();
        }
        Summary {
            count: h.len(),
            min: h.min(),
            mean: h.mean(),
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }
}

/// Percentiles of a histogram, in microseconds.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Summary {
    pub count: u64,
    pub min: u64,
    pub mean: f64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

impl Summary {
    /// The summary in milliseconds (3 decimals: µs resolution).
    pub fn to_json_ms(self) -> Value {
        json!({
            "count": self.count,
            "min": ms(self.min),
            "mean": (self.mean).round() / 1000.0,
            "p50": ms(self.p50),
            "p90": ms(self.p90),
            "p99": ms(self.p99),
            "p99.9": ms(self.p999),
            "max": ms(self.max),
        })
    }
}

/// A histogram shared by many tasks. Tasks record into a [`Batch`] that
/// takes the lock once per few hundred samples.
#[derive(Default)]
pub struct SharedHist(Mutex<Hist>);

impl SharedHist {
    pub fn snapshot(&self) -> Hist {
        self.0.lock().expect("histogram lock").clone()
    }
}

/// A task-local buffer of samples in front of a [`SharedHist`].
pub struct Batch {
    buf: Vec<u64>,
    shared: Arc<SharedHist>,
}

const BATCH: usize = 256;

impl Batch {
    pub fn new(shared: Arc<SharedHist>) -> Self {
        Batch {
            buf: Vec::new(),
            shared,
        }
    }

    pub fn record(&mut self, us: u64) {
        if self.buf.capacity() == 0 {
            self.buf.reserve_exact(BATCH);
        }
        self.buf.push(us);
        if self.buf.len() >= BATCH {
            self.flush();
        }
    }

    pub fn flush(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let mut h = self.shared.0.lock().expect("histogram lock");
        for &us in &self.buf {
            h.record(us);
        }
        self.buf.clear();
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        self.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_uniform_range() {
        let mut h = Hist::default();
        for us in 1..=1000 {
            h.record(us);
        }
        let s = h.summary();
        assert_eq!(s.count, 1000);
        assert_eq!(
            (s.min, s.p50, s.p90, s.p99, s.p999, s.max),
            (1, 500, 900, 990, 999, 1000)
        );
        let j = s.to_json_ms();
        assert_eq!(j["p50"], 0.5);
        assert_eq!(j["p99.9"], 0.999);
        assert_eq!(j["max"], 1.0);
    }

    #[test]
    fn large_values_keep_three_digits() {
        let mut h = Hist::default();
        h.record(123_456);
        let s = h.summary();
        assert!((s.p50 as f64 - 123_456.0).abs() / 123_456.0 < 0.001);
        assert_eq!(Hist::default().summary(), Summary::default());
    }

    #[test]
    fn batches_reach_the_shared_histogram() {
        let shared = Arc::new(SharedHist::default());
        {
            let mut b = Batch::new(shared.clone());
            for us in 0..300 {
                b.record(us + 1);
            }
            assert_eq!(shared.snapshot().summary().count, 256);
        }
        assert_eq!(shared.snapshot().summary().count, 300);
        let mut merged = shared.snapshot();
        merged.merge(&shared.snapshot());
        assert_eq!(merged.summary().count, 600);
    }
}
