//! Latency figures: the one percentile definition that `vgpu-admin status`,
//! the benchmarks and the demo share, and the bounded window of recent waits
//! a VM keeps for its p50/p99.

use std::collections::VecDeque;

/// Waits kept per VM for the p50/p99 of `status`.
pub const WAIT_SAMPLES: usize = 1024;

/// The `p`-th percentile (0..=100) of sorted samples, nearest rank below;
/// 0 when there are none.
pub fn percentile(sorted: &[u64], p: usize) -> u64 {
    match sorted.len() {
        0 => 0,
        n => sorted[(n - 1) * p.min(100) / 100],
    }
}

/// The last [`WAIT_SAMPLES`] waits, in nanoseconds.
#[derive(Debug, Default)]
pub struct WaitSamples(VecDeque<u64>);

impl WaitSamples {
    pub fn push(&mut self, ns: u64) {
        if self.0.len() == WAIT_SAMPLES {
            self.0.pop_front();
        }
        self.0.push_back(ns);
    }

    pub fn percentile(&self, p: usize) -> u64 {
        let mut v: Vec<u64> = self.0.iter().copied().collect();
        v.sort_unstable();
        percentile(&v, p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_window() {
        assert_eq!(percentile(&[], 50), 0);
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50), 50);
        assert_eq!(percentile(&v, 99), 99);
        assert_eq!(percentile(&v, 100), 100);
        assert_eq!(percentile(&v, 0), 1);
        let mut w = WaitSamples::default();
        for ns in 0..(WAIT_SAMPLES as u64 + 10) {
            w.push(ns);
        }
        // The oldest ten fell out of the window.
        assert_eq!(w.percentile(0), 10);
    }
}
