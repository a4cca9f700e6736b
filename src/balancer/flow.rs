//! Flow control: what keeps the balancer's memory bounded whatever clients
//! do. A client connection may have only so many requests queued or in
//! flight (`Window`), and all connections together only so many payload
//! bytes (`Budget`). At either limit the connection's reader simply waits,
//! stops reading its socket, and TCP slows the client down: nothing fails.
//!
//! A framed request takes its bytes as they arrive (`Budget::open`, then
//! `Reservation::grow` per piece read), not when its header announces
//! them: a peer that announces a large frame and sends nothing holds
//! nothing.

use std::collections::BTreeSet;
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
    /// Callers of `acquire` and `grow` waiting for bytes to be given back:
    /// only then does giving back notify (a notify is a system call even
    /// when no one waits, and bytes are given back for every request).
    waiting: usize,
    /// Requests still arriving, numbered in the order they began, and the
    /// bytes they hold between them.
    arriving: BTreeSet<u64>,
    arriving_bytes: usize,
    next: u64,
}

impl Used {
    /// Whether a holder of `held` bytes (numbered `arriving` while its
    /// request arrives) may take `more` without waiting. Alone, a request
    /// larger than the whole budget still goes through. The request that
    /// began arriving first does not wait for the others still arriving,
    /// only for whole ones to be done with: requests arriving together
    /// never wait on each other for ever, each holding a part and none
    /// able to finish.
    fn take(&mut self, bytes: usize, arriving: bool) {
        self.bytes += bytes;
        if arriving {
            self.arriving_bytes += bytes;
        }
    }

    fn room(&self, max: usize, held: usize, more: usize, arriving: Option<u64>) -> bool {
        let first = arriving.is_some_and(|n| self.arriving.first() == Some(&n));
        let whole = self.bytes - self.arriving_bytes;
        self.bytes == held || self.bytes + more <= max || first && whole + held + more <= max
    }
}

/// Bytes taken from a `Budget`, given back when dropped.
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<Budget>,
    bytes: usize,
    /// Its number among the requests still arriving, until `complete`.
    arriving: Option<u64>,
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
        let mut reservation = self.reservation(None);
        reservation.grow(bytes);
        reservation
    }

    /// Takes `bytes` if that needs no wait (see `acquire`).
    pub fn try_acquire(self: &Arc<Self>, bytes: usize) -> Option<Reservation> {
        let mut reservation = self.reservation(None);
        reservation.try_grow(bytes).then_some(reservation)
    }

    /// An empty reservation for a request that has begun to arrive; it
    /// grows as its bytes do (`Reservation::grow`) until `complete`.
    pub fn open(self: &Arc<Self>) -> Reservation {
        let mut used = crate::sync::lock(&self.used);
        let number = used.next;
        used.next += 1;
        used.arriving.insert(number);
        drop(used);
        self.reservation(Some(number))
    }

    fn reservation(self: &Arc<Self>, arriving: Option<u64>) -> Reservation {
        Reservation {
            budget: self.clone(),
            bytes: 0,
            arriving,
        }
    }

    pub fn used(&self) -> usize {
        crate::sync::lock(&self.used).bytes
    }

    /// Wakes the waiters, if any, once `used` is released.
    fn wake(&self, used: std::sync::MutexGuard<'_, Used>) {
        let wake = used.waiting > 0;
        drop(used);
        if wake {
            self.freed.notify_all();
        }
    }
}

impl Reservation {
    /// Takes `more` bytes, waiting while that would pass the maximum (see
    /// `Used::room` for who need not wait).
    pub fn grow(&mut self, more: usize) {
        let budget = &self.budget;
        let mut used = crate::sync::lock(&budget.used);
        while !used.room(budget.max, self.bytes, more, self.arriving) {
            used.waiting += 1;
            used = budget.freed.wait(used).unwrap_or_else(|p| p.into_inner());
            used.waiting -= 1;
        }
        used.take(more, self.arriving.is_some());
        self.bytes += more;
    }

    /// Takes `more` bytes if that needs no wait.
    pub fn try_grow(&mut self, more: usize) -> bool {
        let budget = &self.budget;
        let mut used = crate::sync::lock(&budget.used);
        if !used.room(budget.max, self.bytes, more, self.arriving) {
            return false;
        }
        used.take(more, self.arriving.is_some());
        self.bytes += more;
        true
    }

    /// The request has arrived whole: it takes nothing more, and no longer
    /// goes first among those arriving.
    pub fn complete(&mut self) {
        if let Some(number) = self.arriving.take() {
            let mut used = crate::sync::lock(&self.budget.used);
            used.arriving.remove(&number);
            used.arriving_bytes -= self.bytes;
            self.budget.wake(used);
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut used = crate::sync::lock(&self.budget.used);
        used.bytes -= self.bytes;
        if let Some(number) = self.arriving {
            used.arriving.remove(&number);
            used.arriving_bytes -= self.bytes;
        }
        self.budget.wake(used);
    }
}

/// The requests one connection may have outstanding.
pub type Window = crate::net::Slots;

/// One request's place in its connection's `Window`, given back when the
/// request is done with.
pub type Permit = crate::net::Slot;

/// What a queued request holds until it is done with: its connection's
/// window slot, its share of the byte budget, and its connection's mark of
/// being at work (so that it is not closed to make room meanwhile).
#[derive(Debug, Default)]
pub struct Hold {
    pub permit: Option<Permit>,
    pub bytes: Option<Reservation>,
    pub busy: Option<crate::net::Busy>,
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
    fn an_arriving_request_holds_only_what_has_arrived() {
        let budget = Budget::new(100);
        let mut arriving = budget.open();
        assert_eq!(budget.used(), 0, "announced, nothing arrived yet");
        arriving.grow(30);
        arriving.grow(30);
        assert_eq!(budget.used(), 60);
        arriving.complete();
        assert_eq!(budget.used(), 60, "held until the job is done");
        let mut other = budget.open();
        assert!(!other.try_grow(50), "nothing else is arriving first");
        assert!(other.try_grow(40));
        drop(arriving);
        assert_eq!(budget.used(), 40);
        drop(other);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn the_first_request_arriving_may_always_grow() {
        let budget = Budget::new(100);
        let mut first = budget.open();
        let mut second = budget.open();
        first.grow(60);
        second.grow(40);
        // Both partly there, the budget full: the first goes on past it, so
        // neither waits for the other for ever.
        assert!(!second.try_grow(10));
        assert!(first.try_grow(10));
        assert_eq!(budget.used(), 110);
        let (tx, rx) = crossbeam_channel::bounded(1);
        let waiter = thread::spawn(move || {
            second.grow(10);
            tx.send(()).unwrap();
            second
        });
        // Whole, the first holds its bytes until done with; only then is
        // there room for the second.
        first.complete();
        assert!(rx.recv_timeout(Duration::from_millis(50)).is_err());
        drop(first);
        rx.recv_timeout(Duration::from_secs(5)).unwrap();
        let second = waiter.join().unwrap();
        assert_eq!(budget.used(), 50);
        drop(second);
        assert_eq!(budget.used(), 0);
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
