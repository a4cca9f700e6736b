//! The link to one server: a pool of connections (`Backend`s) and
//! `--max-in-flight` workers taking jobs from one channel. The dispatcher
//! hands a job over only when a worker is free, so a job is on the wire as
//! soon as it is handed over. A worker that reports its job done gets the
//! job that place goes to straight back, when it is for the same server,
//! and carries it out without a trip through the channel. A connection
//! thread may also take a server's connection from the pool and forward
//! its own client's request itself (see `Pool::carry_out`); the dispatcher
//! counts those in flight too, so at most `--max-in-flight` requests are on
//! the wire to a server at once.
//! A server that hangs holds at most those; each times out after
//! `--server-timeout` on its own. Each answer is routed back to the client
//! connection that sent the job.

use super::backend::{self, BackendSettings, Connections, LinkError};
use super::dispatch::{Event, Job, Shared, Work};
use super::stats::{ServerStats, Stats};
use super::tracking::Tracker;
use super::ServerId;
use crate::net;
use crate::proto::Reply;
use crossbeam_channel::{Receiver, Sender};
use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::thread::JoinHandle;

/// Workers have small stacks: replies from servers are small and shallow.
const WORKER_STACK: usize = 256 * 1024;

/// What the dispatcher holds of a link.
pub struct LinkHandle {
    pub jobs: Sender<Job>,
    /// The other end of `jobs`: jobs not yet taken by a worker can be taken
    /// back when the server goes down.
    pub unsent: Receiver<Job>,
    /// The server's connections, for requests forwarded without a worker.
    pub pool: Arc<Pool>,
}

impl LinkHandle {
    /// Cuts every connection of the link: requests on the wire fail now.
    pub fn abort(&self) {
        self.pool.connections.cut_all();
    }

    /// A handle with no workers behind it, for tests that play the link.
    #[cfg(test)]
    pub fn detached(jobs: Sender<Job>, unsent: Receiver<Job>) -> LinkHandle {
        let settings = BackendSettings {
            connect_timeout: std::time::Duration::from_secs(1),
            io_timeout: std::time::Duration::from_secs(1),
            probe_timeout: std::time::Duration::from_secs(1),
            max_frame: 1024,
            wire: super::BackendWire::Framed,
            key: None,
        };
        LinkHandle {
            jobs,
            unsent,
            pool: Arc::new(Pool::new(
                ServerId(0),
                Arc::default(),
                ([127, 0, 0, 1], 9).into(),
                settings,
            )),
        }
    }
}

/// The connections to one server, shared by its link's workers and by
/// connection threads that forward a request themselves. A connection is
/// opened when none is idle; the dispatcher's in-flight count bounds how
/// many are ever open.
pub struct Pool {
    server: ServerId,
    server_stats: Arc<ServerStats>,
    addr: SocketAddr,
    settings: BackendSettings,
    connections: Arc<Connections>,
    idle: Mutex<Vec<Box<dyn backend::Backend>>>,
    opened: AtomicUsize,
}

impl Pool {
    fn new(
        server: ServerId,
        server_stats: Arc<ServerStats>,
        addr: SocketAddr,
        settings: BackendSettings,
    ) -> Pool {
        Pool {
            server,
            server_stats,
            addr,
            settings,
            connections: Arc::default(),
            idle: Mutex::default(),
            opened: AtomicUsize::new(0),
        }
    }

    /// Forwards one request on an idle connection (or a new one).
    fn forward(&self, number: u64, work: &Work) -> Result<Reply, LinkError> {
        let idle = net::lock(&self.idle).pop();
        let mut backend = idle.unwrap_or_else(|| {
            let slot = self.opened.fetch_add(1, Relaxed);
            backend::open(self.addr, &self.settings, self.connections.clone(), slot)
        });
        let result = backend.forward(number, work);
        // Most recently used first: the same few connections stay warm.
        net::lock(&self.idle).push(backend);
        result
    }

    /// Carries out a job the dispatcher counted in flight on this server:
    /// forwards it, gives the reply to `deliver` when it is final (stored,
    /// computed, refused), and returns the event for the dispatcher.
    pub fn carry_out(
        &self,
        job: Job,
        stats: &Stats,
        tracker: Option<&Tracker>,
        deliver: &mut dyn FnMut(&Job, Reply),
    ) -> Event {
        self.server_stats.requests.fetch_add(1, Relaxed);
        let number = job.request_number.unwrap_or_default();
        let result = self.forward(number, &job.work);
        settle(
            self.server,
            job,
            result,
            &self.server_stats,
            stats,
            tracker,
            deliver,
        )
    }
}

/// Where links report finished jobs: a job done is counted off under the
/// dispatcher's lock without waking its thread; anything else goes to the
/// dispatcher thread as an event.
#[derive(Clone)]
pub struct Reporter {
    events: Sender<Event>,
    /// Set once the dispatcher is shared (it starts the first links).
    shared: Arc<OnceLock<Weak<Shared>>>,
}

impl Reporter {
    pub fn new(events: Sender<Event>) -> Reporter {
        Reporter {
            events,
            shared: Arc::default(),
        }
    }

    /// From now on, finished jobs are counted off on `shared` directly.
    pub fn attach(&self, shared: &Arc<Shared>) {
        let _ = self.shared.set(Arc::downgrade(shared));
    }

    /// Tells the dispatcher how a job of the link ended; returns false when
    /// the dispatcher is gone (shutting down), and the job handed back to
    /// the worker, if any (see `Shared::report_handing_back`).
    fn report_handing_back(&self, event: Event) -> (bool, Option<Job>) {
        match self.shared.get().and_then(Weak::upgrade) {
            Some(shared) => shared.report_handing_back(event),
            None => (self.events.send(event).is_ok(), None),
        }
    }
}

/// Starts links for servers as they join the pool; the threads it starts
/// are kept in `threads` for the balancer to join.
pub trait LinkSpawner: Send {
    fn spawn(&mut self, server: ServerId, addr: SocketAddr) -> std::io::Result<LinkHandle>;
}

pub struct Spawner {
    pub workers: usize,
    pub reporter: Reporter,
    pub settings: BackendSettings,
    pub stats: Arc<Stats>,
    pub threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
    pub tracker: Option<Tracker>,
}

impl LinkSpawner for Spawner {
    fn spawn(&mut self, server: ServerId, addr: SocketAddr) -> std::io::Result<LinkHandle> {
        let (handle, threads) = spawn(
            server,
            addr,
            self.workers,
            &self.reporter,
            &self.settings,
            self.stats.clone(),
            self.tracker.clone(),
        )?;
        let mut all = crate::net::lock(&self.threads);
        // Links of servers that left end on their own.
        crate::net::join_finished(&mut all);
        all.extend(threads);
        Ok(handle)
    }
}

/// Starts the workers of one server's link. They stop when the dispatcher
/// drops the handle (the job channel disconnects).
pub fn spawn(
    server: ServerId,
    addr: SocketAddr,
    workers: usize,
    reporter: &Reporter,
    settings: &BackendSettings,
    stats: Arc<Stats>,
    tracker: Option<Tracker>,
) -> std::io::Result<(LinkHandle, Vec<JoinHandle<()>>)> {
    let (jobs_tx, jobs_rx) = crossbeam_channel::unbounded::<Job>();
    let pool = Arc::new(Pool::new(
        server,
        stats.server(server),
        addr,
        settings.clone(),
    ));
    let mut threads = Vec::with_capacity(workers);
    for slot in 0..workers {
        let jobs = jobs_rx.clone();
        let reporter = reporter.clone();
        let stats = stats.clone();
        let tracker = tracker.clone();
        let pool = pool.clone();
        let name = format!("link{}-{slot}", server.0);
        threads.push(net::spawn_named(name, Some(WORKER_STACK), move || {
            let mut answer = |job: &Job, reply| {
                // Straight to the client when that needs no waiting, else
                // by its connection's writer thread.
                if let Some(Ok(mut out)) = job.out.as_ref().map(|o| o.try_lock()) {
                    if out.try_message(&reply) {
                        return;
                    }
                }
                // The client may have gone; its reply has nowhere to go then.
                let _ = job.reply.send(reply);
            };
            // A job handed straight back when this worker reported the
            // last one done: carried out before waiting on the channel.
            let mut next = None;
            while let Some(job) = next.take().or_else(|| jobs.recv().ok()) {
                let event = pool.carry_out(job, &stats, tracker.as_ref(), &mut answer);
                let (alive, handed) = reporter.report_handing_back(event);
                next = handed;
                if !alive && next.is_none() {
                    return; // dispatcher gone: shutting down
                }
            }
        })?);
    }
    let handle = LinkHandle {
        jobs: jobs_tx,
        unsent: jobs_rx,
        pool,
    };
    Ok((handle, threads))
}

/// Turns the outcome of a forward into the client's reply (when final) and
/// the event for the dispatcher.
fn settle(
    server: ServerId,
    mut job: Job,
    result: Result<Reply, LinkError>,
    server_stats: &ServerStats,
    stats: &Stats,
    tracker: Option<&Tracker>,
    deliver: &mut dyn FnMut(&Job, Reply),
) -> Event {
    let name = &server_stats.name;
    let number = job.request_number.unwrap_or_default();
    if let Work::Forget(numbers) = &mut job.work {
        let numbers = std::mem::take(numbers);
        let ok = match result {
            Ok(Reply::Forgotten { moved, .. }) => {
                log::info!(
                    "server {name}: forgot {} request numbers stored elsewhere ({moved} copies moved aside)",
                    numbers.len()
                );
                true
            }
            Ok(other) => {
                log::warn!("server {name}: unexpected answer to forget: {other:?}");
                false
            }
            Err(e) => {
                log::warn!("server {name}: forget failed: {}", e.reason);
                false
            }
        };
        return Event::Forgotten {
            server,
            numbers,
            ok,
        };
    }
    let retry = |job, reason, link_failed, delivered| {
        server_stats.failures.fetch_add(1, Relaxed);
        Event::Retry {
            server,
            job: Box::new(job),
            reason,
            link_failed,
            delivered,
        }
    };
    let reply = match result {
        Ok(Reply::Stored(mut stored)) => {
            log::info!(
                "request {number}: {} from {} stored on server {name} as {}{} ({} letters A) in {} ms",
                job.work.describe(),
                job.client,
                stored.file,
                if stored.existing {
                    " (already there)"
                } else {
                    ""
                },
                stored.a_count,
                job.received.elapsed().as_millis()
            );
            // Recorded before the client hears of it, so that a query made
            // after the acknowledgement sees it.
            if let Some(t) = tracker {
                t.stored(&job, name, &stored.file);
            }
            if let Work::Store(doc) = &job.work {
                server_stats
                    .bytes
                    .fetch_add(doc.content_len as u64, Relaxed);
            }
            stored.id = job.id;
            stored.server = name.clone();
            Reply::Stored(stored)
        }
        Ok(Reply::Calc(mut computed)) => {
            log::info!(
                "request {number}: computed on server {name}: {} {} {} = {}",
                computed.a,
                computed.operation.symbol(),
                computed.b,
                computed.result
            );
            computed.id = job.id;
            computed.server = name.clone();
            Reply::Calc(computed)
        }
        Ok(Reply::Error(e)) if e.code.is_retryable() => {
            return retry(job, format!("{}: {}", e.code, e.message), false, true);
        }
        Ok(Reply::Error(mut e)) => {
            log::warn!(
                "request {number}: refused by server {name} after {} ms: {}",
                job.received.elapsed().as_millis(),
                e.message
            );
            if let Some(t) = tracker {
                t.failed(&job, e.code, &format!("server {name}: {}", e.message));
            }
            server_stats.failures.fetch_add(1, Relaxed);
            e.id = Some(job.id);
            deliver(&job, Reply::Error(e));
            return Event::Failed { server };
        }
        Ok(other) => return retry(job, format!("unexpected reply {other:?}"), true, true),
        Err(e) => return retry(job, e.reason, true, e.delivered),
    };
    stats.latency.observe(job.received.elapsed());
    deliver(&job, reply);
    Event::Done {
        server,
        number,
        uncertain: std::mem::take(&mut job.uncertain),
    }
    // The job drops here, giving back its connection's window slot and its
    // bytes.
}
