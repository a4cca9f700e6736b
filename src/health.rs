//! The health of one server as the balancer sees it: a small state machine
//! fed with probe results and forwarding failures. Pure code: it decides,
//! the dispatcher acts and logs.

use crate::policy::Load;
use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum State {
    /// No probe has answered yet.
    Unknown,
    Up,
    Overloaded,
    Down,
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            State::Unknown => "unknown",
            State::Up => "up",
            State::Overloaded => "overloaded",
            State::Down => "down",
        })
    }
}

/// Something the balancer learnt about a server.
#[derive(Debug, Clone, PartialEq)]
pub enum Observation {
    /// The server answered a status probe.
    ProbeOk {
        overloaded: bool,
        /// It can write to its storage folder (always true for servers
        /// that do not say).
        can_store: bool,
        /// Its figures, for the `resources` policy; the health ignores them.
        load: Option<Load>,
    },
    /// The probe could not connect, timed out, or got garbage.
    ProbeFailed(String),
    /// Forwarding a request failed on the connection itself.
    LinkFailed(String),
    /// A forwarded request was carried out.
    Served,
    /// The server answered a forward with a storage error.
    StorageFailed(String),
    /// The server said its disk is full: no store can succeed there until
    /// a probe says it can write again.
    DiskFull(String),
}

impl Observation {
    /// A probe answer from a server that can store and gave no figures.
    pub fn probe_ok(overloaded: bool) -> Observation {
        Observation::ProbeOk {
            overloaded,
            can_store: true,
            load: None,
        }
    }
}

/// A change of state worth logging.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    pub from: State,
    pub to: State,
    /// Why, when the new state is `Down`.
    pub reason: Option<String>,
}

impl Transition {
    /// A short phrase for the log: "up", "down", "overloaded", "recovered".
    pub fn describe(&self) -> String {
        match (self.from, self.to) {
            (State::Overloaded, State::Up) => "recovered".into(),
            (_, State::Down) => match &self.reason {
                Some(r) => format!("down ({r})"),
                None => "down".into(),
            },
            (_, to) => to.to_string(),
        }
    }
}

/// Consecutive good probes that bring a down server back, by default.
pub const DEFAULT_RISE: u32 = 2;
/// Consecutive failed probes that take a server down, by default.
pub const DEFAULT_FALL: u32 = 2;
/// Storage errors in a row, with no successful forward between them, that
/// take a server down before its probes notice anything.
pub const STORAGE_FAILURES: u32 = 3;

/// The reason given when a server says it cannot write to its folder.
pub const STORAGE_UNAVAILABLE: &str = "storage unavailable";

/// One server's health.
///
/// Probes are sampled evidence, so one is not enough to change a server's
/// fate: it goes down after `fall` failed probes in a row and comes back
/// after `rise` good ones, and a single lost probe does not make it flap.
/// Two exceptions: a server never seen yet (`Unknown`) is up at its first
/// good probe, so that starting the system is not delayed; and first-hand
/// evidence takes it down at once: a forward that failed on the connection,
/// `STORAGE_FAILURES` storage errors in a row, one saying its disk is full,
/// or a probe answer saying it cannot store. Overloaded and back is the server's own word and is
/// followed at once.
#[derive(Debug, Clone)]
pub struct Health {
    state: State,
    rise: u32,
    fall: u32,
    /// Good probes in a row while down.
    good: u32,
    /// Failed probes in a row while not down.
    bad: u32,
    /// Storage errors since the last successful forward.
    storage_errors: u32,
}

impl Default for Health {
    fn default() -> Self {
        Health::new(DEFAULT_RISE, DEFAULT_FALL)
    }
}

impl Health {
    /// `rise` and `fall` below 1 count as 1.
    pub fn new(rise: u32, fall: u32) -> Health {
        Health {
            state: State::Unknown,
            rise: rise.max(1),
            fall: fall.max(1),
            good: 0,
            bad: 0,
            storage_errors: 0,
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// Storage errors counted since the last successful forward.
    pub fn storage_errors(&self) -> u32 {
        self.storage_errors
    }

    /// Whether new requests may be sent to this server.
    pub fn accepts_requests(&self) -> bool {
        self.state == State::Up
    }

    /// Applies an observation; returns the transition if the state changed.
    pub fn observe(&mut self, obs: &Observation) -> Option<Transition> {
        let (to, reason) = match obs {
            Observation::ProbeOk {
                can_store: false, ..
            } => (State::Down, Some(STORAGE_UNAVAILABLE.to_string())),
            Observation::ProbeOk { overloaded, .. } => (self.answered(*overloaded)?, None),
            Observation::ProbeFailed(r) => (self.probe_failed()?, Some(r.clone())),
            Observation::LinkFailed(r) => (State::Down, Some(r.clone())),
            Observation::DiskFull(r) => (State::Down, Some(r.clone())),
            Observation::Served => {
                self.storage_errors = 0;
                return None;
            }
            Observation::StorageFailed(r) => {
                self.storage_errors += 1;
                if self.storage_errors < STORAGE_FAILURES {
                    return None;
                }
                let why = format!(
                    "{} storage errors in a row, the last: {r}",
                    self.storage_errors
                );
                (State::Down, Some(why))
            }
        };
        self.go(to, reason)
    }

    /// A probe answered: the state it says, once `rise` of them in a row
    /// bring a server back from down.
    fn answered(&mut self, overloaded: bool) -> Option<State> {
        self.bad = 0;
        if self.state == State::Down {
            self.good += 1;
            if self.good < self.rise {
                return None;
            }
        }
        Some(if overloaded {
            State::Overloaded
        } else {
            State::Up
        })
    }

    /// A probe failed: down once `fall` of them in a row have.
    fn probe_failed(&mut self) -> Option<State> {
        self.good = 0;
        if self.state == State::Down {
            return None;
        }
        self.bad += 1;
        if self.bad < self.fall {
            return None;
        }
        Some(State::Down)
    }

    /// Moves to `to`; the transition when that is a change.
    fn go(&mut self, to: State, reason: Option<String>) -> Option<Transition> {
        if to == State::Down {
            // Coming back always takes `rise` fresh good probes.
            self.good = 0;
        }
        if to == self.state {
            return None;
        }
        if self.state == State::Down || to == State::Down {
            // Each side of down counts afresh.
            self.good = 0;
            self.bad = 0;
            self.storage_errors = 0;
        }
        let from = std::mem::replace(&mut self.state, to);
        Some(Transition { from, to, reason })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok() -> Observation {
        Observation::probe_ok(false)
    }

    fn overloaded() -> Observation {
        Observation::probe_ok(true)
    }

    fn failed() -> Observation {
        Observation::ProbeFailed("refused".into())
    }

    fn cannot_store() -> Observation {
        Observation::ProbeOk {
            overloaded: false,
            can_store: false,
            load: None,
        }
    }

    /// The state after each observation in turn.
    fn run(h: &mut Health, observations: &[Observation]) -> Vec<State> {
        observations
            .iter()
            .map(|o| {
                h.observe(o);
                h.state()
            })
            .collect()
    }

    fn up() -> Health {
        let mut h = Health::new(2, 2);
        h.observe(&ok()).unwrap();
        h
    }

    fn down() -> Health {
        let mut h = up();
        h.observe(&Observation::LinkFailed("reset".into())).unwrap();
        h
    }

    #[test]
    fn starts_unknown_and_unavailable() {
        let h = Health::default();
        assert_eq!(h.state(), State::Unknown);
        assert!(!h.accepts_requests());
    }

    #[test]
    fn first_good_probe_brings_an_unknown_server_up_at_once() {
        let mut h = Health::new(3, 3);
        let t = h.observe(&ok()).unwrap();
        assert_eq!((t.from, t.to), (State::Unknown, State::Up));
        assert!(h.accepts_requests());
        let mut h = Health::new(3, 3);
        assert_eq!(h.observe(&overloaded()).unwrap().to, State::Overloaded);
    }

    #[test]
    fn an_unknown_server_goes_down_after_fall_failed_probes() {
        let mut h = Health::new(2, 3);
        assert_eq!(
            run(&mut h, &[failed(), failed(), failed()]),
            [State::Unknown, State::Unknown, State::Down]
        );
    }

    #[test]
    fn one_lost_probe_does_not_take_a_server_down() {
        let mut h = up();
        assert_eq!(
            run(&mut h, &[failed(), ok(), failed(), ok()]),
            [State::Up; 4]
        );
        // Two in a row do, with the last probe's reason.
        assert_eq!(h.observe(&failed()), None);
        let t = h.observe(&failed()).unwrap();
        assert_eq!((t.from, t.to), (State::Up, State::Down));
        assert_eq!(t.describe(), "down (refused)");
        assert_eq!(h.observe(&failed()), None, "reported once");
    }

    #[test]
    fn an_overloaded_server_falls_the_same_way() {
        let mut h = up();
        h.observe(&overloaded()).unwrap();
        assert_eq!(
            run(&mut h, &[failed(), failed()]),
            [State::Overloaded, State::Down]
        );
    }

    #[test]
    fn a_down_server_comes_back_after_rise_good_probes_in_a_row() {
        let mut h = Health::new(3, 2);
        h.observe(&ok()).unwrap();
        h.observe(&Observation::LinkFailed("reset".into())).unwrap();
        assert_eq!(
            run(&mut h, &[ok(), ok(), failed(), ok(), ok()]),
            [State::Down; 5],
            "a failed probe starts the count again"
        );
        let t = h.observe(&ok()).unwrap();
        assert_eq!((t.from, t.to), (State::Down, State::Up));
        assert_eq!(t.describe(), "up");
        assert!(h.accepts_requests());
    }

    #[test]
    fn a_down_server_may_come_back_overloaded() {
        let mut h = down();
        assert_eq!(
            run(&mut h, &[overloaded(), overloaded()]),
            [State::Down, State::Overloaded]
        );
    }

    #[test]
    fn overload_is_followed_at_once() {
        let mut h = up();
        let t = h.observe(&overloaded()).unwrap();
        assert_eq!(t.describe(), "overloaded");
        assert!(!h.accepts_requests());
        let t = h.observe(&ok()).unwrap();
        assert_eq!(t.describe(), "recovered");
        assert!(h.accepts_requests());
    }

    #[test]
    fn a_failed_forward_takes_a_server_down_at_once() {
        for start in [up(), Health::new(2, 2)] {
            let mut h = start;
            let t = h
                .observe(&Observation::LinkFailed("connection reset".into()))
                .unwrap();
            assert_eq!(t.to, State::Down);
            assert_eq!(t.describe(), "down (connection reset)");
        }
        // And back only after `rise` probes.
        let mut h = down();
        assert_eq!(run(&mut h, &[ok(), ok()]), [State::Down, State::Up]);
    }

    #[test]
    fn storage_errors_in_a_row_take_a_server_down() {
        let mut h = up();
        let storage = || Observation::StorageFailed("storage: disk full".into());
        assert_eq!(h.observe(&storage()), None);
        assert_eq!(h.observe(&storage()), None);
        // A success in between starts the count again.
        assert_eq!(h.observe(&Observation::Served), None);
        assert_eq!(h.observe(&storage()), None);
        assert_eq!(h.observe(&storage()), None);
        assert_eq!(h.state(), State::Up);
        let t = h.observe(&storage()).unwrap();
        assert_eq!(t.to, State::Down);
        assert_eq!(
            t.describe(),
            "down (3 storage errors in a row, the last: storage: disk full)"
        );
        // Back after `rise` probes, with the count cleared.
        assert_eq!(run(&mut h, &[ok(), ok()]), [State::Down, State::Up]);
        assert_eq!(h.observe(&storage()), None);
    }

    #[test]
    fn a_full_disk_takes_a_server_down_at_once() {
        let mut h = up();
        let full = Observation::DiskFull("disk_full: no space left on device".into());
        let t = h.observe(&full).unwrap();
        assert_eq!(t.describe(), "down (disk_full: no space left on device)");
        assert!(!h.accepts_requests());
        assert_eq!(run(&mut h, &[ok(), ok()]), [State::Down, State::Up]);
    }

    #[test]
    fn a_server_that_cannot_store_is_out_until_it_can_for_rise_probes() {
        for mut h in [up(), Health::new(2, 2)] {
            let t = h.observe(&cannot_store()).unwrap();
            assert_eq!(t.describe(), "down (storage unavailable)");
            assert!(!h.accepts_requests());
            assert_eq!(
                run(&mut h, &[cannot_store(), ok(), cannot_store(), ok()]),
                [State::Down; 4]
            );
            assert_eq!(h.observe(&ok()).unwrap().to, State::Up);
        }
    }

    #[test]
    fn served_and_probe_figures_change_nothing_by_themselves() {
        let mut h = up();
        assert_eq!(h.observe(&Observation::Served), None);
        let with_load = Observation::ProbeOk {
            overloaded: false,
            can_store: true,
            load: Some(Load::default()),
        };
        assert_eq!(h.observe(&with_load), None);
        assert_eq!(h.state(), State::Up);
    }

    fn observation() -> impl proptest::strategy::Strategy<Value = Observation> {
        use proptest::prelude::*;
        prop_oneof![
            4 => Just(ok()),
            1 => Just(overloaded()),
            4 => Just(failed()),
            1 => Just(cannot_store()),
            1 => Just(Observation::LinkFailed("reset".into())),
            2 => Just(Observation::Served),
            1 => Just(Observation::StorageFailed("disk full".into())),
            1 => Just(Observation::DiskFull("disk_full".into())),
        ]
    }

    proptest::proptest! {
        /// Whatever happens, a down server comes back only after `rise` good
        /// probes in a row, and probes alone take a server down only after
        /// `fall` failed ones in a row. (A failed forward, a server saying it
        /// cannot store, or storage errors are first-hand and act at once.)
        #[test]
        fn up_needs_rise_good_probes_and_down_needs_fall_failed_ones(
            rise in 1u32..5,
            fall in 1u32..5,
            observations in proptest::collection::vec(observation(), 0..200),
        ) {
            let mut h = Health::new(rise, fall);
            // Probes in a row, counted the plain way.
            let (mut good, mut bad) = (0u32, 0u32);
            for obs in &observations {
                match obs {
                    Observation::ProbeOk { can_store: true, .. } => {
                        good += 1;
                        bad = 0;
                    }
                    Observation::ProbeOk { can_store: false, .. }
                    | Observation::LinkFailed(_)
                    | Observation::DiskFull(_) => {
                        good = 0;
                        bad = 0;
                    }
                    Observation::ProbeFailed(_) => {
                        good = 0;
                        bad += 1;
                    }
                    Observation::Served | Observation::StorageFailed(_) => {}
                }
                let before = h.state();
                let transition = h.observe(obs);
                let after = h.state();
                proptest::prop_assert_eq!(
                    transition.as_ref().map(|t| (t.from, t.to)),
                    (before != after).then_some((before, after))
                );
                if before == State::Down && after != State::Down {
                    proptest::prop_assert!(good >= rise, "up after {} good probes, rise {}", good, rise);
                }
                if before != State::Down && after == State::Down {
                    if let Observation::ProbeFailed(_) = obs {
                        proptest::prop_assert!(bad >= fall, "down after {} failed probes, fall {}", bad, fall);
                    }
                }
                if after == State::Down {
                    // Coming back counts only probes after going down.
                    if before != State::Down {
                        good = 0;
                    }
                    proptest::prop_assert!(!h.accepts_requests());
                }
                if after != State::Down && before == State::Down {
                    bad = 0;
                }
            }
        }
    }

    #[test]
    fn rise_and_fall_of_zero_mean_one() {
        let mut h = Health::new(0, 0);
        h.observe(&ok());
        assert_eq!(h.observe(&failed()).unwrap().to, State::Down);
        assert_eq!(h.observe(&ok()).unwrap().to, State::Up);
    }
}
