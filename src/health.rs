//! The health of one server as the balancer sees it: a small state machine
//! fed with probe results and forwarding failures. Pure code: it decides,
//! the dispatcher acts and logs.

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
    ProbeOk { overloaded: bool },
    /// The probe could not connect, timed out, or got garbage.
    ProbeFailed(String),
    /// Forwarding a request failed on the connection itself.
    LinkFailed(String),
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

#[derive(Debug, Clone)]
pub struct Health {
    state: State,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            state: State::Unknown,
        }
    }
}

impl Health {
    pub fn state(&self) -> State {
        self.state
    }

    /// Whether new requests may be sent to this server.
    pub fn accepts_requests(&self) -> bool {
        self.state == State::Up
    }

    /// Applies an observation; returns the transition if the state changed.
    pub fn observe(&mut self, obs: &Observation) -> Option<Transition> {
        let (to, reason) = match obs {
            Observation::ProbeOk { overloaded: false } => (State::Up, None),
            Observation::ProbeOk { overloaded: true } => (State::Overloaded, None),
            Observation::ProbeFailed(r) | Observation::LinkFailed(r) => {
                (State::Down, Some(r.clone()))
            }
        };
        if to == self.state {
            return None;
        }
        let from = std::mem::replace(&mut self.state, to);
        Some(Transition { from, to, reason })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_unknown_and_unavailable() {
        let h = Health::default();
        assert_eq!(h.state(), State::Unknown);
        assert!(!h.accepts_requests());
    }

    #[test]
    fn transitions_are_reported_once() {
        let mut h = Health::default();
        let t = h
            .observe(&Observation::ProbeOk { overloaded: false })
            .unwrap();
        assert_eq!((t.from, t.to), (State::Unknown, State::Up));
        assert!(h.accepts_requests());
        assert_eq!(h.observe(&Observation::ProbeOk { overloaded: false }), None);

        let t = h
            .observe(&Observation::ProbeOk { overloaded: true })
            .unwrap();
        assert_eq!(t.describe(), "overloaded");
        assert!(!h.accepts_requests());
        let t = h
            .observe(&Observation::ProbeOk { overloaded: false })
            .unwrap();
        assert_eq!(t.describe(), "recovered");

        let t = h
            .observe(&Observation::LinkFailed("refused".into()))
            .unwrap();
        assert_eq!(t.describe(), "down (refused)");
        assert_eq!(h.observe(&Observation::ProbeFailed("refused".into())), None);
        let t = h
            .observe(&Observation::ProbeOk { overloaded: false })
            .unwrap();
        assert_eq!(t.describe(), "up");
    }
}
