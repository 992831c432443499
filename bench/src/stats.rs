//! Summary statistics over latency samples: nearest-rank percentiles and the mean.

use serde::{Deserialize, Serialize};

/// Percentiles of a set of durations, in microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Summary {
    pub samples: usize,
    pub min_us: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    pub mean_us: f64,
}

/// Nearest-rank percentile of an ascending slice (`p` in 0..=100).
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Summarises nanosecond samples.
pub fn summarize(ns: &[u64]) -> Summary {
    let mut v = ns.to_vec();
    v.sort_unstable();
    let us = |x: u64| x as f64 / 1e3;
    let mean = if v.is_empty() { 0.0 } else { v.iter().map(|x| *x as f64).sum::<f64>() / v.len() as f64 / 1e3 };
    Summary {
        samples: v.len(),
        min_us: us(v.first().copied().unwrap_or(0)),
        p50_us: us(percentile(&v, 50.0)),
        p90_us: us(percentile(&v, 90.0)),
        p99_us: us(percentile(&v, 99.0)),
        max_us: us(v.last().copied().unwrap_or(0)),
        mean_us: mean,
    }
}

/// Median of a few measurements (the lower middle for an even count).
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() { 0.0 } else { v[(v.len() - 1) / 2] }
}
