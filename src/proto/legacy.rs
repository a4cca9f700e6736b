//! The original Python system's wire format, spoken for interoperability
//! (see PROTOCOL.md, "Original format"). No framing: JSON objects are simply
//! concatenated on the stream, written by Python's `json.dumps`.
//!
//! - client -> balancer: `{"titolo": .., "contenuto": .., "request_type": "file_di_testo"}`
//!   objects, one after another on one connection; nothing comes back.
//! - balancer -> server: the same object plus `"numero_richiesta": N`, one
//!   connection per document, no reply.
//! - balancer -> server status probe: `{"request_type": "richiesta_status"}`,
//!   answered by exactly one byte, 0x00 (fine) or 0x01 (overloaded).
//!
//! A connection speaks this format when its first byte is `{`; a framed
//! connection starts with a length prefix, whose first byte is `{` (0x7B)
//! only for frames of almost 2 GiB, far above any maximum.

use super::{Deadline, Document};
use serde_json::Value;
use std::cell::Cell;
use std::fmt;
use std::io::{self, Read};
use std::rc::Rc;
use std::time::{Duration, Instant};

/// The request type of a document.
pub const DOCUMENT_TYPE: &str = "file_di_testo";
/// The status probe, byte for byte as the original balancer sends it.
pub const STATUS_PROBE: &[u8] = br#"{"request_type": "richiesta_status"}"#;

/// Whether a connection whose first byte is `first` speaks this format.
pub fn is_legacy(first: u8) -> bool {
    first == b'{'
}

/// One request in the original format.
#[derive(Debug, Clone, PartialEq)]
pub enum LegacyRequest {
    Document {
        doc: Document,
        request_number: Option<u64>,
    },
    /// The original server treats every other request type as a status
    /// probe; so do we.
    Status,
}

#[derive(Debug)]
pub enum LegacyError {
    /// Not JSON, or a JSON value that is not an object: the stream cannot be
    /// resynchronised.
    InvalidJson(String),
    /// A `file_di_testo` object without string `titolo` and `contenuto`.
    BadDocument(String),
    /// One object is larger than the maximum.
    TooLarge(usize),
    /// The stream ended inside an object.
    Truncated,
    /// No byte within the read timeout: `mid_object` tells a peer that
    /// began an object and did not finish it in time from an idle one.
    Timeout {
        mid_object: bool,
    },
    Io(io::Error),
}

impl fmt::Display for LegacyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LegacyError::InvalidJson(e) => write!(f, "invalid JSON in original-format stream: {e}"),
            LegacyError::BadDocument(e) => write!(f, "malformed original-format document: {e}"),
            LegacyError::TooLarge(max) => {
                write!(f, "original-format object larger than {max} bytes")
            }
            LegacyError::Truncated => f.write_str("connection closed in the middle of an object"),
            LegacyError::Timeout { mid_object: true } => {
                f.write_str("an object did not arrive whole within --frame-timeout")
            }
            LegacyError::Timeout { mid_object: false } => f.write_str("idle for too long"),
            LegacyError::Io(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for LegacyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            LegacyError::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl LegacyError {
    /// Whether the stream is still in step after this error.
    pub fn is_recoverable(&self) -> bool {
        matches!(self, LegacyError::BadDocument(_))
    }
}

/// Interprets one JSON object of the original format.
pub fn parse(value: Value) -> Result<LegacyRequest, LegacyError> {
    let Value::Object(mut object) = value else {
        return Err(LegacyError::InvalidJson("expected a JSON object".into()));
    };
    if object.get("request_type").and_then(Value::as_str) != Some(DOCUMENT_TYPE) {
        return Ok(LegacyRequest::Status);
    }
    let mut text = |key: &str| match object.remove(key) {
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(LegacyError::BadDocument(format!("`{key}` is not a string"))),
        None => Err(LegacyError::BadDocument(format!("missing `{key}`"))),
    };
    let title = text("titolo")?;
    let content = text("contenuto")?;
    let request_number = match object.get("numero_richiesta") {
        None | Some(Value::Null) => None,
        Some(v) => Some(v.as_u64().ok_or_else(|| {
            LegacyError::BadDocument("`numero_richiesta` is not a whole number".into())
        })?),
    };
    Ok(LegacyRequest::Document {
        doc: Document { title, content },
        request_number,
    })
}

/// Where the reading of the current object stands; reset between objects.
struct Progress {
    /// Bytes it may still take.
    remaining: Cell<usize>,
    /// Whether its first byte (whitespace aside) has arrived.
    begun: Cell<bool>,
    /// Its deadline when known before it begins: the first object's.
    due: Cell<Option<Instant>>,
    /// A deadline to set on the stream before its next read.
    pending: Cell<Option<Option<Instant>>>,
}

/// How long an object may take to arrive once begun, and how to tell the
/// stream (see `LegacyReader::paced`).
struct Pace<R> {
    limit: Duration,
    set: fn(&mut R, Option<Instant>),
}

/// A reader that refuses to give more than a budget of bytes (reset
/// between objects), and, when paced, gives each object its deadline once
/// its first byte arrives.
struct Budgeted<R> {
    inner: R,
    progress: Rc<Progress>,
    pace: Option<Pace<R>>,
}

impl<R: Read> Read for Budgeted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let progress = &self.progress;
        let remaining = progress.remaining.get();
        if remaining == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, OverBudget));
        }
        if let (Some(pace), Some(deadline)) = (&self.pace, progress.pending.take()) {
            (pace.set)(&mut self.inner, deadline);
        }
        let n = buf.len().min(remaining);
        let got = self.inner.read(&mut buf[..n])?;
        progress.remaining.set(remaining - got);
        if !progress.begun.get() && buf[..got].iter().any(|b| !b.is_ascii_whitespace()) {
            progress.begun.set(true);
            if let Some(pace) = &self.pace {
                let deadline = progress
                    .due
                    .get()
                    .unwrap_or_else(|| Instant::now() + pace.limit);
                (pace.set)(&mut self.inner, Some(deadline));
            }
        }
        Ok(got)
    }
}

#[derive(Debug)]
struct OverBudget;
impl fmt::Display for OverBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("object too large")
    }
}
impl std::error::Error for OverBudget {}

/// Reads the concatenated JSON objects of an original-format stream, however
/// they are split across reads.
pub struct LegacyReader<R: Read> {
    values: serde_json::StreamDeserializer<'static, serde_json::de::IoRead<Budgeted<R>>, Value>,
    progress: Rc<Progress>,
    max: usize,
}

impl<R: Read> LegacyReader<R> {
    /// `max` bounds the size of one object. `inner` should be buffered: the
    /// JSON reader asks for one byte at a time.
    pub fn new(inner: R, max: usize) -> Self {
        Self::with_pace(inner, max, None, None)
    }

    fn with_pace(inner: R, max: usize, pace: Option<Pace<R>>, first_by: Option<Instant>) -> Self {
        let progress = Rc::new(Progress {
            remaining: Cell::new(max),
            begun: Cell::new(false),
            due: Cell::new(first_by),
            pending: Cell::new(first_by.map(Some)),
        });
        let reader = Budgeted {
            inner,
            progress: progress.clone(),
            pace,
        };
        LegacyReader {
            values: serde_json::Deserializer::from_reader(reader).into_iter(),
            progress,
            max,
        }
    }
}

impl<R: Read + Deadline> LegacyReader<R> {
    /// Like `new`, with deadlines: the first object must arrive whole by
    /// `first_by`, and each later one within `limit` of its first byte.
    /// Between objects only the stream's own read timeout applies (the
    /// original client keeps one connection for a whole session).
    pub fn paced(inner: R, max: usize, limit: Duration, first_by: Instant) -> Self {
        let pace = Pace {
            limit,
            set: |stream: &mut R, deadline| stream.set_deadline(deadline),
        };
        Self::with_pace(inner, max, Some(pace), Some(first_by))
    }
}

impl<R: Read> Iterator for LegacyReader<R> {
    type Item = Result<LegacyRequest, LegacyError>;

    fn next(&mut self) -> Option<Self::Item> {
        let progress = &self.progress;
        progress.remaining.set(self.max);
        let item = match self.values.next() {
            None => None,
            Some(Ok(value)) => Some(parse(value)),
            Some(Err(e)) if e.is_io() => {
                let io_err = io::Error::from(e);
                Some(Err(
                    if io_err
                        .get_ref()
                        .is_some_and(|inner| inner.is::<OverBudget>())
                    {
                        LegacyError::TooLarge(self.max)
                    } else if matches!(
                        io_err.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) {
                        LegacyError::Timeout {
                            mid_object: progress.begun.get(),
                        }
                    } else {
                        LegacyError::Io(io_err)
                    },
                ))
            }
            Some(Err(e)) if e.is_eof() => Some(Err(LegacyError::Truncated)),
            Some(Err(e)) => Some(Err(LegacyError::InvalidJson(e.to_string()))),
        };
        // The next object has no deadline until its first byte arrives.
        progress.begun.set(false);
        progress.due.set(None);
        progress.pending.set(Some(None));
        item
    }
}

/// Serialises a document exactly as the original programs do with
/// `json.dumps`: keys in insertion order, `", "` and `": "` separators,
/// every non-ASCII character escaped as `\uXXXX`.
pub fn dumps_document(doc: &Document, request_number: Option<u64>) -> String {
    let mut out = String::with_capacity(doc.content.len() + doc.title.len() + 96);
    out.push_str("{\"titolo\": ");
    push_python_str(&mut out, &doc.title);
    out.push_str(", \"contenuto\": ");
    push_python_str(&mut out, &doc.content);
    out.push_str(", \"request_type\": \"file_di_testo\"");
    if let Some(n) = request_number {
        out.push_str(&format!(", \"numero_richiesta\": {n}"));
    }
    out.push('}');
    out
}

/// A JSON string as Python's `json.dumps` writes it (`ensure_ascii=True`).
fn push_python_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            ' '..='~' => out.push(c),
            _ => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
        }
    }
    out.push('"');
}

/// The file name the original server gives a document.
pub fn original_file_name(request_number: u64, title: &str) -> String {
    format!("{request_number}_{title}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(title: &str, content: &str) -> Document {
        Document {
            title: title.into(),
            content: content.into(),
        }
    }

    #[test]
    fn dumps_matches_python() {
        // python3 -c 'import json; print(json.dumps({"titolo": "Città", "contenuto": "è\n\"q\" 😀\x7f", "request_type": "file_di_testo", "numero_richiesta": 3}))'
        let text = dumps_document(&doc("Città", "è\n\"q\" 😀\u{7f}"), Some(3));
        assert_eq!(
            text,
            r#"{"titolo": "Citt\u00e0", "contenuto": "\u00e8\n\"q\" \ud83d\ude00\u007f", "request_type": "file_di_testo", "numero_richiesta": 3}"#
        );
        let back: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(back["contenuto"], "è\n\"q\" 😀\u{7f}");
    }

    #[test]
    fn reads_concatenated_objects_split_anywhere() {
        let a = dumps_document(&doc("a", &"x".repeat(5000)), None);
        let b = dumps_document(&doc("b", "y"), Some(2));
        let stream = format!("{a}{b}{}", std::str::from_utf8(STATUS_PROBE).unwrap());
        // A reader that returns at most 7 bytes per call.
        struct Trickle<'a>(&'a [u8]);
        impl Read for Trickle<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                let n = buf.len().min(7).min(self.0.len());
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let items: Vec<_> = LegacyReader::new(Trickle(stream.as_bytes()), 1 << 20)
            .map(|r| r.unwrap())
            .collect();
        assert_eq!(items.len(), 3);
        assert!(
            matches!(&items[0], LegacyRequest::Document { doc, request_number: None } if doc.content.len() == 5000)
        );
        assert!(matches!(
            &items[1],
            LegacyRequest::Document {
                request_number: Some(2),
                ..
            }
        ));
        assert_eq!(items[2], LegacyRequest::Status);
    }

    /// Gives its bytes, then times out; records the deadlines it is given.
    struct Recorded<'a> {
        bytes: &'a [u8],
        deadlines: Rc<std::cell::RefCell<Vec<Option<Instant>>>>,
    }

    impl Read for Recorded<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.bytes.is_empty() {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            self.bytes.read(buf)
        }
    }

    impl Deadline for Recorded<'_> {
        fn set_deadline(&mut self, deadline: Option<Instant>) {
            self.deadlines.borrow_mut().push(deadline);
        }
    }

    #[test]
    fn paced_objects_get_their_deadline_at_their_first_byte() {
        let deadlines = Rc::new(std::cell::RefCell::new(Vec::new()));
        let stream = Recorded {
            bytes: br#"{"request_type": "x"}  {"request_type": "#,
            deadlines: deadlines.clone(),
        };
        let first_by = Instant::now() + Duration::from_secs(5);
        let limit = Duration::from_secs(60);
        let mut reader = LegacyReader::paced(stream, 1024, limit, first_by);
        assert_eq!(reader.next().unwrap().unwrap(), LegacyRequest::Status);
        // The first object is due by `first_by`, from the start.
        assert_eq!(deadlines.borrow()[..], [Some(first_by), Some(first_by)]);
        // The second one begun and not finished: a stall, not idleness.
        let started = Instant::now();
        assert!(matches!(
            reader.next(),
            Some(Err(LegacyError::Timeout { mid_object: true }))
        ));
        let set = deadlines.borrow()[2..].to_vec();
        assert_eq!(set[0], None, "no deadline between objects");
        assert!(set[1].is_some_and(|d| d >= started + limit), "{set:?}");

        let stream = Recorded {
            bytes: br#"{"request_type": "x"} "#,
            deadlines: deadlines.clone(),
        };
        let mut reader = LegacyReader::paced(stream, 1024, limit, first_by);
        assert!(reader.next().unwrap().is_ok());
        assert!(matches!(
            reader.next(),
            Some(Err(LegacyError::Timeout { mid_object: false }))
        ));
    }

    #[test]
    fn errors() {
        let mut r = LegacyReader::new(
            &br#"{"request_type": "file_di_testo", "titolo": "t"}"#[..],
            1024,
        );
        assert!(matches!(r.next(), Some(Err(LegacyError::BadDocument(_)))));
        let mut r = LegacyReader::new(&br#"{"titolo": "t", "cont"#[..], 1024);
        assert!(matches!(r.next(), Some(Err(LegacyError::Truncated))));
        let mut r = LegacyReader::new(&b"{nope}"[..], 1024);
        assert!(matches!(r.next(), Some(Err(LegacyError::InvalidJson(_)))));
        let big = dumps_document(&doc("t", &"z".repeat(2000)), None);
        let mut r = LegacyReader::new(big.as_bytes(), 1024);
        assert!(matches!(r.next(), Some(Err(LegacyError::TooLarge(1024)))));
        assert!(LegacyReader::new(&b"  "[..], 1024).next().is_none());
    }
}
