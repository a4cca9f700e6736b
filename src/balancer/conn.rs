//! One client connection: a reader loop that turns frames into jobs on the
//! request queue, and a writer thread that sends replies back as servers
//! acknowledge them (in any order; each reply carries its request id).
//! The writer stops when the reader and every job of this connection have
//! dropped their reply senders, so no reply is cut off.

use super::dispatch::Job;
use crate::proto::{ErrorCode, FrameError, FrameReader, FrameWriter, Reply, Request};
use crossbeam_channel::{Receiver, Sender};
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy)]
pub struct ConnSettings {
    /// A client silent for this long (or stalled mid-frame) is disconnected
    /// once its pending replies are sent.
    pub idle_timeout: Duration,
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
                log::info!(
                    "document received from {peer}: \"{}\" (id {}, {} bytes)",
                    crate::proto::truncate(&store.doc.title, 80),
                    store.id,
                    store.doc.content.len()
                );
                let job = Job {
                    id: store.id,
                    doc: store.doc,
                    client: peer,
                    reply: replies.clone(),
                    deadline: Instant::now() + settings.queue_timeout,
                    request_number: None,
                    attempts: 0,
                    tried: Vec::new(),
                };
                if let Err(e) = jobs.send(job) {
                    e.into_inner()
                        .fail(ErrorCode::Internal, "balancer is shutting down".into());
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
