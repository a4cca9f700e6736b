//! One client connection: a reader loop that turns frames into jobs on the
//! request queue, and a writer thread that sends replies back as servers
//! acknowledge them (in any order; each reply carries its request id).
//! The writer stops when the reader and every job of this connection have
//! dropped their reply senders, so no reply is cut off.

use super::dispatch::Job;
use crate::proto::legacy::{self, LegacyReader, LegacyRequest};
use crate::proto::{Document, ErrorCode, FrameError, FrameReader, FrameWriter, Reply, Request};
use crossbeam_channel::{Receiver, Sender};
use std::io::BufReader;
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy)]
pub struct ConnSettings {
    /// A client silent for this long (or stalled mid-frame) is disconnected
    /// once its pending replies are sent.
    pub idle_timeout: Duration,
    /// The same for clients of the original format.
    pub legacy_idle_timeout: Duration,
    /// How long a document may wait for a server.
    pub queue_timeout: Duration,
    pub max_frame: usize,
}

pub fn serve(stream: TcpStream, peer: SocketAddr, jobs: Sender<Job>, settings: ConnSettings) {
    log::info!("connection accepted from {peer}");
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
            let received = read_legacy_documents(read_half, peer, &jobs, settings);
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

    let received = read_requests(read_half, peer, &jobs, &reply_tx, settings);
    drop(reply_tx);
    let sent = writer.join().unwrap_or(0);
    log::info!("connection from {peer} closed ({received} requests, {sent} replies)");
}

/// Reads requests until the client closes, stalls or breaks framing.
/// Returns how many requests arrived.
fn read_requests(
    stream: TcpStream,
    peer: SocketAddr,
    jobs: &Sender<Job>,
    replies: &Sender<Reply>,
    settings: ConnSettings,
) -> u64 {
    let mut reader = FrameReader::new(stream, settings.max_frame);
    let mut received = 0;
    loop {
        let request = match reader.message::<Request>() {
            Ok(None) => return received,
            Err(FrameError::Timeout { mid_frame: false }) => {
                log::info!(
                    "connection from {peer}: idle for {:?}, closing",
                    settings.idle_timeout
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
        match request {
            Request::Store(store) => {
                if !enqueue(jobs, store.id, store.doc, peer, replies.clone(), settings) {
                    return received;
                }
            }
            Request::Status { id } => {
                let _ = replies.send(Reply::error(
                    Some(id),
                    ErrorCode::BadRequest,
                    "`status` is answered by storage servers, not by the balancer",
                ));
            }
        }
    }
}

/// Logs a received document and puts it on the request queue. False when
/// the balancer is shutting down.
fn enqueue(
    jobs: &Sender<Job>,
    id: u64,
    doc: Document,
    peer: SocketAddr,
    reply: Sender<Reply>,
    settings: ConnSettings,
) -> bool {
    log::info!(
        "document received from {peer}: \"{}\" (id {id}, {} bytes)",
        crate::proto::truncate(&doc.title, 80),
        doc.content.len()
    );
    let job = Job {
        id,
        doc,
        client: peer,
        reply,
        deadline: Instant::now() + settings.queue_timeout,
        request_number: None,
        attempts: 0,
        tried: Vec::new(),
    };
    match jobs.send(job) {
        Ok(()) => true,
        Err(e) => {
            e.into_inner()
                .fail(ErrorCode::Internal, "balancer is shutting down".into());
            false
        }
    }
}

/// A client of the original system: unframed JSON documents, no replies
/// expected. Outcomes are only logged (by the dispatcher and the links).
fn read_legacy_documents(
    stream: TcpStream,
    peer: SocketAddr,
    jobs: &Sender<Job>,
    settings: ConnSettings,
) -> u64 {
    // Replies have nowhere to go: the original client never reads.
    let (discard, _) = crossbeam_channel::bounded(0);
    let mut received = 0;
    for (index, request) in
        LegacyReader::new(BufReader::new(stream), settings.max_frame).enumerate()
    {
        match request {
            Ok(LegacyRequest::Document { doc, .. }) => {
                received += 1;
                if !enqueue(jobs, index as u64 + 1, doc, peer, discard.clone(), settings) {
                    break;
                }
            }
            Ok(LegacyRequest::Status) => {
                log::warn!("original-format connection from {peer}: ignoring a request that is not a document");
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
