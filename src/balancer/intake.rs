//! Admission of a framed client's requests: the loop of its connection
//! thread. Before reading a request it takes a slot of the connection's
//! window and, as the frame's payload arrives, its bytes from the
//! balancer-wide budget (a header alone takes none); at either limit it
//! waits, and TCP slows the client down. The first whole request is due
//! within `--frame-timeout` of connecting. Each request is decoded,
//! checked by the connection's `Session` (handshake, login, rights), and
//! handed to its handler (`handlers`). Requests read together (a client
//! that pipelines) leave together: documents for one server go in one
//! write once nothing more is buffered.

use super::client_out::ClientWriter;
use super::context::Conn;
use super::flow::{Reservation, Window};
use super::handlers::{self, Flow, Held, Io, Outbox};
use super::limits::Limit;
use super::session::{Admitted, Session, Verdict};
use crate::net;
use crate::proto::{
    self, ClientRequest, Deadline, ErrorCode, FrameError, FrameReader, Reply, ToBalancer,
};
use crossbeam_channel::Sender;
use std::time::Instant;

/// What a connection carried, for its closing log line.
#[derive(Debug, Default, Clone, Copy)]
pub struct Carried {
    pub received: u64,
    /// Requests that were work (documents, computations, files).
    pub work: u64,
}

/// Reads requests until the client closes, stalls or breaks framing, or
/// the balancer shuts down; the first must be whole by `first_by`.
pub fn read_requests(
    conn: &Conn,
    stream: net::Stream,
    first_by: Instant,
    replies: &Sender<Reply>,
    out: &ClientWriter,
) -> Carried {
    let peer = conn.peer;
    let local = stream.tcp().local_addr().unwrap_or(peer);
    let paced = net::Paced::new(stream, conn.settings.idle_timeout);
    let mut reader = FrameReader::new(paced, conn.settings.max_frame);
    let window = Window::new(conn.settings.window);
    let mut session = Session::new(conn.access.clone(), peer, local);
    let mut carried = Carried::default();
    let mut outbox = Outbox::default();
    // Until the first whole frame, its deadline.
    let mut first = Some(first_by);
    loop {
        // What was picked goes before this thread may wait: for the next
        // request to arrive, or for a place in the window.
        if !reader.frame_buffered() || window.in_use() >= window.capacity() {
            outbox.flush(conn);
        }
        let Some((payload, held)) =
            read_one(conn, &mut reader, &window, &mut first, replies, &mut outbox)
        else {
            break;
        };
        conn.mark.arrived();
        // Whatever was read after the shutdown began is left unanswered:
        // the final `shutting_down` reply says so.
        if conn.shutting_down() {
            break;
        }
        let screened = screen(conn, &mut session, payload, replies, &mut carried);
        let (request, raw_fields) = match screened {
            Step::Carry(request, raw_fields) => (request, raw_fields),
            Step::Skip => continue,
            Step::Stop => break,
        };
        if is_work(&request) {
            carried.work += 1;
        }
        // At work while this thread carries the request out (a file
        // transfer, a listing); a job handed on holds its own mark.
        let _working = conn.mark.busy();
        let mut io = Io {
            reader: &mut reader,
            out,
            replies,
            outbox: &mut outbox,
        };
        if let Flow::Close = handlers::handle(conn, &session, request, raw_fields, held, &mut io) {
            break;
        }
    }
    outbox.flush(conn);
    carried
}

/// What the loop does with a request read.
// One at a time, moved once: not worth a box per request.
#[allow(clippy::large_enum_variant)]
enum Step {
    /// Carry it out (with a document's fields as the client wrote them).
    Carry(Admitted, Option<Vec<u8>>),
    /// Answered here: read the next one.
    Skip,
    /// Answered here, and the connection closes.
    Stop,
}

/// Decodes a request read and asks the session about it; answers what is
/// answered here (a bad request, the handshake, a login, a refusal).
fn screen(
    conn: &Conn,
    session: &mut Session,
    payload: Vec<u8>,
    replies: &Sender<Reply>,
    carried: &mut Carried,
) -> Step {
    let request = match proto::decode::<ToBalancer>(&payload) {
        Ok(request) => request,
        Err(bad) => {
            log::warn!("connection from {}: bad request: {bad}", conn.peer);
            let _ = replies.send(Reply::Error(bad.into()));
            return Step::Skip;
        }
    };
    // A document goes on as the client wrote it.
    let raw_fields = match &request {
        ToBalancer::Client(ClientRequest::Store(_)) => proto::raw_document_fields(&payload),
        _ => None,
    };
    drop(payload);
    carried.received += 1;
    let verdict = session.admit(request, &conn.stop);
    // A server that proved the cluster key, a user who logged in: closed
    // to make room only after everyone else idle.
    if session.trusted() {
        conn.mark.trust();
    }
    match verdict {
        Verdict::Proceed(request) => Step::Carry(request, raw_fields),
        Verdict::Answer(reply) => {
            let _ = replies.send(reply);
            Step::Skip
        }
        Verdict::Close(reply) => {
            let _ = replies.send(reply);
            Step::Stop
        }
    }
}

fn is_work(request: &Admitted) -> bool {
    let Admitted::Client(request) = request else {
        return false;
    };
    matches!(
        request,
        ClientRequest::Store(_)
            | ClientRequest::Calc { .. }
            | ClientRequest::Upload(_)
            | ClientRequest::Get { .. }
    )
}

/// Reads one frame, with its window slot and budget bytes; `None` when
/// the connection ends (the reason logged and, where it can be, told).
fn read_one(
    conn: &Conn,
    reader: &mut FrameReader<net::Paced>,
    window: &Window,
    first: &mut Option<Instant>,
    replies: &Sender<Reply>,
    outbox: &mut Outbox,
) -> Option<(Vec<u8>, Held)> {
    // Only this thread takes slots: a full window now stays full until a
    // job gives one back.
    if window.in_use() >= window.capacity() {
        let peer = conn.peer;
        conn.stats.limits.hit(Limit::ClientWindow, || {
            format!(
                "connection from {peer} has {} requests outstanding (--client-window); reading it paused",
                window.capacity()
            )
        });
    }
    let permit = window.acquire();
    reader.get_mut().set_deadline(*first);
    let len = match reader.header() {
        Ok(Some(len)) => len,
        Ok(None) => return None,
        Err(e) => {
            read_failed(conn, e, *first, replies);
            return None;
        }
    };
    // The rest of the frame has --frame-timeout to arrive, however it
    // trickles in (waits for the budget aside), and takes its bytes of the
    // budget as they come.
    let mut bytes = conn.budget.open();
    let deadline = first.unwrap_or_else(|| Instant::now() + conn.settings.frame_timeout);
    let payload = reader.payload_by(len, deadline, |piece| {
        take_budget(conn, &mut bytes, piece, outbox)
    });
    bytes.complete();
    match payload {
        Ok(payload) => {
            *first = None;
            Some((payload, Held { permit, bytes }))
        }
        Err(e) => {
            read_failed(conn, e, *first, replies);
            None
        }
    }
}

/// Takes `piece` more bytes of the budget for a request arriving; at the
/// limit, counts it, sends what this connection picked (it holds bytes
/// too) and waits.
fn take_budget(conn: &Conn, bytes: &mut Reservation, piece: usize, outbox: &mut Outbox) {
    if bytes.try_grow(piece) {
        return;
    }
    outbox.flush(conn);
    let peer = conn.peer;
    conn.stats.limits.hit(Limit::QueuedBytes, || {
        format!(
            "{} bytes queued or in flight (--max-queued-bytes); reading connection from {peer} paused",
            conn.budget.used()
        )
    });
    bytes.grow(piece);
}

/// Logs and counts why reading stopped, and tells the client when it can
/// still be told. `first`: when the first request was due, if it had not
/// arrived whole yet.
fn read_failed(conn: &Conn, e: FrameError, first: Option<Instant>, replies: &Sender<Reply>) {
    let peer = conn.peer;
    let late = first.is_some_and(|by| Instant::now() >= by);
    if late && matches!(e, FrameError::Timeout { .. }) {
        let timeout = conn.settings.frame_timeout;
        conn.stats.limits.hit(Limit::FrameTimeout, || {
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
        FrameError::TooLarge { len, max } => conn.stats.limits.hit(Limit::FrameTooLarge, || {
            format!("connection from {peer} announced a frame of {len} bytes (--max-frame {max}); closed")
        }),
        FrameError::Timeout { mid_frame: true } => {
            conn.stats.limits.hit(Limit::FrameTimeout, || {
                format!(
                    "connection from {peer} stalled mid-frame (--frame-timeout {:?}); closed",
                    conn.settings.frame_timeout
                )
            })
        }
        _ => {}
    }
    match e {
        FrameError::Timeout { mid_frame: false } => log::debug!(
            "connection from {peer}: idle for {:?}, closing",
            conn.settings.idle_timeout
        ),
        e => {
            log::warn!("connection from {peer}: {e}; closing");
            if let Some(r) = e.reply() {
                let _ = replies.send(Reply::Error(r));
            }
        }
    }
}
