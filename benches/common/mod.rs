//! What the benchmarks share: child processes and what /proc says about
//! them (`process`), HAProxy as a reference TCP balancer (`haproxy`),
//! clients that store documents and check every answer (`clients`), and
//! the small statistics every table needs (here).

#![allow(dead_code)] // each bench binary uses its own part of this module

pub mod clients;
pub mod haproxy;
pub mod process;

use std::time::Duration;

/// Nearest-rank percentile of sorted latencies, in milliseconds.
pub fn percentile_ms(sorted: &[Duration], p: usize) -> f64 {
    let rank = (p * sorted.len()).div_ceil(100).max(1);
    sorted[rank - 1].as_secs_f64() * 1000.0
}

/// Median of the values (the mean of the middle two for an even count).
pub fn median(mut values: Vec<f64>) -> f64 {
    assert!(!values.is_empty(), "median of nothing");
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}
