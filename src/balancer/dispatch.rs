//! The dispatcher: one thread that owns the queue of jobs waiting for a
//! server, the health of every server and the pool's membership. Others
//! talk to it through its inbox (`event::Event`) and it takes everything
//! waiting there at each wake-up. It does no I/O: it hands jobs to a
//! link's writer (`Link::enqueue`), has its errand thread carry out what
//! needs a connection (`errands`), and its tracker commit what is to be
//! remembered. It publishes what a pick needs on the `Board`, where
//! connection threads find a server for their requests without waking it.
//!
//! A job waits in the queue only when no server can take it: none that is
//! up, not draining and below `--max-in-flight`. Waiting for a busy server
//! is not a failure; `--queue-timeout` runs only while no server can take
//! work at all (every one down or overloaded). A job that fails on a
//! server goes back to the front of the queue and to a server it has not
//! tried while there is one.
//!
//! Exactly once: a job keeps its request number across retries, and
//! remembers the servers that may have stored it without answering. Once
//! it is stored on another one, each of those is told to `forget` it as
//! soon as it is up again. A job cut off from a server an operator removed
//! goes elsewhere only once that server has forgotten it, or can no longer
//! store it (its `not_after_ms` has passed).
//!
//! Membership (`membership.rs`): servers join and leave while everything
//! runs. Shutting down: when `stop` disconnects, the queue and the
//! requests on the wire are finished until `--drain-timeout`; what is left
//! then gets a `shutting_down` reply.

use super::board::{Board, Gate};
use super::errands::Errand;
use super::event::{Event, Picked};
use super::monitor::Roster;
use super::stats::Stats;
use super::tracking::{TrackEvent, Tracker};
use super::work::{Failure, Job, Work};
use super::ServerId;
use crate::health::{Health, Observation, State};
use crate::ids;
use crate::proto::{ClientKey, ErrorCode, Reply};
use crate::text::now_ms;
use crossbeam_channel::{select, Receiver, Sender};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

mod membership;

/// File transfers waiting for a server, at most (the oldest is dropped
/// past it: its connection has given up by then).
const MAX_PARKED: usize = 100_000;
/// Request numbers sent to a server in one `forget`.
const FORGET_BATCH: usize = 1024;
/// After the drain deadline, how long requests cut off on the wire may take
/// to come back before the dispatcher stops anyway.
const ABORT_GRACE: Duration = Duration::from_secs(5);
/// Messages handled per wake-up at most, so that timers are not starved.
const INBOX_BATCH: usize = 4096;

#[derive(Debug, Clone)]
pub struct Settings {
    pub max_attempts: u32,
    pub queue_timeout: Duration,
    pub drain_timeout: Duration,
    /// Servers can be told to forget numbers (not so the original format).
    pub forget: bool,
    /// Good status probes in a row that bring a down server back.
    pub rise: u32,
    /// Failed status probes in a row that take a server down.
    pub fall: u32,
}

/// The dispatcher's view of one server in the pool.
struct Slot {
    gate: Arc<Gate>,
    health: Health,
    /// Leaving once its requests in flight are done; whom to tell then.
    draining: Option<Vec<(u64, Sender<Reply>)>>,
    /// Request numbers it may hold that are stored on another server.
    forget: BTreeSet<u64>,
    forget_in_flight: bool,
    /// Client keys it may hold that are stored on another server.
    forget_keys: BTreeSet<ClientKey>,
    forget_keys_in_flight: bool,
}

/// A server an operator removed, while the jobs cut off from it are not
/// all settled.
struct Leaving {
    gate: Arc<Gate>,
    /// Cut off from it, waiting to go elsewhere until it has forgotten
    /// them (or can no longer store them).
    held: Vec<Job>,
    /// Numbers asked to be forgotten, not yet answered.
    asked: BTreeSet<u64>,
    /// It could not be asked: held jobs wait for `release_at`.
    unreachable: bool,
    /// When held jobs it could not be asked about may go elsewhere: their
    /// `not_after_ms` has passed.
    release_at: Option<Instant>,
}

impl Leaving {
    /// Numbers of held jobs not asked to be forgotten yet.
    fn unasked(&self) -> Vec<u64> {
        self.held
            .iter()
            .filter_map(|j| j.request_number)
            .filter(|n| !self.asked.contains(n))
            .collect()
    }

    /// When every held job's `not_after_ms` has passed, seen from `now`.
    fn held_until(&self, now: Instant) -> Instant {
        storable_until(&self.held, now)
    }
}

/// When a server can no longer store any of `jobs` (their `not_after_ms`
/// have all passed), seen from `now`.
fn storable_until(jobs: &[Job], now: Instant) -> Instant {
    let latest = jobs.iter().map(|j| j.not_after_ms).max().unwrap_or(0);
    now + Duration::from_millis(latest.saturating_sub(now_ms()))
}

pub struct Dispatcher {
    slots: BTreeMap<ServerId, Slot>,
    leaving: BTreeMap<ServerId, Leaving>,
    board: Arc<Board>,
    /// The servers the monitor probes: the slots' ids and addresses.
    roster: Roster,
    /// Addresses an operator drained or removed: their heartbeats do not
    /// bring them back; `add_server` does.
    banned: BTreeSet<SocketAddr>,
    waiting: VecDeque<Job>,
    numbers: Arc<ids::Generator>,
    settings: Settings,
    stats: Arc<Stats>,
    /// Since when no server can take work, if that is the case now.
    outage_since: Option<Instant>,
    /// When the first waiting job expires, while in an outage.
    next_expiry: Option<Instant>,
    /// File transfers waiting for a server to come up.
    parked_picks: VecDeque<ParkedPick>,
    /// Set once shutting down: when the remaining work is cut off.
    drain_deadline: Option<Instant>,
    aborted: bool,
    /// Records what happens to store jobs, and the pool.
    tracker: Option<Tracker>,
    /// Names of servers that left, for the jobs that outlive them.
    former: BTreeMap<ServerId, String>,
    /// What needs a connection of its own (see `errands`).
    errands: Sender<Errand>,
    /// The slots' gates changed: publish them.
    changed: bool,
}

/// A file transfer's request for a server: preferred, avoided, answer.
type ParkedPick = (Option<String>, Vec<String>, Sender<Option<Picked>>);

impl Dispatcher {
    /// A dispatcher over the servers given (more may join later), with no
    /// thread of its own yet (`run`).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        servers: Vec<super::event::NewLink>,
        board: Arc<Board>,
        roster: Roster,
        numbers: Arc<ids::Generator>,
        settings: Settings,
        stats: Arc<Stats>,
        tracker: Option<Tracker>,
        errands: Sender<Errand>,
    ) -> Dispatcher {
        let mut d = Dispatcher {
            slots: BTreeMap::new(),
            leaving: BTreeMap::new(),
            board,
            roster,
            banned: BTreeSet::new(),
            waiting: VecDeque::new(),
            numbers,
            settings,
            stats,
            outage_since: Some(Instant::now()),
            next_expiry: None,
            parked_picks: VecDeque::new(),
            drain_deadline: None,
            aborted: false,
            tracker,
            former: BTreeMap::new(),
            errands,
            changed: true,
        };
        for new in servers {
            d.add_slot(new);
        }
        d.publish();
        d
    }

    /// Addresses that stay out until an operator adds them again.
    pub fn with_banned(mut self, banned: impl IntoIterator<Item = SocketAddr>) -> Self {
        self.banned.extend(banned);
        self.board.set_banned(self.banned.iter().copied().collect());
        self
    }

    /// Runs the dispatcher until shut down (`stop` disconnected) and
    /// drained. The servers' links are dropped at the end, so that their
    /// threads stop.
    pub fn run(mut self, inbox: Receiver<Event>, stop: Receiver<()>) {
        log::info!(
            "dispatcher: {} policy over {} servers",
            self.board.policy().name(),
            self.slots.len()
        );
        loop {
            if self.drain_deadline.is_some() && self.is_idle() {
                break;
            }
            let timer = match self.next_timer() {
                Some(at) => crossbeam_channel::at(at),
                None => crossbeam_channel::never(),
            };
            let stop_in = if self.drain_deadline.is_some() {
                crossbeam_channel::never()
            } else {
                stop.clone()
            };
            select! {
                recv(inbox) -> event => {
                    // Disconnected only once every other thread is gone.
                    let Ok(event) = event else { break };
                    self.on_event(event);
                    for event in inbox.try_iter().take(INBOX_BATCH) {
                        self.on_event(event);
                    }
                }
                recv(stop_in) -> _ => self.begin_drain(Instant::now()),
                recv(timer) -> _ => {
                    if self.on_timer(Instant::now()) {
                        break;
                    }
                }
            }
            self.after_wake();
        }
        let forgets: usize = self.slots.values().map(|s| s.forget.len()).sum();
        if forgets > 0 {
            log::warn!("shutting down with {forgets} duplicate copies not yet removed from servers that were away");
        }
        self.board.publish(Vec::new());
        self.slots.clear();
        self.leaving.clear();
        log::info!("dispatcher stopped");
    }

    /// What every wake-up ends with: waiting jobs go to servers that can
    /// take them, settled servers leave, and the board shows the result.
    fn after_wake(&mut self) {
        self.dispatch_waiting();
        self.settle_leaving(Instant::now());
        self.finish_draining();
        self.publish();
        self.stats
            .queue_depth
            .store(self.waiting.len() as u64, Relaxed);
    }

    fn is_idle(&self) -> bool {
        self.waiting.is_empty()
            && self.leaving.is_empty()
            && self.slots.values().all(|s| s.gate.in_flight() == 0)
    }

    fn begin_drain(&mut self, now: Instant) {
        if self.drain_deadline.is_none() {
            log::info!(
                "shutting down: finishing {} queued and {} in-flight requests (at most {:?})",
                self.waiting.len(),
                self.slots
                    .values()
                    .map(|s| s.gate.in_flight())
                    .sum::<usize>(),
                self.settings.drain_timeout
            );
            self.drain_deadline = Some(now + self.settings.drain_timeout);
            self.board.set_draining();
        }
    }

    fn next_timer(&self) -> Option<Instant> {
        let leaving = self.leaving.values().filter_map(|l| l.release_at).min();
        let own = match self.drain_deadline {
            Some(deadline) if self.aborted => Some(deadline + ABORT_GRACE),
            Some(deadline) => Some(self.next_expiry.map_or(deadline, |e| e.min(deadline))),
            None => self.next_expiry,
        };
        [own, leaving].into_iter().flatten().min()
    }

    /// Expires jobs and cuts off a drain that took too long. True when the
    /// dispatcher must stop now.
    fn on_timer(&mut self, now: Instant) -> bool {
        if self.next_expiry.is_some_and(|at| at <= now) {
            self.expire(now);
        }
        match self.drain_deadline {
            Some(deadline) if self.aborted && now >= deadline + ABORT_GRACE => {
                log::warn!("shutting down without answers from servers still busy");
                true
            }
            Some(deadline) if !self.aborted && now >= deadline => {
                self.abort();
                false
            }
            _ => false,
        }
    }

    /// The drain deadline has passed: queued jobs are refused, requests on
    /// the wire are cut off (they come back as retries, and are refused).
    fn abort(&mut self) {
        self.aborted = true;
        let queued = self.waiting.len();
        let msg = "the balancer shut down before a server took this request; it was not stored";
        self.board.dequeued(queued);
        for job in std::mem::take(&mut self.waiting) {
            self.track(job.failed_event(ErrorCode::ShuttingDown, msg));
            job.fail(ErrorCode::ShuttingDown, msg.into(), &self.stats);
        }
        let on_wire: usize = self.slots.values().map(|s| s.gate.in_flight()).sum();
        log::warn!("--drain-timeout reached: refused {queued} queued requests, cutting off {on_wire} in flight");
        for slot in self.slots.values() {
            slot.gate.link.close();
        }
        for leaving in std::mem::take(&mut self.leaving).into_values() {
            for job in leaving.held {
                job.fail(ErrorCode::ShuttingDown, msg.into(), &self.stats);
            }
        }
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Submit(job) => self.submit(*job),
            Event::Freed(_) => {}
            Event::Served(server) => self.observe(server, &Observation::Served),
            Event::Retry {
                server,
                job,
                failure,
                delivered,
            } => self.on_retry(server, *job, failure, delivered),
            Event::Doubt {
                server,
                number,
                key,
                uncertain,
            } => self.doubt(server, number, key, uncertain),
            Event::Forgotten {
                server,
                numbers,
                ok,
            } => self.forgotten(server, numbers, ok),
            Event::KeysForgotten { server, keys, ok } => self.keys_forgotten(server, &keys, ok),
            Event::Probes(observations) => self.probed(&observations),
            Event::Membership {
                change,
                id,
                reply,
                link,
            } => self.change_membership(change, id, reply, link),
            Event::Banned(addr) => self.ban(addr),
            Event::PickServer {
                prefer,
                avoid,
                reply,
            } => match self.pick_for_file(prefer.as_deref(), &avoid) {
                Some(picked) => {
                    let _ = reply.send(Some(picked));
                }
                None => {
                    if self.parked_picks.len() >= MAX_PARKED {
                        self.parked_picks.pop_front();
                    }
                    self.parked_picks.push_back((prefer, avoid, reply));
                }
            },
        }
    }

    /// A server answered a `forget` of keys: those are forgotten there.
    fn keys_forgotten(&mut self, server: ServerId, keys: &[ClientKey], ok: bool) {
        if let Some(slot) = self.slots.get_mut(&server) {
            slot.forget_keys_in_flight = false;
            if ok {
                keys.iter().for_each(|k| {
                    slot.forget_keys.remove(k);
                });
            }
        }
    }

    /// The monitor's probes of every server: their load, then what each
    /// says of its health.
    fn probed(&mut self, observations: &[(ServerId, Observation)]) {
        for (server, observation) in observations {
            if let (Observation::ProbeOk { load, .. }, Some(slot)) =
                (observation, self.slots.get(server))
            {
                slot.gate.set_load(*load);
            }
            self.observe(*server, observation);
        }
        self.send_forgets();
    }

    /// A job a connection thread could not send itself (it counted it on
    /// the board as queued).
    fn submit(&mut self, mut job: Job) {
        if self.aborted {
            self.board.dequeued(1);
            job.fail(
                ErrorCode::ShuttingDown,
                "the balancer is shutting down; the request was not stored".into(),
                &self.stats,
            );
            return;
        }
        if self.waiting.is_empty() {
            log::debug!(
                "{}: no server can take it now (down, overloaded or at --max-in-flight); queueing",
                job.label()
            );
        }
        job.queued_at = Instant::now();
        self.enqueue(job, false);
    }

    /// Puts a job in the queue (already counted on the board): at the
    /// front for a retry, which keeps its place ahead of newer jobs.
    fn enqueue(&mut self, job: Job, front: bool) {
        if let Some(since) = self.outage_since {
            let expiry = since.max(job.queued_at) + self.settings.queue_timeout;
            self.next_expiry = Some(self.next_expiry.map_or(expiry, |e| e.min(expiry)));
        }
        if front {
            self.waiting.push_front(job);
        } else {
            self.waiting.push_back(job);
        }
    }

    /// Hands waiting jobs, in order, to servers that can take them, each
    /// server's together; answers file transfers waiting for a server.
    fn dispatch_waiting(&mut self) {
        while let Some((prefer, avoid, reply)) = self.parked_picks.pop_front() {
            match self.pick_for_file(prefer.as_deref(), &avoid) {
                Some(picked) => {
                    let _ = reply.send(Some(picked));
                }
                None => {
                    self.parked_picks.push_front((prefer, avoid, reply));
                    break;
                }
            }
        }
        if self.waiting.is_empty() || self.aborted {
            return;
        }
        let servers: Vec<Arc<Gate>> = self.slots.values().map(|s| s.gate.clone()).collect();
        let mut batches: HashMap<ServerId, (Arc<Gate>, Vec<Job>)> = HashMap::new();
        let mut taken = 0;
        while let Some(job) = self.waiting.front() {
            let gate = match &job.group {
                None => self.board.take(&servers, &job.tried),
                // A copy no server up can take (the others hold its
                // siblings): its group goes on without it.
                Some(group) if !self.board.any_up_besides(&servers, &group.claimed()) => {
                    let job = self.waiting.pop_front().expect("looked at above");
                    taken += 1;
                    let why = "no server up besides those holding the document's other copies";
                    job.fail(ErrorCode::TooFewServers, why.into(), &self.stats);
                    continue;
                }
                Some(group) => self.board.take_for(&servers, &job.tried, group),
            };
            let Some(gate) = gate else {
                break;
            };
            let mut job = self.waiting.pop_front().expect("looked at above");
            taken += 1;
            for (at, event) in job.bind(gate.id, gate.name(), &self.numbers) {
                if let Some(t) = &self.tracker {
                    t.record_at(at, event);
                }
            }
            job.count_started(&gate.stats);
            batches
                .entry(gate.id)
                .or_insert_with(|| (gate.clone(), Vec::new()))
                .1
                .push(job);
        }
        self.board.dequeued(taken);
        for (gate, jobs) in batches.into_values() {
            gate.link.enqueue(jobs);
        }
    }

    /// A server for a file transfer (see `Event::PickServer`).
    fn pick_for_file(&mut self, prefer: Option<&str>, avoid: &[String]) -> Option<Picked> {
        let gate = self.board.pick_for_file(prefer, avoid)?;
        Some(Picked {
            name: gate.name().to_string(),
            addr: gate.addr,
            number: self.numbers.next(),
        })
    }

    fn on_retry(&mut self, server: ServerId, job: Job, failure: Failure, delivered: bool) {
        match &failure {
            Failure::Link(why) => {
                self.observe(server, &Observation::LinkFailed(why.clone()));
            }
            Failure::Refused {
                code: ErrorCode::DiskFull,
                ..
            } => self.observe(server, &Observation::DiskFull(failure.to_string())),
            Failure::Refused {
                code: ErrorCode::Storage,
                ..
            } => self.observe(server, &Observation::StorageFailed(failure.to_string())),
            Failure::Refused { .. } | Failure::Cut => {}
        }
        // Cut off from a server being removed: held until it has
        // forgotten the job (see `settle_leaving`).
        if let (Failure::Cut, false, Some(leaving)) =
            (&failure, self.aborted, self.leaving.get_mut(&server))
        {
            leaving.held.push(job);
            return;
        }
        // A server that refused it did not store it, except one storing
        // the same number on another connection right now.
        let maybe_stored = match &failure {
            Failure::Refused { code, .. } => *code == ErrorCode::InProgress,
            _ => delivered,
        };
        self.retry(server, job, &failure.to_string(), delivered, maybe_stored);
    }

    /// A job that failed on `server` goes back to the front of the queue,
    /// or is given up after `--max-attempts` forwards that reached a server.
    fn retry(
        &mut self,
        server: ServerId,
        mut job: Job,
        reason: &str,
        attempted: bool,
        maybe_stored: bool,
    ) {
        if attempted {
            job.attempts += 1;
        }
        if maybe_stored && !job.uncertain.contains(&server) {
            job.uncertain.push(server);
        }
        let name = self.server_name(server);
        if self.aborted {
            let msg = format!(
                "the balancer shut down while server {name} was handling this request; {}",
                if maybe_stored {
                    "it may have been stored"
                } else {
                    "it was not stored"
                }
            );
            self.track(job.failed_event(ErrorCode::ShuttingDown, &msg));
            job.fail(ErrorCode::ShuttingDown, msg, &self.stats);
        } else if job.attempts >= self.settings.max_attempts {
            log::error!(
                "{}: failed on server {name} ({reason}); giving up after {} attempts in {} ms",
                job.label(),
                job.attempts,
                job.received.elapsed().as_millis()
            );
            let msg = format!(
                "request failed after {} attempts; last error from server {name}: {reason}",
                job.attempts
            );
            self.give_up(job, ErrorCode::ServerFailed, msg);
        } else {
            self.track(job.retried_event(&name, reason));
            if let Some(slot) = self.slots.get(&server) {
                slot.gate.stats.retries.fetch_add(1, Relaxed);
            }
            log::warn!(
                "{}: failed on server {name} ({reason}); trying another server",
                job.label()
            );
            job.queued_at = Instant::now();
            self.board.enqueued();
            self.enqueue(job, true);
        }
    }

    /// Answers a job that will not be carried out. One that reached a
    /// server without an answer coming back may be stored there: it is
    /// answered `maybe_stored`, naming those servers, never plain failed.
    fn give_up(&self, job: Job, code: ErrorCode, msg: String) {
        let (code, msg) = if job.uncertain.is_empty() {
            (code, msg)
        } else {
            let names: Vec<String> = job
                .uncertain
                .iter()
                .map(|id| self.server_name(*id))
                .collect();
            (
                ErrorCode::MaybeStored,
                format!(
                    "{msg}; it may have been stored on {}, which had it when no answer came",
                    names.join(", ")
                ),
            )
        };
        self.track(job.failed_event(code, &msg));
        job.fail(code, msg, &self.stats);
    }

    fn track(&self, event: Option<TrackEvent>) {
        if let (Some(t), Some(event)) = (&self.tracker, event) {
            t.record(event);
        }
    }

    /// A server's name, also after it left the pool.
    fn server_name(&self, id: ServerId) -> String {
        if let Some(slot) = self.slots.get(&id) {
            return slot.gate.name().to_string();
        }
        if let Some(leaving) = self.leaving.get(&id) {
            return leaving.gate.name().to_string();
        }
        self.former
            .get(&id)
            .cloned()
            .unwrap_or_else(|| format!("#{}", id.0))
    }

    /// A job stored on `server` after others may have stored it too.
    fn doubt(
        &mut self,
        server: ServerId,
        number: u64,
        key: Option<ClientKey>,
        uncertain: Vec<ServerId>,
    ) {
        let stored_on = self.server_name(server);
        for other in uncertain.into_iter().filter(|s| *s != server) {
            if let Some(slot) = self.slots.get_mut(&other) {
                log::warn!(
                    "request {number}: stored on server {stored_on}, may also be on server {}; it will be told to forget it",
                    slot.gate.name()
                );
                slot.forget.insert(number);
                slot.forget_keys.extend(key);
            }
        }
    }

    fn forgotten(&mut self, server: ServerId, numbers: Vec<u64>, ok: bool) {
        if let Some(slot) = self.slots.get_mut(&server) {
            slot.forget_in_flight = false;
            if ok {
                for n in &numbers {
                    slot.forget.remove(n);
                }
            }
        }
        let Some(leaving) = self.leaving.get_mut(&server) else {
            return;
        };
        let numbers: BTreeSet<u64> = numbers.into_iter().collect();
        leaving.asked.retain(|n| !numbers.contains(n));
        let (answered, held): (Vec<Job>, Vec<Job>) = std::mem::take(&mut leaving.held)
            .into_iter()
            .partition(|j| numbers.contains(&j.request_number.unwrap_or_default()));
        leaving.held = held;
        if ok {
            // It will never store them: they go elsewhere as if never sent.
            for job in answered {
                let reason = "cut off: the server was removed, and forgot it";
                self.retry(server, job, reason, true, false);
            }
            return;
        }
        // It could not be asked: they go once it can no longer store them.
        let at = storable_until(&answered, Instant::now());
        let leaving = self.leaving.get_mut(&server).expect("looked up above");
        leaving.unreachable = true;
        leaving.release_at = Some(leaving.release_at.map_or(at, |r| r.max(at)));
        leaving.held.extend(answered);
    }

    /// Asks removed servers to forget the jobs cut off from them, lets
    /// through those they forgot or can no longer store, and drops the
    /// servers with nothing left to settle.
    fn settle_leaving(&mut self, now: Instant) {
        let mut done = Vec::new();
        let mut released = Vec::new();
        for (id, leaving) in &mut self.leaving {
            let unasked = leaving.unasked();
            if leaving.unreachable {
                // Later ones wait as long as the first did.
                let at = leaving.held_until(now);
                if !unasked.is_empty() {
                    leaving.release_at = Some(leaving.release_at.map_or(at, |r| r.max(at)));
                    leaving.asked.extend(&unasked);
                }
            } else if !unasked.is_empty() {
                leaving.asked.extend(&unasked);
                let errand = Errand::Forget {
                    server: *id,
                    addr: leaving.gate.addr,
                    numbers: unasked,
                };
                if self.errands.send(errand).is_err() {
                    // No errand thread (shutting down): wait as if asked
                    // in vain.
                    leaving.unreachable = true;
                    leaving.release_at = Some(leaving.held_until(now));
                }
            }
            if leaving.release_at.is_some_and(|at| at <= now) {
                leaving.release_at = None;
                released.push((*id, std::mem::take(&mut leaving.held)));
            }
            if leaving.held.is_empty()
                && leaving.gate.in_flight() == 0
                && leaving.release_at.is_none()
            {
                done.push(*id);
            }
        }
        for (id, jobs) in released {
            for job in jobs {
                let reason = "cut off: the server was removed and could not be asked to forget it";
                self.retry(id, job, reason, true, true);
            }
        }
        for id in done {
            if let Some(leaving) = self.leaving.remove(&id) {
                self.former.insert(id, leaving.gate.name().to_string());
            }
        }
    }

    fn observe(&mut self, server: ServerId, observation: &Observation) {
        let Some(slot) = self.slots.get_mut(&server) else {
            return;
        };
        let transition = slot.health.observe(observation);
        // Storage errors are counted from the answers: watch its ends.
        let counting = slot.health.storage_errors() > 0;
        slot.gate.set_watched(counting || slot.draining.is_some());
        let Some(t) = transition else {
            return;
        };
        slot.gate.stats.set_state(t.to);
        slot.gate
            .set_accepting(slot.health.accepts_requests() && slot.draining.is_none());
        let line = format!("server {} is {}", slot.gate.name(), t.describe());
        match t.to {
            State::Up => log::info!("{line}"),
            _ => log::warn!("{line}"),
        }
        self.update_outage();
    }

    fn update_outage(&mut self) {
        let available = self.slots.values().any(|s| s.gate.accepting());
        match (available, self.outage_since) {
            (true, Some(_)) => {
                self.outage_since = None;
                self.next_expiry = None;
            }
            (false, None) => {
                let now = Instant::now();
                log::error!("no server can take work: {}", self.describe_servers());
                self.outage_since = Some(now);
                self.next_expiry = self
                    .waiting
                    .iter()
                    .map(|j| now.max(j.queued_at))
                    .min()
                    .map(|t| t + self.settings.queue_timeout);
            }
            _ => {}
        }
    }

    fn describe_servers(&self) -> String {
        self.slots
            .values()
            .map(|s| format!("{} {}", s.gate.name(), s.health.state()))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Why no server can take work, for the clients whose requests expire.
    fn outage_reason(&self) -> String {
        if self.slots.is_empty() {
            return format!(
                "no server available for --queue-timeout ({:?}): the pool is empty (no \
                 server joined, or every one left or was removed)",
                self.settings.queue_timeout
            );
        }
        let states: BTreeSet<State> = self.slots.values().map(|s| s.health.state()).collect();
        let what = match states.iter().copied().collect::<Vec<_>>()[..] {
            [State::Down] => "every server is down",
            [State::Overloaded] => "every server is overloaded",
            [State::Unknown] => "no server has answered a status check yet",
            _ => "every server is down, overloaded or draining",
        };
        format!(
            "no server available for --queue-timeout ({:?}): {what} ({})",
            self.settings.queue_timeout,
            self.describe_servers()
        )
    }

    fn expire(&mut self, now: Instant) {
        let Some(since) = self.outage_since else {
            self.next_expiry = None;
            return;
        };
        let timeout = self.settings.queue_timeout;
        let expires = |j: &Job| since.max(j.queued_at) + timeout;
        let (expired, kept): (Vec<Job>, Vec<Job>) =
            self.waiting.drain(..).partition(|j| expires(j) <= now);
        self.waiting = kept.into();
        self.next_expiry = self.waiting.iter().map(expires).min();
        if expired.is_empty() {
            return;
        }
        self.board.dequeued(expired.len());
        let msg = self.outage_reason();
        log::error!("{} requests: {msg}; giving up", expired.len());
        for job in expired {
            self.give_up(job, ErrorCode::NoServer, msg.clone());
        }
    }

    /// Tells servers that are up which of their request numbers are stored
    /// elsewhere, one batch per server at a time.
    fn send_forgets(&mut self) {
        if !self.settings.forget || self.drain_deadline.is_some() {
            return;
        }
        for slot in self.slots.values_mut() {
            if !slot.gate.accepting() {
                continue;
            }
            if !slot.forget_keys.is_empty() && !slot.forget_keys_in_flight {
                let keys: Vec<ClientKey> = slot
                    .forget_keys
                    .iter()
                    .take(FORGET_BATCH)
                    .copied()
                    .collect();
                slot.forget_keys_in_flight = true;
                log::info!(
                    "server {}: telling it to forget {} client keys stored elsewhere",
                    slot.gate.name(),
                    keys.len()
                );
                send_forget(slot, Work::ForgetKeys(keys), &self.numbers);
            }
            if slot.forget_in_flight {
                continue;
            }
            let numbers: Vec<u64> = slot.forget.iter().take(FORGET_BATCH).copied().collect();
            if numbers.is_empty() {
                continue;
            }
            slot.forget_in_flight = true;
            log::info!(
                "server {}: telling it to forget {} request numbers stored elsewhere",
                slot.gate.name(),
                numbers.len()
            );
            send_forget(slot, Work::Forget(numbers), &self.numbers);
        }
    }

    /// Shows the pool on the board, when it changed.
    fn publish(&mut self) {
        if std::mem::take(&mut self.changed) {
            self.board
                .publish(self.slots.values().map(|s| s.gate.clone()).collect());
        }
    }
}

/// Hands a `forget` to a server's link; nobody waits for its answer but
/// the dispatcher (an event).
fn send_forget(slot: &Slot, work: Work, numbers: &ids::Generator) {
    let (reply, _) = crossbeam_channel::bounded(1);
    let mut job = Job::new(
        0,
        work,
        SocketAddr::from(([0, 0, 0, 0], 0)),
        reply,
        Default::default(),
    );
    job.request_number = Some(numbers.next());
    slot.gate.take();
    slot.gate.link.enqueue(vec![job]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balancer::event::{Change, NewLink};
    use crate::balancer::flow::Hold;
    use crate::balancer::link::Link;
    use crate::balancer::stats::ServerStats;
    use crate::policy::PolicyKind;
    use crate::proto::Operation;
    use crossbeam_channel::Receiver;

    fn addr(i: usize) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 5001 + i as u16))
    }

    struct Setup {
        d: Dispatcher,
        /// What each server's link was handed.
        links: Vec<Receiver<Job>>,
        errands: Receiver<Errand>,
    }

    fn setup(servers: usize, max_in_flight: usize) -> Setup {
        let stats = Arc::new(Stats::default());
        let mut new = Vec::new();
        let mut links = Vec::new();
        for i in 0..servers {
            let (link, jobs) = Link::channel();
            new.push(NewLink {
                id: ServerId(i as u32),
                stats: ServerStats::named(addr(i).to_string()),
                link,
            });
            links.push(jobs);
        }
        let (errands_tx, errands) = crossbeam_channel::unbounded();
        let d = Dispatcher::new(
            new,
            Arc::new(Board::new(PolicyKind::RoundRobin, max_in_flight)),
            Roster::default(),
            Arc::new(ids::Generator::new(ids::Source::Balancer, 1)),
            Settings {
                max_attempts: 3,
                queue_timeout: Duration::from_secs(10),
                drain_timeout: Duration::from_secs(30),
                forget: true,
                // One probe decides.
                rise: 1,
                fall: 1,
            },
            stats,
            None,
            errands_tx,
        );
        Setup { d, links, errands }
    }

    fn job(id: u64) -> (Job, Receiver<Reply>) {
        let (tx, rx) = crossbeam_channel::unbounded();
        let job = Job::new(
            id,
            Work::Calc(Operation::Somma),
            SocketAddr::from(([127, 0, 0, 1], 9)),
            tx,
            Hold::default(),
        );
        (job, rx)
    }

    fn probes(d: &mut Dispatcher, up: &[bool]) {
        let obs = up
            .iter()
            .enumerate()
            .map(|(i, &up)| {
                let o = if up {
                    Observation::probe_ok(false)
                } else {
                    Observation::ProbeFailed("down".into())
                };
                (ServerId(i as u32), o)
            })
            .collect();
        d.on_event(Event::Probes(obs));
        d.after_wake();
    }

    /// A job as a connection thread queues it.
    fn submit(d: &mut Dispatcher, job: Job) {
        d.board.enqueued();
        d.on_event(Event::Submit(Box::new(job)));
        d.after_wake();
    }

    fn handed(link: &Receiver<Job>) -> Vec<Job> {
        link.try_iter().collect()
    }

    /// What a link does when a job ends on its server.
    fn end(d: &mut Dispatcher, server: usize, event: Event) {
        d.board.servers()[server]
            .stats
            .in_flight
            .fetch_sub(1, Relaxed);
        d.on_event(event);
        d.after_wake();
    }

    #[test]
    fn jobs_wait_while_no_server_is_up_and_go_when_one_is() {
        let mut s = setup(2, 4);
        let (a, _) = job(1);
        submit(&mut s.d, a);
        assert!(handed(&s.links[0]).is_empty() && handed(&s.links[1]).is_empty());
        assert_eq!((s.d.waiting.len(), s.d.board.queued()), (1, 1));
        probes(&mut s.d, &[false, true]);
        let sent = handed(&s.links[1]);
        assert_eq!(sent.len(), 1);
        assert!(sent[0].request_number.is_some());
        assert_eq!((s.d.waiting.len(), s.d.board.queued()), (0, 0));
    }

    #[test]
    fn a_full_server_holds_jobs_until_a_place_is_freed() {
        let mut s = setup(1, 2);
        probes(&mut s.d, &[true]);
        for id in 1..=3 {
            submit(&mut s.d, job(id).0);
        }
        assert_eq!(handed(&s.links[0]).len(), 2);
        assert_eq!(s.d.waiting.len(), 1);
        end(&mut s.d, 0, Event::Freed(ServerId(0)));
        assert_eq!(handed(&s.links[0]).len(), 1);
        assert_eq!(s.d.board.queued(), 0);
    }

    #[test]
    fn a_failed_job_goes_to_a_server_it_has_not_tried_and_is_given_up_after_max_attempts() {
        let mut s = setup(2, 4);
        probes(&mut s.d, &[true, true]);
        submit(&mut s.d, job(1).0);
        let mut j = handed(&s.links[0]).pop().expect("to the first server");
        let refused = || Failure::Refused {
            code: ErrorCode::Storage,
            message: "disk error".into(),
        };
        let retry = |job| Event::Retry {
            server: ServerId(0),
            job: Box::new(job),
            failure: refused(),
            delivered: true,
        };
        end(&mut s.d, 0, retry(j));
        j = handed(&s.links[1]).pop().expect("to the other server");
        assert_eq!(j.tried, [ServerId(0), ServerId(1)]);
        assert!(j.uncertain.is_empty(), "a refusal is not a maybe-stored");
        // Third attempt: given up.
        let (mut last, answers) = job(2);
        last.attempts = 2;
        last.request_number = Some(7);
        s.d.slots.get(&ServerId(0)).unwrap().gate.take();
        end(&mut s.d, 0, retry(last));
        match answers.try_recv().unwrap() {
            Reply::Error(e) => assert_eq!(e.code, ErrorCode::ServerFailed, "{e:?}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_job_lost_with_its_connection_may_be_stored_and_says_so_when_given_up() {
        let mut s = setup(1, 4);
        probes(&mut s.d, &[true]);
        let (a, answers) = job(1);
        submit(&mut s.d, a);
        let sent = handed(&s.links[0]).pop().unwrap();
        end(
            &mut s.d,
            0,
            Event::Retry {
                server: ServerId(0),
                job: Box::new(sent),
                failure: Failure::Link("the server closed the connection".into()),
                delivered: true,
            },
        );
        // The server went down with it: the queue times out.
        assert!(s.d.outage_since.is_some());
        s.d.expire(Instant::now() + Duration::from_secs(11));
        match answers.try_recv().unwrap() {
            Reply::Error(e) => {
                assert_eq!(e.code, ErrorCode::MaybeStored, "{e:?}");
                assert!(e.message.contains("127.0.0.1:5001"), "{}", e.message);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn jobs_cut_off_by_a_removal_wait_until_the_server_has_forgotten_them() {
        let mut s = setup(2, 4);
        probes(&mut s.d, &[true, true]);
        submit(&mut s.d, job(1).0);
        let cut = handed(&s.links[0]).pop().unwrap();
        let number = cut.request_number.unwrap();
        let (reply, _) = crossbeam_channel::unbounded();
        s.d.change_membership(Change::Remove(addr(0)), 1, reply, None);
        end(
            &mut s.d,
            0,
            Event::Retry {
                server: ServerId(0),
                job: Box::new(cut),
                failure: Failure::Cut,
                delivered: true,
            },
        );
        // Held, and the removed server is asked to forget it.
        assert!(handed(&s.links[1]).is_empty());
        match s.errands.try_recv().unwrap() {
            Errand::Forget { numbers, .. } => assert_eq!(numbers, [number]),
        }
        s.d.on_event(Event::Forgotten {
            server: ServerId(0),
            numbers: vec![number],
            ok: true,
        });
        s.d.after_wake();
        let moved = handed(&s.links[1]).pop().expect("goes to the other server");
        assert!(moved.uncertain.is_empty());
        assert!(s.d.leaving.is_empty(), "nothing left to settle");
    }

    #[test]
    fn a_draining_server_gets_nothing_new_and_leaves_when_idle() {
        let mut s = setup(2, 4);
        probes(&mut s.d, &[true, true]);
        submit(&mut s.d, job(1).0);
        assert_eq!(handed(&s.links[0]).len(), 1);
        let (reply, answers) = crossbeam_channel::unbounded();
        s.d.change_membership(Change::Deregister(addr(0)), 5, reply, None);
        submit(&mut s.d, job(2).0);
        submit(&mut s.d, job(3).0);
        assert_eq!(handed(&s.links[1]).len(), 2);
        assert!(answers.try_recv().is_err(), "answered once it is idle");
        end(&mut s.d, 0, Event::Freed(ServerId(0)));
        assert!(matches!(
            answers.try_recv(),
            Ok(Reply::Membership { id: 5, .. })
        ));
        assert_eq!(s.d.slots.len(), 1);
    }
}
