//! The dispatcher: one thread that owns the request queue, the health of
//! every server and the balancing policy. Connection threads send it jobs;
//! the monitor and the server links send it events. It hands each job to
//! the link of the chosen server, holds jobs while no server can take them
//! (without polling), and retries a job on another server when one fails.

use super::stats::Stats;
use super::Backend;
use crate::health::{Health, Observation, State};
use crate::policy::{Candidate, Policy};
use crate::proto::{self, Document, ErrorCode, Operation, Reply};
use crossbeam_channel::{select, Receiver, Sender};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

/// Most jobs held waiting for a server; past this the dispatcher stops
/// taking new jobs, the queue fills and client connections are slowed down
/// by TCP instead of the balancer growing without bound.
const MAX_WAITING: usize = 10_000;

/// What a job asks of a server.
#[derive(Debug)]
pub enum Work {
    Store(Document),
    Calc(Operation),
}

impl Work {
    /// How logs name it.
    pub fn describe(&self) -> String {
        match self {
            Work::Store(doc) => format!("\"{}\"", proto::truncate(&doc.title, 80)),
            Work::Calc(op) => format!("calc {op}"),
        }
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
    /// When waiting for a server gives up with `no_server`.
    pub deadline: Instant,
    /// Assigned at the first forward and kept across retries, so a server can
    /// tell a retried document from a new one.
    pub request_number: Option<u64>,
    /// Forwards that may have reached a server.
    pub attempts: u32,
    /// Servers already tried, avoided while others are available.
    pub tried: Vec<usize>,
}

impl Job {
    pub fn fail(self, code: ErrorCode, message: String, stats: &Stats) {
        stats.failed.fetch_add(1, Relaxed);
        // The client may have gone; its reply has nowhere to go then.
        let _ = self.reply.send(Reply::error(Some(self.id), code, message));
    }

    fn label(&self) -> String {
        match self.request_number {
            Some(n) => format!("request {n}"),
            None => format!("request from {} (id {})", self.client, self.id),
        }
    }
}

/// What links and the monitor tell the dispatcher.
#[derive(Debug)]
pub enum Event {
    /// One round of status probes, one observation per server, applied
    /// together so that no server gets a head start.
    Probes(Vec<Observation>),
    /// A link is done with a job (stored, or failed for good).
    Done { server: usize },
    /// A link is done with a job that failed for good.
    Failed { server: usize },
    /// A link could not complete a job; it goes back to the queue.
    Retry {
        server: usize,
        job: Job,
        reason: String,
        /// The connection to the server failed (as opposed to an error
        /// reply): the server is marked down until a probe says otherwise.
        link_failed: bool,
        /// The request may have reached the server; counts as an attempt.
        delivered: bool,
    },
}

/// The dispatcher's view of one server.
struct Slot {
    name: String,
    health: Health,
    in_flight: usize,
    link: Sender<Job>,
}

pub struct Settings {
    pub max_attempts: u32,
    pub max_in_flight: usize,
}

pub struct Dispatcher {
    slots: Vec<Slot>,
    policy: Box<dyn Policy>,
    waiting: VecDeque<Job>,
    last_request_number: u64,
    settings: Settings,
    stats: Arc<Stats>,
}

impl Dispatcher {
    pub fn new(
        backends: Vec<(Backend, Sender<Job>)>,
        policy: Box<dyn Policy>,
        settings: Settings,
        stats: Arc<Stats>,
    ) -> Self {
        let slots = backends
            .into_iter()
            .map(|(b, link)| Slot {
                name: b.name,
                health: Health::default(),
                in_flight: 0,
                link,
            })
            .collect();
        Dispatcher {
            slots,
            policy,
            waiting: VecDeque::new(),
            last_request_number: 0,
            settings,
            stats,
        }
    }

    /// Runs until every sender of `jobs` is gone.
    pub fn run(mut self, jobs: Receiver<Job>, events: Receiver<Event>) {
        log::info!(
            "dispatcher: {} policy over {} servers",
            self.policy.name(),
            self.slots.len()
        );
        let never = crossbeam_channel::never();
        loop {
            let timer = match self.waiting.iter().map(|j| j.deadline).min() {
                Some(deadline) => crossbeam_channel::at(deadline),
                None => crossbeam_channel::never(),
            };
            let jobs_in = if self.waiting.len() >= MAX_WAITING {
                &never
            } else {
                &jobs
            };
            select! {
                recv(jobs_in) -> job => match job {
                    Ok(job) => self.submit(job),
                    Err(_) => break,
                },
                recv(events) -> event => {
                    if let Ok(event) = event {
                        self.on_event(event);
                    }
                }
                recv(timer) -> _ => self.expire(Instant::now()),
            }
            self.stats
                .queue_depth
                .store(self.waiting.len() as u64, Relaxed);
        }
        for job in self.waiting.drain(..) {
            job.fail(
                ErrorCode::Internal,
                "balancer is shutting down".into(),
                &self.stats,
            );
        }
    }

    fn submit(&mut self, job: Job) {
        if self.waiting.is_empty() {
            if let Some(job) = self.try_dispatch(job) {
                // Logged once per wait, not once per request: under load every
                // request would say the same.
                log::info!(
                    "{}: no server can take it now (down, overloaded or at --max-in-flight); queueing",
                    job.label()
                );
                self.waiting.push_back(job);
            }
        } else {
            self.waiting.push_back(job);
            self.drain();
        }
    }

    /// Dispatches waiting jobs in arrival order while servers can take them.
    fn drain(&mut self) {
        while let Some(job) = self.waiting.pop_front() {
            if let Some(job) = self.try_dispatch(job) {
                self.waiting.push_front(job);
                break;
            }
        }
    }

    fn candidates(&self, avoid: &[usize]) -> Vec<Candidate> {
        self.slots
            .iter()
            .enumerate()
            .map(|(i, s)| Candidate {
                eligible: s.health.accepts_requests()
                    && s.in_flight < self.settings.max_in_flight
                    && !avoid.contains(&i),
                in_flight: s.in_flight,
            })
            .collect()
    }

    /// Hands the job to a server's link, or gives it back when no server can
    /// take it now.
    fn try_dispatch(&mut self, mut job: Job) -> Option<Job> {
        let mut candidates = self.candidates(&job.tried);
        if !candidates.iter().any(|c| c.eligible) {
            // Every server not yet tried is unavailable: trying one again
            // beats waiting.
            candidates = self.candidates(&[]);
        }
        let Some(index) = self.policy.pick(&candidates) else {
            return Some(job);
        };
        let number = *job.request_number.get_or_insert_with(|| {
            self.last_request_number += 1;
            self.last_request_number
        });
        let slot = &mut self.slots[index];
        log::info!(
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
        job.tried.push(index);
        slot.in_flight += 1;
        self.stats.servers[index]
            .in_flight
            .store(slot.in_flight as u64, Relaxed);
        if let Err(returned) = slot.link.send(job) {
            // The link thread is gone, which only a bug can cause; keep the
            // job and stop using that server.
            slot.in_flight -= 1;
            self.stats.servers[index]
                .in_flight
                .store(slot.in_flight as u64, Relaxed);
            log::error!("server {}: link thread has stopped", slot.name);
            slot.health
                .observe(&Observation::LinkFailed("link thread stopped".into()));
            return Some(returned.into_inner());
        }
        None
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Probes(observations) => {
                for (server, observation) in observations.iter().enumerate() {
                    self.observe(server, observation);
                }
                self.drain();
            }
            Event::Done { server } => {
                self.finished(server);
                self.drain();
            }
            Event::Failed { server } => {
                self.stats.failed.fetch_add(1, Relaxed);
                self.finished(server);
                self.drain();
            }
            Event::Retry {
                server,
                mut job,
                reason,
                link_failed,
                delivered,
            } => {
                self.finished(server);
                if link_failed {
                    self.observe(server, &Observation::LinkFailed(reason.clone()));
                }
                if delivered {
                    job.attempts += 1;
                }
                let name = &self.slots[server].name;
                if job.attempts >= self.settings.max_attempts {
                    log::error!(
                        "{}: failed on server {name} ({reason}); giving up after {} attempts",
                        job.label(),
                        job.attempts
                    );
                    let msg = format!(
                        "request failed after {} attempts; last error from server {name}: {reason}",
                        job.attempts
                    );
                    job.fail(ErrorCode::ServerFailed, msg, &self.stats);
                } else {
                    self.stats.servers[server].retries.fetch_add(1, Relaxed);
                    log::warn!(
                        "{}: failed on server {name} ({reason}); trying another server",
                        job.label()
                    );
                    // A retried job keeps its place ahead of newer ones.
                    if let Some(job) = self.try_dispatch(job) {
                        self.waiting.push_front(job);
                    }
                }
                self.drain();
            }
        }
    }

    fn finished(&mut self, server: usize) {
        let slot = &mut self.slots[server];
        slot.in_flight -= 1;
        self.stats.servers[server]
            .in_flight
            .store(slot.in_flight as u64, Relaxed);
    }

    fn observe(&mut self, server: usize, observation: &Observation) {
        let slot = &mut self.slots[server];
        if let Some(t) = slot.health.observe(observation) {
            self.stats.servers[server].set_state(t.to);
            let line = format!("server {} is {}", slot.name, t.describe());
            match t.to {
                State::Up => log::info!("{line}"),
                _ => log::warn!("{line}"),
            }
        }
    }

    fn expire(&mut self, now: Instant) {
        let (expired, kept): (Vec<Job>, Vec<Job>) =
            self.waiting.drain(..).partition(|j| j.deadline <= now);
        self.waiting = kept.into();
        for job in expired {
            let states: Vec<String> = self
                .slots
                .iter()
                .map(|s| format!("{} {}", s.name, s.health.state()))
                .collect();
            let busy = self.slots.iter().any(|s| s.health.accepts_requests());
            let msg = if busy {
                format!(
                    "no server available: every server that is up has --max-in-flight requests in progress ({})",
                    states.join(", ")
                )
            } else {
                format!("no server available ({})", states.join(", "))
            };
            log::error!("{}: {msg}; giving up", job.label());
            job.fail(ErrorCode::NoServer, msg, &self.stats);
        }
    }
}
