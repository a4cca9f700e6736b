//! The sending side of a framed connection to a server: the one owner of
//! its write half. Replies come from the connection's thread (status, calc,
//! forget, refusals) and from the storage committer (stores, answered in
//! the order they become durable). Whoever holds replies queues them here
//! and writes them under the outbox's lock, as far as the socket takes them
//! at once; what would block is left to the connection's writer thread,
//! which waits for the socket. Nothing else touches the socket, except a
//! conversation (an upload, a download) while nothing else is outstanding.
//!
//! The outbox also counts the connection's stores in the committer, so
//! that its thread reads ahead only so far (`MAX_STORES`,
//! `MAX_STORE_BYTES`, and `MAX_QUEUED_BYTES` of replies the peer has not
//! taken yet) and can wait until every one is answered.

use crate::net::{self, lock};
use crate::proto::{self, FrameWriter, Reply};
use crossbeam_channel::{Receiver, Sender};
use std::io::{self, Write};
use std::net::SocketAddr;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

/// Stores one connection may have in the committer before its thread
/// stops reading (TCP then slows the sender down).
pub const MAX_STORES: usize = 256;
/// And bytes of their documents.
pub const MAX_STORE_BYTES: usize = 32 * 1024 * 1024;
/// Bytes of replies waiting for the socket before the connection's thread
/// stops reading: a peer that sends requests and reads no replies holds
/// no more than this.
pub const MAX_QUEUED_BYTES: usize = 4 * 1024 * 1024;

pub struct Outbox {
    stream: net::Stream,
    peer: SocketAddr,
    state: Mutex<State>,
    /// Signalled when a store ends, the queue empties or writing fails.
    changed: Condvar,
}

#[derive(Default)]
struct State {
    /// Frames not written yet, in order.
    queued: Vec<u8>,
    /// The writer thread is writing (the socket would have blocked):
    /// nobody else writes until it has caught up.
    writing: bool,
    /// Writing failed (the peer is gone): replies are dropped.
    broken: bool,
    /// Stores in the committer, and the bytes of their documents.
    stores: usize,
    store_bytes: usize,
    /// Wakes the writer thread; taken when the connection ends, which
    /// ends the writer.
    nudge: Option<Sender<()>>,
}

impl Outbox {
    /// An outbox on `stream`, and its writer thread, called `name`, which
    /// marks the connection busy while it writes.
    pub fn start(
        stream: net::Stream,
        peer: SocketAddr,
        name: String,
        mark: net::Mark,
    ) -> io::Result<(Arc<Outbox>, JoinHandle<()>)> {
        let (nudge, nudges) = crossbeam_channel::unbounded();
        let outbox = Arc::new(Outbox {
            stream,
            peer,
            state: Mutex::new(State {
                nudge: Some(nudge),
                ..State::default()
            }),
            changed: Condvar::new(),
        });
        let watched = outbox.clone();
        mark.watch_output(move || watched.has_output());
        let writer = outbox.clone();
        let thread = net::spawn_named(name, Some(128 * 1024), move || {
            writer.write_when_nudged(&nudges, &mark)
        })?;
        Ok((outbox, thread))
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Queues a reply behind those not written yet. True when the caller
    /// is the one to `flush` it (nothing was queued before).
    pub fn queue(&self, reply: &Reply) -> bool {
        let frame = frame_of(reply);
        let mut state = self.state();
        state.push(&frame)
    }

    /// Queues the reply to a store the committer has ended, and counts the
    /// store off (see `queue`).
    pub fn queue_store_reply(&self, reply: &Reply, bytes: usize) -> bool {
        let frame = frame_of(reply);
        let mut state = self.state();
        state.stores -= 1;
        state.store_bytes -= bytes;
        let first = state.push(&frame);
        self.changed.notify_all();
        first
    }

    /// Writes what is queued, as far as the socket takes it now; the rest
    /// goes to the writer thread.
    pub fn flush(&self) {
        let mut state = self.state();
        if state.writing || state.broken || state.queued.is_empty() {
            return;
        }
        match self.stream.send_now(&state.queued) {
            Some(Ok(n)) if n == state.queued.len() => {
                state.queued.clear();
                self.changed.notify_all();
            }
            Some(Ok(n)) => {
                state.queued.drain(..n);
                state.hand_to_writer();
            }
            // TLS records cannot be cut short: the writer sends them.
            None => state.hand_to_writer(),
            Some(Err(e)) => self.fail(&mut state, &e),
        }
    }

    /// Counts a store handed to the committer, with the bytes of its
    /// document: its reply comes through `queue_store_reply`.
    pub fn store_begun(&self, bytes: usize) {
        let mut state = self.state();
        state.stores += 1;
        state.store_bytes += bytes;
    }

    /// Whether the connection's thread should read no more for now: it has
    /// as many stores in the committer as it may (`MAX_STORES`,
    /// `MAX_STORE_BYTES`), or as many replies waiting for the socket
    /// (`MAX_QUEUED_BYTES`).
    pub fn is_full(&self) -> bool {
        self.state().is_full()
    }

    /// Waits until the connection may read on (see `is_full`). Its own
    /// stores must all be handed over first.
    pub fn wait_for_room(&self) {
        let state = self.state();
        let _state = self
            .changed
            .wait_while(state, |s| s.is_full() && !s.broken)
            .unwrap_or_else(PoisonError::into_inner);
    }

    /// Waits until every store of the connection is answered and every
    /// reply written (or writing failed). Its own stores must all be
    /// handed over first, and its own replies flushed.
    pub fn wait_idle(&self) {
        let state = self.state();
        let _state = self
            .changed
            .wait_while(state, |s| {
                s.stores > 0 || (!s.broken && (s.writing || !s.queued.is_empty()))
            })
            .unwrap_or_else(PoisonError::into_inner);
    }

    /// A writer straight on the socket, for a conversation that writes
    /// frame after frame (an upload, a download): waits until nothing else
    /// is outstanding, and nothing else is written until the conversation
    /// ends, as the connection's thread, in it, reads nothing more.
    pub fn conversation(&self) -> FrameWriter<net::Stream> {
        self.wait_idle();
        FrameWriter::new(self.stream.clone())
    }

    pub fn is_broken(&self) -> bool {
        self.state().broken
    }

    /// Ends the connection's output: the writer thread writes what is
    /// left and ends. Called once every store is answered (`wait_idle`).
    pub fn close(&self) {
        let nudge = self.state().nudge.take();
        drop(nudge);
    }

    /// Output on its way: queued, or being written.
    fn has_output(&self) -> bool {
        let state = self.state();
        state.writing || !state.queued.is_empty()
    }

    /// The writer thread: at each nudge, writes what is queued, waiting
    /// for the socket as long as it takes (up to its write timeout); once
    /// the connection ends, writes what is left.
    fn write_when_nudged(&self, nudges: &Receiver<()>, mark: &net::Mark) {
        while nudges.recv().is_ok() {
            self.write_queued(mark);
        }
        self.write_queued(mark);
    }

    fn write_queued(&self, mark: &net::Mark) {
        loop {
            // At work from before the bytes leave the queue until they are
            // written (see `Mark::watch_output`).
            let _busy = mark.busy();
            let bytes = {
                let mut state = self.state();
                if state.broken || state.queued.is_empty() {
                    state.writing = false;
                    self.changed.notify_all();
                    return;
                }
                state.writing = true;
                self.changed.notify_all();
                std::mem::take(&mut state.queued)
            };
            if let Err(e) = (&self.stream).write_all(&bytes) {
                let mut state = self.state();
                self.fail(&mut state, &e);
                return;
            }
        }
    }

    /// The peer is gone or does not read: nothing more is written, and the
    /// connection's thread stops reading.
    fn fail(&self, state: &mut State, e: &io::Error) {
        if !state.broken {
            log::warn!("cannot reply to {}: {e}", self.peer);
        }
        state.broken = true;
        state.writing = false;
        state.queued = Vec::new();
        self.stream.end_reading();
        self.changed.notify_all();
    }
}

impl State {
    fn push(&mut self, frame: &[u8]) -> bool {
        if self.broken {
            return false;
        }
        let first = self.queued.is_empty() && !self.writing;
        self.queued.extend_from_slice(frame);
        first
    }

    fn hand_to_writer(&mut self) {
        self.writing = true;
        if let Some(nudge) = &self.nudge {
            let _ = nudge.send(());
        }
    }

    fn is_full(&self) -> bool {
        self.stores >= MAX_STORES
            || self.store_bytes >= MAX_STORE_BYTES
            || self.queued.len() >= MAX_QUEUED_BYTES
    }
}

fn frame_of(reply: &Reply) -> Vec<u8> {
    let mut frame = Vec::new();
    // Writing into a Vec fails only for a payload over 4 GiB, which no
    // reply is; such a reply is dropped rather than sent cut.
    if let Err(e) = proto::write_frame(&mut frame, &proto::encode(reply)) {
        log::error!("cannot frame a reply: {e}");
        frame.clear();
    }
    frame
}
