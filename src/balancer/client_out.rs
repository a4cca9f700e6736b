//! The sending side of a client connection. Replies are written by the
//! connection's writer thread, by the connection thread itself (a request
//! it forwarded, a download) and by the links that forwarded the client's
//! requests. A link must never wait for a client that does not read: it
//! writes a reply only when the lock is free and only as far as the socket
//! takes it at once (`try_message`). The end of a frame it could not finish
//! is kept, and the writer thread, nudged, sends it before anything else.

use crate::net;
use crate::proto::{self, FrameWriter, Reply};
use crossbeam_channel::{Receiver, Sender};
use serde::Serialize;
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
