//! Cumulative histograms as Prometheus exposes them: fixed bucket bounds, a count per bucket
//! and the sum, kept as plain integers (microseconds) so that the nginx shell can hold them in
//! shared-memory atomics and every worker adds to the same ones.
//!
//! A [`Histogram`] is the layout (its bounds); a recorded value adds one to the bucket
//! [`Histogram::bucket`] names and its microseconds to the sum. [`Histogram::write`] renders
//! a snapshot of those counters as `_bucket{le}` (cumulative), `_sum` and `_count`.

use crate::metrics::{Exposition, Kind};

/// The layout of one histogram: its bucket upper bounds, in microseconds, increasing. One
/// more bucket, `+Inf`, follows them.
#[derive(Clone, Copy, Debug)]
pub struct Histogram {
    pub bounds_us: &'static [u64],
}

/// Latency of calls between services: from a few milliseconds (a call in the same region
/// with a cached token) to a minute (a slow batch call, a cold start behind it). Prometheus'
/// default buckets, with 30 s and 60 s added for the slow ones.
pub const LATENCY: Histogram = Histogram {
    bounds_us: &[
        5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000, 5_000_000,
        10_000_000, 30_000_000, 60_000_000,
    ],
};

/// What one histogram holds at a scrape: a count per bucket (not cumulative; the last one is
/// `+Inf`) and the sum in microseconds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub buckets: Vec<u64>,
    pub sum_us: u64,
}

impl Histogram {
    /// Buckets in all, `+Inf` included: the counters one histogram needs besides its sum.
    pub const fn len(&self) -> usize {
        self.bounds_us.len() + 1
    }

    pub const fn is_empty(&self) -> bool {
        false
    }

    /// The bucket a value falls in: the first whose bound is at least `value_us`, else `+Inf`.
    pub fn bucket(&self, value_us: u64) -> usize {
        self.bounds_us.partition_point(|&b| b < value_us)
    }

    /// `NAME_bucket{labels,le}` (cumulative), `NAME_sum` (seconds) and `NAME_count`, after
    /// the family's `# HELP` and `# TYPE` lines once per family (`family`).
    pub fn family(e: &mut Exposition, name: &str, help: &str) {
        e.family(name, Kind::Histogram, help);
    }

    /// One labelled histogram of a family started with [`Histogram::family`].
    pub fn write(&self, e: &mut Exposition, name: &str, labels: &[(&str, &str)], c: &Counts) {
        let bucket = format!("{name}_bucket");
        let mut cumulative = 0u64;
        for i in 0..self.len() {
            cumulative += c.buckets.get(i).copied().unwrap_or(0);
            let le = match self.bounds_us.get(i) {
                Some(&us) => seconds(us),
                None => "+Inf".to_string(),
            };
            let mut with_le: Vec<(&str, &str)> = labels.to_vec();
            with_le.push(("le", &le));
            e.sample(&bucket, &with_le, cumulative);
        }
        e.sample(&format!("{name}_sum"), labels, c.sum_us as f64 / 1e6);
        e.sample(&format!("{name}_count"), labels, cumulative);
    }
}

/// Microseconds as seconds, the shortest exact decimal (`0.005`, `2.5`, `30`).
fn seconds(us: u64) -> String {
    let (whole, frac) = (us / 1_000_000, us % 1_000_000);
    if frac == 0 {
        return whole.to_string();
    }
    let digits = format!("{frac:06}");
    format!("{whole}.{}", digits.trim_end_matches('0'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_fall_in_the_first_bucket_that_holds_them() {
        let h = LATENCY;
        assert_eq!(h.len(), 14);
        assert_eq!(h.bucket(0), 0);
        assert_eq!(h.bucket(5_000), 0, "le is inclusive");
        assert_eq!(h.bucket(5_001), 1);
        assert_eq!(h.bucket(60_000_000), 12);
        assert_eq!(h.bucket(60_000_001), 13, "+Inf");
        assert_eq!(h.bucket(u64::MAX), 13);
    }

    #[test]
    fn bounds_increase() {
        assert!(LATENCY.bounds_us.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn renders_cumulative_buckets_sum_and_count() {
        let h = Histogram {
            bounds_us: &[5_000, 2_500_000],
        };
        let mut e = Exposition::new();
        Histogram::family(&mut e, "x_seconds", "Help.");
        let c = Counts {
            buckets: vec![2, 0, 1],
            sum_us: 3_010_000,
        };
        h.write(&mut e, "x_seconds", &[("route", "/a/")], &c);
        assert_eq!(
            e.finish(),
            "# HELP x_seconds Help.\n# TYPE x_seconds histogram\n\
             x_seconds_bucket{route=\"/a/\",le=\"0.005\"} 2\n\
             x_seconds_bucket{route=\"/a/\",le=\"2.5\"} 2\n\
             x_seconds_bucket{route=\"/a/\",le=\"+Inf\"} 3\n\
             x_seconds_sum{route=\"/a/\"} 3.01\n\
             x_seconds_count{route=\"/a/\"} 3\n"
        );
    }

    #[test]
    fn seconds_are_written_exactly() {
        assert_eq!(seconds(5_000), "0.005");
        assert_eq!(seconds(30_000_000), "30");
        assert_eq!(seconds(2_500_000), "2.5");
    }
}
