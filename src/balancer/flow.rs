//! Flow control: what keeps the balancer's memory bounded whatever clients
//! do. A client connection may have only so many requests queued or in
//! flight (`Window`), and all connections together only so many payload
//! bytes (`Budget`). At either limit the connection's reader simply waits,
//! stops reading its socket, and TCP slows the client down: nothing fails.

use std::sync::{Arc, Condvar, Mutex};

/// Payload bytes held by queued and in-flight requests, across all
/// connections.
#[derive(Debug)]
pub struct Budget {
    max: usize,
    used: Mutex<Used>,
    freed: Condvar,
}

#[derive(Debug, Default)]
struct Used {
    bytes: usize,
    /// Callers of `acquire` waiting for bytes to be given back: only then
    /// does giving back notify (a notify is a system call even when no
    /// one waits, and bytes are given back for every request).
    waiting: usize,
}

/// Bytes taken from a `Budget`, given back when dropped.
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<Budget>,
    bytes: usize,
}

impl Budget {
    pub fn new(max: usize) -> Arc<Budget> {
        Arc::new(Budget {
            max,
            used: Mutex::new(Used::default()),
            freed: Condvar::new(),
        })
    }

    /// Takes `bytes`, waiting while that would pass the maximum. A request
    /// larger than the whole budget waits until nothing else is held, so it
    /// still goes through, alone.
    pub fn acquire(self: &Arc<Self>, bytes: usize) -> Reservation {
        let mut used = crate::net::lock(&self.used);
        while used.bytes > 0 && used.bytes + bytes > self.max {
            used.waiting += 1;
            used = self.freed.wait(used).unwrap_or_else(|p| p.into_inner());
            used.waiting -= 1;
        }
        used.bytes += bytes;
        Reservation {
            budget: self.clone(),
            bytes,
        }
    }

    /// Takes `bytes` if that needs no wait (see `acquire`).
    pub fn try_acquire(self: &Arc<Self>, bytes: usize) -> Option<Reservation> {
        let mut used = crate::net::lock(&self.used);
        if used.bytes > 0 && used.bytes + bytes > self.max {
            return None;
        }
        used.bytes += bytes;
        Some(Reservation {
            budget: self.clone(),
            bytes,
        })
    }

    pub fn used(&self) -> usize {
        crate::net::lock(&self.used).bytes
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut used = crate::net::lock(&self.budget.used);
        used.bytes -= self.bytes;
        let wake = used.waiting > 0;
        drop(used);
        if wake {
            self.budget.freed.notify_all();
        }
    }
}

/// The requests one connection may have outstanding.
pub type Window = crate::net::Slots;

/// One request's place in its connection's `Window`, given back when the
/// request is done with.
pub type Permit = crate::net::Slot;

/// What a queued request holds until it is done with: its connection's
/// window slot and its share of the byte budget.
#[derive(Debug, Default)]
pub struct Hold {
    pub permit: Option<Permit>,
    pub bytes: Option<Reservation>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;
    use std::time::Duration;

    #[test]
    fn budget_blocks_until_bytes_are_given_back() {
        let budget = Budget::new(100);
        let a = budget.acquire(60);
        let b = budget.acquire(40);
        assert_eq!(budget.used(), 100);
        let (tx, rx) = crossbeam_channel::bounded(1);
        let waiter = {
            let budget = budget.clone();
            thread::spawn(move || {
                let r = budget.acquire(30);
                tx.send(()).unwrap();
                r
            })
        };
        assert!(rx.recv_timeout(Duration::from_millis(50)).is_err());
        drop(a);
        rx.recv_timeout(Duration::from_secs(5)).unwrap();
        let c = waiter.join().unwrap();
        assert_eq!(budget.used(), 70);
        drop((b, c));
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn try_acquire_takes_only_what_needs_no_wait() {
        let budget = Budget::new(100);
        let a = budget.try_acquire(80).unwrap();
        assert!(budget.try_acquire(30).is_none());
        let _b = budget.try_acquire(20).unwrap();
        drop(a);
        assert!(budget.try_acquire(30).is_some());
    }

    #[test]
    fn oversized_request_goes_through_alone() {
        let budget = Budget::new(10);
        let big = budget.acquire(50);
        assert_eq!(budget.used(), 50);
        drop(big);
        let _small = budget.acquire(5);
    }

    #[test]
    fn window_counts_outstanding_permits() {
        let window = Window::new(2);
        let p1 = window.acquire();
        let _p2 = window.acquire();
        assert_eq!(window.in_use(), window.capacity(), "window should be full");
        drop(p1);
        assert_eq!(window.in_use(), 1);
        let _p3 = window.acquire();
    }
}
