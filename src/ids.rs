//! Request numbers that never repeat: across balancer restarts, across
//! several balancers in front of the same servers, and apart from the
//! numbers a server gives documents sent to it directly.
//!
//! A number is a 63-bit time-ordered id, in the manner of Snowflake ids:
//!
//! | bits | field                                                        |
//! |------|--------------------------------------------------------------|
//! | 41   | milliseconds since 2025-01-01 UTC (good until 2094)          |
//! | 1    | source: 0 a balancer, 1 a server numbering a direct store    |
//! | 9    | node: the balancer's `--balancer-id`, or the server's id     |
//! | 12   | sequence within the millisecond (4096 per ms)                |
//!
//! No state is persisted: a restarted balancer starts at a later
//! millisecond. The generator never goes backwards even if the clock does,
//! and waits for the next millisecond rather than overflow the sequence.

use std::sync::{Arc, Mutex};
use std::time::Duration;

/// 2025-01-01T00:00:00Z in Unix milliseconds.
const EPOCH_MS: u64 = 1_735_689_600_000;
const SEQ_BITS: u32 = 12;
const NODE_BITS: u32 = 9;
const MAX_SEQ: u64 = (1 << SEQ_BITS) - 1;
/// Largest node id.
pub const MAX_NODE: u16 = (1 << NODE_BITS) - 1;

/// Who gives out the numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Balancer,
    /// A server numbering a document that came without a number.
    Server,
}

/// The parts of a request number, for logs and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parts {
    pub unix_ms: u64,
    pub source: Source,
    pub node: u16,
    pub sequence: u16,
}

pub fn parts(number: u64) -> Parts {
    Parts {
        unix_ms: (number >> (SEQ_BITS + NODE_BITS + 1)) + EPOCH_MS,
        source: if number >> (SEQ_BITS + NODE_BITS) & 1 == 1 {
            Source::Server
        } else {
            Source::Balancer
        },
        node: (number >> SEQ_BITS) as u16 & MAX_NODE,
        sequence: (number & MAX_SEQ) as u16,
    }
}

/// Hands out request numbers; cheap to call from many threads. Clones
/// share one sequence, so the parts of a process that number things (the
/// dispatcher, file transfers) never give out the same number.
#[derive(Debug, Clone)]
pub struct Generator {
    prefix: u64,
    /// (millisecond, last sequence used in it)
    last: Arc<Mutex<(u64, u64)>>,
}

impl Generator {
    /// `node` is truncated to 9 bits.
    pub fn new(source: Source, node: u16) -> Generator {
        let source_bit = u64::from(source == Source::Server);
        Generator {
            prefix: (source_bit << NODE_BITS | u64::from(node & MAX_NODE)) << SEQ_BITS,
            last: Arc::new(Mutex::new((0, MAX_SEQ))),
        }
    }

    pub fn next(&self) -> u64 {
        self.next_by(now_ms)
    }

    /// `next` with the clock (milliseconds since the epoch above) given, so
    /// that tests can stop it or turn it back.
    fn next_by(&self, mut clock: impl FnMut() -> u64) -> u64 {
        let mut last = crate::sync::lock(&self.last);
        loop {
            let now = clock().max(last.0);
            if now > last.0 {
                *last = (now, 0);
            } else if last.1 < MAX_SEQ {
                last.1 += 1;
            } else {
                // 4096 numbers in one millisecond: wait for the next one.
                std::thread::sleep(Duration::from_micros(100));
                continue;
            }
            return (last.0 << (SEQ_BITS + NODE_BITS + 1)) | self.prefix | last.1;
        }
    }
}

/// Milliseconds since this scheme's epoch (`EPOCH_MS`).
fn now_ms() -> u64 {
    crate::text::now_ms().saturating_sub(EPOCH_MS)
}

/// A node id for a process that was given none: random, and logged by the
/// caller so that a clash between two balancers can be told apart.
pub fn random_node() -> u16 {
    rand::random::<u16>() & MAX_NODE
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn numbers_increase_and_never_repeat() {
        let g = Generator::new(Source::Balancer, 7);
        let mut prev = 0;
        let mut seen = HashSet::new();
        for _ in 0..20_000 {
            let n = g.next();
            assert!(n > prev);
            assert!(seen.insert(n));
            prev = n;
        }
        let p = parts(prev);
        assert_eq!((p.source, p.node), (Source::Balancer, 7));
        let age = now_ms() + EPOCH_MS - p.unix_ms;
        assert!(age < 60_000, "{p:?}");
        assert!(prev < 1 << 63);
    }

    #[test]
    fn sources_and_nodes_never_share_a_number() {
        let gens = [
            Generator::new(Source::Balancer, 1),
            Generator::new(Source::Balancer, 2),
            Generator::new(Source::Server, 1),
        ];
        let mut seen = HashSet::new();
        for _ in 0..5_000 {
            for g in &gens {
                assert!(seen.insert(g.next()));
            }
        }
        assert_eq!(parts(gens[2].next()).source, Source::Server);
    }

    #[test]
    fn clones_share_one_sequence() {
        let a = Generator::new(Source::Balancer, 4);
        let b = a.clone();
        let mut seen = HashSet::new();
        for _ in 0..5_000 {
            assert!(seen.insert(a.next()));
            assert!(seen.insert(b.next()));
        }
    }

    #[test]
    fn a_restarted_generator_starts_past_the_old_one() {
        let first = Generator::new(Source::Balancer, 3);
        let last_of_first = (0..10_000).map(|_| first.next()).max().unwrap();
        // A new process in the same millisecond could clash only if it
        // started before the old one's clock; it starts after.
        std::thread::sleep(Duration::from_millis(2));
        let second = Generator::new(Source::Balancer, 3);
        assert!(second.next() > last_of_first);
    }

    /// A clock that reads the given milliseconds in turn, then moves on one
    /// millisecond per reading (so a run of numbers always ends).
    fn scripted(readings: Vec<u64>) -> impl FnMut() -> u64 {
        let mut readings = readings.into_iter();
        let mut last = 0;
        move || {
            last = readings.next().unwrap_or(last + 1);
            last
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        #[test]
        fn numbers_increase_whatever_the_clock_does(
            start in 0u64..1 << 40,
            // Steps of the clock: standing still, forwards, and backwards.
            steps in proptest::collection::vec(-50i64..50, 1..300),
            per_reading in 1usize..40,
            node in 0u16..=MAX_NODE,
            server in proptest::bool::ANY,
        ) {
            let source = if server { Source::Server } else { Source::Balancer };
            let g = Generator::new(source, node);
            let mut now = start;
            let readings: Vec<u64> = steps
                .iter()
                .map(|&step| {
                    now = now.saturating_add_signed(step);
                    now
                })
                .collect();
            let mut clock = scripted(readings);
            let mut previous = None;
            for _ in 0..steps.len() * per_reading {
                let n = g.next_by(&mut clock);
                if let Some(p) = previous {
                    proptest::prop_assert!(n > p, "{} after {}", n, p);
                }
                let parts = parts(n);
                proptest::prop_assert_eq!((parts.source, parts.node), (source, node));
                proptest::prop_assert!(n < 1 << 63);
                previous = Some(n);
            }
        }
    }
}
