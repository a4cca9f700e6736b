//! Flow control: what keeps the balancer's memory bounded whatever clients
//! do. A client connection may have only so many requests queued or in
//! flight (`Window`), and all connections together only so many payload
//! bytes (`Budget`). At either limit the connection's reader simply waits,
//! stops reading its socket, and TCP slows the client down: nothing fails.

use crossbeam_channel::{Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};

/// Payload bytes held by queued and in-flight requests, across all
/// connections.
#[derive(Debug)]
pub struct Budget {
    max: usize,
    used: Mutex<usize>,
    freed: Condvar,
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
            used: Mutex::new(0),
            freed: Condvar::new(),
        })
    }

    /// Takes `bytes`, waiting while that would pass the maximum. A request
    /// larger than the whole budget waits until nothing else is held, so it
    /// still goes through, alone.
    pub fn acquire(self: &Arc<Self>, bytes: usize) -> Reservation {
        let mut used = crate::net::lock(&self.used);
        while *used > 0 && *used + bytes > self.max {
            used = self.freed.wait(used).unwrap_or_else(|p| p.into_inner());
        }
        *used += bytes;
        Reservation {
            budget: self.clone(),
            bytes,
        }
    }

    pub fn used(&self) -> usize {
        *crate::net::lock(&self.used)
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let mut used = crate::net::lock(&self.budget.used);
        *used -= self.bytes;
        drop(used);
        self.budget.freed.notify_all();
    }
}

/// The requests one connection may have outstanding: a bounded channel used
/// as a counting semaphore.
pub struct Window {
    take: Sender<()>,
    give_back: Receiver<()>,
}

/// One slot of a `Window`, given back when dropped (when its request is
/// answered and done with).
#[derive(Debug)]
pub struct Permit(Receiver<()>);

impl Window {
    pub fn new(size: usize) -> Window {
        let (take, give_back) = crossbeam_channel::bounded(size.max(1));
        Window { take, give_back }
    }

    /// Waits for a free slot.
    pub fn acquire(&self) -> Permit {
        // Cannot fail: this window holds the receiver too.
        let _ = self.take.send(());
        Permit(self.give_back.clone())
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let _ = self.0.try_recv();
    }
}

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
        assert!(window.take.try_send(()).is_err(), "window should be full");
        drop(p1);
        let _p3 = window.acquire();
    }
}
