//! Balancing policies: which server takes the next request. Pure code, no
//! sockets, so every policy is tested with plain unit tests.

/// What a policy may know about one server when picking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    /// Up, not overloaded, and not excluded for this request.
    pub eligible: bool,
    /// Requests sent to the server and not yet answered.
    pub in_flight: usize,
}

/// A balancing policy. `pick` returns the index of an eligible candidate,
/// or `None` when there is none.
pub trait Policy: Send {
    fn pick(&mut self, candidates: &[Candidate]) -> Option<usize>;
    fn name(&self) -> &'static str;
}

/// Round robin over eligible servers, as in the original system: start at
/// the server after the last one chosen and skip those that cannot take the
/// request.
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: usize,
}

impl Policy for RoundRobin {
    fn pick(&mut self, candidates: &[Candidate]) -> Option<usize> {
        let n = candidates.len();
        let chosen = (0..n)
            .map(|step| (self.next + step) % n)
            .find(|&i| candidates[i].eligible)?;
        self.next = (chosen + 1) % n;
        Some(chosen)
    }

    fn name(&self) -> &'static str {
        "round-robin"
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
                in_flight: 0,
            })
            .collect()
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
    fn none_when_nothing_eligible() {
        let mut rr = RoundRobin::default();
        assert_eq!(rr.pick(&cands(&[false, false])), None);
        assert_eq!(rr.pick(&[]), None);
    }

    #[test]
    fn even_spread_over_many_picks() {
        let mut rr = RoundRobin::default();
        let c = cands(&[true; 3]);
        let mut counts = [0; 3];
        for _ in 0..30 {
            counts[rr.pick(&c).unwrap()] += 1;
        }
        assert_eq!(counts, [10, 10, 10]);
    }
}
