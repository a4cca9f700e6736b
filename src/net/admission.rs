//! Admission: who keeps a connection slot when slots run short. Every open
//! connection is in a `Registry` with its standing, which its own thread
//! keeps up to date through a `Mark` (atomics: no lock, nothing held across
//! I/O). When a newcomer would pass the cap on connections, or the cap on
//! connections from one address, the `Policy` (pure code) picks one that
//! is idle or has not sent a whole request yet, and the registry closes it:
//! connections that do nothing cannot lock out those that would work.
//! Connections at work are never closed; with every slot taken by them,
//! newcomers wait in the listen backlog until one closes or finishes.

use super::Stream;
use crate::sync::lock;
use crate::throttle::{self, Throttle};
use crossbeam_channel::{select, Receiver, Sender};
use std::collections::HashMap;
use std::net::{IpAddr, Shutdown, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What a connection is doing, as far as admission cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// No whole request yet.
    Incomplete,
    /// Nothing outstanding: waiting for its next request.
    Idle,
    /// A request outstanding, or a file transfer under way.
    Busy,
}

/// One open connection, as the policy sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    pub id: u64,
    pub peer: SocketAddr,
    pub standing: Standing,
    /// Proved the cluster key (or, at the balancer, a user logged in).
    pub trusted: bool,
    /// When it last did something (connected, sent a whole request,
    /// finished its work), in milliseconds on the registry's clock.
    pub active_ms: u64,
}

/// Which cap a newcomer ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cap {
    /// Connections open at once.
    Total,
    /// Connections open at once from the newcomer's address.
    PerIp,
}

/// What to do with a newcomer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Admit,
    /// Close this connection to make room, then admit.
    Evict {
        victim: Candidate,
        cap: Cap,
    },
    /// Its address has as many connections as it may, all at work, while
    /// others could get in: close the newcomer (waiting would hold up
    /// everyone else's).
    Refuse,
    /// Every slot is taken by connections at work: the newcomer waits
    /// until one closes or finishes.
    Wait,
}

/// The caps, and who makes room when one is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub max_connections: usize,
    pub max_per_ip: usize,
}

impl Policy {
    /// What to do with a newcomer from `ip` while `open` connections are
    /// open, `same_ip` of them from `ip`. `candidates` lists the open
    /// connections; it is only called at a cap.
    pub fn admit<I: IntoIterator<Item = Candidate>>(
        &self,
        open: usize,
        same_ip: usize,
        ip: IpAddr,
        candidates: impl FnOnce() -> I,
    ) -> Decision {
        // The address's own connections make room first: closing another
        // address's would not bring this one under its cap.
        if same_ip >= self.max_per_ip {
            let all: Vec<Candidate> = candidates().into_iter().collect();
            let own = all.iter().copied().filter(|c| c.peer.ip() == ip);
            return match victim(own) {
                Some(victim) => Decision::Evict {
                    victim,
                    cap: Cap::PerIp,
                },
                // Everyone waits alike when every slot is at work.
                None if !self.has_room(open, || all) => Decision::Wait,
                None => Decision::Refuse,
            };
        }
        if open >= self.max_connections {
            return match victim(candidates()) {
                Some(victim) => Decision::Evict {
                    victim,
                    cap: Cap::Total,
                },
                None => Decision::Wait,
            };
        }
        Decision::Admit
    }

    /// Whether a newcomer, from whatever address, could get in now: false
    /// when every slot is taken by connections at work.
    pub fn has_room<I: IntoIterator<Item = Candidate>>(
        &self,
        open: usize,
        candidates: impl FnOnce() -> I,
    ) -> bool {
        open < self.max_connections || victim(candidates()).is_some()
    }
}

/// The connection to close to make room: one that has not sent a whole
/// request before an idle one, an idle untrusted one before an idle trusted
/// one (the balancer's links and probes at a server, a logged-in client),
/// and among equals the one inactive longest. Never one at work.
fn victim(candidates: impl IntoIterator<Item = Candidate>) -> Option<Candidate> {
    candidates
        .into_iter()
        .filter_map(|c| {
            let rank = match (c.standing, c.trusted) {
                (Standing::Incomplete, _) => 0,
                (Standing::Idle, false) => 1,
                (Standing::Idle, true) => 2,
                (Standing::Busy, _) => return None,
            };
            Some(((rank, c.active_ms, c.id), c))
        })
        .min_by_key(|(key, _)| *key)
        .map(|(_, c)| c)
}

/// Where admission events are counted (the balancer's limit metrics).
#[derive(Debug, Default, Clone, Copy)]
pub struct Counters<'a> {
    /// A newcomer waited: every slot was taken by connections at work.
    pub waited: Option<&'a AtomicU64>,
    /// A connection was closed to make room.
    pub evicted: Option<&'a AtomicU64>,
    /// A newcomer was refused: its address was at its cap, all at work.
    pub refused: Option<&'a AtomicU64>,
}

/// How a listener admits connections.
#[derive(Debug, Clone, Copy)]
pub struct Admission<'a> {
    pub policy: Policy,
    /// How log lines name the two caps (the options that set them).
    pub names: CapNames,
    pub counters: Counters<'a>,
}

#[derive(Debug, Clone, Copy)]
pub struct CapNames {
    pub total: &'static str,
    pub per_ip: &'static str,
}

impl CapNames {
    /// The options of the balancer and the server.
    pub const OPTIONS: CapNames = CapNames {
        total: "--max-connections",
        per_ip: "--max-connections-per-ip",
    };
}

/// Connections closed to make room keep their descriptors until their
/// threads end (at once, normally); past this many at a time, newcomers
/// wait for them, so that a flood cannot run the process out of
/// descriptors.
const MAX_CLOSING: usize = 64;

/// At most one log line per kind of admission event this often.
const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// The open connections of one listener. Only its accept loop admits and
/// registers; connection threads only update their `Mark` and, at the
/// end, leave.
pub struct Registry {
    policy: Policy,
    names: CapNames,
    clock: Instant,
    open: Mutex<Open>,
    waker: Arc<Waker>,
    logged: Throttle<&'static str>,
}

#[derive(Default)]
struct Open {
    entries: HashMap<u64, Entry>,
    /// Connections by address, those being closed aside.
    per_ip: HashMap<IpAddr, usize>,
    /// Connections closed to make room whose threads have not ended yet.
    closing: usize,
}

struct Entry {
    stream: Stream,
    peer: SocketAddr,
    mark: Mark,
    closing: bool,
}

impl Open {
    /// Marks connection `victim` closing; its stream, to shut, when it is
    /// still open.
    fn close(&mut self, victim: &Candidate) -> Option<Stream> {
        let entry = self.entries.get_mut(&victim.id)?;
        entry.closing = true;
        let stream = entry.stream.clone();
        self.closing += 1;
        forget_ip(&mut self.per_ip, victim.peer.ip());
        Some(stream)
    }

    /// Counts connection `id` in.
    fn insert(&mut self, id: u64, stream: &Stream, peer: SocketAddr, mark: &Mark) {
        self.entries.insert(
            id,
            Entry {
                stream: stream.clone(),
                peer,
                mark: mark.clone(),
                closing: false,
            },
        );
        *self.per_ip.entry(peer.ip()).or_insert(0) += 1;
    }

    fn admitted(&self) -> usize {
        self.entries.len() - self.closing
    }

    fn candidates(&self) -> impl Iterator<Item = Candidate> + '_ {
        self.entries
            .iter()
            .filter(|(_, e)| !e.closing)
            .map(|(&id, e)| e.mark.candidate(id, e.peer))
    }
}

/// Wakes the accept loop, only when it waits.
struct Waker {
    waiting: AtomicBool,
    tx: Sender<()>,
    rx: Receiver<()>,
}

impl Waker {
    fn wake(&self) {
        if self.waiting.swap(false, Ordering::SeqCst) {
            let _ = self.tx.try_send(());
        }
    }
}

impl Registry {
    pub fn new(policy: Policy, names: CapNames) -> Arc<Registry> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        Arc::new(Registry {
            policy,
            names,
            clock: Instant::now(),
            open: Mutex::new(Open::default()),
            waker: Arc::new(Waker {
                waiting: AtomicBool::new(false),
                tx,
                rx,
            }),
            logged: Throttle::new(LOG_INTERVAL),
        })
    }

    /// Whether a newcomer could get in now (see `Policy::has_room`).
    fn has_room(&self) -> bool {
        let open = lock(&self.open);
        open.closing < MAX_CLOSING
            && self
                .policy
                .has_room(open.admitted(), || open.candidates().collect::<Vec<_>>())
    }

    fn closing_too_many(&self) -> bool {
        lock(&self.open).closing >= MAX_CLOSING
    }

    /// Returns once a newcomer could get in (true), or once `stop` is
    /// disconnected (false). Meanwhile new connections wait in the listen
    /// backlog.
    pub fn wait_for_room(&self, stop: &Receiver<()>, counters: &Counters) -> bool {
        while self.closing_too_many() {
            // Not for long, and not worth a line: they end at once.
            if !self.wait(stop, || !self.closing_too_many()) {
                return false;
            }
        }
        self.has_room() || self.wait_at_work(stop, counters)
    }

    /// Counts and logs a newcomer waiting because every slot is at work,
    /// then waits for room (see `wait_for_room`).
    fn wait_at_work(&self, stop: &Receiver<()>, counters: &Counters) -> bool {
        count(counters.waited);
        if let Some(skipped) = self.logged.check(&"wait") {
            log::warn!(
                "{} connections open ({} {}), all at work: new ones wait until one closes or finishes{}",
                self.policy.max_connections,
                self.names.total,
                self.policy.max_connections,
                throttle::more(skipped)
            );
        }
        self.wait(stop, || self.has_room())
    }

    /// Waits until `ready` holds or `stop` is disconnected (false). The
    /// flag is raised before `ready` is checked, and whoever changes what
    /// it checks lowers the flag after: a wake-up is never lost.
    fn wait(&self, stop: &Receiver<()>, ready: impl Fn() -> bool) -> bool {
        loop {
            self.waker.waiting.store(true, Ordering::SeqCst);
            if ready() {
                self.waker.waiting.store(false, Ordering::SeqCst);
                return true;
            }
            select! {
                recv(self.waker.rx) -> _ => {}
                recv(stop) -> _ => {
                    self.waker.waiting.store(false, Ordering::SeqCst);
                    return false;
                }
            }
        }
    }

    /// Admits a newcomer as connection `id`, closing another to make room
    /// if need be (see `Policy`). `None` when it is refused, or when `stop`
    /// is disconnected while it waits; the caller then drops it.
    pub fn admit(
        &self,
        id: u64,
        stream: &Stream,
        peer: SocketAddr,
        stop: &Receiver<()>,
        counters: &Counters,
    ) -> Option<Mark> {
        let ip = peer.ip();
        loop {
            let mut open = lock(&self.open);
            if open.closing >= MAX_CLOSING {
                drop(open);
                // Not for long, and not worth a line: they end at once.
                if !self.wait(stop, || !self.closing_too_many()) {
                    return None;
                }
                continue;
            }
            let same_ip = open.per_ip.get(&ip).copied().unwrap_or(0);
            let decision = self.policy.admit(open.admitted(), same_ip, ip, || {
                open.candidates().collect::<Vec<_>>()
            });
            let evicted = match decision {
                Decision::Admit => None,
                // Picked from the entries under this same lock.
                Decision::Evict { victim, cap } => open.close(&victim).map(|s| (victim, cap, s)),
                Decision::Refuse => {
                    drop(open);
                    self.refuse(counters, same_ip, peer);
                    return None;
                }
                Decision::Wait => {
                    drop(open);
                    if !self.wait_at_work(stop, counters) {
                        return None;
                    }
                    continue;
                }
            };
            let mark = Mark::new(self.clock, self.waker.clone());
            open.insert(id, stream, peer, &mark);
            let admitted = open.admitted();
            drop(open);
            if let Some((victim, cap, stream)) = evicted {
                // Both ways: its thread's read ends at once, and so does it.
                let _ = stream.tcp().shutdown(Shutdown::Both);
                count(counters.evicted);
                self.log_eviction(&victim, cap, peer, admitted, same_ip);
            }
            return Some(mark);
        }
    }

    /// Counts and logs (now and then) a newcomer refused.
    fn refuse(&self, counters: &Counters, same_ip: usize, peer: SocketAddr) {
        count(counters.refused);
        if let Some(skipped) = self.logged.check(&"refuse") {
            log::warn!(
                "{same_ip} connections open from {} ({} {}), all at work: \
                 refused a new one from {peer}{}",
                peer.ip(),
                self.names.per_ip,
                self.policy.max_per_ip,
                throttle::more(skipped)
            );
        }
    }

    fn log_eviction(
        &self,
        victim: &Candidate,
        cap: Cap,
        peer: SocketAddr,
        admitted: usize,
        same_ip: usize,
    ) {
        let Some(skipped) = self.logged.check(&"evict") else {
            return;
        };
        let reached = match cap {
            Cap::Total => format!(
                "{admitted} connections open ({} {})",
                self.names.total, self.policy.max_connections
            ),
            Cap::PerIp => format!(
                "{same_ip} connections open from {} ({} {})",
                peer.ip(),
                self.names.per_ip,
                self.policy.max_per_ip
            ),
        };
        let what = match (victim.standing, victim.trusted) {
            (Standing::Incomplete, _) => "a connection with no whole request yet",
            (_, false) => "an idle connection",
            (_, true) => "an idle trusted connection",
        };
        let idle = self
            .clock
            .elapsed()
            .saturating_sub(Duration::from_millis(victim.active_ms));
        log::warn!(
            "{reached}: closed {what} from {} (inactive for {:.1} s) to admit {peer}{}",
            victim.peer,
            idle.as_secs_f64(),
            throttle::more(skipped)
        );
    }

    /// Forgets a connection whose thread has ended.
    pub fn leave(&self, id: u64) {
        let mut open = lock(&self.open);
        if let Some(entry) = open.entries.remove(&id) {
            if entry.closing {
                open.closing -= 1;
            } else {
                forget_ip(&mut open.per_ip, entry.peer.ip());
            }
        }
        drop(open);
        self.waker.wake();
    }

    /// Shuts down the read half of every open connection (a shutdown:
    /// replies can still be written). Returns how many there were.
    pub fn end_reading(&self) -> usize {
        let streams: Vec<Stream> = lock(&self.open)
            .entries
            .values()
            .map(|e| e.stream.clone())
            .collect();
        for stream in &streams {
            // Fails only if the peer is already gone, which ends it too.
            let _ = stream.tcp().shutdown(Shutdown::Read);
        }
        streams.len()
    }
}

fn forget_ip(per_ip: &mut HashMap<IpAddr, usize>, ip: IpAddr) {
    if let Some(n) = per_ip.get_mut(&ip) {
        *n -= 1;
        if *n == 0 {
            per_ip.remove(&ip);
        }
    }
}

fn count(counter: Option<&AtomicU64>) {
    if let Some(counter) = counter {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// A connection's standing, kept up to date by its own thread (and by the
/// jobs it hands on, through `Busy`).
#[derive(Clone)]
pub struct Mark(Arc<MarkState>);

struct MarkState {
    clock: Instant,
    waker: Arc<Waker>,
    /// A whole request has arrived.
    complete: AtomicBool,
    trusted: AtomicBool,
    /// Requests outstanding and transfers under way.
    busy: AtomicUsize,
    active_ms: AtomicU64,
    /// Whether output waits in queues to be written (`watch_output`).
    output: std::sync::OnceLock<Box<dyn Fn() -> bool + Send + Sync>>,
}

impl std::fmt::Debug for Mark {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mark")
            .field("standing", &self.standing())
            .field("trusted", &self.0.trusted.load(Ordering::Relaxed))
            .finish()
    }
}

impl Mark {
    fn new(clock: Instant, waker: Arc<Waker>) -> Mark {
        let mark = Mark(Arc::new(MarkState {
            clock,
            waker,
            complete: AtomicBool::new(false),
            trusted: AtomicBool::new(false),
            busy: AtomicUsize::new(0),
            active_ms: AtomicU64::new(0),
            output: std::sync::OnceLock::new(),
        }));
        mark.touch();
        mark
    }

    /// A mark in no registry, for a connection served outside a listener.
    pub fn detached() -> Mark {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let waker = Waker {
            waiting: AtomicBool::new(false),
            tx,
            rx,
        };
        Mark::new(Instant::now(), Arc::new(waker))
    }

    /// A whole request has arrived.
    pub fn arrived(&self) {
        self.0.complete.store(true, Ordering::Relaxed);
        self.touch();
    }

    /// The peer proved the cluster key, or a user logged in.
    pub fn trust(&self) {
        self.0.trusted.store(true, Ordering::Relaxed);
    }

    /// Marks the connection at work until the guard is dropped (a request
    /// outstanding, a transfer under way).
    pub fn busy(&self) -> Busy {
        self.0.busy.fetch_add(1, Ordering::SeqCst);
        self.touch();
        Busy(self.clone())
    }

    /// Counts output waiting in queues as work: `pending` says whether
    /// any does. Whoever takes it off a queue must hold a `busy` guard from
    /// before it does until it is written; then the connection is never
    /// seen idle with a reply on its way. Set once; later calls do nothing.
    pub fn watch_output(&self, pending: impl Fn() -> bool + Send + Sync + 'static) {
        let _ = self.0.output.set(Box::new(pending));
    }

    pub fn standing(&self) -> Standing {
        let busy = || self.0.busy.load(Ordering::SeqCst) > 0;
        let queued = || self.0.output.get().is_some_and(|pending| pending());
        // Busy again after the queues: a writer marks itself busy before it
        // takes output off them, so one of the three sees it.
        if busy() || queued() || busy() {
            Standing::Busy
        } else if self.0.complete.load(Ordering::Relaxed) {
            Standing::Idle
        } else {
            Standing::Incomplete
        }
    }

    fn touch(&self) {
        let ms = self.0.clock.elapsed().as_millis() as u64;
        self.0.active_ms.store(ms, Ordering::Relaxed);
    }

    fn candidate(&self, id: u64, peer: SocketAddr) -> Candidate {
        Candidate {
            id,
            peer,
            standing: self.standing(),
            trusted: self.0.trusted.load(Ordering::Relaxed),
            active_ms: self.0.active_ms.load(Ordering::Relaxed),
        }
    }
}

/// A connection at work, until dropped; then, if it has nothing else
/// outstanding, it may be closed to make room, and a waiting accept loop
/// is told.
#[derive(Debug)]
pub struct Busy(Mark);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.touch();
        if self.0 .0.busy.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0 .0.waker.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    fn conn(id: u64, from: u8, standing: Standing, trusted: bool, active_ms: u64) -> Candidate {
        Candidate {
            id,
            peer: SocketAddr::new(ip(from), 40000 + id as u16),
            standing,
            trusted,
            active_ms,
        }
    }

    const POLICY: Policy = Policy {
        max_connections: 4,
        max_per_ip: 2,
    };

    fn decide(open: &[Candidate], from: u8) -> Decision {
        let same = open.iter().filter(|c| c.peer.ip() == ip(from)).count();
        POLICY.admit(open.len(), same, ip(from), || open.to_vec())
    }

    fn evicted(decision: Decision) -> (u64, Cap) {
        match decision {
            Decision::Evict { victim, cap } => (victim.id, cap),
            other => panic!("expected an eviction, got {other:?}"),
        }
    }

    use Standing::{Busy, Idle, Incomplete};

    #[test]
    fn below_both_caps_everyone_gets_in() {
        assert_eq!(decide(&[], 1), Decision::Admit);
        let open = [conn(1, 1, Idle, false, 0), conn(2, 2, Busy, false, 0)];
        assert_eq!(decide(&open, 3), Decision::Admit);
        assert_eq!(decide(&open, 1), Decision::Admit);
    }

    #[test]
    fn incomplete_then_idle_untrusted_then_idle_trusted_never_busy() {
        let mut open = vec![
            conn(1, 1, Busy, false, 0),
            conn(2, 2, Idle, true, 0),
            conn(3, 3, Idle, false, 50),
            conn(4, 4, Incomplete, false, 90),
        ];
        assert_eq!(evicted(decide(&open, 5)), (4, Cap::Total));
        open.retain(|c| c.id != 4);
        open.push(conn(5, 5, Busy, false, 95));
        assert_eq!(evicted(decide(&open, 6)), (3, Cap::Total));
        open.retain(|c| c.id != 3);
        open.push(conn(6, 6, Busy, false, 99));
        assert_eq!(evicted(decide(&open, 7)), (2, Cap::Total));
        open.retain(|c| c.id != 2);
        open.push(conn(7, 7, Busy, false, 99));
        assert_eq!(decide(&open, 8), Decision::Wait);
        assert!(!POLICY.has_room(open.len(), || open.clone()));
    }

    #[test]
    fn the_longest_inactive_goes_first_among_equals() {
        let open = [
            conn(1, 1, Idle, false, 300),
            conn(2, 2, Idle, false, 100),
            conn(3, 3, Idle, false, 200),
            conn(4, 4, Idle, true, 0),
        ];
        assert_eq!(evicted(decide(&open, 5)), (2, Cap::Total));
    }

    #[test]
    fn at_its_cap_an_address_makes_room_from_its_own() {
        // Address 1 at its cap of 2, the whole listener not full: one of
        // its own goes, even if another address has older idle ones.
        let open = [
            conn(1, 2, Incomplete, false, 0),
            conn(2, 1, Idle, false, 20),
            conn(3, 1, Incomplete, false, 30),
        ];
        assert_eq!(evicted(decide(&open, 1)), (3, Cap::PerIp));
        // All of its own at work: refused, nobody else closed.
        let open = [
            conn(1, 2, Incomplete, false, 0),
            conn(2, 1, Busy, false, 20),
            conn(3, 1, Busy, false, 30),
        ];
        assert_eq!(decide(&open, 1), Decision::Refuse);
        // Another address still gets in.
        assert_eq!(decide(&open, 3), Decision::Admit);
        // With every slot at work, it waits like everyone else.
        let open = [
            conn(1, 2, Busy, false, 0),
            conn(2, 3, Busy, false, 0),
            conn(3, 1, Busy, false, 20),
            conn(4, 1, Busy, false, 30),
        ];
        assert_eq!(decide(&open, 1), Decision::Wait);
    }

    #[test]
    fn a_full_listener_with_an_address_at_its_cap_takes_from_that_address() {
        let open = [
            conn(1, 2, Incomplete, false, 0),
            conn(2, 3, Incomplete, false, 0),
            conn(3, 1, Idle, true, 20),
            conn(4, 1, Idle, false, 30),
        ];
        assert_eq!(evicted(decide(&open, 1)), (4, Cap::PerIp));
        assert_eq!(evicted(decide(&open, 4)), (1, Cap::Total));
    }

    /// A connected pair: the registry's side, and the peer's.
    fn pair(listener: &std::net::TcpListener) -> (Stream, std::net::TcpStream) {
        let peer = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (ours, _) = listener.accept().unwrap();
        (Stream::new(ours), peer)
    }

    #[test]
    fn a_registry_closes_its_victim_and_wakes_a_waiting_accept_loop() {
        use std::io::Read;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let registry = Registry::new(
            Policy {
                max_connections: 1,
                max_per_ip: 1,
            },
            CapNames::OPTIONS,
        );
        let evicted = AtomicU64::new(0);
        let counters = Counters {
            evicted: Some(&evicted),
            ..Counters::default()
        };
        let (_stop_tx, stop) = crossbeam_channel::bounded::<()>(0);
        let from = SocketAddr::from(([127, 0, 0, 1], 1));

        let (first, mut first_peer) = pair(&listener);
        registry.admit(1, &first, from, &stop, &counters).unwrap();
        let (second, _second_peer) = pair(&listener);
        let mark = registry.admit(2, &second, from, &stop, &counters).unwrap();
        assert_eq!(evicted.load(Ordering::Relaxed), 1);
        // The first was shut down: its peer reads the end of the stream.
        let mut byte = [0u8; 1];
        assert_eq!(first_peer.read(&mut byte).unwrap(), 0);
        registry.leave(1);

        // At work, the second cannot make room: a newcomer waits until it
        // has finished.
        let busy = mark.busy();
        assert!(!registry.has_room());
        let (done_tx, done) = crossbeam_channel::bounded(1);
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let room = registry.wait_for_room(&stop, &Counters::default());
                done_tx.send(room).unwrap();
            });
            assert!(done.recv_timeout(Duration::from_millis(100)).is_err());
            drop(busy);
            assert_eq!(done.recv_timeout(Duration::from_secs(5)), Ok(true));
        });
    }

    #[test]
    fn a_mark_is_busy_while_any_guard_lives() {
        let mark = Mark::detached();
        assert_eq!(mark.standing(), Incomplete);
        mark.arrived();
        assert_eq!(mark.standing(), Idle);
        let a = mark.busy();
        let b = mark.busy();
        drop(a);
        assert_eq!(mark.standing(), Busy);
        drop(b);
        assert_eq!(mark.standing(), Idle);
    }
}
