//! What the dispatcher publishes for the other threads: the servers that
//! are in the pool, each behind a `Gate` (can it take work, how many
//! requests it has on the wire, how to reach it), and how many jobs wait
//! in its queue. A connection thread picks a server on the board and sends
//! its client's request itself while some server can take it and nothing
//! waits before it; the dispatcher's thread is not woken on that path. The
//! policy's cursor is on the board too, shared by every thread that picks,
//! so that round robin gives each server its turn whoever picks.
//!
//! A place on a server (`--max-in-flight`) is taken with an atomic add on
//! its gate before the request is sent, and given back when the request
//! ends (`Gate::release`).

use super::link::Link;
use super::replicas::Group;
use super::stats::ServerStats;
use super::ServerId;
use crate::policy::{Candidate, Load, PolicyKind};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::{Arc, Mutex, RwLock};

/// One server as every thread sees it.
pub struct Gate {
    pub id: ServerId,
    pub addr: SocketAddr,
    /// Its counters (`in_flight` is the count of places taken).
    pub stats: Arc<ServerStats>,
    pub link: Link,
    /// Up, not overloaded, not draining: new work may go to it.
    accepting: AtomicBool,
    /// Its figures from its last status report, for `--policy resources`.
    load: Mutex<Option<Load>>,
}

impl Gate {
    pub fn new(id: ServerId, addr: SocketAddr, stats: Arc<ServerStats>, link: Link) -> Gate {
        Gate {
            id,
            addr,
            stats,
            link,
            accepting: AtomicBool::new(false),
            load: Mutex::new(None),
        }
    }

    pub fn name(&self) -> &str {
        &self.stats.name
    }

    pub fn in_flight(&self) -> usize {
        self.stats.in_flight.load(Relaxed) as usize
    }

    pub fn accepting(&self) -> bool {
        self.accepting.load(Relaxed)
    }

    /// Can take work, or may soon: no probe has answered yet (a copy of a
    /// document waits for it rather than being refused at start).
    pub fn may_accept(&self) -> bool {
        self.accepting() || self.stats.state() == crate::health::State::Unknown
    }

    /// For the dispatcher: whether new work may go to it.
    pub fn set_accepting(&self, accepting: bool) {
        self.accepting.store(accepting, Relaxed);
    }

    /// For the dispatcher: whether every end of a request on it is
    /// reported (it drains, or its storage errors are being counted).
    pub fn set_watched(&self, watched: bool) {
        self.stats.watched.store(watched, Relaxed);
    }

    pub fn set_load(&self, load: Option<Load>) {
        *crate::sync::lock(&self.load) = load;
    }

    /// Takes a place on it, if one of `max` is free.
    pub fn try_take(&self, max: usize) -> bool {
        if self.stats.in_flight.fetch_add(1, Relaxed) < max as u64 {
            return true;
        }
        self.stats.in_flight.fetch_sub(1, Relaxed);
        false
    }

    /// Takes a place whatever the count (a job the dispatcher sends to the
    /// one server that may take it).
    pub fn take(&self) {
        self.stats.in_flight.fetch_add(1, Relaxed);
    }

    fn candidate(&self, max: usize, avoided: bool) -> Candidate {
        let in_flight = self.in_flight();
        Candidate {
            eligible: self.accepting() && in_flight < max && !avoided,
            in_flight,
            load: *crate::sync::lock(&self.load),
        }
    }
}

/// The published state.
pub struct Board {
    servers: RwLock<Arc<Vec<Arc<Gate>>>>,
    cursor: AtomicUsize,
    /// Jobs waiting in the dispatcher's queue: none may be overtaken.
    queued: AtomicUsize,
    /// Shutting down: every end of a request is reported.
    draining: AtomicBool,
    /// Addresses an operator took out: their heartbeats are refused.
    banned: RwLock<BTreeSet<SocketAddr>>,
    max_in_flight: usize,
    policy: PolicyKind,
}

impl Board {
    pub fn new(policy: PolicyKind, max_in_flight: usize) -> Board {
        Board {
            servers: RwLock::new(Arc::new(Vec::new())),
            cursor: AtomicUsize::new(0),
            queued: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
            banned: RwLock::new(BTreeSet::new()),
            max_in_flight,
            policy,
        }
    }

    pub fn policy(&self) -> PolicyKind {
        self.policy
    }

    pub fn max_in_flight(&self) -> usize {
        self.max_in_flight
    }

    /// The servers in the pool, in the order they joined.
    pub fn servers(&self) -> Arc<Vec<Arc<Gate>>> {
        self.servers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// For the dispatcher: the servers in the pool from now on.
    pub fn publish(&self, servers: Vec<Arc<Gate>>) {
        *self.servers.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(servers);
    }

    /// The gate of a server in the pool with that address.
    pub fn find(&self, addr: SocketAddr) -> Option<Arc<Gate>> {
        self.servers().iter().find(|g| g.addr == addr).cloned()
    }

    /// For the dispatcher: the addresses an operator took out.
    pub fn set_banned(&self, banned: BTreeSet<SocketAddr>) {
        *self.banned.write().unwrap_or_else(|p| p.into_inner()) = banned;
    }

    /// Whether an operator took this address out of the pool.
    pub fn is_banned(&self, addr: SocketAddr) -> bool {
        self.banned
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&addr)
    }

    pub fn queued(&self) -> usize {
        self.queued.load(Relaxed)
    }

    /// A job goes to the dispatcher's queue (counted before it is sent, so
    /// that no thread overtakes it meanwhile).
    pub fn enqueued(&self) {
        self.queued.fetch_add(1, Relaxed);
    }

    /// For the dispatcher: jobs left its queue.
    pub fn dequeued(&self, n: usize) {
        self.queued.fetch_sub(n, Relaxed);
    }

    pub fn set_draining(&self) {
        self.draining.store(true, Relaxed);
    }

    /// Whether the end of a request on `server` must be reported to the
    /// dispatcher: jobs wait for a place, it watches that server, or it is
    /// waiting for servers to have nothing in flight.
    pub fn must_report(&self, server: &ServerStats) -> bool {
        self.queued() > 0 || server.watched.load(Relaxed) || self.draining.load(Relaxed)
    }

    /// For a connection thread: a server that can take a job now, with a
    /// place taken on it; `None` when it must wait in the dispatcher's
    /// queue (jobs wait there already, or no server can take it now).
    pub fn take_now(&self, avoid: &[ServerId]) -> Option<Arc<Gate>> {
        if self.queued() > 0 {
            return None;
        }
        self.take(&self.servers(), avoid)
    }

    /// A server among `servers` that can take a job now, avoiding those in
    /// `avoid` while another is up; a place is taken on it.
    pub fn take(&self, servers: &[Arc<Gate>], avoid: &[ServerId]) -> Option<Arc<Gate>> {
        self.take_excluding(servers, avoid, &[])
    }

    /// For a copy of a document (`--replicas`): `take_now`, never on a
    /// server another copy of it has claimed; the server is claimed.
    pub fn take_now_for(&self, avoid: &[ServerId], group: &Group) -> Option<Arc<Gate>> {
        if self.queued() > 0 {
            return None;
        }
        self.take_for(&self.servers(), avoid, group)
    }

    /// `take` for a copy of a document: never on a server another copy of
    /// it has claimed; the server is claimed.
    pub fn take_for(
        &self,
        servers: &[Arc<Gate>],
        avoid: &[ServerId],
        group: &Group,
    ) -> Option<Arc<Gate>> {
        let gate = self.take_excluding(servers, avoid, &group.claimed())?;
        if group.claim(gate.id) {
            return Some(gate);
        }
        // Another thread placed a copy there meanwhile.
        gate.stats.in_flight.fetch_sub(1, Relaxed);
        None
    }

    /// Whether some server up is not in `exclude`: a copy can go there
    /// once it has a free place.
    pub fn any_up_besides(&self, servers: &[Arc<Gate>], exclude: &[ServerId]) -> bool {
        servers
            .iter()
            .any(|g| g.may_accept() && !exclude.contains(&g.id))
    }

    /// `take`, never on a server in `exclude`.
    fn take_excluding(
        &self,
        servers: &[Arc<Gate>],
        avoid: &[ServerId],
        exclude: &[ServerId],
    ) -> Option<Arc<Gate>> {
        // Every server not yet tried is down or overloaded: trying one
        // again beats waiting. (One that is up but busy is worth the wait:
        // it is soon free.)
        let untried_up = servers
            .iter()
            .any(|g| g.accepting() && !avoid.contains(&g.id) && !exclude.contains(&g.id));
        let avoid = if untried_up { avoid } else { &[] };
        // A place may go between the look and the take: look again.
        for _ in 0..=servers.len() {
            let candidates: Vec<Candidate> = servers
                .iter()
                .map(|g| {
                    let out = avoid.contains(&g.id) || exclude.contains(&g.id);
                    g.candidate(self.max_in_flight, out)
                })
                .collect();
            let i = self.policy.pick_shared(&self.cursor, &candidates)?;
            if servers[i].try_take(self.max_in_flight) {
                return Some(servers[i].clone());
            }
        }
        None
    }

    /// A server for a file transfer, `prefer`red when it can take work:
    /// files do not go through the links, so a server's documents in
    /// flight do not rule it out.
    pub fn pick_for_file(&self, prefer: Option<&str>, avoid: &[String]) -> Option<Arc<Gate>> {
        let servers = self.servers();
        let usable = |g: &Gate| g.accepting() && !avoid.iter().any(|a| a == g.name());
        if let Some(g) = servers.iter().find(|g| Some(g.name()) == prefer) {
            if usable(g) {
                return Some(g.clone());
            }
        }
        let candidates: Vec<Candidate> = servers
            .iter()
            .map(|g| Candidate {
                eligible: usable(g),
                in_flight: g.in_flight(),
                load: *crate::sync::lock(&g.load),
            })
            .collect();
        let i = self.policy.pick_shared(&self.cursor, &candidates)?;
        Some(servers[i].clone())
    }
}
