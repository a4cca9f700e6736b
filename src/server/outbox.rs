//! The sending side of a framed connection to a server: the one owner of
//! its write half. Replies come from the connection's thread (status, calc,
//! forget, refusals) and from the storage committer (stores, answered in
//! the order they become durable). Whoever holds replies queues them here
//! and writes them under the outbox's lock, as far as the socket takes them
//! at once; what would block is left to the connection's writer thread,
//! which waits for the socket (started the first time it is needed: most
//! connections never need one). Nothing else touches the socket, except a
//! conversation (an upload, a download) while nothing else is outstanding.
//!
//! The outbox also counts the connection's stores in the committer, so
//! that its thread reads ahead only so far (`MAX_STORES`,
//! `MAX_STORE_BYTES`, and `MAX_QUEUED_BYTES` of replies the peer has not
//! taken yet) and can wait until every one is answered.

use crate::net;
use crate::proto::{self, FrameWriter, Reply};
use crate::sync::lock;
use crossbeam_channel::Sender;
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
    /// The writer thread's name, and the connection's standing, which it
    /// keeps at work while it writes.
    writer_name: String,
    mark: net::Mark,
    state: Mutex<State>,
    /// Signalled when a store ends, the queue empties, the writer has
    /// started, or writing fails.
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
    writer: Writer,
    /// The connection's thread waits for `changed` (only it ever does).
    waiting: bool,
}

/// The connection's writer thread.
#[derive(Default)]
enum Writer {
    #[default]
    NotNeeded,
    /// Being started, outside the lock.
    Starting,
    /// Its nudges (closing them ends it) and its thread.
    Running(Sender<()>, JoinHandle<()>),
}

impl Outbox {
    /// An outbox on `stream`; its writer thread, when one is needed, is
    /// called `writer_name`.
    pub fn new(
        stream: net::Stream,
        peer: SocketAddr,
        writer_name: String,
        mark: net::Mark,
    ) -> Arc<Outbox> {
        let outbox = Arc::new(Outbox {
            stream,
            peer,
            writer_name,
            mark: mark.clone(),
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        });
        // Weak: the outbox holds the mark, which holds this.
        let watched = Arc::downgrade(&outbox);
        mark.watch_output(move || watched.upgrade().is_some_and(|o| o.has_output()));
        outbox
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Wakes the connection's thread if it waits (a notification costs a
    /// system call even when nobody waits, and stores end by thousands).
    fn notify(&self, state: &State) {
        if state.waiting {
            self.changed.notify_all();
        }
    }

    /// Waits on the connection's thread while `blocked` holds.
    fn wait_while(&self, blocked: impl Fn(&State) -> bool) {
        let mut state = self.state();
        while blocked(&state) {
            state.waiting = true;
            state = self
                .changed
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
            state.waiting = false;
        }
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
        self.notify(&state);
        first
    }

    /// Writes what is queued, as far as the socket takes it now; the rest
    /// goes to the writer thread.
    pub fn flush(self: &Arc<Self>) {
        let mut state = self.state();
        if state.writing || state.broken || state.queued.is_empty() {
            return;
        }
        match self.stream.send_now(&state.queued) {
            Some(Ok(n)) if n == state.queued.len() => {
                state.queued.clear();
                self.notify(&state);
                return;
            }
            Some(Ok(n)) => {
                state.queued.drain(..n);
            }
            // TLS records cannot be cut short: the writer sends them.
            None => {}
            Some(Err(e)) => {
                self.fail(&mut state, &e);
                return;
            }
        }
        state.writing = true;
        match &state.writer {
            Writer::Running(nudge, _) => {
                let _ = nudge.send(());
            }
            // Its first pass writes what is queued.
            Writer::Starting => {}
            Writer::NotNeeded => {
                state.writer = Writer::Starting;
                drop(state);
                self.start_writer();
            }
        }
    }

    /// Starts the writer thread. Not under the lock: no thread starts
    /// while one is held.
    fn start_writer(self: &Arc<Self>) {
        let (nudge, nudges) = crossbeam_channel::unbounded::<()>();
        let outbox = self.clone();
        let started =
            crate::sync::spawn_named(self.writer_name.clone(), Some(128 * 1024), move || {
                while nudges.recv().is_ok() {
                    outbox.write_queued();
                }
                // The connection has ended: what is left.
                outbox.write_queued();
            });
        let mut state = self.state();
        match started {
            Ok(thread) => {
                // Whatever was queued while it started is written now;
                // from here on, `flush` nudges it.
                let _ = nudge.send(());
                state.writer = Writer::Running(nudge, thread);
            }
            Err(e) => {
                state.writer = Writer::NotNeeded;
                self.fail(&mut state, &e);
            }
        }
        self.notify(&state);
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
        self.wait_while(|s| s.is_full() && !s.broken);
    }

    /// Waits until every store of the connection is answered and every
    /// reply written (or writing failed). Its own stores must all be
    /// handed over first, and its own replies flushed.
    pub fn wait_idle(&self) {
        self.wait_while(|s| {
            s.stores > 0
                || matches!(s.writer, Writer::Starting)
                || (!s.broken && (s.writing || !s.queued.is_empty()))
        });
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

    /// Ends the connection's output: the writer thread, if one was
    /// started, writes what is left and ends, and is joined. Called once
    /// every store is answered (`wait_idle`).
    pub fn close(&self) {
        let writer = std::mem::take(&mut self.state().writer);
        if let Writer::Running(nudge, thread) = writer {
            drop(nudge);
            if thread.join().is_err() {
                log::error!("the reply writer of {} panicked", self.peer);
            }
        }
    }

    /// Output on its way: queued, or being written.
    fn has_output(&self) -> bool {
        let state = self.state();
        state.writing || !state.queued.is_empty()
    }

    /// On the writer thread: writes what is queued, waiting for the socket
    /// as long as it takes (up to its write timeout), until nothing is
    /// queued.
    fn write_queued(&self) {
        loop {
            // At work from before the bytes leave the queue until they are
            // written (see `Mark::watch_output`).
            let _busy = self.mark.busy();
            let bytes = {
                let mut state = self.state();
                if state.broken || state.queued.is_empty() {
                    state.writing = false;
                    self.notify(&state);
                    return;
                }
                state.writing = true;
                self.notify(&state);
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
        self.notify(state);
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
