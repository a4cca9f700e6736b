//! The link to one server: how a job gets there. Framed servers get a few
//! pipelined connections (`lane`), each carrying many requests at once;
//! servers of the original format get workers that open a connection per
//! document, as the original balancer did. Links are started by whoever
//! brings a server into the pool (the balancer at start, the connection
//! thread that received `register` or `add_server`), never by the
//! dispatcher, and end when the last handle on them is dropped.

use super::backend::{self, BackendSettings};
use super::lane::{Answered, Finish, Lane, LaneSettings};
use super::stats::ServerStats;
use super::work::{Job, Work};
use super::{BackendWire, ServerId};
use crate::text::now_ms;
use crossbeam_channel::Sender;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// Workers of a link to servers of the original format: documents sent at
/// once to one of them, each on its own connection.
const LEGACY_WORKERS: usize = 8;
/// Worker stacks: they only format and write one document.
const WORKER_STACK: usize = 256 * 1024;

/// A handle on a server's link; cheap to clone.
#[derive(Clone)]
pub struct Link(Arc<Inner>);

enum Inner {
    Framed {
        lanes: Vec<Lane>,
        /// The lane the next batch goes on.
        next: AtomicUsize,
        io_timeout_ms: u64,
    },
    Legacy {
        jobs: Sender<Job>,
    },
    /// Jobs go to a channel a test reads.
    #[cfg(test)]
    Channel(Sender<Job>),
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Link(..)")
    }
}

impl Link {
    /// Sends jobs (given their request numbers) from the thread that holds
    /// them, writing what the socket takes now.
    pub fn send(&self, jobs: Vec<Job>) {
        self.put(jobs, true);
    }

    /// Hands jobs over without any I/O on this thread (the dispatcher's).
    pub fn enqueue(&self, jobs: Vec<Job>) {
        self.put(jobs, false);
    }

    fn put(&self, mut jobs: Vec<Job>, write_now: bool) {
        match &*self.0 {
            Inner::Framed {
                lanes,
                next,
                io_timeout_ms,
            } => {
                // A server must not store a document past half the time
                // the balancer waits for its answer: after that it may be
                // sent elsewhere, and a late copy would be a duplicate.
                let not_after_ms = now_ms() + io_timeout_ms / 2;
                let batch = jobs
                    .drain(..)
                    .map(|mut job| {
                        let number = job.request_number.unwrap_or_default();
                        job.not_after_ms = not_after_ms;
                        let frame = job.work.encode(number, not_after_ms);
                        (job, frame)
                    })
                    .collect();
                let lane = &lanes[next.fetch_add(1, Relaxed) % lanes.len()];
                if write_now {
                    lane.send(batch);
                } else {
                    lane.enqueue(batch);
                }
            }
            Inner::Legacy { jobs: channel } => {
                for job in jobs {
                    // The workers stop only when the link is dropped.
                    let _ = channel.send(job);
                }
            }
            #[cfg(test)]
            Inner::Channel(channel) => {
                for job in jobs {
                    let _ = channel.send(job);
                }
            }
        }
    }

    /// A link whose jobs go to the receiver, for tests that play servers.
    #[cfg(test)]
    pub fn channel() -> (Link, crossbeam_channel::Receiver<Job>) {
        let (tx, rx) = crossbeam_channel::unbounded();
        (Link(Arc::new(Inner::Channel(tx))), rx)
    }

    /// Cuts the link for good: requests on the wire come back as failed
    /// (`Failure::Cut`), and nothing more is sent.
    pub fn close(&self) {
        if let Inner::Framed { lanes, .. } = &*self.0 {
            for lane in lanes {
                lane.close();
            }
        }
    }
}

/// Starts links for servers as they join; the threads are kept for the
/// balancer to join at the end.
pub struct Links {
    pub settings: BackendSettings,
    /// Connections per framed server (`--server-connections`).
    pub lanes: usize,
    pub finish: Arc<dyn Finish>,
    pub threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
    next_id: AtomicU32,
}

impl Links {
    pub fn new(
        settings: BackendSettings,
        lanes: usize,
        finish: Arc<dyn Finish>,
        threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
    ) -> Links {
        Links {
            settings,
            lanes: lanes.max(1),
            finish,
            threads,
            next_id: AtomicU32::new(0),
        }
    }

    /// A new server id, fresh counters and a link to `addr` with its
    /// threads running.
    pub fn start(&self, addr: SocketAddr) -> std::io::Result<(ServerId, Arc<ServerStats>, Link)> {
        let id = ServerId(self.next_id.fetch_add(1, Relaxed));
        let stats = ServerStats::named(addr.to_string());
        let mut threads = Vec::new();
        let inner = match self.settings.wire {
            BackendWire::Framed => {
                let settings = LaneSettings {
                    server: id,
                    stats: stats.clone(),
                    addr,
                    backend: self.settings.clone(),
                    finish: self.finish.clone(),
                };
                let mut lanes = Vec::with_capacity(self.lanes);
                for i in 0..self.lanes {
                    let (lane, started) =
                        Lane::spawn(settings.clone(), &format!("link{}-{i}", id.0))?;
                    lanes.push(lane);
                    threads.extend(started);
                }
                Inner::Framed {
                    lanes,
                    next: AtomicUsize::new(0),
                    io_timeout_ms: self.settings.io_timeout.as_millis() as u64,
                }
            }
            BackendWire::Legacy => {
                let (jobs, queue) = crossbeam_channel::unbounded::<Job>();
                for i in 0..LEGACY_WORKERS {
                    let queue = queue.clone();
                    let settings = self.settings.clone();
                    let finish = self.finish.clone();
                    let stats = stats.clone();
                    let name = format!("link{}-{i}", id.0);
                    threads.push(crate::sync::spawn_named(
                        name,
                        Some(WORKER_STACK),
                        move || {
                            for job in queue {
                                let result = send_legacy(addr, &settings, &job);
                                finish.finish(id, &stats, job, result);
                            }
                        },
                    )?);
                }
                Inner::Legacy { jobs }
            }
        };
        let mut all = crate::sync::lock(&self.threads);
        // Links of servers that left end on their own.
        crate::sync::join_finished(&mut all);
        all.extend(threads);
        Ok((id, stats, Link(Arc::new(inner))))
    }
}

/// Carries out a job on a server of the original format, which only
/// stores documents.
fn send_legacy(addr: SocketAddr, settings: &BackendSettings, job: &Job) -> Answered {
    let number = job.request_number.unwrap_or_default();
    match &job.work {
        Work::Store(doc) => backend::send_legacy(addr, settings, number, &doc.fields),
        Work::Calc(_) | Work::Forget(_) | Work::ForgetKeys(_) => Ok(crate::proto::Reply::error(
            Some(number),
            crate::proto::ErrorCode::BadRequest,
            "servers of the original format only store documents",
        )),
    }
}
