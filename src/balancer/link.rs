//! The link to one server: a pool of `--max-in-flight` workers, each with
//! its own persistent connection (a `Backend`), taking jobs from one
//! channel. The dispatcher hands a job over only when a worker is free, so
//! a job is on the wire as soon as it is handed over, and up to
//! `--max-in-flight` requests are on the wire at once. A server that hangs
//! holds at most those; each times out after `--server-timeout` on its own.
//! Each answer is routed back to the client connection that sent the job.

use super::backend::{self, BackendSettings, Connections, LinkError};
use super::dispatch::{Event, Job, Work};
use super::stats::{ServerStats, Stats};
use super::tracking::Tracker;
use super::ServerId;
use crate::net;
use crate::proto::Reply;
use crossbeam_channel::{Receiver, Sender};
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// Workers have small stacks: replies from servers are small and shallow.
const WORKER_STACK: usize = 256 * 1024;

/// What the dispatcher holds of a link.
pub struct LinkHandle {
    pub jobs: Sender<Job>,
    /// The other end of `jobs`: jobs not yet taken by a worker can be taken
    /// back when the server goes down.
    pub unsent: Receiver<Job>,
    connections: Arc<Connections>,
}

impl LinkHandle {
    /// Cuts every connection of the link: requests on the wire fail now.
    pub fn abort(&self) {
        self.connections.cut_all();
    }

    /// A handle with no workers behind it, for tests that play the link.
    #[cfg(test)]
    pub fn detached(jobs: Sender<Job>, unsent: Receiver<Job>) -> LinkHandle {
        LinkHandle {
            jobs,
            unsent,
            connections: Arc::default(),
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
    pub events: Sender<Event>,
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
            self.events.clone(),
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
    events: Sender<Event>,
    settings: &BackendSettings,
    stats: Arc<Stats>,
    tracker: Option<Tracker>,
) -> std::io::Result<(LinkHandle, Vec<JoinHandle<()>>)> {
    let (jobs_tx, jobs_rx) = crossbeam_channel::unbounded::<Job>();
    let connections = Arc::new(Connections::default());
    let mut threads = Vec::with_capacity(workers);
    for slot in 0..workers {
        let jobs = jobs_rx.clone();
        let events = events.clone();
        let stats = stats.clone();
        let tracker = tracker.clone();
        let mut backend = backend::open(addr, settings, connections.clone(), slot);
        let name = format!("link{}-{slot}", server.0);
        threads.push(net::spawn_named(name, Some(WORKER_STACK), move || {
            let server_stats = stats.server(server);
            for job in jobs {
                server_stats.requests.fetch_add(1, Relaxed);
                let number = job.request_number.unwrap_or_default();
                let result = backend.forward(number, &job.work);
                let event = settle(server, job, result, &server_stats, &stats, tracker.as_ref());
                if events.send(event).is_err() {
                    return; // dispatcher gone: shutting down
                }
            }
        })?);
    }
    let handle = LinkHandle {
        jobs: jobs_tx,
        unsent: jobs_rx,
        connections,
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
            let _ = job.reply.send(Reply::Error(e));
            return Event::Failed { server };
        }
        Ok(other) => return retry(job, format!("unexpected reply {other:?}"), true, true),
        Err(e) => return retry(job, e.reason, true, e.delivered),
    };
    stats.latency.observe(job.received.elapsed());
    let _ = job.reply.send(reply);
    Event::Done {
        server,
        number,
        uncertain: std::mem::take(&mut job.uncertain),
    }
    // The job drops here, giving back its connection's window slot and its
    // bytes.
}
