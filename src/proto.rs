//! The wire. This module is the only place that knows how bytes on a socket
//! become messages and back.
//!
//! A frame is a `u32` big-endian length followed by that many bytes. A
//! message is one frame holding UTF-8 JSON with a `"type"` tag. The length is
//! checked against a maximum before anything is allocated. A message may
//! announce a binary body with `"body_len": N`; the body then travels as the
//! next frame, raw. No message uses a body yet, but the reader and writer here
//! already carry raw frames, so streamed files can be added without touching
//! the framing.
//!
//! Every request carries an `id` chosen by the sender; the reply to it echoes
//! the same `id`, so one connection can carry many requests in flight.
//! Italian field names (`titolo`, `contenuto`, `numero_richiesta`) exist only
//! on the wire, for continuity with the original system.

pub mod legacy;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

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

impl std::error::Error for FrameError {}

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
impl std::error::Error for PartialRead {}

fn partial_count(e: &io::Error) -> usize {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<PartialRead>())
        .map_or(0, |p| p.0)
}

/// Reads one frame. `Ok(None)` is a clean end of stream between frames.
pub fn read_frame(r: &mut impl Read, max: usize) -> Result<Option<Vec<u8>>, FrameError> {
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
    let len = len as usize;
    let mut payload = vec![0u8; len];
    let got = read_full(r, &mut payload).map_err(|e| {
        if is_timeout(&e) {
            FrameError::Timeout { mid_frame: true }
        } else {
            FrameError::Io(e)
        }
    })?;
    if got < len {
        return Err(FrameError::Truncated {
            expected: len + 4,
            got: got + 4,
        });
    }
    Ok(Some(payload))
}

/// Writes one frame and flushes it.
pub fn write_frame(w: &mut impl Write, payload: &[u8]) -> io::Result<()> {
    let len = u32::try_from(payload.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "frame longer than 4 GiB"))?;
    w.write_all(&len.to_be_bytes())?;
    w.write_all(payload)?;
    w.flush()
}

/// Serialises a message to its frame payload.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    // Serialising our own types to a Vec cannot fail: no maps with non-string
    // keys, no custom Serialize impls that error.
    serde_json::to_vec(msg).expect("protocol messages always serialise")
}

/// A message family that can be decoded from a frame: requests or replies.
pub trait Message: DeserializeOwned + Serialize {
    /// The `"type"` values of this family, to tell an unknown type apart from
    /// a malformed known one.
    const TYPES: &'static [&'static str];
}

/// Why a well-framed payload is not a valid message. The stream is still in
/// step, so the connection stays open and this becomes an error reply.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodeError {
    /// The request id, when the payload got far enough to show one.
    pub id: Option<u64>,
    pub code: ErrorCode,
    pub message: String,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for DecodeError {}

impl From<DecodeError> for ErrorReply {
    fn from(e: DecodeError) -> Self {
        ErrorReply {
            id: e.id,
            code: e.code,
            message: e.message,
        }
    }
}

/// Decodes a frame payload into a message of family `T`.
pub fn decode<T: Message>(payload: &[u8]) -> Result<T, DecodeError> {
    let err = |id, code, message: String| DecodeError { id, code, message };
    let text = std::str::from_utf8(payload).map_err(|e| {
        err(
            None,
            ErrorCode::InvalidUtf8,
            format!("payload is not valid UTF-8 ({e})"),
        )
    })?;
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| {
        err(
            None,
            ErrorCode::InvalidJson,
            format!("payload is not valid JSON ({e})"),
        )
    })?;
    let Some(object) = value.as_object() else {
        return Err(err(
            None,
            ErrorCode::InvalidJson,
            "payload is JSON but not an object".into(),
        ));
    };
    let id = object.get("id").and_then(|v| v.as_u64());
    let kind = match object.get("type") {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(_) => {
            return Err(err(
                id,
                ErrorCode::BadRequest,
                "field `type` must be a string".into(),
            ))
        }
        None => {
            return Err(err(
                id,
                ErrorCode::BadRequest,
                "missing field `type`".into(),
            ))
        }
    };
    if !T::TYPES.contains(&kind.as_str()) {
        return Err(err(
            id,
            ErrorCode::UnknownType,
            format!(
                "unknown message type `{}` (expected one of: {})",
                truncate(&kind, 64),
                T::TYPES.join(", ")
            ),
        ));
    }
    serde_json::from_value(value).map_err(|e| {
        err(
            id,
            ErrorCode::BadRequest,
            format!("malformed `{kind}` message: {e}"),
        )
    })
}

/// Shortens untrusted text for error messages and logs.
pub fn truncate(s: &str, max_chars: usize) -> String {
    match s.char_indices().nth(max_chars) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// The name a unit enum variant has on the wire, so that logs and messages
/// match what peers see.
fn wire_name<T: Serialize>(value: &T) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// A document as it travels: title and content.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Document {
    #[serde(rename = "titolo")]
    pub title: String,
    #[serde(rename = "contenuto")]
    pub content: String,
}

/// Store a document. The balancer fills `request_number` before forwarding;
/// a client leaves it out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoreRequest {
    pub id: u64,
    #[serde(flatten)]
    pub doc: Document,
    #[serde(
        rename = "numero_richiesta",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub request_number: Option<u64>,
}

/// Requests: client -> balancer, and balancer -> server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    /// Store a document (balanced over the servers).
    Store(StoreRequest),
    /// Compute an operation on two random numbers (balanced like `store`).
    Calc {
        id: u64,
        #[serde(rename = "operazione")]
        operation: Operation,
    },
    /// A server's status (servers only).
    Status { id: u64 },
    /// Every server with its health and last status (balancer only).
    Servers { id: u64 },
}

impl Request {
    pub fn id(&self) -> u64 {
        match self {
            Request::Store(r) => r.id,
            Request::Calc { id, .. } | Request::Status { id } | Request::Servers { id } => *id,
        }
    }
}

impl Message for Request {
    const TYPES: &'static [&'static str] = &["store", "calc", "status", "servers"];
}

/// A document has been written to disk on a server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stored {
    pub id: u64,
    /// Address of the server that holds the document.
    pub server: String,
    #[serde(rename = "numero_richiesta")]
    pub request_number: u64,
    /// File name inside the server's storage folder.
    pub file: String,
    /// Count of letters `a` and `A` in the content.
    pub a_count: u64,
}

/// A server's view of itself: load, resources, storage.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub id: u64,
    pub overloaded: bool,
    /// Documents being stored right now (active transfers).
    pub active: u64,
    pub max_active: u64,
    /// Resident memory of the server process, in bytes.
    pub memory_bytes: u64,
    pub max_memory_bytes: u64,
    /// CPU use of the whole machine, in percent.
    pub cpu_percent: f32,
    /// Memory of the whole machine, in bytes.
    pub memory_used_bytes: u64,
    pub memory_total_bytes: u64,
    /// The disk holding the storage folder, in bytes.
    pub disk_used_bytes: u64,
    pub disk_free_bytes: u64,
    /// Bytes received and sent on all network interfaces since the server
    /// started.
    pub net_rx_bytes: u64,
    pub net_tx_bytes: u64,
    pub uptime_secs: u64,
    pub files_stored: u64,
}

/// The four operations of the compute service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    Somma,
    Sottrazione,
    Moltiplicazione,
    Divisione,
}

impl Operation {
    pub const ALL: [Operation; 4] = [
        Operation::Somma,
        Operation::Sottrazione,
        Operation::Moltiplicazione,
        Operation::Divisione,
    ];

    /// Applies the operation; division gives a decimal.
    pub fn apply(self, a: i64, b: i64) -> f64 {
        let (a, b) = (a as f64, b as f64);
        match self {
            Operation::Somma => a + b,
            Operation::Sottrazione => a - b,
            Operation::Moltiplicazione => a * b,
            Operation::Divisione => a / b,
        }
    }

    pub fn symbol(self) -> char {
        match self {
            Operation::Somma => '+',
            Operation::Sottrazione => '-',
            Operation::Moltiplicazione => '×',
            Operation::Divisione => '÷',
        }
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&wire_name(self))
    }
}

/// The answer of the compute service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Computed {
    pub id: u64,
    /// Address of the server that computed it.
    pub server: String,
    #[serde(rename = "A")]
    pub a: i64,
    #[serde(rename = "B")]
    pub b: i64,
    #[serde(rename = "operazione")]
    pub operation: Operation,
    #[serde(rename = "risultato")]
    pub result: f64,
}

/// One server as the balancer sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerView {
    pub name: String,
    /// `unknown`, `up`, `overloaded` or `down`.
    pub state: String,
    /// Requests sent to it and not yet answered.
    pub in_flight: u64,
    /// Its last status report, if a probe has ever succeeded.
    pub status: Option<StatusReport>,
    /// How long the last status probe took, in milliseconds.
    pub check_ms: Option<f64>,
}

/// The balancer's list of servers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerList {
    pub id: u64,
    pub servers: Vec<ServerView>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    FrameTooLarge,
    InvalidUtf8,
    InvalidJson,
    UnknownType,
    BadRequest,
    Timeout,
    NoServer,
    ServerFailed,
    Storage,
    Internal,
}

impl ErrorCode {
    /// Whether the same request may succeed on another server: true for
    /// failures of the server, false for faults in the request itself.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::Storage | ErrorCode::ServerFailed | ErrorCode::Internal | ErrorCode::Timeout
        )
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&wire_name(self))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorReply {
    /// The id of the failed request; absent when the request could not be
    /// read far enough to know it.
    pub id: Option<u64>,
    pub code: ErrorCode,
    pub message: String,
}

/// Replies: server -> balancer, and balancer -> client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Reply {
    Stored(Stored),
    Calc(Computed),
    Status(StatusReport),
    Servers(ServerList),
    Error(ErrorReply),
}

impl Reply {
    pub fn id(&self) -> Option<u64> {
        match self {
            Reply::Stored(r) => Some(r.id),
            Reply::Calc(r) => Some(r.id),
            Reply::Status(r) => Some(r.id),
            Reply::Servers(r) => Some(r.id),
            Reply::Error(r) => r.id,
        }
    }

    pub fn error(id: Option<u64>, code: ErrorCode, message: impl Into<String>) -> Reply {
        Reply::Error(ErrorReply {
            id,
            code,
            message: message.into(),
        })
    }
}

impl Message for Reply {
    const TYPES: &'static [&'static str] = &["stored", "calc", "status", "servers", "error"];
}

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

impl std::error::Error for CallError {}

impl From<io::Error> for CallError {
    fn from(e: io::Error) -> Self {
        CallError::Frame(FrameError::Io(e))
    }
}

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

    /// Next message of family `T`. The outer error closes the stream; the
    /// inner one is a bad message on a stream that is still in step.
    pub fn message<T: Message>(&mut self) -> Result<Option<Result<T, DecodeError>>, FrameError> {
        Ok(self.frame()?.map(|payload| decode(&payload)))
    }

    pub fn get_ref(&self) -> &R {
        self.inner.get_ref()
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

    pub fn message<T: Serialize>(&mut self, msg: &T) -> io::Result<()> {
        write_frame(&mut self.inner, &encode(msg))
    }
}

/// A request/response connection over any byte stream (TCP now, TLS later).
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
        write_frame(self.reader.inner.get_mut(), &encode(msg))
    }

    pub fn recv<T: Message>(&mut self) -> Result<T, CallError> {
        match self.reader.message::<T>() {
            Ok(Some(Ok(msg))) => Ok(msg),
            Ok(Some(Err(e))) => Err(CallError::Decode(e)),
            Ok(None) => Err(CallError::Closed),
            Err(e) => Err(CallError::Frame(e)),
        }
    }

    /// Sends a request and waits for its reply.
    pub fn call(&mut self, request: &Request) -> Result<Reply, CallError> {
        self.send(request)?;
        self.recv()
    }

    pub fn get_ref(&self) -> &S {
        self.reader.get_ref()
    }
}

/// Opens a TCP connection with a connect timeout and read/write timeouts.
pub fn connect(
    addr: &std::net::SocketAddr,
    connect_timeout: Duration,
    io_timeout: Duration,
) -> io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(addr, connect_timeout)?;
    stream.set_read_timeout(Some(io_timeout))?;
    stream.set_write_timeout(Some(io_timeout))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(payload: &[u8]) -> Vec<u8> {
        let mut v = (payload.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn frame_round_trip() {
        let mut buf = Vec::new();
        write_frame(&mut buf, b"hello").unwrap();
        assert_eq!(buf, framed(b"hello"));
        let mut r = &buf[..];
        assert_eq!(read_frame(&mut r, 16).unwrap().unwrap(), b"hello");
        assert!(read_frame(&mut r, 16).unwrap().is_none());
    }

    #[test]
    fn oversized_length_is_refused_before_allocating() {
        let bytes = u32::MAX.to_be_bytes();
        match read_frame(&mut &bytes[..], 1024) {
            Err(FrameError::TooLarge { len, max }) => {
                assert_eq!(len, u32::MAX as u64);
                assert_eq!(max, 1024);
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
    }

    #[test]
    fn truncated_header_and_body() {
        assert!(matches!(
            read_frame(&mut &[0u8, 0][..], 16),
            Err(FrameError::Truncated {
                expected: 4,
                got: 2
            })
        ));
        let mut bytes = framed(b"abcdef");
        bytes.truncate(7);
        assert!(matches!(
            read_frame(&mut &bytes[..], 16),
            Err(FrameError::Truncated {
                expected: 10,
                got: 7
            })
        ));
    }

    #[test]
    fn store_request_wire_shape() {
        let req = Request::Store(StoreRequest {
            id: 7,
            doc: Document {
                title: "Città".into(),
                content: "àa".into(),
            },
            request_number: None,
        });
        let json: serde_json::Value = serde_json::from_slice(&encode(&req)).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"type": "store", "id": 7, "titolo": "Città", "contenuto": "àa"})
        );
        assert_eq!(decode::<Request>(&encode(&req)).unwrap(), req);
    }

    #[test]
    fn decode_errors_are_classified() {
        let e = decode::<Request>(b"\xff\xfe").unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidUtf8);
        let e = decode::<Request>(b"{not json").unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidJson);
        let e = decode::<Request>(b"[1,2]").unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidJson);
        let e = decode::<Request>(br#"{"type":"delete","id":3}"#).unwrap_err();
        assert_eq!((e.code, e.id), (ErrorCode::UnknownType, Some(3)));
        let e = decode::<Request>(br#"{"type":"store","id":4,"titolo":"x"}"#).unwrap_err();
        assert_eq!((e.code, e.id), (ErrorCode::BadRequest, Some(4)));
        assert!(e.message.contains("contenuto"), "{}", e.message);
        let e = decode::<Request>(br#"{"id":5}"#).unwrap_err();
        assert_eq!((e.code, e.id), (ErrorCode::BadRequest, Some(5)));
    }

    #[test]
    fn calc_wire_shape() {
        let req = decode::<Request>(br#"{"type":"calc","id":2,"operazione":"divisione"}"#).unwrap();
        assert_eq!(
            req,
            Request::Calc {
                id: 2,
                operation: Operation::Divisione
            }
        );
        let e = decode::<Request>(br#"{"type":"calc","id":3,"operazione":"potenza"}"#).unwrap_err();
        assert_eq!((e.code, e.id), (ErrorCode::BadRequest, Some(3)));
        assert!(
            e.message.contains("potenza") && e.message.contains("somma"),
            "{}",
            e.message
        );
        let reply = Reply::Calc(Computed {
            id: 2,
            server: "s".into(),
            a: 7,
            b: 2,
            operation: Operation::Divisione,
            result: Operation::Divisione.apply(7, 2),
        });
        let json: serde_json::Value = serde_json::from_slice(&encode(&reply)).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"type": "calc", "id": 2, "server": "s", "A": 7, "B": 2,
                               "operazione": "divisione", "risultato": 3.5})
        );
    }

    #[test]
    fn decimal_results_survive_the_wire_exactly() {
        for (a, b) in [(6, 26), (1, 3), (49, 47), (22, 7)] {
            let reply = Reply::Calc(Computed {
                id: 1,
                server: "s".into(),
                a,
                b,
                operation: Operation::Divisione,
                result: Operation::Divisione.apply(a, b),
            });
            assert_eq!(decode::<Reply>(&encode(&reply)).unwrap(), reply);
        }
    }

    #[test]
    fn operations() {
        assert_eq!(Operation::Somma.apply(3, 4), 7.0);
        assert_eq!(Operation::Sottrazione.apply(3, 4), -1.0);
        assert_eq!(Operation::Moltiplicazione.apply(3, 4), 12.0);
        assert_eq!(Operation::Divisione.apply(3, 4), 0.75);
        assert_eq!(Operation::Moltiplicazione.to_string(), "moltiplicazione");
    }

    #[test]
    fn error_code_display_is_wire_name() {
        assert_eq!(ErrorCode::NoServer.to_string(), "no_server");
        assert!(ErrorCode::Storage.is_retryable());
        assert!(!ErrorCode::BadRequest.is_retryable());
    }
}
