//! One client connection: a reader loop that turns frames into jobs on the
//! request queue, and a writer thread that sends replies back as servers
//! answer them (in any order; each reply carries its request id).
//!
//! Flow control: before reading a request the reader takes a slot of the
//! connection's window and, as the frame's payload arrives, its bytes from
//! the balancer-wide budget (a header alone takes none). At either limit
//! it waits, and TCP slows the client down. Both are given back when the
//! job is done.
//!
//! The writer stops when the reader and every job of this connection have
//! dropped their reply senders, so no reply is cut off. When the balancer
//! is shutting down it then sends one last `shutting_down` error without an
//! id: every request the client sent after the ones answered was not read.

use super::client_out::{ClientOut, ClientWriter};
use super::dispatch::{Change, Event, Job, Shared, Work};
use super::flow::{Budget, Hold, Reservation, Window};
use super::limits::Limit;
use super::link::Pool;
use super::relay::{FileSettings, Next};
use super::session::{Access, Session, Verdict};
use super::stats::Stats;
use super::tracking::{Tracker, TransferFilter};
use crate::net::{self, Wire};
use crate::proto::legacy::{LegacyError, LegacyReader, LegacyRequest};
use crate::proto::{
    self, Chunk, Deadline, ErrorCode, FrameError, FrameReader, Reply, Request, ServerList,
    TransferList,
};
use crossbeam_channel::{Receiver, Select, Sender, TryRecvError};
use std::io::BufReader;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy)]
pub struct ConnSettings {
    /// A client silent for this long (or stalled mid-frame) is disconnected
    /// once its pending replies are sent.
    pub idle_timeout: Duration,
    /// The same for clients of the original format.
    pub legacy_idle_timeout: Duration,
    pub max_frame: usize,
    /// A frame's payload must arrive within this, once its header has; and
    /// a connection's first whole request within this of connecting.
    pub frame_timeout: Duration,
    /// Requests one connection may have queued or in flight.
    pub window: usize,
    /// Largest document content one request may carry, in bytes.
    pub max_document_size: Option<usize>,
}

/// What a connection thread works with.
pub struct Conn {
    pub peer: SocketAddr,
    /// Requests the dispatcher's own thread takes (while the balancer shuts
    /// down, or with the queue full).
    pub jobs: Sender<Job>,
    /// The dispatcher, for a request forwarded by this thread itself.
    pub dispatcher: Arc<Shared>,
    /// Membership requests go to the dispatcher as events.
    pub events: Sender<Event>,
    pub settings: ConnSettings,
    pub stats: Arc<Stats>,
    pub budget: Arc<Budget>,
    /// Disconnected when the balancer shuts down.
    pub stop: Receiver<()>,
    /// Answers `transfers`; `None` when tracking is off.
    pub tracker: Option<Tracker>,
    /// How file uploads reach servers.
    pub files: Arc<FileSettings>,
    /// Who may ask what (cluster key, users).
    pub access: Arc<Access>,
    /// This connection's standing, for admission: whether it has sent a
    /// whole request, has work outstanding, is trusted.
    pub mark: net::Mark,
}

impl Conn {
    fn shutting_down(&self) -> bool {
        matches!(self.stop.try_recv(), Err(TryRecvError::Disconnected))
    }

    pub fn serve(self, stream: net::Stream) {
        let peer = self.peer;
        // Queries (`client status --watch`) open a connection per sample:
        // only connections that carried work are logged at info.
        log::debug!("connection accepted from {peer}");
        self.stats.connections.fetch_add(1, Relaxed);
        self.serve_stream(stream);
        self.stats.connections.fetch_sub(1, Relaxed);
    }

    fn serve_stream(&self, stream: net::Stream) {
        let (peer, settings) = (self.peer, self.settings);
        if let Err(e) = net::prepare(stream.tcp(), settings.idle_timeout) {
            log::warn!("connection from {peer}: cannot set up: {e}");
            return;
        }
        let read_half = stream.clone();
        // Every connection owes a whole first request (frame, or object of
        // the original format) within --frame-timeout of arriving: one that
        // says nothing, or begins and stalls, holds its place no longer.
        let first_by = Instant::now() + settings.frame_timeout;
        match net::detect_wire(&stream, first_by) {
            Ok(Wire::Closed) => {
                log::debug!("connection from {peer} closed without sending anything");
            }
            Ok(Wire::Refused) => {}
            // The original format has no login: with users on it is
            // refused, or anyone could store past them.
            Ok(Wire::Legacy) if self.access.users.is_some() => {
                log::warn!(
                    "original-format connection from {peer} refused: it cannot log in (--users)"
                );
            }
            Ok(Wire::Legacy) => {
                let received = self.read_legacy_documents(read_half, first_by);
                log::info!("original-format connection from {peer} closed ({received} documents)");
            }
            Ok(Wire::Framed) => self.serve_framed(stream, read_half, first_by),
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                self.stats.limits.hit(Limit::FrameTimeout, || {
                    format!(
                        "connection from {peer} sent nothing within --frame-timeout ({:?}); closed",
                        settings.frame_timeout
                    )
                });
            }
            Err(e) => log::info!("connection from {peer} sent nothing: {e}"),
        }
    }

    fn serve_framed(&self, stream: net::Stream, read_half: net::Stream, first_by: Instant) {
        let peer = self.peer;
        let closing = stream.clone();
        let (reply_tx, reply_rx) = crossbeam_channel::unbounded();
        let stop = self.stop.clone();
        let name = format!("{}-w", std::thread::current().name().unwrap_or("conn"));
        let (out, nudges) = ClientOut::new(stream);
        let writer_out = out.clone();
        // Replies waiting to be written keep the connection at work.
        let queued = (reply_rx.clone(), nudges.clone());
        self.mark
            .watch_output(move || !queued.0.is_empty() || !queued.1.is_empty());
        let mark = self.mark.clone();
        let writer = net::spawn_named(name, Some(256 * 1024), move || {
            write_replies(&writer_out, peer, reply_rx, nudges, stop, mark)
        });
        let writer = match writer {
            Ok(w) => w,
            Err(e) => {
                log::error!("connection from {peer}: {e}");
                return;
            }
        };
        let (received, work) = self.read_requests(read_half, first_by, &reply_tx, &out);
        drop(reply_tx);
        let _ = writer.join();
        let sent = net::lock(&out).written;
        net::close_gracefully(&closing);
        let level = if work > 0 {
            log::Level::Info
        } else {
            log::Level::Debug
        };
        log::log!(
            level,
            "connection from {peer} closed ({received} requests, {sent} replies)"
        );
    }

    /// Reads requests until the client closes, stalls or breaks framing, or
    /// the balancer shuts down; the first must be whole by `first_by`.
    /// Returns how many requests arrived, and how many of them were work
    /// (store or calc).
    ///
    /// The connection's `Session` says who is on the other end: requests
    /// that touch what a user owns filter by `session.user()` or
    /// `session.owner_filter()` (transfers now).
    fn read_requests(
        &self,
        stream: net::Stream,
        first_by: Instant,
        replies: &Sender<Reply>,
        out: &ClientWriter,
    ) -> (u64, u64) {
        let peer = self.peer;
        let local = stream.tcp().local_addr().unwrap_or(peer);
        let paced = net::Paced::new(stream, self.settings.idle_timeout);
        let mut reader = FrameReader::new(paced, self.settings.max_frame);
        let window = Window::new(self.settings.window);
        let mut session = Session::new(self.access.clone(), peer, local);
        let mut received = 0;
        let mut work_received = 0;
        // Until the first whole frame, its deadline.
        let mut first = Some(first_by);
        loop {
            // Only this thread takes slots: a full window now stays full
            // until a job gives one back.
            if window.in_use() >= window.capacity() {
                self.stats.limits.hit(Limit::ClientWindow, || {
                    format!(
                        "connection from {peer} has {} requests outstanding (--client-window); reading it paused",
                        window.capacity()
                    )
                });
            }
            let permit = window.acquire();
            reader.get_mut().set_deadline(first);
            let len = match reader.header() {
                Ok(Some(len)) => len,
                Ok(None) => return (received, work_received),
                Err(e) => {
                    self.read_failed(e, first, replies);
                    return (received, work_received);
                }
            };
            // The rest of the frame has --frame-timeout to arrive, however
            // it trickles in (waits for the budget aside), and takes its
            // bytes of the budget as they come.
            let mut bytes = self.budget.open();
            let deadline = first.unwrap_or_else(|| Instant::now() + self.settings.frame_timeout);
            let payload =
                reader.payload_by(len, deadline, |piece| self.take_budget(&mut bytes, piece));
            bytes.complete();
            let payload = match payload {
                Ok(p) => p,
                Err(e) => {
                    self.read_failed(e, first, replies);
                    return (received, work_received);
                }
            };
            first = None;
            self.mark.arrived();
            // Whatever was read after the shutdown began is left unanswered:
            // the final `shutting_down` reply says so.
            if self.shutting_down() {
                return (received, work_received);
            }
            let request = match proto::decode::<Request>(&payload) {
                Ok(request) => request,
                Err(mut bad) => {
                    if bad.code == ErrorCode::UnknownType {
                        bad.message = balancer_types_only(&bad.message);
                    }
                    log::warn!("connection from {peer}: bad request: {bad}");
                    let _ = replies.send(Reply::Error(bad.into()));
                    continue;
                }
            };
            // A document goes on as the client wrote it.
            let raw_fields = match &request {
                Request::Store(_) => proto::raw_document_fields(&payload),
                _ => None,
            };
            drop(payload);
            received += 1;
            let verdict = session.admit(&request, &self.stop);
            // A server that proved the cluster key, a user who logged in:
            // closed to make room only after everyone else idle.
            if session.trusted() {
                self.mark.trust();
            }
            match verdict {
                Verdict::Proceed => {}
                Verdict::Answer(reply) => {
                    let _ = replies.send(reply);
                    continue;
                }
                Verdict::Close(reply) => {
                    let _ = replies.send(reply);
                    return (received, work_received);
                }
            }
            // At work while this thread carries the request out (a file
            // transfer, a listing); a job handed on holds its own mark.
            let _working = self.mark.busy();
            let request_kind = request.kind();
            let (id, work) = match request {
                Request::Store(store)
                    if self
                        .settings
                        .max_document_size
                        .is_some_and(|max| store.doc.content.len() > max) =>
                {
                    let max = self.settings.max_document_size.unwrap_or_default();
                    let size = store.doc.content.len();
                    self.stats.limits.hit(Limit::DocumentTooLarge, || {
                        format!("connection from {peer} sent a document of {size} bytes (--max-document-size {max})")
                    });
                    let _ = replies.send(Reply::error(
                        Some(store.id),
                        ErrorCode::TooLarge,
                        format!(
                            "the document has {size} bytes of content, more than this balancer takes (--max-document-size {max})"
                        ),
                    ));
                    continue;
                }
                Request::Store(store) => {
                    log::debug!(
                        "document received from {peer}: \"{}\" (id {}, {} bytes)",
                        proto::truncate(&store.doc.title, 80),
                        store.id,
                        store.doc.content.len()
                    );
                    (store.id, Work::store_fields(&store.doc, raw_fields))
                }
                Request::Calc { id, operation } => {
                    log::debug!("calc request received from {peer}: {operation} (id {id})");
                    (id, Work::Calc(operation))
                }
                Request::Servers { id } => {
                    let list = ServerList {
                        id,
                        servers: self.stats.views(),
                    };
                    let _ = replies.send(Reply::Servers(list));
                    continue;
                }
                Request::Register { id, addr }
                | Request::Deregister { id, addr }
                | Request::AddServer { id, addr }
                | Request::DrainServer { id, addr }
                | Request::RemoveServer { id, addr } => {
                    self.membership(request_kind, id, &addr, replies);
                    continue;
                }
                Request::Transfers {
                    id,
                    active,
                    failed,
                    since_ms,
                    limit,
                } => {
                    // A user sees only their own transfers (admins: all).
                    let filter = TransferFilter {
                        active,
                        failed,
                        since_ms,
                        limit,
                        user: session.owner_filter(),
                    };
                    let _ = replies.send(self.transfers(id, &filter));
                    continue;
                }
                Request::Forget { id, .. } => {
                    let _ = replies.send(Reply::error(
                        Some(id),
                        ErrorCode::BadRequest,
                        "`forget` is sent by the balancer to storage servers, not to the balancer",
                    ));
                    continue;
                }
                Request::Status { id } => {
                    let _ = replies.send(Reply::error(
                        Some(id),
                        ErrorCode::BadRequest,
                        "`status` is answered by storage servers; ask the balancer for `servers`",
                    ));
                    continue;
                }
                Request::Upload(upload) => {
                    work_received += 1;
                    match self.upload(upload, &mut reader, replies, session.user_name().as_deref())
                    {
                        Next::Continue => continue,
                        Next::Close => return (received, work_received),
                    }
                }
                Request::Get {
                    id, name, offset, ..
                } => {
                    work_received += 1;
                    match self.get(id, &name, offset, session.owner_filter(), out) {
                        Next::Continue => continue,
                        Next::Close => return (received, work_received),
                    }
                }
                Request::List { id, .. } => {
                    let _ = replies.send(self.list(id, session.owner_filter()));
                    continue;
                }
                Request::TransferEvent(event) => {
                    let _ = replies.send(self.transfer_event(event));
                    continue;
                }
                Request::Chunk(Chunk { id, .. }) | Request::UploadEnd { id, .. } => {
                    let _ = replies.send(Reply::error(
                        Some(id),
                        ErrorCode::BadRequest,
                        "no upload in progress on this connection (send `upload` first)",
                    ));
                    continue;
                }
                // Answered by the session before they get here.
                Request::Hello { id, .. }
                | Request::HelloProof { id, .. }
                | Request::Login { id, .. } => {
                    let _ = replies.send(Reply::error(
                        Some(id),
                        ErrorCode::BadRequest,
                        "handshake or login out of place",
                    ));
                    continue;
                }
            };
            work_received += 1;
            // A client with nothing else outstanding, and nothing more sent,
            // waits for this reply before it sends more: this thread
            // forwards the request itself when a server can take it now,
            // without a hand-off. A client that pipelines keeps its
            // requests spread over the servers by the links.
            let alone = window.in_use() == 1 && !reader.has_buffered();
            let hold = Hold {
                permit: Some(permit),
                bytes: Some(bytes),
                busy: Some(self.mark.busy()),
            };
            let mut job = Job::new(id, work, peer, replies.clone(), hold);
            job.user = session.user_name();
            job.out = Some(out.clone());
            self.stats.received.fetch_add(1, Relaxed);
            if alone {
                if let Some(pool) = self.dispatcher.take_now(&mut job) {
                    self.forward(job, &pool, out);
                    continue;
                }
            }
            if !self.submit(job) {
                return (received, work_received);
            }
        }
    }

    /// Takes `piece` more bytes of the budget for a request arriving; at
    /// the limit, counts it and waits.
    fn take_budget(&self, bytes: &mut Reservation, piece: usize) {
        if bytes.try_grow(piece) {
            return;
        }
        let peer = self.peer;
        self.stats.limits.hit(Limit::QueuedBytes, || {
            format!(
                "{} bytes queued or in flight (--max-queued-bytes); reading connection from {peer} paused",
                self.budget.used()
            )
        });
        bytes.grow(piece);
    }

    /// Hands a membership request to the dispatcher, which answers it.
    fn membership(&self, kind: &str, id: u64, addr: &str, replies: &Sender<Reply>) {
        let addr = match crate::net::resolve(addr) {
            Ok(a) => a,
            Err(e) => {
                let _ = replies.send(Reply::error(Some(id), ErrorCode::BadRequest, e));
                return;
            }
        };
        let change = match kind {
            "register" => Change::Register(addr),
            "deregister" => Change::Deregister(addr),
            "add_server" => Change::Add(addr),
            "drain_server" => Change::Drain(addr),
            _ => Change::Remove(addr),
        };
        log::info!("{kind} {addr} from {}", self.peer);
        let event = Event::Membership {
            change,
            id,
            reply: replies.clone(),
        };
        if self.events.send(event).is_err() {
            let _ = replies.send(Reply::error(
                Some(id),
                ErrorCode::ShuttingDown,
                "the balancer is shutting down",
            ));
        }
    }

    /// The answer to `transfers`, from the state file.
    fn transfers(&self, id: u64, filter: &TransferFilter) -> Reply {
        let Some(tracker) = &self.tracker else {
            return Reply::error(
                Some(id),
                ErrorCode::BadRequest,
                "transfer tracking is off (start the balancer with --state)",
            );
        };
        match tracker.query(filter) {
            Ok(records) => Reply::Transfers(TransferList {
                id,
                transfers: records.into_iter().map(Into::into).collect(),
            }),
            Err(e) => {
                log::warn!("connection from {}: transfers: {e}", self.peer);
                Reply::error(Some(id), ErrorCode::Internal, e.to_string())
            }
        }
    }

    /// Logs and counts why reading stopped, and tells the client when it
    /// can still be told. `first`: when the first request was due, if it
    /// had not arrived whole yet.
    fn read_failed(&self, e: FrameError, first: Option<Instant>, replies: &Sender<Reply>) {
        let peer = self.peer;
        let late = first.is_some_and(|by| Instant::now() >= by);
        if late && matches!(e, FrameError::Timeout { .. }) {
            let timeout = self.settings.frame_timeout;
            self.stats.limits.hit(Limit::FrameTimeout, || {
                format!(
                    "connection from {peer} sent no whole request within --frame-timeout ({timeout:?}) of connecting; closed"
                )
            });
            let _ = replies.send(Reply::error(
                None,
                ErrorCode::Timeout,
                format!("no whole request within --frame-timeout ({timeout:?}) of connecting"),
            ));
            return;
        }
        match &e {
            FrameError::TooLarge { len, max } => self.stats.limits.hit(Limit::FrameTooLarge, || {
                format!("connection from {peer} announced a frame of {len} bytes (--max-frame {max}); closed")
            }),
            FrameError::Timeout { mid_frame: true } => {
                self.stats.limits.hit(Limit::FrameTimeout, || {
                    format!(
                        "connection from {peer} stalled mid-frame (--frame-timeout {:?}); closed",
                        self.settings.frame_timeout
                    )
                })
            }
            _ => {}
        }
        match e {
            FrameError::Timeout { mid_frame: false } => log::info!(
                "connection from {peer}: idle for {:?}, closing",
                self.settings.idle_timeout
            ),
            e => {
                log::warn!("connection from {peer}: {e}; closing");
                if let Some(r) = e.reply() {
                    let _ = replies.send(Reply::Error(r));
                }
            }
        }
    }

    /// Forwards a request the dispatcher let this thread take, and writes
    /// the reply to the client itself, once the request is counted off: a
    /// client slow to read holds no place on the server. A job that must be
    /// retried goes back to the dispatcher, and its reply comes another way.
    fn forward(&self, job: Job, pool: &Pool, out: &ClientWriter) {
        let mut answer = None;
        let event = pool.carry_out(job, &self.stats, self.tracker.as_ref(), &mut |_, reply| {
            answer = Some(reply)
        });
        self.dispatcher.report(event);
        if let Some(reply) = answer {
            if let Err(e) = net::lock(out).message(&reply) {
                log::debug!("connection from {}: cannot send reply: {e}", self.peer);
            }
        }
    }

    /// Submits a request under the dispatcher's lock, or else through its
    /// thread's queue. False when the balancer is shutting down.
    fn submit(&self, job: Job) -> bool {
        let Some(job) = self.dispatcher.submit_now(job) else {
            return true;
        };
        match self.jobs.send(job) {
            Ok(()) => true,
            Err(e) => {
                e.into_inner().fail(
                    ErrorCode::ShuttingDown,
                    "the balancer is shutting down; the request was not stored".into(),
                    &self.stats,
                );
                false
            }
        }
    }

    /// A client of the original system: unframed JSON documents, no replies
    /// expected. Outcomes are only logged (by the dispatcher and the links).
    fn read_legacy_documents(&self, stream: net::Stream, first_by: Instant) -> u64 {
        let peer = self.peer;
        let settings = self.settings;
        // Replies have nowhere to go: the original client never reads.
        let (discard, _) = crossbeam_channel::bounded(0);
        let window = Window::new(settings.window);
        let mut received = 0;
        // Idle up to --legacy-client-timeout between documents, each whole
        // within --frame-timeout once begun.
        let paced = net::Paced::new(stream, settings.legacy_idle_timeout);
        let reader = LegacyReader::paced(
            BufReader::new(paced),
            settings.max_frame,
            settings.frame_timeout,
            first_by,
        );
        for (index, request) in reader.enumerate() {
            if self.shutting_down() {
                break;
            }
            match request {
                Ok(LegacyRequest::Document { doc, .. }) => {
                    self.mark.arrived();
                    received += 1;
                    log::info!(
                        "document received from {peer}: \"{}\" (original format, {} bytes)",
                        proto::truncate(&doc.title, 80),
                        doc.content.len()
                    );
                    let hold = Hold {
                        permit: Some(window.acquire()),
                        bytes: Some(self.budget.acquire(doc.content.len())),
                        busy: Some(self.mark.busy()),
                    };
                    let work = Work::store(&doc);
                    let job = Job::new(index as u64 + 1, work, peer, discard.clone(), hold);
                    self.stats.received.fetch_add(1, Relaxed);
                    if !self.submit(job) {
                        break;
                    }
                }
                Ok(LegacyRequest::Status) => {
                    self.mark.arrived();
                    log::warn!(
                        "original-format connection from {peer}: ignoring a request that is not a document"
                    );
                }
                Err(LegacyError::Timeout { mid_object: true }) => {
                    self.stats.limits.hit(Limit::FrameTimeout, || {
                        format!(
                            "original-format connection from {peer}: a document not whole within --frame-timeout ({:?}); closed",
                            settings.frame_timeout
                        )
                    });
                    break;
                }
                Err(LegacyError::Timeout { mid_object: false }) => {
                    log::info!(
                        "original-format connection from {peer}: idle for {:?}, closing",
                        settings.legacy_idle_timeout
                    );
                    break;
                }
                Err(e) => {
                    log::warn!("original-format connection from {peer}: {e}");
                    if !e.is_recoverable() {
                        break;
                    }
                }
            }
        }
        received
    }
}

/// The request types a client may send to the balancer: `status` and
/// `forget` are for storage servers.
const BALANCER_TYPES: &str = "store, calc, servers, transfers, register, deregister, \
     add_server, drain_server, remove_server, upload, chunk, upload_end, list, get, hello, \
     hello_proof, login, transfer_event";

/// The decoder's `unknown_type` message lists every request type of the
/// protocol; a client of the balancer is told only those it accepts.
fn balancer_types_only(message: &str) -> String {
    match message.find(" (expected one of:") {
        Some(cut) => format!(
            "{} (the balancer accepts: {BALANCER_TYPES})",
            &message[..cut]
        ),
        None => message.to_string(),
    }
}

/// The connection's writer thread: sends the replies that come by channel,
/// and the ends of frames a link could not finish (see `client_out`).
fn write_replies(
    out: &ClientWriter,
    peer: SocketAddr,
    replies: Receiver<Reply>,
    nudges: Receiver<()>,
    stop: Receiver<()>,
    mark: net::Mark,
) {
    let mut broken = false;
    let fail = |e: std::io::Error| {
        log::warn!("connection from {peer}: cannot send reply: {e}");
        true
    };
    // Keep draining after a write error so that the channel empties and the
    // jobs of this connection are not held up.
    loop {
        let mut ready = Select::new();
        ready.recv(&replies);
        ready.recv(&nudges);
        ready.ready();
        // At work from before a reply leaves its queue until it is written,
        // so that it is not cut off by closing the connection to make room
        // (see `Mark::watch_output`).
        let _writing = mark.busy();
        match replies.try_recv() {
            Ok(_) if broken => {}
            Ok(reply) => {
                if let Err(e) = net::lock(out).message(&reply) {
                    broken = fail(e);
                }
            }
            Err(TryRecvError::Disconnected) => break,
            Err(TryRecvError::Empty) => {
                if nudges.try_recv().is_ok() {
                    if let Err(e) = net::lock(out).finish_unsent() {
                        broken = broken || fail(e);
                    }
                }
            }
        }
    }
    if broken {
        return;
    }
    let mut out = net::lock(out);
    if let Err(e) = out.finish_unsent() {
        fail(e);
        return;
    }
    if matches!(stop.try_recv(), Err(TryRecvError::Disconnected)) {
        let last = Reply::error(
            None,
            ErrorCode::ShuttingDown,
            "the balancer is shutting down: every request answered above was handled; \
             any request sent after them was not read",
        );
        let _ = out.message(&last);
    }
}
