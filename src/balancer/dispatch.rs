//! The dispatcher: the request queue, the health of every server and the
//! balancing policy, behind one lock (`Shared`). Its thread handles the
//! monitor's probes, membership, file transfers' picks, retries and the
//! queue's timers. The path of a request needs no hand-off to it: under the
//! lock, a connection thread submits the job itself (`submit_now`: to a
//! link, or into the queue) or, when its client has nothing else
//! outstanding, takes a server and forwards the job itself (`take_now`); a
//! link counts off a finished job (`Event::Done`) the same way, and hands
//! the next queued job to a link.
//!
//! A job stays in the queue until a server can take it: one that is up and
//! has fewer than `--max-in-flight` requests on the wire. Waiting for a
//! busy server is not a failure; `--queue-timeout` runs only while no
//! server can take work at all (every one down or overloaded). A job that
//! fails on a server is retried ahead of newer ones, on a server it has not
//! tried while there is one. When a server goes down, the jobs handed to
//! its link but not yet sent come straight back.
//!
//! Exactly once: a job keeps its request number across retries, and
//! remembers the servers that may have stored it without answering. Once
//! it is stored on another one, each of those is told to `forget` it as
//! soon as it is up again.
//!
//! Membership (`membership.rs`): servers join (an operator's `add_server`,
//! a server's `register`) and leave (`drain_server`, `deregister`: no new
//! work, gone once their requests are done; `remove_server`: gone now, its
//! requests retried elsewhere) while everything runs.
//!
//! Shutting down: when `stop` disconnects (or every job sender is gone),
//! the queue and the requests on the wire are finished until
//! `--drain-timeout`; what is left then gets a `shutting_down` reply.

use super::flow::Hold;
use super::link::{LinkHandle, LinkSpawner, Pool};
use super::monitor::Roster;
use super::stats::Stats;
use super::tracking::Tracker;
use super::ServerId;
use crate::health::{Health, Observation, State};
use crate::ids;
use crate::policy::{Candidate, Load, Policy};
use crate::proto::{self, ErrorCode, Operation, Reply};
use crossbeam_channel::Sender;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

mod membership;
mod shared;
pub use membership::Change;
pub use shared::Shared;

/// Most jobs held waiting for a server; past this the dispatcher stops
/// taking new jobs and connection threads wait (the byte budget and the
/// per-connection windows usually bind first).
const MAX_WAITING: usize = 100_000;
/// Request numbers sent to a server in one `forget`.
const FORGET_BATCH: usize = 1024;
/// After the drain deadline, how long requests cut off on the wire may take
/// to come back before the dispatcher stops anyway.
const ABORT_GRACE: Duration = Duration::from_secs(5);

/// A document as the balancer keeps it: encoded once, forwarded as is.
#[derive(Debug)]
pub struct StoreWork {
    /// For logs only, shortened.
    pub title: String,
    /// `"titolo":…,"contenuto":…` (see `proto::encode_document_fields`).
    pub fields: Vec<u8>,
    pub content_len: usize,
}

/// What a job asks of a server.
#[derive(Debug)]
pub enum Work {
    Store(StoreWork),
    Calc(Operation),
    /// Request numbers the server should drop: stored elsewhere.
    Forget(Vec<u64>),
}

impl Work {
    /// How logs name it.
    pub fn describe(&self) -> String {
        match self {
            Work::Store(doc) => format!("\"{}\"", doc.title),
            Work::Calc(op) => format!("calc {op}"),
            Work::Forget(numbers) => format!("forget {} request numbers", numbers.len()),
        }
    }

    pub fn store(doc: &proto::Document) -> Work {
        Work::store_fields(doc, None)
    }

    /// A document to store, forwarded as `fields` (from
    /// `proto::raw_document_fields`) when given, else encoded from `doc`.
    pub fn store_fields(doc: &proto::Document, fields: Option<Vec<u8>>) -> Work {
        Work::Store(StoreWork {
            title: proto::truncate(&doc.title, 80),
            fields: fields.unwrap_or_else(|| proto::encode_document_fields(doc)),
            content_len: doc.content.len(),
        })
    }
}

/// One request (a document to store, an operation to compute) on its way
/// to a server.
#[derive(Debug)]
pub struct Job {
    /// The client's request id, echoed in the reply.
    pub id: u64,
    pub work: Work,
    pub client: SocketAddr,
    /// When the balancer received it.
    pub received: Instant,
    pub reply: Sender<Reply>,
    /// Assigned when first sent and kept across retries, so that a server
    /// can tell a retried document from a new one.
    pub request_number: Option<u64>,
    /// Forwards that may have reached a server.
    pub attempts: u32,
    /// Servers already tried, avoided while others are available.
    pub tried: Vec<ServerId>,
    /// Servers that may hold it: the request reached them, no answer came.
    pub uncertain: Vec<ServerId>,
    /// When it last started waiting in the queue.
    pub queued_at: Instant,
    /// The connection's window slot and byte budget, given back on drop.
    pub hold: Hold,
    /// The user who sent it (with `--users`), recorded with the transfer.
    pub user: Option<Arc<str>>,
    /// The client's connection, when a link may write the reply to it
    /// straight away (framed clients); else the reply goes by `reply`.
    pub out: Option<super::client_out::ClientWriter>,
}

impl Job {
    pub fn new(id: u64, work: Work, client: SocketAddr, reply: Sender<Reply>, hold: Hold) -> Job {
        let now = Instant::now();
        Job {
            id,
            work,
            client,
            received: now,
            reply,
            request_number: None,
            attempts: 0,
            tried: Vec::new(),
            uncertain: Vec::new(),
            queued_at: now,
            hold,
            user: None,
            out: None,
        }
    }

    pub fn fail(self, code: ErrorCode, message: String, stats: &Stats) {
        stats.failed.fetch_add(1, Relaxed);
        // The client may have gone; its reply has nowhere to go then.
        let _ = self.reply.send(Reply::error(Some(self.id), code, message));
    }

    pub fn label(&self) -> String {
        match self.request_number {
            Some(n) => format!("request {n}"),
            None => format!("request from {} (id {})", self.client, self.id),
        }
    }
}

/// What links and the monitor tell the dispatcher.
#[derive(Debug)]
pub enum Event {
    /// One round of status probes, applied together so that no server gets
    /// a head start.
    Probes(Vec<(ServerId, Observation)>),
    /// A link answered the client (stored or computed).
    Done {
        server: ServerId,
        number: u64,
        /// Other servers that may hold the same request number.
        uncertain: Vec<ServerId>,
    },
    /// A link answered the client with an error that retrying cannot fix.
    Failed { server: ServerId },
    /// A `forget` came back; `ok` when the server carried it out.
    Forgotten {
        server: ServerId,
        numbers: Vec<u64>,
        ok: bool,
    },
    /// A server joins or leaves; the answer goes to `reply` with `id`.
    Membership {
        change: Change,
        id: u64,
        reply: Sender<Reply>,
    },
    /// A connection needs a server for a file transfer: `prefer` when it
    /// can take work, else the policy's choice among the others not in
    /// `avoid`. The answer carries a request number for tracking.
    PickServer {
        prefer: Option<String>,
        avoid: Vec<String>,
        reply: Sender<Option<Picked>>,
    },
    /// Nothing: the dispatcher thread looks at its timer again (a call
    /// made under the lock by another thread brought it forward).
    Wake,
    /// A link could not complete a job; it goes back to the queue.
    Retry {
        server: ServerId,
        job: Box<Job>,
        reason: String,
        /// The connection to the server failed (as opposed to an error
        /// reply): the server is marked down until a probe says otherwise.
        link_failed: bool,
        /// The request may have reached the server; counts as an attempt.
        delivered: bool,
    },
}

/// A file transfer's request for a server: preferred, avoided, answer.
type ParkedPick = (Option<String>, Vec<String>, Sender<Option<Picked>>);

/// The server chosen for a file transfer.
#[derive(Debug, Clone, PartialEq)]
pub struct Picked {
    pub name: String,
    pub addr: SocketAddr,
    /// The transfer's request number.
    pub number: u64,
}

/// The dispatcher's view of one server.
struct Slot {
    name: String,
    addr: SocketAddr,
    health: Health,
    /// Leaving once its requests in flight are done; whom to tell then.
    draining: Option<Vec<(u64, Sender<Reply>)>>,
    /// Its figures from the last status probe that gave some.
    load: Option<Load>,
    /// Jobs handed to its link and not yet answered.
    in_flight: usize,
    link: LinkHandle,
    /// Request numbers it may hold that are stored on another server.
    forget: BTreeSet<u64>,
    forget_in_flight: bool,
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub max_attempts: u32,
    pub max_in_flight: usize,
    pub queue_timeout: Duration,
    pub drain_timeout: Duration,
    /// Servers can be told to forget numbers (not so the original format).
    pub forget: bool,
    /// Good probes in a row that bring a down server back.
    pub rise: u32,
    /// Failed probes in a row that take a server down.
    pub fall: u32,
}

pub struct Dispatcher {
    slots: BTreeMap<ServerId, Slot>,
    /// Starts links for servers that join.
    links: Box<dyn LinkSpawner>,
    /// The servers the monitor probes: the slots' ids and addresses.
    roster: Roster,
    next_server: u32,
    /// Addresses an operator drained or removed: their heartbeats do not
    /// bring them back; `add_server` does.
    banned: BTreeSet<SocketAddr>,
    policy: Box<dyn Policy>,
    waiting: VecDeque<Job>,
    numbers: ids::Generator,
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
    /// Records what happens to store jobs, when tracking is on.
    tracker: Option<Tracker>,
    /// Set while a worker of this server's link reports a job done (see
    /// `on_done_handing_back`): the first job then dispatched to that
    /// server is kept here for the worker, not sent through the channel.
    hand_back: Option<(ServerId, Option<Job>)>,
    /// Names of servers that left the pool, for the jobs that outlive
    /// them (a retry, or a failure that names where a copy may be).
    former: BTreeMap<ServerId, String>,
}

impl Dispatcher {
    /// A dispatcher over `servers` (more may join later).
    pub fn new(
        servers: &[SocketAddr],
        links: Box<dyn LinkSpawner>,
        roster: Roster,
        policy: Box<dyn Policy>,
        numbers: ids::Generator,
        settings: Settings,
        stats: Arc<Stats>,
    ) -> std::io::Result<Self> {
        let mut d = Dispatcher {
            slots: BTreeMap::new(),
            links,
            roster,
            next_server: 0,
            banned: BTreeSet::new(),
            policy,
            waiting: VecDeque::new(),
            numbers,
            settings,
            stats,
            outage_since: Some(Instant::now()),
            next_expiry: None,
            parked_picks: VecDeque::new(),
            drain_deadline: None,
            aborted: false,
            tracker: None,
            hand_back: None,
            former: BTreeMap::new(),
        };
        for addr in servers {
            d.add_slot(*addr)?;
        }
        Ok(d)
    }

    /// Records store jobs' dispatches, retries and failures with `tracker`.
    pub fn with_tracker(mut self, tracker: Option<Tracker>) -> Self {
        self.tracker = tracker;
        self
    }

    fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.slots.values().all(|s| s.in_flight == 0)
    }

    pub(crate) fn begin_drain(&mut self, now: Instant) {
        if self.drain_deadline.is_none() {
            log::info!(
                "shutting down: finishing {} queued and {} in-flight requests (at most {:?})",
                self.waiting.len(),
                self.slots.values().map(|s| s.in_flight).sum::<usize>(),
                self.settings.drain_timeout
            );
            self.drain_deadline = Some(now + self.settings.drain_timeout);
        }
    }

    fn next_timer(&self) -> Option<Instant> {
        match self.drain_deadline {
            Some(deadline) if self.aborted => Some(deadline + ABORT_GRACE),
            Some(deadline) => Some(self.next_expiry.map_or(deadline, |e| e.min(deadline))),
            None => self.next_expiry,
        }
    }

    /// Expires jobs and cuts off a drain that took too long. True when the
    /// dispatcher must stop now.
    pub(crate) fn on_timer(&mut self, now: Instant) -> bool {
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
    /// the wire are cut off (their links answer them as failed).
    fn abort(&mut self) {
        self.aborted = true;
        let queued = self.waiting.len();
        let msg = "the balancer shut down before a server took this request; it was not stored";
        for job in self.waiting.drain(..) {
            if let Some(t) = &self.tracker {
                t.failed(&job, ErrorCode::ShuttingDown, msg);
            }
            job.fail(ErrorCode::ShuttingDown, msg.into(), &self.stats);
        }
        let on_wire: usize = self.slots.values().map(|s| s.in_flight).sum();
        log::warn!("--drain-timeout reached: refused {queued} queued requests, cutting off {on_wire} in flight");
        for slot in self.slots.values() {
            slot.link.abort();
        }
    }

    pub(crate) fn submit(&mut self, mut job: Job) {
        job.queued_at = Instant::now();
        if self.aborted {
            job.fail(
                ErrorCode::ShuttingDown,
                "the balancer is shutting down; the request was not stored".into(),
                &self.stats,
            );
            return;
        }
        if self.waiting.is_empty() {
            if let Some(job) = self.try_dispatch(job) {
                // Logged once per wait, not once per request.
                log::info!(
                    "{}: no server can take it now (down, overloaded or at --max-in-flight); queueing",
                    job.label()
                );
                self.enqueue(job, false);
            }
        } else {
            self.enqueue(job, false);
            self.drain();
        }
    }

    /// Puts a job in the queue: at the front for a retry, which keeps its
    /// place ahead of newer jobs.
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

    /// Dispatches waiting jobs in order while servers can take them (and
    /// answers file transfers waiting for a server).
    fn drain(&mut self) {
        if !self.parked_picks.is_empty() {
            self.answer_parked_picks();
        }
        while let Some(job) = self.waiting.pop_front() {
            if let Some(job) = self.try_dispatch(job) {
                self.waiting.push_front(job);
                break;
            }
        }
    }

    fn candidates(&self, avoid: &[ServerId]) -> Vec<Candidate> {
        self.slots
            .iter()
            .map(|(id, s)| Candidate {
                eligible: s.health.accepts_requests()
                    && s.draining.is_none()
                    && s.in_flight < self.settings.max_in_flight
                    && !avoid.contains(id),
                in_flight: s.in_flight,
                load: s.load,
            })
            .collect()
    }

    /// Keeps a file transfer's request for a server until one can take it
    /// (the connection gives up after its own timeout).
    fn park_pick(
        &mut self,
        prefer: Option<String>,
        avoid: Vec<String>,
        reply: Sender<Option<Picked>>,
    ) {
        if self.parked_picks.len() >= MAX_WAITING {
            // The oldest has surely been given up on by now.
            self.parked_picks.pop_front();
        }
        self.parked_picks.push_back((prefer, avoid, reply));
    }

    /// Answers parked file transfers while servers can take them.
    fn answer_parked_picks(&mut self) {
        while let Some((prefer, avoid, reply)) = self.parked_picks.pop_front() {
            match self.pick_for_file(prefer.as_deref(), &avoid) {
                // A connection that gave up has dropped its receiver: the
                // number is spent, nothing else.
                Some(picked) => {
                    let _ = reply.send(Some(picked));
                }
                None => {
                    self.parked_picks.push_front((prefer, avoid, reply));
                    break;
                }
            }
        }
    }

    /// A server for a file transfer (see `Event::PickServer`). Files do not
    /// use the links, so a server's in-flight documents do not rule it out.
    fn pick_for_file(&mut self, prefer: Option<&str>, avoid: &[String]) -> Option<Picked> {
        let usable = |s: &Slot| {
            s.health.accepts_requests() && s.draining.is_none() && !avoid.contains(&s.name)
        };
        let chosen = match self
            .slots
            .values()
            .find(|s| Some(s.name.as_str()) == prefer)
        {
            Some(s) if usable(s) => s,
            _ => {
                let candidates: Vec<Candidate> = self
                    .slots
                    .values()
                    .map(|s| Candidate {
                        eligible: usable(s),
                        in_flight: s.in_flight,
                        load: s.load,
                    })
                    .collect();
                let index = self.policy.pick(&candidates)?;
                self.slots.values().nth(index)?
            }
        };
        let (name, addr) = (chosen.name.clone(), chosen.addr);
        Some(Picked {
            name,
            addr,
            number: self.numbers.next(),
        })
    }

    /// Hands the job to a server's link, or gives it back when no server can
    /// take it now.
    fn try_dispatch(&mut self, mut job: Job) -> Option<Job> {
        match self.choose(&mut job) {
            Some(id) => self.send(id, job),
            None => Some(job),
        }
    }

    /// For a connection thread: submits the job under the lock, without
    /// waking the dispatcher thread (to a link now, or into the queue). Gives
    /// it back while shutting down or with the queue full: the dispatcher
    /// thread takes it then, when it can.
    pub fn submit_now(&mut self, job: Job) -> Option<Job> {
        if self.drain_deadline.is_some() || self.waiting.len() >= MAX_WAITING {
            return Some(job);
        }
        self.submit(job);
        None
    }

    /// For a connection thread that forwards its client's request itself:
    /// the connections of a server that can take the job now, which is then
    /// counted in flight there. None when the job has to wait its turn
    /// (others are queued, no server can take it, shutting down).
    pub fn take_now(&mut self, job: &mut Job) -> Option<Arc<Pool>> {
        if self.drain_deadline.is_some() || !self.waiting.is_empty() {
            return None;
        }
        let id = self.choose(job)?;
        self.count_in(id);
        Some(self.slots[&id].link.pool.clone())
    }

    /// Picks the server for a job (one it has not tried while there is
    /// one), gives it its request number and records the dispatch. None
    /// when no server can take it now.
    fn choose(&mut self, job: &mut Job) -> Option<ServerId> {
        let mut candidates = self.candidates(&job.tried);
        let untried_up = self.slots.iter().any(|(id, s)| {
            s.health.accepts_requests() && s.draining.is_none() && !job.tried.contains(id)
        });
        if !untried_up {
            // Every server not yet tried is down or overloaded: trying one
            // again beats waiting. (One that is up but busy is worth the
            // wait: it is soon free.)
            candidates = self.candidates(&[]);
        }
        let index = self.policy.pick(&candidates)?;
        let &id = self.slots.keys().nth(index)?;
        let number = *job
            .request_number
            .get_or_insert_with(|| self.numbers.next());
        let slot = &self.slots[&id];
        log::debug!(
            "request {number}: {} from {} -> server {}{}",
            job.work.describe(),
            job.client,
            slot.name,
            if job.tried.is_empty() {
                String::new()
            } else {
                format!(" (retry {})", job.tried.len())
            }
        );
        if let Some(t) = &self.tracker {
            t.dispatched(job, &slot.name);
        }
        job.tried.push(id);
        Some(id)
    }

    /// Counts one more request on the wire to a server.
    fn count_in(&mut self, id: ServerId) {
        let slot = self.slots.get_mut(&id).expect("known server");
        slot.in_flight += 1;
        self.stats
            .server(id)
            .in_flight
            .store(slot.in_flight as u64, Relaxed);
    }

    /// Gives a job to a server's link and counts it in flight.
    fn send(&mut self, id: ServerId, job: Job) -> Option<Job> {
        self.count_in(id);
        if let Some((server, held)) = &mut self.hand_back {
            if *server == id && held.is_none() {
                *held = Some(job);
                return None;
            }
        }
        let slot = &self.slots[&id];
        match slot.link.jobs.send(job) {
            Ok(()) => None,
            Err(returned) => {
                // The link's threads are gone, which only a bug can cause;
                // keep the job and stop using that server.
                log::error!("server {}: link has stopped", slot.name);
                self.finished(id);
                self.observe(id, &Observation::LinkFailed("link stopped".into()));
                Some(returned.into_inner())
            }
        }
    }

    /// `on_event` for a job that a worker of a server's link finished: the
    /// job dispatched to that server as a result, if any, is returned for that
    /// worker to carry out next. Under load, when every server is at
    /// `--max-in-flight`, the place just freed is the only one, so the
    /// worker goes straight on instead of waking another one through the
    /// channel and going to sleep.
    pub(crate) fn on_done_handing_back(&mut self, event: Event) -> Option<Job> {
        if let Event::Done { server, .. } = event {
            self.hand_back = Some((server, None));
        }
        self.on_event(event);
        self.hand_back.take().and_then(|(_, job)| job)
    }

    pub(crate) fn on_event(&mut self, event: Event) {
        match event {
            Event::Probes(observations) => {
                for (server, observation) in &observations {
                    if let (
                        Observation::ProbeOk {
                            load: Some(load), ..
                        },
                        Some(slot),
                    ) = (observation, self.slots.get_mut(server))
                    {
                        slot.load = Some(*load);
                    }
                    self.observe(*server, observation);
                }
                self.send_forgets();
            }
            Event::Done {
                server,
                number,
                uncertain,
            } => {
                self.finished(server);
                self.observe(server, &Observation::Served);
                for other in uncertain.into_iter().filter(|s| *s != server) {
                    if let Some(slot) = self.slots.get_mut(&other) {
                        log::warn!(
                            "request {number}: stored on server {}, may also be on server {}; it will be told to forget it",
                            self.stats.server(server).name,
                            slot.name
                        );
                        slot.forget.insert(number);
                    }
                }
            }
            Event::Failed { server } => {
                self.stats.failed.fetch_add(1, Relaxed);
                self.finished(server);
            }
            Event::Forgotten {
                server,
                numbers,
                ok,
            } => {
                self.finished(server);
                if let Some(slot) = self.slots.get_mut(&server) {
                    slot.forget_in_flight = false;
                    if ok {
                        for n in &numbers {
                            slot.forget.remove(n);
                        }
                    }
                }
            }
            Event::Membership { change, id, reply } => self.change_membership(change, id, reply),
            Event::Wake => {}
            Event::PickServer {
                prefer,
                avoid,
                reply,
            } => match self.pick_for_file(prefer.as_deref(), &avoid) {
                Some(picked) => {
                    let _ = reply.send(Some(picked));
                }
                None => self.park_pick(prefer, avoid, reply),
            },
            Event::Retry {
                server,
                job,
                reason,
                link_failed,
                delivered,
            } => {
                self.finished(server);
                if link_failed {
                    self.observe(server, &Observation::LinkFailed(reason.clone()));
                } else if reason.starts_with(&format!("{}:", ErrorCode::DiskFull)) {
                    self.observe(server, &Observation::DiskFull(reason.clone()));
                } else if reason.starts_with(&format!("{}:", ErrorCode::Storage)) {
                    // The link words an error reply as "<code>: <message>".
                    self.observe(server, &Observation::StorageFailed(reason.clone()));
                }
                self.retry(server, *job, reason, delivered);
            }
        }
        self.drain();
    }

    fn retry(&mut self, server: ServerId, mut job: Job, reason: String, delivered: bool) {
        if delivered {
            job.attempts += 1;
            if !job.uncertain.contains(&server) {
                job.uncertain.push(server);
            }
        }
        let name = self.server_name(server);
        if self.aborted {
            let msg = format!(
                "the balancer shut down while server {name} was handling this request; {}",
                if delivered {
                    "it may have been stored"
                } else {
                    "it was not stored"
                }
            );
            if let Some(t) = &self.tracker {
                t.failed(&job, ErrorCode::ShuttingDown, &msg);
            }
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
            if let Some(t) = &self.tracker {
                t.retried(&job, &name, &reason);
            }
            self.stats.server(server).retries.fetch_add(1, Relaxed);
            log::warn!(
                "{}: failed on server {name} ({reason}); trying another server",
                job.label()
            );
            job.queued_at = Instant::now();
            if let Some(job) = self.try_dispatch(job) {
                self.enqueue(job, true);
            }
        }
    }

    fn finished(&mut self, server: ServerId) {
        if let Some(slot) = self.slots.get_mut(&server) {
            slot.in_flight = slot.in_flight.saturating_sub(1);
            self.stats
                .server(server)
                .in_flight
                .store(slot.in_flight as u64, Relaxed);
            if slot.in_flight == 0 && slot.draining.is_some() {
                self.remove_slot(server, "drained");
            }
        }
    }

    fn observe(&mut self, server: ServerId, observation: &Observation) {
        let Some(slot) = self.slots.get_mut(&server) else {
            return;
        };
        let Some(t) = slot.health.observe(observation) else {
            return;
        };
        self.stats.server(server).set_state(t.to);
        let line = format!("server {} is {}", slot.name, t.describe());
        match t.to {
            State::Up => log::info!("{line}"),
            _ => log::warn!("{line}"),
        }
        if t.to == State::Down {
            self.reclaim_unsent(server);
        }
        self.update_outage();
    }

    /// Takes back the jobs a down server's link has not started sending, so
    /// they go to another server now rather than wait for this one.
    fn reclaim_unsent(&mut self, server: ServerId) {
        let mut reclaimed = Vec::new();
        if let Some(slot) = self.slots.get(&server) {
            while let Ok(job) = slot.link.unsent.try_recv() {
                reclaimed.push(job);
            }
        }
        if reclaimed.is_empty() {
            return;
        }
        log::warn!(
            "server {} is down: {} requests not yet sent to it go to other servers",
            self.stats.server(server).name,
            reclaimed.len()
        );
        for job in reclaimed.into_iter().rev() {
            self.finished(server);
            if let Work::Forget(_) = job.work {
                if let Some(slot) = self.slots.get_mut(&server) {
                    slot.forget_in_flight = false;
                }
                continue;
            }
            if let Some(t) = &self.tracker {
                let name = &self.stats.server(server).name;
                t.retried(&job, name, "server went down before it was sent");
            }
            self.enqueue(job, true);
        }
    }

    fn update_outage(&mut self) {
        let available = self
            .slots
            .values()
            .any(|s| s.health.accepts_requests() && s.draining.is_none());
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
            .map(|s| format!("{} {}", s.name, s.health.state()))
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
            _ => "every server is down or overloaded",
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
        let msg = self.outage_reason();
        log::error!("{} requests: {msg}; giving up", expired.len());
        for job in expired {
            self.give_up(job, ErrorCode::NoServer, msg.clone());
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
        if let Some(t) = &self.tracker {
            t.failed(&job, code, &msg);
        }
        job.fail(code, msg, &self.stats);
    }

    /// A server's name, also after it left the pool.
    fn server_name(&self, id: ServerId) -> String {
        match (self.slots.get(&id), self.former.get(&id)) {
            (Some(slot), _) => slot.name.clone(),
            (None, Some(name)) => name.clone(),
            (None, None) => format!("#{}", id.0),
        }
    }

    /// Tells servers that are up which of their request numbers are stored
    /// elsewhere, one batch per server at a time.
    fn send_forgets(&mut self) {
        if !self.settings.forget || self.drain_deadline.is_some() {
            return;
        }
        let ready: Vec<ServerId> = self
            .slots
            .iter()
            .filter(|(_, s)| {
                s.health.accepts_requests() && !s.forget.is_empty() && !s.forget_in_flight
            })
            .map(|(id, _)| *id)
            .collect();
        for id in ready {
            let slot = self.slots.get_mut(&id).expect("listed above");
            let numbers: Vec<u64> = slot.forget.iter().take(FORGET_BATCH).copied().collect();
            slot.forget_in_flight = true;
            log::info!(
                "server {}: telling it to forget {} request numbers stored elsewhere",
                slot.name,
                numbers.len()
            );
            // Nobody waits for the answer but the dispatcher (an event).
            let (reply, _) = crossbeam_channel::bounded(1);
            let job = Job::new(
                0,
                Work::Forget(numbers),
                SocketAddr::from(([0, 0, 0, 0], 0)),
                reply,
                Hold::default(),
            );
            if self.send(id, job).is_some() {
                if let Some(slot) = self.slots.get_mut(&id) {
                    slot.forget_in_flight = false;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::RoundRobin;
    use crossbeam_channel::Receiver;

    struct FakeLink {
        jobs: Receiver<Job>,
    }

    /// Plays the links: every server that joins gets a channel the test
    /// reads.
    #[derive(Clone, Default)]
    struct FakeSpawner(Arc<std::sync::Mutex<Vec<Receiver<Job>>>>);

    impl LinkSpawner for FakeSpawner {
        fn spawn(&mut self, _: ServerId, _: SocketAddr) -> std::io::Result<LinkHandle> {
            let (tx, rx) = crossbeam_channel::unbounded();
            self.0.lock().unwrap().push(rx.clone());
            Ok(LinkHandle::detached(tx, rx))
        }
    }

    impl FakeSpawner {
        fn links(&self) -> Vec<FakeLink> {
            let links = self.0.lock().unwrap();
            links
                .iter()
                .map(|rx| FakeLink { jobs: rx.clone() })
                .collect()
        }
    }

    fn addr(i: usize) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 5001 + i as u16))
    }

    fn setup_with(servers: usize, settings: Settings) -> (Dispatcher, FakeSpawner) {
        let stats = Arc::new(Stats::default());
        let spawner = FakeSpawner::default();
        let addrs: Vec<SocketAddr> = (0..servers).map(addr).collect();
        let d = Dispatcher::new(
            &addrs,
            Box::new(spawner.clone()),
            Roster::default(),
            Box::<RoundRobin>::default(),
            ids::Generator::new(ids::Source::Balancer, 1),
            settings,
            stats,
        )
        .unwrap();
        (d, spawner)
    }

    fn setup(servers: usize, settings: Settings) -> (Dispatcher, Vec<FakeLink>) {
        let (d, spawner) = setup_with(servers, settings);
        (d, spawner.links())
    }

    fn settings() -> Settings {
        Settings {
            max_attempts: 3,
            max_in_flight: 2,
            queue_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(30),
            forget: true,
            // One probe decides, as these tests were written for.
            rise: 1,
            fall: 1,
        }
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

    fn all_up(d: &mut Dispatcher, n: usize) {
        let obs = (0..n)
            .map(|i| (ServerId(i as u32), Observation::probe_ok(false)))
            .collect();
        d.on_event(Event::Probes(obs));
    }

    fn probe(d: &mut Dispatcher, server: u32, obs: Observation) {
        d.on_event(Event::Probes(vec![(ServerId(server), obs)]));
    }

    fn done_event(server: u32, job: &Job) -> Event {
        Event::Done {
            server: ServerId(server),
            number: job.request_number.unwrap(),
            uncertain: job.uncertain.clone(),
        }
    }

    fn done(d: &mut Dispatcher, server: u32, job: &Job) {
        d.on_event(done_event(server, job));
    }

    /// Submits jobs 0..n; their reply channels.
    fn submit_jobs(d: &mut Dispatcher, n: u64) -> Vec<Receiver<Reply>> {
        (0..n)
            .map(|i| {
                let (j, rx) = job(i);
                d.submit(j);
                rx
            })
            .collect()
    }

    #[test]
    fn waits_at_max_in_flight_without_failing_while_servers_are_up() {
        let (mut d, links) = setup(1, settings());
        all_up(&mut d, 1);
        let replies = submit_jobs(&mut d, 5);
        assert_eq!(links[0].jobs.len(), 2, "only --max-in-flight on the wire");
        assert_eq!(d.waiting.len(), 3);
        // Long past the queue timeout: a busy server is no outage.
        assert!(!d.on_timer(Instant::now() + Duration::from_secs(60)));
        assert_eq!(d.waiting.len(), 3);
        assert!(replies.iter().all(|r| r.is_empty()));
        let first = links[0].jobs.recv().unwrap();
        done(&mut d, 0, &first);
        assert_eq!(links[0].jobs.len(), 2);
        assert_eq!(d.waiting.len(), 2);
    }

    #[test]
    fn a_job_taken_now_counts_in_flight_and_waits_its_turn_behind_queued_ones() {
        let (mut d, links) = setup(1, settings());
        // No server up yet: nothing to take.
        let (mut first, _rx) = job(1);
        assert!(d.take_now(&mut first).is_none());
        all_up(&mut d, 1);
        assert!(d.take_now(&mut first).is_some());
        assert!(first.request_number.is_some());
        assert_eq!(first.tried, vec![ServerId(0)]);
        // It holds one of the two places on the wire.
        let (second, _rx2) = job(2);
        d.submit(second);
        let (third, _rx3) = job(3);
        d.submit(third);
        assert_eq!(links[0].jobs.len(), 1);
        assert_eq!(d.waiting.len(), 1);
        // Queued work goes first: a new job is not taken past it.
        let (mut fourth, _rx4) = job(4);
        assert!(d.take_now(&mut fourth).is_none());
        assert!(fourth.request_number.is_none());
        done(&mut d, 0, &first);
        assert_eq!(links[0].jobs.len(), 2, "the queued job took the place");
        assert!(d.waiting.is_empty());
    }

    #[test]
    fn a_worker_that_frees_a_place_gets_the_next_job_for_its_server_back() {
        let (mut d, links) = setup(2, settings());
        all_up(&mut d, 2);
        let _replies = submit_jobs(&mut d, 6);
        assert_eq!((links[0].jobs.len(), links[1].jobs.len()), (2, 2));
        assert_eq!(d.waiting.len(), 2);
        // Server 1 frees a place: the only free one, so the next queued job
        // comes back to its worker, and nothing goes through a channel.
        let first = links[1].jobs.recv().unwrap();
        let next = d
            .on_done_handing_back(done_event(1, &first))
            .expect("handed back");
        assert_eq!(next.tried, vec![ServerId(1)]);
        assert_eq!(d.slots[&ServerId(1)].in_flight, 2, "counted in flight");
        assert_eq!((links[0].jobs.len(), links[1].jobs.len()), (2, 1));
        assert_eq!(d.waiting.len(), 1);
        assert!(d.hand_back.is_none());
        // With nothing queued, nothing comes back.
        let (mut d, links) = setup(2, settings());
        all_up(&mut d, 2);
        let (j, _rx) = job(9);
        d.submit(j);
        let only = links[0].jobs.recv().unwrap();
        let back = d.on_done_handing_back(done_event(0, &only));
        assert!(back.is_none());
        assert_eq!(d.slots[&ServerId(0)].in_flight, 0);
    }

    #[test]
    fn a_job_queued_by_another_thread_in_an_outage_wakes_the_dispatcher_for_its_timeout() {
        let (d, links) = setup(1, settings());
        let (events_tx, events) = crossbeam_channel::unbounded();
        let shared = Shared::new(d, events_tx);
        // No server up: the job waits, and the dispatcher thread must now
        // sleep only until its --queue-timeout.
        let (first, _rx) = job(1);
        assert!(shared.submit_now(first).is_none());
        assert!(matches!(events.try_recv(), Ok(Event::Wake)));
        // A second one expires later: no earlier timer, no wake.
        let (second, _rx2) = job(2);
        assert!(shared.submit_now(second).is_none());
        assert!(events.try_recv().is_err());
        assert!(links[0].jobs.is_empty());
    }

    #[test]
    fn queue_timeout_runs_only_while_no_server_can_take_work() {
        let (mut d, _links) = setup(2, settings());
        all_up(&mut d, 2);
        probe(&mut d, 0, Observation::ProbeFailed("refused".into()));
        probe(&mut d, 1, Observation::ProbeFailed("refused".into()));
        let (j, rx) = job(1);
        d.submit(j);
        let expiry = d.next_expiry.expect("an outage arms the timer");
        d.on_timer(expiry - Duration::from_millis(1));
        assert!(rx.is_empty());
        d.on_timer(expiry);
        match rx.try_recv().unwrap() {
            Reply::Error(e) => {
                assert_eq!(e.code, ErrorCode::NoServer);
                assert!(e.message.contains("every server is down"), "{}", e.message);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_server_coming_back_ends_the_outage_clock() {
        let (mut d, links) = setup(1, settings());
        let (j, rx) = job(1);
        d.submit(j);
        assert!(d.next_expiry.is_some());
        all_up(&mut d, 1);
        assert!(d.next_expiry.is_none());
        assert_eq!(links[0].jobs.len(), 1);
        assert!(rx.is_empty());
    }

    #[test]
    fn retry_goes_first_and_to_another_server() {
        let (mut d, links) = setup(
            2,
            Settings {
                max_in_flight: 1,
                ..settings()
            },
        );
        all_up(&mut d, 2);
        let (a, _ra) = job(1);
        let (b, _rb) = job(2);
        let (c, _rc) = job(3);
        d.submit(a);
        d.submit(b);
        d.submit(c);
        let a = links[0].jobs.recv().unwrap();
        assert_eq!(a.id, 1);
        let number = a.request_number;
        // Server 0 answers with an error: job 1 goes before job 3, to the
        // other server once that one is free.
        d.on_event(Event::Retry {
            server: ServerId(0),
            job: Box::new(a),
            reason: "storage: disk full".into(),
            link_failed: false,
            delivered: true,
        });
        let b = links[1].jobs.recv().unwrap();
        assert_eq!(b.id, 2);
        done(&mut d, 1, &b);
        let again = links[1].jobs.recv().unwrap();
        assert_eq!((again.id, again.request_number), (1, number));
        assert_eq!(again.tried, [ServerId(0), ServerId(1)]);
        assert_eq!(links[0].jobs.recv().unwrap().id, 3);
    }

    #[test]
    fn the_same_server_again_only_when_no_other_can_take_it() {
        let (mut d, links) = setup(2, settings());
        all_up(&mut d, 2);
        probe(&mut d, 1, Observation::probe_ok(true));
        let (a, _ra) = job(1);
        d.submit(a);
        let a = links[0].jobs.recv().unwrap();
        d.on_event(Event::Retry {
            server: ServerId(0),
            job: Box::new(a),
            reason: "timeout".into(),
            link_failed: false,
            delivered: true,
        });
        let a = links[0].jobs.recv().unwrap();
        assert_eq!(a.tried, [ServerId(0), ServerId(0)]);
        assert_eq!(a.attempts, 1);
    }

    #[test]
    fn storage_errors_in_a_row_take_a_server_down_and_probes_give_its_load() {
        let (mut d, links) = setup(
            1,
            Settings {
                max_attempts: 5,
                ..settings()
            },
        );
        let load = Load {
            cpu_percent: 50.0,
            ..Load::default()
        };
        probe(
            &mut d,
            0,
            Observation::ProbeOk {
                overloaded: false,
                can_store: true,
                load: Some(load),
            },
        );
        assert_eq!(d.candidates(&[])[0].load, Some(load));
        let (a, _ra) = job(1);
        d.submit(a);
        for _ in 0..3 {
            let a = links[0]
                .jobs
                .try_recv()
                .expect("sent again to the only server");
            d.on_event(Event::Retry {
                server: ServerId(0),
                job: Box::new(a),
                reason: "storage: disk full".into(),
                link_failed: false,
                delivered: true,
            });
        }
        assert_eq!(d.slots[&ServerId(0)].health.state(), State::Down);
        assert_eq!(d.waiting.len(), 1, "waits for a server that can store");
    }

    #[test]
    fn a_down_server_gives_back_what_it_has_not_sent() {
        let (mut d, links) = setup(
            2,
            Settings {
                max_in_flight: 4,
                ..settings()
            },
        );
        probe(&mut d, 0, Observation::probe_ok(false));
        let mut replies = Vec::new();
        for i in 0..3 {
            let (j, rx) = job(i);
            replies.push(rx);
            d.submit(j);
        }
        assert_eq!(links[0].jobs.len(), 3);
        probe(&mut d, 1, Observation::probe_ok(false));
        probe(&mut d, 0, Observation::ProbeFailed("hung".into()));
        assert_eq!(links[0].jobs.len(), 0);
        let moved: Vec<u64> = links[1].jobs.try_iter().map(|j| j.id).collect();
        assert_eq!(moved, [0, 1, 2]);
    }

    #[test]
    fn a_server_that_may_hold_a_copy_is_told_to_forget_it() {
        let (mut d, links) = setup(2, settings());
        all_up(&mut d, 2);
        let (a, _ra) = job(1);
        d.submit(a);
        let a = links[0].jobs.recv().unwrap();
        let number = a.request_number.unwrap();
        d.on_event(Event::Retry {
            server: ServerId(0),
            job: Box::new(a),
            reason: "no reply: connection reset".into(),
            link_failed: true,
            delivered: true,
        });
        let a = links[1].jobs.recv().unwrap();
        assert_eq!(a.uncertain, [ServerId(0)]);
        done(&mut d, 1, &a);
        // Server 0 is down: nothing is sent until it is back.
        assert!(links[0].jobs.is_empty());
        all_up(&mut d, 2);
        let forget = links[0].jobs.recv().unwrap();
        match &forget.work {
            Work::Forget(numbers) => assert_eq!(numbers, &[number]),
            other => panic!("{other:?}"),
        }
        d.on_event(Event::Forgotten {
            server: ServerId(0),
            numbers: vec![number],
            ok: true,
        });
        all_up(&mut d, 2);
        assert!(links[0].jobs.is_empty(), "forgotten once only");
    }

    #[test]
    fn drain_refuses_what_is_left_at_the_deadline() {
        let (mut d, links) = setup(
            1,
            Settings {
                max_in_flight: 1,
                ..settings()
            },
        );
        all_up(&mut d, 1);
        let (a, _ra) = job(1);
        let (b, rb) = job(2);
        d.submit(a);
        d.submit(b);
        let now = Instant::now();
        d.begin_drain(now);
        assert!(!d.is_idle());
        assert!(!d.on_timer(now + Duration::from_secs(30)));
        match rb.try_recv().unwrap() {
            Reply::Error(e) => assert_eq!(e.code, ErrorCode::ShuttingDown),
            other => panic!("{other:?}"),
        }
        // The request on the wire comes back cut off.
        let a = links[0].jobs.recv().unwrap();
        let (tx, ra) = crossbeam_channel::unbounded();
        let a = Job { reply: tx, ..a };
        d.on_event(Event::Retry {
            server: ServerId(0),
            job: Box::new(a),
            reason: "aborted".into(),
            link_failed: true,
            delivered: true,
        });
        match ra.try_recv().unwrap() {
            Reply::Error(e) => {
                assert_eq!(e.code, ErrorCode::ShuttingDown);
                assert!(e.message.contains("may have been stored"), "{}", e.message);
            }
            other => panic!("{other:?}"),
        }
        assert!(d.is_idle());
    }

    fn change(d: &mut Dispatcher, change: Change) -> Reply {
        let (tx, rx) = crossbeam_channel::unbounded();
        d.on_event(Event::Membership {
            change,
            id: 7,
            reply: tx,
        });
        rx.try_recv().expect("answered at once")
    }

    #[test]
    fn a_server_added_at_run_time_takes_work_once_up() {
        let (mut d, spawner) = setup_with(1, settings());
        all_up(&mut d, 1);
        match change(&mut d, Change::Add(addr(1))) {
            Reply::Membership { id: 7, message } => assert!(message.contains("joined")),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            change(&mut d, Change::Add(addr(1))),
            Reply::Error(e) if e.message.contains("already in the pool")
        ));
        // Registering again is the server's heartbeat: fine.
        assert!(matches!(
            change(&mut d, Change::Register(addr(1))),
            Reply::Membership { .. }
        ));
        all_up(&mut d, 2);
        for i in 0..4 {
            d.submit(job(i).0);
        }
        let links = spawner.links();
        assert_eq!((links[0].jobs.len(), links[1].jobs.len()), (2, 2));
        assert_eq!(crate::net::lock(&d.roster).len(), 2);
    }

    #[test]
    fn a_draining_server_gets_nothing_new_and_leaves_when_done() {
        let (mut d, links) = setup(2, settings());
        all_up(&mut d, 2);
        d.submit(job(1).0);
        let on_first = links[0].jobs.recv().unwrap();
        // The server itself leaves: the answer waits until it is idle.
        let (tx, rx) = crossbeam_channel::unbounded();
        d.on_event(Event::Membership {
            change: Change::Deregister(addr(0)),
            id: 9,
            reply: tx,
        });
        assert!(rx.is_empty());
        d.submit(job(2).0);
        d.submit(job(3).0);
        assert!(links[0].jobs.is_empty());
        assert_eq!(links[1].jobs.len(), 2);
        done(&mut d, 0, &on_first);
        assert!(matches!(
            rx.try_recv().unwrap(),
            Reply::Membership { id: 9, .. }
        ));
        assert_eq!(d.slots.len(), 1);
        assert_eq!(crate::net::lock(&d.roster).len(), 1);
    }

    #[test]
    fn a_removed_server_gives_its_work_back_and_stays_out() {
        let (mut d, links) = setup(
            2,
            Settings {
                max_in_flight: 4,
                ..settings()
            },
        );
        probe(&mut d, 0, Observation::probe_ok(false));
        for i in 0..3 {
            d.submit(job(i).0);
        }
        let first = links[0].jobs.recv().unwrap();
        assert!(matches!(
            change(&mut d, Change::Remove(addr(0))),
            Reply::Membership { .. }
        ));
        // Not yet sent: back in the queue; the one on the wire comes back
        // from its cut connection.
        assert_eq!(d.waiting.len(), 2);
        d.on_event(Event::Retry {
            server: ServerId(0),
            job: Box::new(first),
            reason: "cut".into(),
            link_failed: true,
            delivered: true,
        });
        assert_eq!(d.waiting.len(), 3);
        probe(&mut d, 1, Observation::probe_ok(false));
        assert_eq!(links[1].jobs.len(), 3);
        assert!(matches!(
            change(&mut d, Change::Register(addr(0))),
            Reply::Error(e) if e.message.contains("client admin add")
        ));
        assert!(matches!(
            change(&mut d, Change::Drain(addr(0))),
            Reply::Error(e) if e.message.contains("not in the pool")
        ));
        assert!(matches!(
            change(&mut d, Change::Add(addr(0))),
            Reply::Membership { .. }
        ));
    }
}
