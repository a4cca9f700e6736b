//! One client connection: a reader loop that turns frames into jobs on the
//! request queue, and a writer thread that sends replies back as servers
//! answer them (in any order; each reply carries its request id).
//! The writer stops when the reader and every job of this connection have
//! dropped their reply senders, so no reply is cut off.

use super::dispatch::{Job, Work};
use super::stats::Stats;
use crate::proto::legacy::{self, LegacyReader, LegacyRequest};
use crate::proto::{
    self, ErrorCode, FrameError, FrameReader, FrameWriter, Reply, Request, ServerList,
};
use crossbeam_channel::{Receiver, Sender};
use std::io::BufReader;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy)]
pub struct ConnSettings {
    /// A client silent for this long (or stalled mid-frame) is disconnected
    /// once its pending replies are sent.
    pub idle_timeout: Duration,
    /// The same for clients of the original format.
    pub legacy_idle_timeout: Duration,
    /// How long a request may wait for a server.
    pub queue_timeout: Duration,
    pub max_frame: usize,
}

/// What a connection thread works with.
pub struct Conn {
    pub peer: SocketAddr,
    pub jobs: Sender<Job>,
    pub settings: ConnSettings,
    pub stats: Arc<Stats>,
}

impl Conn {
    pub fn serve(self, stream: TcpStream) {
        let peer = self.peer;
        log::info!("connection accepted from {peer}");
        self.stats.connections.fetch_add(1, Relaxed);
        self.serve_stream(stream);
        self.stats.connections.fetch_sub(1, Relaxed);
    }

    fn serve_stream(&self, stream: TcpStream) {
        let (peer, settings) = (self.peer, self.settings);
        let setup = stream
            .set_read_timeout(Some(settings.idle_timeout))
            .and_then(|()| stream.set_write_timeout(Some(settings.idle_timeout)))
            .and_then(|()| stream.set_nodelay(true))
            .and_then(|()| stream.try_clone());
        let read_half = match setup {
            Ok(s) => s,
            Err(e) => {
                log::warn!("connection from {peer}: cannot set up: {e}");
                return;
            }
        };
        let mut first = [0u8; 1];
        match stream.peek(&mut first) {
            Ok(0) => {
                log::info!("connection from {peer} closed without sending anything");
                return;
            }
            Ok(_) if legacy::is_legacy(first[0]) => {
                if let Err(e) = read_half.set_read_timeout(Some(settings.legacy_idle_timeout)) {
                    log::warn!("connection from {peer}: cannot set up: {e}");
                    return;
                }
                let received = self.read_legacy_documents(read_half);
                log::info!("original-format connection from {peer} closed ({received} documents)");
                return;
            }
            Ok(_) => {}
            Err(e) => {
                log::info!("connection from {peer} sent nothing: {e}");
                return;
            }
        }
        let (reply_tx, reply_rx) = crossbeam_channel::unbounded();
        let writer = thread::Builder::new()
            .name(format!("{}-w", thread::current().name().unwrap_or("conn")))
            .stack_size(256 * 1024)
            .spawn(move || write_replies(stream, peer, reply_rx));
        let writer = match writer {
            Ok(w) => w,
            Err(e) => {
                log::error!("connection from {peer}: cannot start writer: {e}");
                return;
            }
        };
        let received = self.read_requests(read_half, &reply_tx);
        drop(reply_tx);
        let sent = writer.join().unwrap_or(0);
        log::info!("connection from {peer} closed ({received} requests, {sent} replies)");
    }

    /// Reads requests until the client closes, stalls or breaks framing.
    /// Returns how many requests arrived.
    fn read_requests(&self, stream: TcpStream, replies: &Sender<Reply>) -> u64 {
        let peer = self.peer;
        let mut reader = FrameReader::new(stream, self.settings.max_frame);
        let mut received = 0;
        loop {
            let request = match reader.message::<Request>() {
                Ok(None) => return received,
                Err(FrameError::Timeout { mid_frame: false }) => {
                    log::info!(
                        "connection from {peer}: idle for {:?}, closing",
                        self.settings.idle_timeout
                    );
                    return received;
                }
                Err(e) => {
                    log::warn!("connection from {peer}: {e}; closing");
                    if let Some(r) = e.reply() {
                        let _ = replies.send(Reply::Error(r));
                    }
                    return received;
                }
                Ok(Some(Err(bad))) => {
                    log::warn!("connection from {peer}: bad request: {bad}");
                    let _ = replies.send(Reply::Error(bad.into()));
                    continue;
                }
                Ok(Some(Ok(request))) => request,
            };
            received += 1;
            let work = match request {
                Request::Store(store) => {
                    log::info!(
                        "document received from {peer}: \"{}\" (id {}, {} bytes)",
                        proto::truncate(&store.doc.title, 80),
                        store.id,
                        store.doc.content.len()
                    );
                    (store.id, Work::Store(store.doc))
                }
                Request::Calc { id, operation } => {
                    log::info!("calc request received from {peer}: {operation} (id {id})");
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
            };
            if !self.enqueue(work.0, work.1, replies.clone()) {
                return received;
            }
        }
    }

    /// Puts a request on the queue. False when the balancer is shutting down.
    fn enqueue(&self, id: u64, work: Work, reply: Sender<Reply>) -> bool {
        self.stats.received.fetch_add(1, Relaxed);
        let now = Instant::now();
        let job = Job {
            id,
            work,
            client: self.peer,
            received: now,
            reply,
            deadline: now + self.settings.queue_timeout,
            request_number: None,
            attempts: 0,
            tried: Vec::new(),
        };
        match self.jobs.send(job) {
            Ok(()) => true,
            Err(e) => {
                e.into_inner().fail(
                    ErrorCode::Internal,
                    "balancer is shutting down".into(),
                    &self.stats,
                );
                false
            }
        }
    }

    /// A client of the original system: unframed JSON documents, no replies
    /// expected. Outcomes are only logged (by the dispatcher and the links).
    fn read_legacy_documents(&self, stream: TcpStream) -> u64 {
        let peer = self.peer;
        // Replies have nowhere to go: the original client never reads.
        let (discard, _) = crossbeam_channel::bounded(0);
        let mut received = 0;
        let reader = LegacyReader::new(BufReader::new(stream), self.settings.max_frame);
        for (index, request) in reader.enumerate() {
            match request {
                Ok(LegacyRequest::Document { doc, .. }) => {
                    received += 1;
                    log::info!(
                        "document received from {peer}: \"{}\" (original format, {} bytes)",
                        proto::truncate(&doc.title, 80),
                        doc.content.len()
                    );
                    if !self.enqueue(index as u64 + 1, Work::Store(doc), discard.clone()) {
                        break;
                    }
                }
                Ok(LegacyRequest::Status) => {
                    log::warn!(
                        "original-format connection from {peer}: ignoring a request that is not a document"
                    );
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

fn write_replies(stream: TcpStream, peer: SocketAddr, replies: Receiver<Reply>) -> u64 {
    let mut writer = FrameWriter::new(stream);
    let mut sent = 0;
    let mut broken = false;
    // Keep draining after a write error so that the channel empties and the
    // jobs of this connection are not held up.
    for reply in replies {
        if broken {
            continue;
        }
        match writer.message(&reply) {
            Ok(()) => sent += 1,
            Err(e) => {
                log::warn!("connection from {peer}: cannot send reply: {e}");
                broken = true;
            }
        }
    }
    sent
}
