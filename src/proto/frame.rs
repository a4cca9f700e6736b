//! Frames: a `u32` big-endian length, then that many bytes. The length is
//! checked against a maximum before reading, and the buffer grows as bytes
//! arrive, so a peer that announces a large frame and stalls costs nothing.

use std::fmt;
use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::time::Instant;

/// Default cap on one frame: generous for text documents, small enough that a
/// hostile length prefix cannot make a peer allocate gigabytes.
pub const DEFAULT_MAX_FRAME: usize = 8 * 1024 * 1024;

/// How much larger a request may grow when the balancer forwards it (it adds
/// `numero_richiesta` and replaces the id). Servers accept frames this much
/// larger than clients may send, so whatever the balancer takes, a server
/// with the same `--max-frame` takes too.
pub const FORWARD_HEADROOM: usize = 1024;

/// Why a frame could not be read. Everything here means the stream can no
/// longer be trusted (or is gone), so the caller closes the connection.
#[derive(Debug)]
pub enum FrameError {
    /// The length prefix is larger than the reader's maximum.
    TooLarge {
        len: u64,
        max: usize,
    },
    /// The peer closed the stream in the middle of a frame.
    Truncated {
        expected: usize,
        got: usize,
    },
    /// No byte arrived within the read timeout. `mid_frame` tells a stalled
    /// peer (part of a frame sent) from an idle one.
    Timeout {
        mid_frame: bool,
    },
    Io(io::Error),
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::TooLarge { len, max } => {
                write!(f, "frame of {len} bytes exceeds the maximum of {max} bytes")
            }
            FrameError::Truncated { expected, got } => write!(
                f,
                "connection closed mid-frame ({got} of {expected} bytes received)"
            ),
            FrameError::Timeout { mid_frame: true } => {
                write!(f, "peer stalled in the middle of a frame")
            }
            FrameError::Timeout { mid_frame: false } => write!(f, "peer idle for too long"),
            FrameError::Io(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for FrameError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            FrameError::Io(e) => Some(e),
            _ => None,
        }
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Reads into `buf` until full. Returns how many bytes arrived before a
/// clean end of stream (== `buf.len()` when complete).
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                // Keep the count so the caller can tell idle from stalled.
                return Err(io::Error::new(e.kind(), PartialRead(got, e)));
            }
        }
    }
    Ok(got)
}

#[derive(Debug)]
struct PartialRead(usize, io::Error);
impl fmt::Display for PartialRead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.1.fmt(f)
    }
}
impl std::error::Error for PartialRead {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.1)
    }
}

fn partial_count(e: &io::Error) -> usize {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<PartialRead>())
        .map_or(0, |p| p.0)
}

/// Reads one frame. `Ok(None)` is a clean end of stream between frames.
pub fn read_frame(r: &mut impl Read, max: usize) -> Result<Option<Vec<u8>>, FrameError> {
    match read_header(r, max)? {
        None => Ok(None),
        Some(len) => read_payload(r, len).map(Some),
    }
}

/// Reads a frame's length prefix and checks it against `max`. `Ok(None)` is
/// a clean end of stream between frames.
pub fn read_header(r: &mut impl Read, max: usize) -> Result<Option<usize>, FrameError> {
    let mut header = [0u8; 4];
    let got = read_full(r, &mut header).map_err(|e| {
        if is_timeout(&e) {
            FrameError::Timeout {
                mid_frame: partial_count(&e) > 0,
            }
        } else {
            FrameError::Io(e)
        }
    })?;
    match got {
        0 => return Ok(None),
        4 => {}
        got => return Err(FrameError::Truncated { expected: 4, got }),
    }
    let len = u32::from_be_bytes(header) as u64;
    if len > max as u64 {
        return Err(FrameError::TooLarge { len, max });
    }
    Ok(Some(len as usize))
}

/// First allocation for a payload; the buffer grows as bytes arrive, so a
/// declared length costs memory only once it is really sent.
const INITIAL_PAYLOAD_CAPACITY: usize = 64 * 1024;

/// Reads the `len` bytes of a payload whose header has been read.
pub fn read_payload(r: &mut impl Read, len: usize) -> Result<Vec<u8>, FrameError> {
    let mut payload = Vec::with_capacity(len.min(INITIAL_PAYLOAD_CAPACITY));
    read_payload_into(r, len, &mut payload)?;
    Ok(payload)
}

/// Like `read_payload`, appending to `payload` (whose allocation a caller
/// may reuse from frame to frame).
pub fn read_payload_into(
    r: &mut impl Read,
    len: usize,
    payload: &mut Vec<u8>,
) -> Result<(), FrameError> {
    let start = payload.len();
    let mut limited = r.take(len as u64);
    loop {
        // `read_to_end` keeps what arrived before an error, so a timeout
        // still tells how far the frame got.
        match limited.read_to_end(payload) {
            Ok(_) => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => return Err(FrameError::Timeout { mid_frame: true }),
            Err(e) => return Err(FrameError::Io(e)),
        }
    }
    let got = payload.len() - start;
    if got < len {
        return Err(FrameError::Truncated {
            expected: len + 4,
            got: got + 4,
        });
    }
    Ok(())
}

/// Writes one frame and flushes it.
pub fn write_frame(w: &mut impl Write, payload: &[u8]) -> io::Result<()> {
    let len = u32::try_from(payload.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "frame longer than 4 GiB"))?;
    if payload.len() <= SMALL_FRAME {
        // One write, so an unbuffered socket sends one segment, not two.
        let mut frame = Vec::with_capacity(4 + payload.len());
        frame.extend_from_slice(&len.to_be_bytes());
        frame.extend_from_slice(payload);
        w.write_all(&frame)?;
    } else {
        w.write_all(&len.to_be_bytes())?;
        w.write_all(payload)?;
    }
    w.flush()
}

/// Frames up to this size are copied behind their header and written at once.
const SMALL_FRAME: usize = 64 * 1024;

/// Reads frames from one half of a stream.
pub struct FrameReader<R: Read> {
    inner: BufReader<R>,
    max: usize,
}

impl<R: Read> FrameReader<R> {
    pub fn new(inner: R, max: usize) -> Self {
        FrameReader {
            inner: BufReader::new(inner),
            max,
        }
    }

    /// Next frame; `Ok(None)` at a clean end of stream.
    pub fn frame(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        read_frame(&mut self.inner, self.max)
    }

    /// The next frame's length, checked against the maximum; `Ok(None)` at a
    /// clean end of stream. Follow with `payload(len)`.
    pub fn header(&mut self) -> Result<Option<usize>, FrameError> {
        read_header(&mut self.inner, self.max)
    }

    pub fn payload(&mut self, len: usize) -> Result<Vec<u8>, FrameError> {
        read_payload(&mut self.inner, len)
    }

    pub fn get_ref(&self) -> &R {
        self.inner.get_ref()
    }

    /// Bytes already read from the stream and not yet taken: the peer sent
    /// more than one frame at once.
    pub fn has_buffered(&self) -> bool {
        !self.inner.buffer().is_empty()
    }

    /// Whether the next frame is already read whole: taking it needs no
    /// wait on the stream.
    pub fn frame_buffered(&self) -> bool {
        let buffered = self.inner.buffer();
        match buffered.get(..4) {
            Some(header) => {
                let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
                buffered.len() - 4 >= len as usize
            }
            None => false,
        }
    }

    /// The stream under the read buffer, for writes on a connection that
    /// both reads and writes through this reader.
    pub fn get_mut(&mut self) -> &mut R {
        self.inner.get_mut()
    }
}

/// The bytes under the frames, for raw bodies (`file::read_body`).
impl<R: Read> Read for FrameReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf)
    }
}

/// A stream whose reads can be given a deadline (see `net::Paced`).
pub trait Deadline {
    fn set_deadline(&mut self, deadline: Option<Instant>);
}

/// The most of a payload read at once by `FrameReader::payload_by`.
pub const ADMIT_PIECE: usize = 64 * 1024;

impl<R: Read + Deadline> FrameReader<R> {
    /// Reads the `len` bytes of a payload whose header has arrived, all by
    /// `deadline`, in pieces of at most `ADMIT_PIECE` bytes: once a piece's
    /// first byte is there, `admit(n)` is called before its `n` bytes are
    /// read, so that a caller can take room for them as they arrive (and
    /// wait for it: time spent in `admit` moves the deadline back).
    pub fn payload_by(
        &mut self,
        len: usize,
        deadline: Instant,
        admit: impl FnMut(usize),
    ) -> Result<Vec<u8>, FrameError> {
        let mut payload = Vec::with_capacity(len.min(INITIAL_PAYLOAD_CAPACITY));
        self.payload_into_by(len, deadline, &mut payload, admit)?;
        Ok(payload)
    }

    /// `payload_by` into `payload`, which is cleared first (its allocation
    /// is kept: a relay passes the same few buffers around).
    pub fn payload_into_by(
        &mut self,
        len: usize,
        deadline: Instant,
        payload: &mut Vec<u8>,
        mut admit: impl FnMut(usize),
    ) -> Result<(), FrameError> {
        let mut deadline = deadline;
        payload.clear();
        let read = loop {
            if payload.len() == len {
                break Ok(());
            }
            self.get_mut().set_deadline(Some(deadline));
            match self.inner.fill_buf() {
                Ok([]) => {
                    break Err(FrameError::Truncated {
                        expected: len + 4,
                        got: payload.len() + 4,
                    })
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if is_timeout(&e) => break Err(FrameError::Timeout { mid_frame: true }),
                Err(e) => break Err(FrameError::Io(e)),
            }
            let piece = (len - payload.len()).min(ADMIT_PIECE);
            let admitting = Instant::now();
            admit(piece);
            deadline += admitting.elapsed();
            self.get_mut().set_deadline(Some(deadline));
            match read_payload_into(&mut self.inner, piece, payload) {
                Ok(()) => {}
                // What arrived of the piece stays in `payload`.
                Err(FrameError::Truncated { .. }) => {
                    break Err(FrameError::Truncated {
                        expected: len + 4,
                        got: payload.len() + 4,
                    })
                }
                Err(e) => break Err(e),
            }
        };
        self.get_mut().set_deadline(None);
        read
    }
}

/// A buffered stream with a deadline sets it on the stream below.
impl<R: Read + Deadline> Deadline for BufReader<R> {
    fn set_deadline(&mut self, deadline: Option<Instant>) {
        self.get_mut().set_deadline(deadline);
    }
}

/// Writes frames to one half of a stream.
pub struct FrameWriter<W: Write> {
    inner: BufWriter<W>,
}

impl<W: Write> FrameWriter<W> {
    pub fn new(inner: W) -> Self {
        FrameWriter {
            inner: BufWriter::new(inner),
        }
    }

    /// A raw frame: the body announced by the message before it.
    pub fn body(&mut self, bytes: &[u8]) -> io::Result<()> {
        write_frame(&mut self.inner, bytes)
    }
}
