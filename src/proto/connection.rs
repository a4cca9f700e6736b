//! A request/response connection: frames and messages over one stream.

use super::frame::{write_frame, FrameError, FrameReader};
use super::message::{encode, DecodeError, ErrorReply, Message, Reply};
use serde::Serialize;
use std::fmt;
use std::io::{self, Read, Write};

/// Why a request/response exchange failed.
#[derive(Debug)]
pub enum CallError {
    Frame(FrameError),
    /// The peer closed the connection before replying.
    Closed,
    /// The reply could not be decoded.
    Decode(DecodeError),
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CallError::Frame(e) => e.fmt(f),
            CallError::Closed => f.write_str("connection closed by peer"),
            CallError::Decode(e) => write!(f, "unreadable reply: {e}"),
        }
    }
}

impl std::error::Error for CallError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            CallError::Frame(e) => Some(e),
            CallError::Decode(e) => Some(e),
            CallError::Closed => None,
        }
    }
}

impl From<io::Error> for CallError {
    fn from(e: io::Error) -> Self {
        CallError::Frame(FrameError::Io(e))
    }
}

/// A request/response connection over any byte stream (a `net::Stream`:
/// TCP or TLS).
pub struct Connection<S: Read + Write> {
    reader: FrameReader<S>,
}

impl<S: Read + Write> Connection<S> {
    pub fn new(stream: S, max: usize) -> Self {
        Connection {
            reader: FrameReader::new(stream, max),
        }
    }

    pub fn send<T: Serialize>(&mut self, msg: &T) -> io::Result<()> {
        // Frames are written whole and flushed, so writing straight to the
        // stream under the reader's buffer is safe.
        write_frame(self.reader.get_mut(), &encode(msg))
    }

    /// Sends a payload already encoded (see `encode_forward`).
    pub fn send_payload(&mut self, payload: &[u8]) -> io::Result<()> {
        write_frame(self.reader.get_mut(), payload)
    }

    pub fn recv<T: Message>(&mut self) -> Result<T, CallError> {
        match self.reader.message::<T>() {
            Ok(Some(Ok(msg))) => Ok(msg),
            Ok(Some(Err(e))) => Err(CallError::Decode(e)),
            Ok(None) => Err(CallError::Closed),
            Err(e) => Err(CallError::Frame(e)),
        }
    }

    /// Sends a request (of any family) and waits for its reply.
    pub fn call<T: Serialize>(&mut self, request: &T) -> Result<Reply, CallError> {
        self.send(request)?;
        self.recv()
    }

    /// After a write failed: the error the peer sent before it closed, if
    /// that is what comes next (disk full, bad offset...). Set a short read
    /// timeout first: the peer may have sent nothing.
    pub fn parting_error(&mut self) -> Option<ErrorReply> {
        match self.recv::<Reply>() {
            Ok(Reply::Error(e)) => Some(e),
            _ => None,
        }
    }

    /// The raw frame after a `chunk` message (see `file::read_body`).
    pub fn read_body(&mut self, expected: u64) -> Result<Vec<u8>, super::file::BodyError> {
        super::file::read_body(&mut self.reader, expected)
    }

    pub fn get_ref(&self) -> &S {
        self.reader.get_ref()
    }
}
