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

use super::Document;
use serde_json::Value;
use std::cell::Cell;
use std::fmt;
use std::io::{self, Read};
use std::rc::Rc;

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

/// A reader that refuses to give more than a budget of bytes; the budget is
/// reset between objects.
struct Budgeted<R> {
    inner: R,
    remaining: Rc<Cell<usize>>,
}

impl<R: Read> Read for Budgeted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let remaining = self.remaining.get();
        if remaining == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, OverBudget));
        }
        let n = buf.len().min(remaining);
        let got = self.inner.read(&mut buf[..n])?;
        self.remaining.set(remaining - got);
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
    remaining: Rc<Cell<usize>>,
    max: usize,
}

impl<R: Read> LegacyReader<R> {
    /// `max` bounds the size of one object. `inner` should be buffered: the
    /// JSON reader asks for one byte at a time.
    pub fn new(inner: R, max: usize) -> Self {
        let remaining = Rc::new(Cell::new(max));
        let reader = Budgeted {
            inner,
            remaining: remaining.clone(),
        };
        LegacyReader {
            values: serde_json::Deserializer::from_reader(reader).into_iter(),
            remaining,
            max,
        }
    }
}

impl<R: Read> Iterator for LegacyReader<R> {
    type Item = Result<LegacyRequest, LegacyError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.remaining.set(self.max);
        let item = match self.values.next()? {
            Ok(value) => parse(value),
            Err(e) if e.is_io() => {
                let io_err = io::Error::from(e);
                if io_err
                    .get_ref()
                    .is_some_and(|inner| inner.is::<OverBudget>())
                {
                    Err(LegacyError::TooLarge(self.max))
                } else {
                    Err(LegacyError::Io(io_err))
                }
            }
            Err(e) if e.is_eof() => Err(LegacyError::Truncated),
            Err(e) => Err(LegacyError::InvalidJson(e.to_string())),
        };
        Some(item)
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
