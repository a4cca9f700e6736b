//! Frames that carry messages: reading a frame and decoding the message
//! in it, encoding a message into a frame, and the error reply a broken
//! frame earns. `frame` knows bytes only; `message` knows JSON only; this
//! joins them.

use super::frame::{Deadline, FrameError, FrameReader, FrameWriter};
use super::message::{decode, encode, DecodeError, ErrorCode, ErrorReply, Message};
use serde::Serialize;
use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

impl FrameError {
    /// The error reply worth sending to the peer before closing, if any.
    pub fn reply(&self) -> Option<ErrorReply> {
        let (code, message) = match self {
            FrameError::TooLarge { .. } => (ErrorCode::FrameTooLarge, self.to_string()),
            FrameError::Timeout { .. } => (ErrorCode::Timeout, self.to_string()),
            FrameError::Truncated { .. } | FrameError::Io(_) => return None,
        };
        Some(ErrorReply {
            id: None,
            code,
            message,
        })
    }
}

impl<R: Read> FrameReader<R> {
    /// Next message of family `T`. The outer error closes the stream; the
    /// inner one is a bad message on a stream that is still in step.
    pub fn message<T: Message>(&mut self) -> Result<Option<Result<T, DecodeError>>, FrameError> {
        Ok(self.frame()?.map(|payload| decode(&payload)))
    }
}

impl<R: Read + Deadline> FrameReader<R> {
    /// Like `message`, but once a frame's header has arrived the rest of it
    /// must arrive within `limit`, however it trickles in.
    pub fn message_within<T: Message>(
        &mut self,
        limit: Duration,
    ) -> Result<Option<Result<T, DecodeError>>, FrameError> {
        let Some(len) = self.header()? else {
            return Ok(None);
        };
        self.get_mut().set_deadline(Some(Instant::now() + limit));
        let payload = self.payload(len);
        self.get_mut().set_deadline(None);
        Ok(Some(decode(&payload?)))
    }

    /// Like `message`, but the whole frame, header included, must arrive
    /// by `deadline` (a connection's first request).
    pub fn message_by<T: Message>(
        &mut self,
        deadline: Instant,
    ) -> Result<Option<Result<T, DecodeError>>, FrameError> {
        self.get_mut().set_deadline(Some(deadline));
        let header = self.header();
        self.get_mut().set_deadline(None);
        let Some(len) = header? else {
            return Ok(None);
        };
        let payload = self.payload_by(len, deadline, |_| {})?;
        Ok(Some(decode(&payload)))
    }
}

impl<W: Write> FrameWriter<W> {
    /// A message, as one frame.
    pub fn message<T: Serialize>(&mut self, msg: &T) -> io::Result<()> {
        self.body(&encode(msg))
    }
}
