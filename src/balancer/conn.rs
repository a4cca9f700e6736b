//! One client connection: which wire it speaks, the reader loop that
//! admits its requests (`intake`), and the writer thread that sends the
//! replies that could not be written at once (in any order; each carries
//! its request id). The client's socket has one owner for writing,
//! `ClientOut`: whoever has a reply writes it there, and the writer thread
//! takes what would block.
//!
//! The writer stops when the reader and every job of this connection have
//! dropped their reply senders, so no reply is cut off. When the balancer
//! is shutting down it then sends one last `shutting_down` error without an
//! id: every request the client sent after the ones answered was not read.

use super::client_out::{ClientOut, ClientWriter};
use super::context::Conn;
use super::flow::{Hold, Window};
use super::handlers::{legacy_document, Flow};
use super::intake;
use super::limits::Limit;
use crate::net::{self, Wire};
use crate::proto::legacy::{LegacyError, LegacyReader, LegacyRequest};
use crate::proto::{self, ErrorCode, Reply};
use crossbeam_channel::{Receiver, Select, TryRecvError};
use std::io::BufReader;
use std::net::SocketAddr;
use std::time::Instant;

impl Conn {
    pub fn serve(self, stream: net::Stream) {
        let peer = self.peer;
        // Queries (`client status --watch`) open a connection per sample:
        // only connections that carried work are logged at info.
        log::debug!("connection accepted from {peer}");
        self.serve_stream(stream);
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
            Err(e) => log::debug!("connection from {peer} sent nothing: {e}"),
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
        let writer = crate::sync::spawn_named(name, Some(256 * 1024), move || {
            write_replies(&writer_out, peer, reply_rx, nudges, stop, mark)
        });
        let writer = match writer {
            Ok(w) => w,
            Err(e) => {
                log::error!("connection from {peer}: {e}");
                return;
            }
        };
        let carried = intake::read_requests(self, read_half, first_by, &reply_tx, &out);
        drop(reply_tx);
        let _ = writer.join();
        let sent = crate::sync::lock(&out).written;
        net::close_gracefully(&closing);
        let level = if carried.work > 0 {
            log::Level::Info
        } else {
            log::Level::Debug
        };
        log::log!(
            level,
            "connection from {peer} closed ({} requests, {sent} replies)",
            carried.received
        );
    }

    /// A client of the original system: unframed JSON documents, no replies
    /// expected. Outcomes are only logged (by the dispatcher and the links).
    fn read_legacy_documents(&self, stream: net::Stream, first_by: Instant) -> u64 {
        let peer = self.peer;
        let settings = self.settings;
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
                    if let Flow::Close = legacy_document(self, index as u64 + 1, &doc, hold) {
                        break;
                    }
                }
                Ok(LegacyRequest::Status) => {
                    self.mark.arrived();
                    log::warn!(
                        "original-format connection from {peer}: ignoring a request that is not a document"
                    );
                }
                Err(e) => {
                    if !self.legacy_read_failed(e) {
                        break;
                    }
                }
            }
        }
        received
    }

    /// Logs (or counts) why reading an original-format client failed;
    /// whether reading goes on.
    fn legacy_read_failed(&self, e: LegacyError) -> bool {
        let (peer, settings) = (self.peer, self.settings);
        match e {
            LegacyError::Timeout { mid_object: true } => {
                self.stats.limits.hit(Limit::FrameTimeout, || {
                    format!(
                        "original-format connection from {peer}: a document not whole within --frame-timeout ({:?}); closed",
                        settings.frame_timeout
                    )
                });
                false
            }
            LegacyError::Timeout { mid_object: false } => {
                log::debug!(
                    "original-format connection from {peer}: idle for {:?}, closing",
                    settings.legacy_idle_timeout
                );
                false
            }
            e => {
                log::warn!("original-format connection from {peer}: {e}");
                e.is_recoverable()
            }
        }
    }
}

/// The connection's writer thread: sends the replies that come by channel,
/// and the ends of frames another thread could not finish (see
/// `client_out`).
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
        log::debug!("connection from {peer}: cannot send reply: {e}");
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
                if let Err(e) = crate::sync::lock(out).message(&reply) {
                    broken = fail(e);
                }
            }
            Err(TryRecvError::Disconnected) => break,
            Err(TryRecvError::Empty) => {
                if nudges.try_recv().is_ok() {
                    if let Err(e) = crate::sync::lock(out).finish_unsent() {
                        broken = broken || fail(e);
                    }
                }
            }
        }
    }
    if broken {
        return;
    }
    let mut out = crate::sync::lock(out);
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
