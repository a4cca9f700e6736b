//! Balancing policies: which server takes the next request. Pure code, no
//! sockets, so every policy is tested with plain unit tests.
//!
//! The dispatcher describes every server as a `Candidate` (in the order of
//! its slots) and sends the request to the index the policy picks. A policy
//! keeps only a cursor between picks; what it knows of the servers comes
//! in with every call, so servers may come and go between picks.

use std::sync::atomic::{AtomicUsize, Ordering};

/// A server's resources as its last status report gave them.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Load {
    /// CPU use of the machine the server runs on, in percent (0-100).
    pub cpu_percent: f32,
    /// Used memory of that machine over its total, 0-1.
    pub memory_fraction: f32,
    /// Free space of the filesystem holding its storage folder over that
    /// filesystem's size, 0-1.
    pub disk_free_fraction: f32,
}

/// What a policy may know about one server when picking.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Candidate {
    /// Up, not overloaded, below `--max-in-flight`, and not excluded for
    /// this request.
    pub eligible: bool,
    /// Requests sent to the server and not yet answered.
    pub in_flight: usize,
    /// From its last status report; `None` before any report (and always
    /// for servers of the original format, which report no figures).
    pub load: Option<Load>,
}

/// A balancing policy. `pick` returns the index of an eligible candidate,
/// or `None` when there is none.
pub trait Policy: Send {
    fn pick(&mut self, candidates: &[Candidate]) -> Option<usize>;
    fn name(&self) -> &'static str;
}

/// The policies `--policy` offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum PolicyKind {
    #[default]
    RoundRobin,
    LeastActive,
    Resources,
}

impl PolicyKind {
    pub fn build(self) -> Box<dyn Policy> {
        match self {
            PolicyKind::RoundRobin => Box::<RoundRobin>::default(),
            PolicyKind::LeastActive => Box::<LeastActive>::default(),
            PolicyKind::Resources => Box::<Resources>::default(),
        }
    }

    /// Picks with `next` as the cursor, which then moves past the pick
    /// (see each policy).
    pub fn pick_from(self, next: &mut usize, candidates: &[Candidate]) -> Option<usize> {
        match self {
            PolicyKind::RoundRobin => round_robin(next, candidates),
            PolicyKind::LeastActive => lowest_from(next, candidates, |c| c.in_flight as f64),
            PolicyKind::Resources => by_resources(next, candidates),
        }
    }

    /// Picks with a cursor that several threads share: each pick moves it
    /// past the server picked, as one thread's picks would, so that round
    /// robin stays exact whoever picks.
    pub fn pick_shared(self, cursor: &AtomicUsize, candidates: &[Candidate]) -> Option<usize> {
        loop {
            let current = cursor.load(Ordering::Relaxed);
            let mut next = current;
            let chosen = self.pick_from(&mut next, candidates)?;
            if cursor
                .compare_exchange(current, next, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
            {
                return Some(chosen);
            }
        }
    }

    /// The name on the command line and in logs.
    pub fn name(self) -> &'static str {
        match self {
            PolicyKind::RoundRobin => "round-robin",
            PolicyKind::LeastActive => "least-active",
            PolicyKind::Resources => "resources",
        }
    }
}

/// Indexes `0..n` in circular order starting at `from`.
fn circle(from: usize, n: usize) -> impl Iterator<Item = usize> {
    (0..n).map(move |step| (from + step) % n)
}

/// Round robin over eligible servers, as in the original system: start at
/// the server after the last one chosen and skip those that cannot take the
/// request.
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: usize,
}

fn round_robin(next: &mut usize, candidates: &[Candidate]) -> Option<usize> {
    let n = candidates.len();
    let chosen = circle(*next, n).find(|&i| candidates[i].eligible)?;
    *next = (chosen + 1) % n;
    Some(chosen)
}

impl Policy for RoundRobin {
    fn pick(&mut self, candidates: &[Candidate]) -> Option<usize> {
        round_robin(&mut self.next, candidates)
    }

    fn name(&self) -> &'static str {
        PolicyKind::RoundRobin.name()
    }
}

/// The eligible candidate with the lowest `score`, ties going to the first
/// one in circular order from `*next`, which then moves past it. Strict
/// `<` keeps the earliest of equal scores, so equal servers take turns.
fn lowest_from(
    next: &mut usize,
    candidates: &[Candidate],
    score: impl Fn(&Candidate) -> f64,
) -> Option<usize> {
    let n = candidates.len();
    let mut best: Option<(usize, f64)> = None;
    for i in circle(*next, n).filter(|&i| candidates[i].eligible) {
        let s = score(&candidates[i]);
        if best.is_none_or(|(_, b)| s < b) {
            best = Some((i, s));
        }
    }
    let (chosen, _) = best?;
    *next = (chosen + 1) % n;
    Some(chosen)
}

/// The eligible server with the fewest requests in flight: a slow server
/// keeps its requests longer, so it is picked less. Ties go round robin,
/// so that equal servers share the work evenly rather than the first one
/// taking every request of a quiet period.
#[derive(Debug, Default)]
pub struct LeastActive {
    next: usize,
}

impl Policy for LeastActive {
    fn pick(&mut self, candidates: &[Candidate]) -> Option<usize> {
        PolicyKind::LeastActive.pick_from(&mut self.next, candidates)
    }

    fn name(&self) -> &'static str {
        PolicyKind::LeastActive.name()
    }
}

/// What one request in flight weighs in a `Resources` score: four requests
/// on the wire count as much as a fully busy CPU.
pub const IN_FLIGHT_WEIGHT: f64 = 0.25;

/// Below this share of free disk a server is scored as nearly full.
pub const LOW_DISK_FREE: f64 = 0.05;

/// The eligible server with the most resources to spare. Each one gets
///
/// ```text
/// score = cpu_percent / 100                   0..1, the machine's CPU
///       + memory_fraction                     0..1, the machine's memory
///       + (1 - disk_free_fraction)            0..1, fuller disk is worse
///       + 2  if disk_free_fraction < 5 %      a nearly full disk is avoided
///       + 0.25 * in_flight                    work already sent to it
/// ```
///
/// and the lowest score wins, ties round robin. Reports come every check
/// interval, so between two of them the figures do not move; the in-flight
/// term is what moves at every pick and keeps all the requests of one
/// interval from going to the server that looked idlest at its start.
///
/// While any eligible server has not reported figures (none yet, or a
/// server of the original format), scores would compare a guess with
/// measurements, so the pick is least-active instead.
#[derive(Debug, Default)]
pub struct Resources {
    next: usize,
}

/// The `Resources` score of a server with known figures (lower is better).
pub fn resource_score(load: &Load, in_flight: usize) -> f64 {
    let cpu = (f64::from(load.cpu_percent) / 100.0).clamp(0.0, 1.0);
    let memory = f64::from(load.memory_fraction).clamp(0.0, 1.0);
    let free = f64::from(load.disk_free_fraction).clamp(0.0, 1.0);
    let nearly_full = if free < LOW_DISK_FREE { 2.0 } else { 0.0 };
    cpu + memory + (1.0 - free) + nearly_full + IN_FLIGHT_WEIGHT * in_flight as f64
}

fn by_resources(next: &mut usize, candidates: &[Candidate]) -> Option<usize> {
    let all_known = candidates
        .iter()
        .filter(|c| c.eligible)
        .all(|c| c.load.is_some());
    if all_known {
        lowest_from(next, candidates, |c| match &c.load {
            Some(load) => resource_score(load, c.in_flight),
            None => f64::INFINITY,
        })
    } else {
        lowest_from(next, candidates, |c| c.in_flight as f64)
    }
}

impl Policy for Resources {
    fn pick(&mut self, candidates: &[Candidate]) -> Option<usize> {
        by_resources(&mut self.next, candidates)
    }

    fn name(&self) -> &'static str {
        PolicyKind::Resources.name()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cands(eligible: &[bool]) -> Vec<Candidate> {
        eligible
            .iter()
            .map(|&eligible| Candidate {
                eligible,
                ..Candidate::default()
            })
            .collect()
    }

    fn busy(in_flight: &[usize]) -> Vec<Candidate> {
        in_flight
            .iter()
            .map(|&in_flight| Candidate {
                eligible: true,
                in_flight,
                load: None,
            })
            .collect()
    }

    const IDLE: Load = Load {
        cpu_percent: 5.0,
        memory_fraction: 0.3,
        disk_free_fraction: 0.6,
    };

    fn loaded(loads: &[Load]) -> Vec<Candidate> {
        loads
            .iter()
            .map(|&load| Candidate {
                eligible: true,
                in_flight: 0,
                load: Some(load),
            })
            .collect()
    }

    fn all_kinds() -> [PolicyKind; 3] {
        [
            PolicyKind::RoundRobin,
            PolicyKind::LeastActive,
            PolicyKind::Resources,
        ]
    }

    #[test]
    fn cycles_through_all_servers() {
        let mut rr = RoundRobin::default();
        let c = cands(&[true, true, true]);
        let picks: Vec<_> = (0..7).map(|_| rr.pick(&c).unwrap()).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2, 0]);
    }

    #[test]
    fn skips_ineligible_and_keeps_order() {
        let mut rr = RoundRobin::default();
        assert_eq!(rr.pick(&cands(&[true, false, true])), Some(0));
        assert_eq!(rr.pick(&cands(&[true, false, true])), Some(2));
        assert_eq!(rr.pick(&cands(&[true, false, true])), Some(0));
        // Server 1 comes back: it is next in the circle.
        assert_eq!(rr.pick(&cands(&[true, true, true])), Some(1));
    }

    #[test]
    fn none_when_nothing_eligible_or_empty_pool() {
        for kind in all_kinds() {
            let mut p = kind.build();
            assert_eq!(p.pick(&cands(&[false, false])), None, "{}", p.name());
            assert_eq!(p.pick(&[]), None, "{}", p.name());
            // And it still works once servers are there.
            assert_eq!(p.pick(&cands(&[true])), Some(0), "{}", p.name());
        }
    }

    #[test]
    fn even_spread_over_equal_servers_for_every_policy() {
        for kind in all_kinds() {
            let mut p = kind.build();
            for c in [cands(&[true; 3]), loaded(&[IDLE; 3])] {
                let mut counts = [0; 3];
                for _ in 0..30 {
                    counts[p.pick(&c).unwrap()] += 1;
                }
                assert_eq!(counts, [10, 10, 10], "{}", p.name());
            }
        }
    }

    #[test]
    fn every_policy_skips_ineligible_servers() {
        for kind in all_kinds() {
            let mut p = kind.build();
            let mut c = loaded(&[IDLE; 3]);
            c[1].eligible = false;
            // Even when the ineligible one looks best.
            c[0].in_flight = 3;
            c[2].in_flight = 3;
            for _ in 0..10 {
                assert_ne!(p.pick(&c), Some(1), "{}", p.name());
            }
        }
    }

    #[test]
    fn a_shared_cursor_picks_as_one_policy_would() {
        for kind in all_kinds() {
            let cursor = AtomicUsize::new(0);
            let mut alone = kind.build();
            let c = cands(&[true, false, true, true]);
            for _ in 0..12 {
                assert_eq!(
                    kind.pick_shared(&cursor, &c),
                    alone.pick(&c),
                    "{}",
                    kind.name()
                );
            }
        }
        // Threads picking at once still give each server its turn.
        let cursor = AtomicUsize::new(0);
        let c = cands(&[true; 3]);
        let counts: Vec<usize> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| {
                        let mut counts = [0usize; 3];
                        for _ in 0..3000 {
                            counts[PolicyKind::RoundRobin.pick_shared(&cursor, &c).unwrap()] += 1;
                        }
                        counts
                    })
                })
                .collect();
            handles.into_iter().fold(vec![0; 3], |mut all, h| {
                for (a, b) in all.iter_mut().zip(h.join().unwrap()) {
                    *a += b;
                }
                all
            })
        });
        assert_eq!(counts, [4000, 4000, 4000]);
    }

    #[test]
    fn names_match_the_command_line() {
        use clap::ValueEnum;
        for kind in all_kinds() {
            assert_eq!(kind.build().name(), kind.name());
            let value = kind.to_possible_value().unwrap();
            assert_eq!(value.get_name(), kind.name());
        }
        assert_eq!(PolicyKind::default(), PolicyKind::RoundRobin);
    }

    #[test]
    fn least_active_prefers_the_least_loaded() {
        let mut la = LeastActive::default();
        assert_eq!(la.pick(&busy(&[4, 1, 3])), Some(1));
        assert_eq!(la.pick(&busy(&[0, 1, 3])), Some(0));
        // Fewest in flight among the eligible ones only.
        let mut c = busy(&[5, 0, 3]);
        c[1].eligible = false;
        assert_eq!(la.pick(&c), Some(2));
    }

    #[test]
    fn least_active_spreads_ties_round_robin() {
        let mut la = LeastActive::default();
        let c = busy(&[2, 7, 2, 2]);
        let picks: Vec<_> = (0..6).map(|_| la.pick(&c).unwrap()).collect();
        assert_eq!(picks, [0, 2, 3, 0, 2, 3]);
    }

    #[test]
    fn least_active_follows_in_flight_as_it_changes() {
        // The dispatcher counts each pick in flight: the picks even out.
        let mut la = LeastActive::default();
        let mut c = busy(&[3, 0, 1]);
        let mut picks = Vec::new();
        for _ in 0..5 {
            let i = la.pick(&c).unwrap();
            c[i].in_flight += 1;
            picks.push(i);
        }
        assert_eq!(picks, [1, 2, 1, 2, 1]);
        assert_eq!(c.iter().map(|c| c.in_flight).collect::<Vec<_>>(), [3, 3, 3]);
    }

    #[test]
    fn resources_avoids_the_busy_and_the_full_server() {
        let busy_cpu = Load {
            cpu_percent: 95.0,
            memory_fraction: 0.9,
            ..IDLE
        };
        let full_disk = Load {
            disk_free_fraction: 0.01,
            ..IDLE
        };
        let mut r = Resources::default();
        let c = loaded(&[busy_cpu, IDLE, full_disk]);
        for _ in 0..5 {
            assert_eq!(r.pick(&c), Some(1));
        }
        // The in-flight term spreads work once the idle one has enough.
        let mut c = loaded(&[busy_cpu, IDLE, IDLE]);
        let mut counts = [0usize; 3];
        for _ in 0..20 {
            let i = r.pick(&c).unwrap();
            c[i].in_flight += 1;
            counts[i] += 1;
        }
        assert!(counts[1].abs_diff(counts[2]) <= 1, "{counts:?}");
        assert!(counts[0] < counts[1], "{counts:?}");
    }

    #[test]
    fn resource_score_orders_by_each_figure() {
        let base = resource_score(&IDLE, 0);
        let worse = [
            Load {
                cpu_percent: 50.0,
                ..IDLE
            },
            Load {
                memory_fraction: 0.8,
                ..IDLE
            },
            Load {
                disk_free_fraction: 0.2,
                ..IDLE
            },
        ];
        for load in worse {
            assert!(resource_score(&load, 0) > base, "{load:?}");
        }
        assert!(resource_score(&IDLE, 1) > base);
        let nearly_full = Load {
            disk_free_fraction: 0.04,
            cpu_percent: 0.0,
            memory_fraction: 0.0,
        };
        let saturated = Load {
            cpu_percent: 100.0,
            memory_fraction: 1.0,
            disk_free_fraction: 0.5,
        };
        assert!(resource_score(&nearly_full, 0) > resource_score(&saturated, 0));
    }

    fn any_load() -> impl proptest::strategy::Strategy<Value = Load> {
        use proptest::prelude::*;
        // Any figures a server may report, NaN and infinities included.
        (any::<f32>(), any::<f32>(), any::<f32>()).prop_map(|(cpu, memory, disk)| Load {
            cpu_percent: cpu,
            memory_fraction: memory,
            disk_free_fraction: disk,
        })
    }

    fn any_candidate() -> impl proptest::strategy::Strategy<Value = Candidate> {
        use proptest::prelude::*;
        (any::<bool>(), 0usize..100, proptest::option::of(any_load())).prop_map(
            |(eligible, in_flight, load)| Candidate {
                eligible,
                in_flight,
                load,
            },
        )
    }

    proptest::proptest! {
        /// Servers come and go between picks (the list changes length and
        /// eligibility); a pick is always an eligible server, and `None`
        /// only when there is none.
        #[test]
        fn never_picks_an_ineligible_server(
            rounds in proptest::collection::vec(
                proptest::collection::vec(any_candidate(), 0..6), 1..40),
        ) {
            for kind in all_kinds() {
                let mut policy = kind.build();
                for candidates in &rounds {
                    match policy.pick(candidates) {
                        Some(i) => proptest::prop_assert!(
                            candidates.get(i).is_some_and(|c| c.eligible),
                            "{} picked {} of {:?}", kind.name(), i, candidates
                        ),
                        None => proptest::prop_assert!(
                            candidates.iter().all(|c| !c.eligible),
                            "{} picked none of {:?}", kind.name(), candidates
                        ),
                    }
                }
            }
        }

        /// Over n equal servers, k * n picks give each server k, whatever
        /// the policy and whatever the servers' common load.
        #[test]
        fn equal_servers_share_picks_evenly(
            n in 1usize..8,
            k in 1usize..20,
            in_flight in 0usize..10,
            load in proptest::option::of(any_load()),
            // Picks made before, on another list, leave the cursor anywhere.
            warm_up in 0usize..10,
        ) {
            let equal = vec![Candidate { eligible: true, in_flight, load }; n];
            for kind in all_kinds() {
                let mut policy = kind.build();
                let other = vec![Candidate { eligible: true, in_flight: 0, load: None }; 7];
                for _ in 0..warm_up {
                    policy.pick(&other);
                }
                let mut counts = vec![0; n];
                for _ in 0..k * n {
                    counts[policy.pick(&equal).unwrap()] += 1;
                }
                proptest::prop_assert_eq!(&counts, &vec![k; n], "{}", kind.name());
            }
        }

        /// Least-active picks a server with the fewest requests in flight;
        /// when the picks are counted in flight and some finish, no server
        /// of equal standing is starved: every server is picked within n
        /// picks of the counts being equal.
        #[test]
        fn least_active_picks_the_fewest_and_starves_none(
            n in 1usize..6,
            finishes in proptest::collection::vec(proptest::option::of(0usize..6), 1..200),
        ) {
            let mut policy = LeastActive::default();
            let mut in_flight = vec![0usize; n];
            for finish in &finishes {
                let candidates: Vec<_> = in_flight
                    .iter()
                    .map(|&in_flight| Candidate { eligible: true, in_flight, load: None })
                    .collect();
                let i = policy.pick(&candidates).unwrap();
                let fewest = *in_flight.iter().min().unwrap();
                proptest::prop_assert_eq!(in_flight[i], fewest);
                in_flight[i] += 1;
                if let Some(j) = finish.filter(|&j| j < n && in_flight[j] > 0) {
                    in_flight[j] -= 1;
                }
                if in_flight.iter().all(|&c| c == in_flight[0]) {
                    // Equal counts: the cursor reaches everyone in turn.
                    let mut turn = vec![0; n];
                    let mut probe = LeastActive { next: policy.next };
                    let equal: Vec<_> = in_flight
                        .iter()
                        .map(|&in_flight| Candidate { eligible: true, in_flight, load: None })
                        .collect();
                    for _ in 0..n {
                        turn[probe.pick(&equal).unwrap()] += 1;
                    }
                    proptest::prop_assert_eq!(turn, vec![1; n]);
                }
            }
        }
    }

    #[test]
    fn resources_falls_back_to_least_active_while_loads_are_unknown() {
        let mut r = Resources::default();
        let mut c = loaded(&[IDLE, IDLE, IDLE]);
        c[0].load = None;
        c[0].in_flight = 2;
        c[1].in_flight = 1;
        c[2].in_flight = 5;
        assert_eq!(r.pick(&c), Some(1));
        // An ineligible server without figures does not matter.
        let mut c = loaded(&[
            Load {
                cpu_percent: 90.0,
                ..IDLE
            },
            IDLE,
        ]);
        c[0].in_flight = 0;
        c[1].in_flight = 1;
        c.push(Candidate::default());
        assert_eq!(r.pick(&c), Some(1));
    }
}
