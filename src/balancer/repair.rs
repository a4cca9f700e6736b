//! Repair (`--replicas`): placeholder, filled in below.
use std::time::Duration;

/// How lost copies are made again.
#[derive(Debug, Clone, Copy)]
pub struct RepairSettings {
    /// A server down this long has its copies made again elsewhere.
    pub after: Duration,
    /// Bytes per second copied at most (`None`: no limit).
    pub rate: Option<u64>,
}

impl Default for RepairSettings {
    fn default() -> Self {
        RepairSettings {
            after: Duration::from_secs(600),
            rate: None,
        }
    }
}
