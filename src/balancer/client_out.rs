//! The sending side of a client connection. Replies are written by the
//! connection's writer thread, by the connection thread itself (a request
//! it forwarded, a download) and by the links that forwarded the client's
//! requests. A link must never wait for a client that does not read: it
//! writes a reply only when the lock is free and only as far as the socket
//! takes it at once (`try_message`). The end of a frame it could not finish
//! is kept, and the writer thread, nudged, sends it before anything else.
//!
//! A link that reads many answers at once delivers their replies in a
//! `batch`: held back while it goes through them, then those to one
//! client written together, after the batch's log lines.

use crate::net;
use crate::proto::{self, FrameWriter, Reply};
use crossbeam_channel::{Receiver, Sender};
use serde::Serialize;
use std::cell::RefCell;
use std::io::{self, Write};
use std::sync::{Arc, Mutex};

pub type ClientWriter = Arc<Mutex<ClientOut>>;

pub struct ClientOut {
    frames: FrameWriter<net::Stream>,
    stream: net::Stream,
    /// The end of a frame a link began and could not finish.
    unsent: Vec<u8>,
    /// Tells the writer thread that `unsent` waits for it.
    nudge: Sender<()>,
    /// Messages written, by whoever wrote them.
    pub written: u64,
}

impl std::fmt::Debug for ClientOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientOut")
            .field("unsent", &self.unsent.len())
            .field("written", &self.written)
            .finish()
    }
}

impl ClientOut {
    /// The shared writer, and the writer thread's end of the nudges.
    pub fn new(stream: net::Stream) -> (ClientWriter, Receiver<()>) {
        let (nudge, nudges) = crossbeam_channel::unbounded();
        let out = ClientOut {
            frames: FrameWriter::new(stream.clone()),
            stream,
            unsent: Vec::new(),
            nudge,
            written: 0,
        };
        (Arc::new(Mutex::new(out)), nudges)
    }

    /// Sends what a link left unfinished, waiting as long as it takes (up
    /// to the socket's write timeout).
    pub fn finish_unsent(&mut self) -> io::Result<()> {
        if !self.unsent.is_empty() {
            let unsent = std::mem::take(&mut self.unsent);
            (&self.stream).write_all(&unsent)?;
        }
        Ok(())
    }

    pub fn message<T: Serialize>(&mut self, msg: &T) -> io::Result<()> {
        self.finish_unsent()?;
        self.frames.message(msg)?;
        self.written += 1;
        Ok(())
    }

    /// A raw frame: the body announced by the message before it.
    pub fn body(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.finish_unsent()?;
        self.frames.body(bytes)
    }

    /// Writes replies without waiting, as `try_message` does, all in one
    /// write: how many of them are written or begun (the rest have to go
    /// through the writer thread).
    fn try_messages(&mut self, replies: &[Reply]) -> usize {
        if !self.unsent.is_empty() {
            return 0;
        }
        let mut frames = Vec::new();
        let mut ends = Vec::with_capacity(replies.len());
        for reply in replies {
            if proto::write_frame(&mut frames, &proto::encode(reply)).is_err() {
                break;
            }
            ends.push(frames.len());
        }
        let sent = match self.stream.send_now(&frames) {
            Some(Ok(n)) => n,
            Some(Err(_)) | None => 0,
        };
        // Every frame that ends within what was sent, and the one begun.
        let done = ends.iter().take_while(|&&end| end <= sent).count();
        let begun = done < ends.len() && sent > ends[..done].last().copied().unwrap_or(0);
        if begun {
            self.unsent = frames[sent..ends[done]].to_vec();
            let _ = self.nudge.send(());
        }
        let taken = done + usize::from(begun);
        self.written += taken as u64;
        taken
    }

    /// Writes a reply without waiting: true when it is written, or begun
    /// with its end left to the writer thread. False when nothing was
    /// written: the reply has to go through the writer thread (the socket
    /// is full, a frame is unfinished, the stream is TLS, it failed).
    pub fn try_message(&mut self, reply: &Reply) -> bool {
        if !self.unsent.is_empty() {
            return false;
        }
        let mut frame = Vec::new();
        if proto::write_frame(&mut frame, &proto::encode(reply)).is_err() {
            return false;
        }
        match self.stream.send_now(&frame) {
            Some(Ok(n)) if n == frame.len() => {}
            Some(Ok(0)) | Some(Err(_)) | None => return false,
            Some(Ok(n)) => {
                self.unsent = frame.split_off(n);
                let _ = self.nudge.send(());
            }
        }
        self.written += 1;
        true
    }
}

/// A reply held back by a `batch`, with its client's writer and the
/// connection's writer thread (for what the socket does not take at once).
struct Held {
    out: ClientWriter,
    reply: Reply,
    fallback: Sender<Reply>,
}

thread_local! {
    /// The replies this thread holds back (`batch`), if it does.
    static HELD: RefCell<Option<Vec<Held>>> = const { RefCell::new(None) };
}

/// Keeps `reply` for the end of this thread's `batch`; gives it back when
/// the thread holds nothing back.
pub fn hold(out: &ClientWriter, reply: Reply, fallback: &Sender<Reply>) -> Option<Reply> {
    HELD.with(|held| match held.borrow_mut().as_mut() {
        Some(replies) => {
            replies.push(Held {
                out: out.clone(),
                reply,
                fallback: fallback.clone(),
            });
            None
        }
        None => Some(reply),
    })
}

/// Runs `f` with the replies it delivers (`hold`) and the lines it logs
/// (`logging::hold`) held back; then writes the lines, then the replies,
/// those to one client in one write. A reply is never seen before its
/// log line, and a client with several replies is woken once.
pub fn batch<T>(f: impl FnOnce() -> T) -> T {
    struct Release;
    impl Drop for Release {
        fn drop(&mut self) {
            if let Some(replies) = HELD.with(|held| held.borrow_mut().take()) {
                send_held(replies);
            }
        }
    }
    let nested = HELD.with(|held| {
        let mut held = held.borrow_mut();
        let nested = held.is_some();
        held.get_or_insert_with(Vec::new);
        nested
    });
    if nested {
        return f();
    }
    let _release = Release;
    crate::logging::hold(f)
}

/// Sends held replies, grouped by client in the order they came.
fn send_held(mut replies: Vec<Held>) {
    while !replies.is_empty() {
        let out = replies[0].out.clone();
        let (mine, rest): (Vec<Held>, Vec<Held>) =
            replies.into_iter().partition(|h| Arc::ptr_eq(&h.out, &out));
        replies = rest;
        let fallback = mine[0].fallback.clone();
        let mine: Vec<Reply> = mine.into_iter().map(|h| h.reply).collect();
        let taken = match out.try_lock() {
            Ok(mut out) => out.try_messages(&mine),
            Err(_) => 0,
        };
        for reply in mine.into_iter().skip(taken) {
            let _ = fallback.send(reply);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    fn pair() -> (ClientWriter, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let near = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (far, _) = listener.accept().unwrap();
        (ClientOut::new(net::Stream::from(near)).0, far)
    }

    fn stored(id: u64) -> Reply {
        Reply::Error(proto::ErrorReply {
            id: Some(id),
            code: proto::ErrorCode::Internal,
            message: format!("reply {id}"),
        })
    }

    #[test]
    fn a_batch_sends_each_clients_replies_in_order_once_it_ends() {
        let ((a, mut a_far), (b, mut b_far)) = (pair(), pair());
        let (fallback, queued) = crossbeam_channel::unbounded();
        let held = batch(|| {
            for (out, id) in [(&a, 1), (&b, 2), (&a, 3)] {
                assert!(hold(out, stored(id), &fallback).is_none(), "held");
            }
            // Nothing has gone out yet.
            a_far.set_nonblocking(true).unwrap();
            let mut byte = [0u8; 1];
            let early = std::io::Read::read(&mut a_far, &mut byte);
            a_far.set_nonblocking(false).unwrap();
            early.is_err()
        });
        assert!(held, "a reply went out inside the batch");
        let ids = |far: &mut TcpStream, n: usize| -> Vec<Option<u64>> {
            (0..n)
                .map(|_| {
                    let payload = proto::read_frame(far, 1 << 16).unwrap().unwrap();
                    proto::decode::<Reply>(&payload).unwrap().id()
                })
                .collect()
        };
        assert_eq!(ids(&mut a_far, 2), [Some(1), Some(3)]);
        assert_eq!(ids(&mut b_far, 1), [Some(2)]);
        assert!(queued.is_empty(), "all written at once");
        assert_eq!(a.lock().unwrap().written, 2);
        // Outside a batch nothing is held.
        assert!(hold(&a, stored(4), &fallback).is_some());
    }
}
