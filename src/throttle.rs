//! Log lines for events that come in floods (limit hits, impostors, login
//! failures): the first event of a kind is logged, the next ones within
//! `interval` only counted, and the count goes with the next line logged.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Kinds kept at most; past this the oldest are forgotten (a flood of
/// distinct keys, say peer addresses, must not grow memory).
const MAX_KEYS: usize = 4096;

#[derive(Debug)]
pub struct Throttle<K> {
    interval: Duration,
    seen: Mutex<HashMap<K, (Instant, u64)>>,
}

impl<K: Eq + Hash + Clone> Throttle<K> {
    pub fn new(interval: Duration) -> Throttle<K> {
        Throttle {
            interval,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// `Some(n)` when this event should be logged, `n` being how many of
    /// its kind were left unlogged since the last line; `None` to stay
    /// quiet.
    pub fn check(&self, key: &K) -> Option<u64> {
        let now = Instant::now();
        let mut seen = crate::sync::lock(&self.seen);
        if let Some((last, quiet)) = seen.get_mut(key) {
            if now.duration_since(*last) < self.interval {
                *quiet += 1;
                return None;
            }
            let skipped = *quiet;
            *last = now;
            *quiet = 0;
            return Some(skipped);
        }
        if seen.len() >= MAX_KEYS {
            let interval = self.interval;
            seen.retain(|_, (last, _)| now.duration_since(*last) < interval);
            if seen.len() >= MAX_KEYS {
                seen.clear();
            }
        }
        seen.insert(key.clone(), (now, 0));
        Some(0)
    }
}

/// " (and N more since the last line)" when N > 0.
pub fn more(skipped: u64) -> String {
    if skipped == 0 {
        String::new()
    } else {
        format!(" ({skipped} more like it since the last such line)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_is_logged_the_rest_counted() {
        let t = Throttle::new(Duration::from_secs(3600));
        assert_eq!(t.check(&"a"), Some(0));
        assert_eq!(t.check(&"a"), None);
        assert_eq!(t.check(&"a"), None);
        assert_eq!(t.check(&"b"), Some(0));
        let t = Throttle::new(Duration::ZERO);
        assert_eq!(t.check(&1), Some(0));
        assert_eq!(t.check(&1), Some(0));
        assert_eq!(more(0), "");
        assert!(more(3).contains('3'));
    }
}
