//! One pipelined connection to a storage server: a lane of its link. Many
//! requests are on it at once; the server answers each by its id (its
//! request number), in any order.
//!
//! The write half has one owner, `LaneState`, behind the lane's lock: a
//! connection thread that holds a request writes it there itself, as far
//! as the socket takes it without waiting, and leaves the rest to the
//! lane's writer thread, which also writes what the dispatcher hands over
//! (it does no I/O) and opens the connection when there is none. Nothing
//! else writes to the socket. One reader thread per lane reads the answers
//! (many per read) and hands each job to `Finish` with its answer.
//!
//! When the connection breaks, or an answer is later than
//! `--server-timeout`, every request on it comes back as failed, saying
//! whether it may have reached the server: one still in the lane's queue
//! never did.

use super::backend::{self, BackendSettings};
use super::client_out;
use super::stats::ServerStats;
use super::work::{Failure, Job};
use super::ServerId;
use crate::net;
use crate::proto::{Deadline, FrameError, FrameReader, Reply};
use crossbeam_channel::{Receiver, Sender};
use std::collections::{HashMap, HashSet, VecDeque};
use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

/// Lane threads have small stacks: answers from servers are small and
/// shallow.
const LANE_STACK: usize = 256 * 1024;

/// A server's answer to a job, or how it failed on the connection and
/// whether the request may have reached the server (`delivered`).
pub type Answered = Result<Reply, (Failure, bool)>;

/// Where a link hands back the jobs it carried.
pub trait Finish: Send + Sync {
    /// `job` was answered (`Ok`) by server `id`, or failed on the
    /// connection: `delivered` when the request may have reached it.
    fn finish(&self, id: ServerId, server: &ServerStats, job: Job, result: Answered);
}

/// What a lane knows of its server.
#[derive(Clone)]
pub struct LaneSettings {
    pub server: ServerId,
    pub stats: Arc<ServerStats>,
    pub addr: SocketAddr,
    pub backend: BackendSettings,
    pub finish: Arc<dyn Finish>,
}

/// The write half and the requests on the connection.
struct LaneState {
    stream: Option<net::Stream>,
    /// Bytes the writer thread is to write, and the requests whose frames
    /// end in them (by the offset of that end).
    queue: Vec<u8>,
    queued: VecDeque<(u64, usize)>,
    /// The writer thread is writing what it took from `queue`.
    busy: bool,
    /// Requests sent or queued, by number, with their deadlines; and the
    /// deadlines in the order they were sent (one no longer pending with
    /// that deadline is skipped when seen).
    pending: HashMap<u64, (Job, Instant)>,
    deadlines: VecDeque<(Instant, u64)>,
}

struct Shared {
    settings: LaneSettings,
    state: Mutex<LaneState>,
    /// Cut for good: the server left the pool.
    closed: AtomicBool,
}

/// One connection of a server's link. Dropping it ends its threads.
pub struct Lane {
    shared: Arc<Shared>,
    nudge: Sender<()>,
}

impl Lane {
    /// A lane with its writer and reader threads (named after `name`); it
    /// connects when it first has something to send.
    pub fn spawn(
        settings: LaneSettings,
        name: &str,
    ) -> std::io::Result<(Lane, Vec<JoinHandle<()>>)> {
        let shared = Arc::new(Shared {
            settings,
            state: Mutex::new(LaneState {
                stream: None,
                queue: Vec::new(),
                queued: VecDeque::new(),
                busy: false,
                pending: HashMap::new(),
                deadlines: VecDeque::new(),
            }),
            closed: AtomicBool::new(false),
        });
        let (nudge, nudges) = crossbeam_channel::unbounded::<()>();
        let (streams_tx, streams) = crossbeam_channel::unbounded::<net::Stream>();
        let writer = {
            let shared = shared.clone();
            crate::sync::spawn_named(format!("{name}-w"), Some(LANE_STACK), move || {
                write_loop(&shared, &nudges, &streams_tx)
            })?
        };
        let reader = {
            let shared = shared.clone();
            crate::sync::spawn_named(format!("{name}-r"), Some(LANE_STACK), move || {
                read_loop(&shared, &streams)
            })?
        };
        Ok((Lane { shared, nudge }, vec![writer, reader]))
    }

    /// Sends requests: written now as far as the socket takes them without
    /// waiting, the rest by the writer thread. For the thread that holds
    /// them (a client's connection thread).
    pub fn send(&self, batch: Vec<(Job, Vec<u8>)>) {
        self.put(batch, true);
    }

    /// Hands requests to the writer thread, with no I/O on this thread
    /// (the dispatcher's).
    pub fn enqueue(&self, batch: Vec<(Job, Vec<u8>)>) {
        self.put(batch, false);
    }

    fn put(&self, batch: Vec<(Job, Vec<u8>)>, write_now: bool) {
        let shared = &self.shared;
        let server = shared.settings.server;
        if shared.closed.load(Ordering::Relaxed) {
            for (job, _) in batch {
                let failure = Failure::Link("the server left the pool".into());
                let s = &shared.settings;
                s.finish
                    .finish(server, &s.stats, job, Err((failure, false)));
            }
            return;
        }
        let deadline = Instant::now() + shared.settings.backend.io_timeout;
        let mut frames = Vec::new();
        let mut numbers = Vec::with_capacity(batch.len());
        for (job, payload) in &batch {
            let _ = crate::proto::write_frame(&mut frames, payload);
            numbers.push((job.request_number.unwrap_or_default(), frames.len()));
        }
        let mut state = crate::sync::lock(&shared.state);
        for (job, _) in batch {
            let number = job.request_number.unwrap_or_default();
            state.deadlines.push_back((deadline, number));
            state.pending.insert(number, (job, deadline));
        }
        let mut written = 0;
        if write_now && state.queue.is_empty() && !state.busy {
            if let Some(stream) = &state.stream {
                written = match stream.send_now(&frames) {
                    Some(Ok(n)) => n,
                    // TLS records cannot be cut short; an error is the
                    // writer's (or reader's) to find and report.
                    Some(Err(_)) | None => 0,
                };
            }
        }
        if written == frames.len() {
            return;
        }
        let wake = state.queue.is_empty() && !state.busy;
        let base = state.queue.len();
        state.queue.extend_from_slice(&frames[written..]);
        for (number, end) in numbers {
            if end > written {
                state.queued.push_back((number, base + end - written));
            }
        }
        drop(state);
        if wake {
            let _ = self.nudge.send(());
        }
    }

    /// Cuts the connection for good: what is on it comes back as failed
    /// (`Failure::Cut`), and nothing is sent any more.
    pub fn close(&self) {
        self.shared.closed.store(true, Ordering::Relaxed);
        let stream = crate::sync::lock(&self.shared.state).stream.clone();
        match stream {
            Some(stream) => {
                let _ = stream.shutdown(std::net::Shutdown::Both);
            }
            // Nothing on the wire: what waits in the queue goes back now.
            None => fail_all(&self.shared, None, Failure::Cut),
        }
    }

    /// Requests on this lane (sent or queued), not yet answered.
    pub fn outstanding(&self) -> usize {
        crate::sync::lock(&self.shared.state).pending.len()
    }
}

impl Drop for Lane {
    /// The reader would otherwise wait on the connection for as long as
    /// the server keeps it open.
    fn drop(&mut self) {
        self.close();
    }
}

/// The writer thread: opens the connection when there is none and writes
/// whatever waits in the queue, until the lane is dropped.
fn write_loop(shared: &Shared, nudges: &Receiver<()>, streams: &Sender<net::Stream>) {
    while nudges.recv().is_ok() {
        loop {
            let mut state = crate::sync::lock(&shared.state);
            if state.queue.is_empty() || shared.closed.load(Ordering::Relaxed) {
                break;
            }
            let Some(stream) = state.stream.clone() else {
                drop(state);
                if !connect(shared, streams) {
                    break;
                }
                continue;
            };
            let bytes = std::mem::take(&mut state.queue);
            state.queued.clear();
            state.busy = true;
            drop(state);
            let wrote = (&stream).write_all(&bytes).and_then(|()| (&stream).flush());
            crate::sync::lock(&shared.state).busy = false;
            if let Err(e) = wrote {
                // The reader sees the broken stream too; cutting it makes
                // sure it does now.
                log::debug!("server {}: write failed: {e}", shared.settings.addr);
                let _ = stream.shutdown(std::net::Shutdown::Both);
                break;
            }
        }
    }
}

/// Opens the connection (proving the cluster key) and gives its read half
/// to the reader. False when that failed: what waited for it came back as
/// failed, never sent.
fn connect(shared: &Shared, streams: &Sender<net::Stream>) -> bool {
    let settings = &shared.settings;
    match backend::connect_framed(settings.addr, &settings.backend) {
        Ok(stream) => {
            crate::sync::lock(&shared.state).stream = Some(stream.clone());
            streams.send(stream).is_ok()
        }
        Err(failure) => {
            fail_all(shared, None, Failure::Link(failure));
            false
        }
    }
}

/// Every request on the lane comes back as failed; `broken` is the
/// connection it was on, when there was one (a later connection's
/// requests are not this failure's). A request still in the queue never
/// reached the server.
fn fail_all(shared: &Shared, broken: Option<&net::Stream>, failure: Failure) {
    let mut state = crate::sync::lock(&shared.state);
    if let Some(broken) = broken {
        if !state.stream.as_ref().is_some_and(|s| s.same(broken)) {
            return;
        }
    }
    state.stream = None;
    let unsent: HashSet<u64> = state.queued.drain(..).map(|(n, _)| n).collect();
    state.queue.clear();
    state.deadlines.clear();
    let jobs: Vec<Job> = state.pending.drain().map(|(_, (job, _))| job).collect();
    drop(state);
    let failure = if shared.closed.load(Ordering::Relaxed) {
        Failure::Cut
    } else {
        failure
    };
    for job in jobs {
        let delivered = !unsent.contains(&job.request_number.unwrap_or_default());
        let s = &shared.settings;
        s.finish
            .finish(s.server, &s.stats, job, Err((failure.clone(), delivered)));
    }
}

/// The reader thread: reads the answers of each connection the writer
/// opens, until the lane is dropped.
fn read_loop(shared: &Shared, streams: &Receiver<net::Stream>) {
    for stream in streams {
        let failure = read_answers(shared, &stream);
        let _ = stream.shutdown(std::net::Shutdown::Both);
        fail_all(shared, Some(&stream), failure);
    }
}

/// Reads answers on one connection until it breaks or an answer is late;
/// says why it stopped. The answers read together (whole frames already
/// in the buffer) are handed on in one batch: their replies to clients
/// and their log lines go out together (`client_out::batch`).
fn read_answers(shared: &Shared, stream: &net::Stream) -> Failure {
    let settings = &shared.settings;
    // With nothing outstanding the reader still wakes every
    // --server-timeout, so that a request sent while it waited is timed
    // from then on.
    let paced = net::Paced::new(stream.clone(), settings.backend.io_timeout);
    let mut reader = FrameReader::new(paced, settings.backend.max_frame);
    loop {
        if !reader.has_buffered() {
            let due = earliest_deadline(shared);
            reader.get_mut().set_deadline(due);
        }
        let first = match next_answer(shared, &mut reader) {
            Ok(Some(reply)) => reply,
            Ok(None) => continue,
            Err(failure) => return failure,
        };
        let read = client_out::batch(|| {
            hand_on(shared, first)?;
            while reader.frame_buffered() {
                if let Some(reply) = next_answer(shared, &mut reader)? {
                    hand_on(shared, reply)?;
                }
            }
            Ok(())
        });
        if let Err(failure) = read {
            return failure;
        }
    }
}

/// The next answer; `None` when the wait timed out with nothing overdue.
fn next_answer(
    shared: &Shared,
    reader: &mut FrameReader<net::Paced>,
) -> Result<Option<Reply>, Failure> {
    let settings = &shared.settings;
    let addr = settings.addr;
    match reader.message::<Reply>() {
        Ok(Some(Ok(reply))) => Ok(Some(reply)),
        Ok(Some(Err(bad))) => Err(Failure::Link(format!(
            "unreadable answer from {addr}: {bad}"
        ))),
        Ok(None) => Err(Failure::Link("the server closed the connection".into())),
        Err(FrameError::Timeout { mid_frame: false }) => {
            if earliest_deadline(shared).is_some_and(|d| d <= Instant::now()) {
                return Err(Failure::Link(format!(
                    "no answer within --server-timeout ({:?})",
                    settings.backend.io_timeout
                )));
            }
            Ok(None)
        }
        Err(e) => Err(Failure::Link(format!("no answer: {e}"))),
    }
}

/// Hands an answer to `Finish` with the job it answers.
fn hand_on(shared: &Shared, reply: Reply) -> Result<(), Failure> {
    let settings = &shared.settings;
    let Some(number) = reply.id() else {
        // An error without an id: the server ends the connection.
        return Err(Failure::Link(format!(
            "the server ended the connection: {reply:?}"
        )));
    };
    let job = crate::sync::lock(&shared.state).pending.remove(&number);
    match job {
        Some((job, _)) => settings
            .finish
            .finish(settings.server, &settings.stats, job, Ok(reply)),
        // A late answer for a request taken back already: it was retried
        // elsewhere as "may be stored here", and is told to forget it once
        // stored there.
        None => log::debug!(
            "server {}: answer for request {number}, no longer waited for",
            settings.addr
        ),
    }
    Ok(())
}

/// When the oldest request on the lane is due, if any.
fn earliest_deadline(shared: &Shared) -> Option<Instant> {
    let mut state = crate::sync::lock(&shared.state);
    while let Some(&(due, number)) = state.deadlines.front() {
        if state.pending.get(&number).is_some_and(|(_, d)| *d == due) {
            return Some(due);
        }
        state.deadlines.pop_front();
    }
    None
}
