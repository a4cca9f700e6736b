//! Messages: the JSON replies carried in frames, the document and the
//! other parts requests and replies share, and how a payload is decoded
//! into a message of a family (`Message`) with a precise error.

use super::file::{
    Chunk, Deleted, FileHeader, FileList, FileStored, InventoryReport, Redirect, UploadReady,
};
use serde::{Deserialize, Serialize};
use std::fmt;

use super::key::{ClientKey, HeldKey};
use super::kinds::kinds;

/// Serialises a message to its frame payload.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    // Serialising our own types to a Vec cannot fail: no maps with non-string
    // keys, no custom Serialize impls that error.
    serde_json::to_vec(msg).expect("protocol messages always serialise")
}

/// How many bytes `encode(msg)` makes, without making them: the client
/// checks a request against the frame limit before sending it.
pub fn encoded_len<T: Serialize>(msg: &T) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    serde_json::to_writer(&mut count, msg).expect("protocol messages always serialise");
    count.0
}

/// A message family that can be decoded from a frame: the requests one
/// kind of listener reads, or replies.
pub trait Message: Sized {
    /// The `"type"` values of this family, to tell an unknown type apart
    /// from a malformed known one.
    fn types() -> Vec<&'static str>;

    /// Decodes a payload the quickest way the family knows; an error sends
    /// it to `explain`, for a precise one.
    fn parse(payload: &[u8]) -> serde_json::Result<Self>;

    /// Decodes a JSON object whose `type` is `kind`, one of `types()`.
    fn parse_value(kind: &str, value: serde_json::Value) -> serde_json::Result<Self>;

    /// For a `type` this family does not take but another listener does:
    /// where it belongs.
    fn misdirected(_kind: &str) -> Option<String> {
        None
    }
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

/// Decodes a frame payload into a message of family `T`. A valid message
/// is parsed once, straight into `T`; only an invalid one goes through a
/// JSON value, to say precisely what is wrong with it.
pub fn decode<T: Message>(payload: &[u8]) -> Result<T, DecodeError> {
    T::parse(payload).or_else(|_| explain(payload))
}

/// Decodes an invalid payload step by step: UTF-8, JSON, an object, its
/// `type`, then the message, with the error of the first step that fails.
fn explain<T: Message>(payload: &[u8]) -> Result<T, DecodeError> {
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
    if let Some(refused) = not_taken::<T>(id, &kind) {
        return Err(refused);
    }
    T::parse_value(&kind, value).map_err(|e| {
        err(
            id,
            ErrorCode::BadRequest,
            format!("malformed `{kind}` message: {e}"),
        )
    })
}

/// The error for a `type` family `T` does not take: `bad_request` saying
/// where it belongs when another listener takes it, else `unknown_type`;
/// either lists the types `T` takes. `None` when `T` takes it.
fn not_taken<T: Message>(id: Option<u64>, kind: &str) -> Option<DecodeError> {
    let types = T::types();
    if types.contains(&kind) {
        return None;
    }
    let (code, said) = match T::misdirected(kind) {
        Some(elsewhere) => (ErrorCode::BadRequest, elsewhere),
        None => (
            ErrorCode::UnknownType,
            format!("unknown message type `{}`", truncate(kind, 64)),
        ),
    };
    let message = format!("{said} (expected one of: {})", types.join(", "));
    Some(DecodeError { id, code, message })
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
    /// The server already held this request number and did not store it
    /// again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub existing: bool,
    /// With `--replicas` above 1: every copy acknowledged (server and
    /// file), the first being `server` and `file`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub copies: Vec<CopyPlace>,
    /// Fewer copies than `--replicas` were made (`--min-replicas` allowed
    /// it); repair makes the rest once servers are back.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub under_replicated: bool,
}

/// Where one copy of a document or file is: a server and its name there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyPlace {
    pub server: String,
    pub file: String,
}

/// A server's view of itself: load, resources, storage.
///
/// Fields added after the first version have serde defaults, so reports of
/// older servers still parse; such a server is taken to be able to store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
    #[serde(deserialize_with = "f32_in_range")]
    pub cpu_percent: f32,
    /// CPU use of the server process, in percent of one core (above 100
    /// when it keeps several cores busy).
    #[serde(default, deserialize_with = "f32_in_range")]
    pub process_cpu_percent: f32,
    /// Memory of the whole machine, in bytes.
    pub memory_used_bytes: u64,
    pub memory_total_bytes: u64,
    /// The filesystem holding the storage folder, in bytes.
    pub disk_used_bytes: u64,
    pub disk_free_bytes: u64,
    /// At the last sample the server could create and remove a file in its
    /// storage folder, and the filesystem had room to spare. When false the
    /// balancer sends it no documents.
    #[serde(default = "yes")]
    pub storage_writable: bool,
    /// Bytes received and sent on all network interfaces since the server
    /// started.
    pub net_rx_bytes: u64,
    pub net_tx_bytes: u64,
    pub uptime_secs: u64,
    pub files_stored: u64,
}

fn yes() -> bool {
    true
}

/// An `f32` from a JSON number that fits in one. A plain cast would turn
/// 1e39 into infinity, which JSON cannot carry on (it is written as `null`),
/// so a report holding it would make every message it is passed on in
/// undecodable.
fn f32_in_range<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f32, D::Error> {
    let wide = f64::deserialize(d)?;
    let narrow = wide as f32;
    if narrow.is_finite() {
        Ok(narrow)
    } else {
        Err(serde::de::Error::custom(format!(
            "{wide} does not fit in a 32-bit float"
        )))
    }
}

impl Default for StatusReport {
    /// All zeros, and able to store: the same as a report of an older
    /// server that sends only zeros.
    fn default() -> Self {
        StatusReport {
            id: 0,
            overloaded: false,
            active: 0,
            max_active: 0,
            memory_bytes: 0,
            max_memory_bytes: 0,
            cpu_percent: 0.0,
            process_cpu_percent: 0.0,
            memory_used_bytes: 0,
            memory_total_bytes: 0,
            disk_used_bytes: 0,
            disk_free_bytes: 0,
            storage_writable: true,
            net_rx_bytes: 0,
            net_tx_bytes: 0,
            uptime_secs: 0,
            files_stored: 0,
        }
    }
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
    /// The balancer's id for it (ids are not reused while it runs).
    #[serde(default)]
    pub id: u32,
    pub name: String,
    /// `unknown`, `up`, `overloaded`, `down` or `draining`.
    pub state: String,
    /// Requests sent to it and not yet answered.
    pub in_flight: u64,
    /// Its last status report, if a probe has ever succeeded.
    pub status: Option<StatusReport>,
    /// How long the last status probe took, in milliseconds.
    pub check_ms: Option<f64>,
    /// Requests sent to it, and of those the ones that failed on it.
    #[serde(default)]
    pub requests: u64,
    #[serde(default)]
    pub failures: u64,
    /// How long ago `status` was received, in milliseconds: it is stale
    /// when the server is down.
    #[serde(default)]
    pub status_age_ms: Option<u64>,
}

/// The balancer's list of servers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerList {
    pub id: u64,
    pub servers: Vec<ServerView>,
    /// With `--replicas` above 1: what repair has done and has left.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repair: Option<RepairView>,
}

/// Repair's figures, in the balancer's answer to `servers`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepairView {
    /// Entries with fewer live copies than `--replicas` still.
    pub entries_left: u64,
    pub copies_made: u64,
    pub bytes_copied: u64,
}

/// One transfer (a document the balancer took) as its state file has it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TransferView {
    /// The request number (`numero_richiesta` on the servers).
    pub number: u64,
    /// The client's address.
    pub client: String,
    pub title: String,
    /// Content length in bytes.
    pub size: u64,
    /// Servers it was sent to, in order.
    pub servers: Vec<String>,
    /// `queued`, `sending`, `retried`, `stored` or `failed`.
    pub state: String,
    /// Where it was stored, once stored.
    pub server: Option<String>,
    /// Its file name on that server, once stored.
    pub file: Option<String>,
    /// Unix milliseconds: when the balancer received it.
    pub started_ms: u64,
    pub ended_ms: Option<u64>,
    pub duration_ms: Option<u64>,
    /// The last error (of a retry, or why it failed).
    pub error: Option<String>,
    /// The user who sent it (balancers with `--users`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The balancer that took it (its address), where balancers share
    /// their state; absent from older balancers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balancer: Option<String>,
}

/// The balancer's answer to `transfers`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TransferList {
    pub id: u64,
    pub transfers: Vec<TransferView>,
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
    /// The balancer is stopping; the request was not (or may not have been)
    /// carried out, as the message says.
    ShuttingDown,
    /// A server refused a document past its `not_after_ms`.
    Expired,
    /// A server is storing the same request number right now (or
    /// receiving the same upload on another connection).
    InProgress,
    /// No stored file has that name.
    NotFound,
    /// The bytes received do not have the checksum the client sent.
    ChecksumMismatch,
    /// More or fewer bytes arrived than the upload declared.
    SizeMismatch,
    /// A chunk does not start where the server's copy ends.
    BadOffset,
    /// A redirect ticket that is forged, expired or for another server.
    BadTicket,
    /// The request needs a login (`--users`) or a cluster handshake (a
    /// cluster key) first, or the credentials or proof were wrong.
    Unauthenticated,
    /// The user is logged in but may not do this (admin requests).
    Forbidden,
    /// A login refused without looking at the password: too many failed
    /// logins on the account or from the address (try again later), or
    /// the account is locked (an admin unlocks it).
    Throttled,
    /// A document is larger than the balancer's `--max-document-size`.
    TooLarge,
    /// The server's disk is full: nothing was stored; another server may
    /// have room.
    DiskFull,
    /// The balancer gave up on a document after it reached a server that
    /// never answered (it died, hung or was removed with the document on
    /// the wire): it may be stored there, as the message says.
    MaybeStored,
    /// `upload` with `no_clobber` of a name that is taken.
    Exists,
    /// Every server holding the file is down: the message names them.
    Unavailable,
    /// Fewer servers are up than `--replicas` asks copies of a document
    /// (and than `--min-replicas` allows): nothing was stored.
    TooFewServers,
}

impl ErrorCode {
    /// Whether the same request may succeed on another server: true for
    /// failures of the server, false for faults in the request itself.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::Storage
                | ErrorCode::DiskFull
                | ErrorCode::ServerFailed
                | ErrorCode::Internal
                | ErrorCode::Timeout
                | ErrorCode::Expired
                | ErrorCode::InProgress
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
    Transfers(TransferList),
    /// Answer to `forget`: how many stored copies were moved aside.
    Forgotten {
        id: u64,
        moved: u64,
    },
    /// Answer to `lookup`: the keys held, with their copies, and those
    /// being written right now (ask again).
    Keys {
        id: u64,
        held: Vec<HeldKey>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        busy: Vec<ClientKey>,
    },
    /// Answer to a membership request: what the balancer did.
    Membership {
        id: u64,
        message: String,
    },
    Error(ErrorReply),
    UploadReady(UploadReady),
    Redirect(Redirect),
    /// A chunk of a file being downloaded; its bytes follow as a raw frame.
    Chunk(Chunk),
    FileStored(FileStored),
    Files(FileList),
    File(FileHeader),
    /// Answer to `delete`.
    Deleted(Deleted),
    /// Answer to `inventory`.
    Inventory(InventoryReport),
    /// Answer to `fetch`: the copy is in place, its bytes checked.
    Fetched {
        id: u64,
        file: String,
        size: u64,
        sha256: String,
    },
    /// A `transfer_event` was recorded.
    Recorded {
        id: u64,
    },
    /// The responder's answer to `hello`: its own nonce, the address the
    /// connection reached it at, and its proof of the cluster key.
    Hello {
        id: u64,
        nonce: String,
        addr: String,
        proof: String,
    },
    /// A handshake or login succeeded. `user` and `admin` describe a
    /// logged-in user; both are absent after a cluster handshake.
    Welcome {
        id: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user: Option<String>,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        admin: bool,
    },
}

impl Reply {
    pub fn id(&self) -> Option<u64> {
        match self {
            Reply::Stored(r) => Some(r.id),
            Reply::Calc(r) => Some(r.id),
            Reply::Status(r) => Some(r.id),
            Reply::Servers(r) => Some(r.id),
            Reply::Transfers(r) => Some(r.id),
            Reply::Forgotten { id, .. }
            | Reply::Keys { id, .. }
            | Reply::Membership { id, .. }
            | Reply::Hello { id, .. }
            | Reply::Welcome { id, .. } => Some(*id),
            Reply::Error(r) => r.id,
            Reply::UploadReady(r) => Some(r.id),
            Reply::Redirect(r) => Some(r.id),
            Reply::Chunk(r) => Some(r.id),
            Reply::FileStored(r) => Some(r.id),
            Reply::Files(r) => Some(r.id),
            Reply::File(r) => Some(r.id),
            Reply::Deleted(r) => Some(r.id),
            Reply::Inventory(r) => Some(r.id),
            Reply::Recorded { id } => Some(*id),
            Reply::Fetched { id, .. } => Some(*id),
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

impl Reply {
    /// `stored` as servers write it (`type` first), decoded straight into
    /// its fields; `None` for anything else.
    pub(super) fn decode_frequent(payload: &[u8]) -> Option<Reply> {
        if !payload.starts_with(br#"{"type":"stored","#) {
            return None;
        }
        // The tag is an unknown field to `Stored`, which skips it.
        serde_json::from_slice(payload).ok().map(Reply::Stored)
    }
}

kinds!(Reply {
    Stored => "stored",
    Calc => "calc",
    Status => "status",
    Servers => "servers",
    Transfers => "transfers",
    Forgotten => "forgotten",
    Keys => "keys",
    Membership => "membership",
    Error => "error",
    UploadReady => "upload_ready",
    Redirect => "redirect",
    Chunk => "chunk",
    FileStored => "file_stored",
    Files => "files",
    File => "file",
    Deleted => "deleted",
    Inventory => "inventory",
    Fetched => "fetched",
    Recorded => "recorded",
    Hello => "hello",
    Welcome => "welcome",
});

impl Message for Reply {
    fn types() -> Vec<&'static str> {
        Reply::TYPES.to_vec()
    }

    /// `stored`, one per document, the short way; anything else the
    /// general way.
    fn parse(payload: &[u8]) -> serde_json::Result<Self> {
        match Reply::decode_frequent(payload) {
            Some(reply) => Ok(reply),
            None => serde_json::from_slice(payload),
        }
    }

    fn parse_value(_kind: &str, value: serde_json::Value) -> serde_json::Result<Self> {
        serde_json::from_value(value)
    }
}

/// A document's fields as JSON object members (`"titolo":…,"contenuto":…`),
/// encoded once when the balancer receives it and spliced into every
/// forward, however many attempts it takes.
pub fn encode_document_fields(doc: &Document) -> Vec<u8> {
    let mut bytes = encode(doc);
    // `{` ... `}` around the members.
    bytes.pop();
    bytes.remove(0);
    bytes
}

/// The same fields as `encode_document_fields` makes, taken as the client
/// wrote them in its `store` payload (already decoded once, so known to be
/// valid): the balancer forwards them without unescaping and escaping the
/// content again. `None` when the payload does not lend itself to it.
pub fn raw_document_fields(payload: &[u8]) -> Option<Vec<u8>> {
    use serde_json::value::RawValue;
    #[derive(Deserialize)]
    struct Raw<'a> {
        #[serde(borrow, rename = "titolo")]
        title: &'a RawValue,
        #[serde(borrow, rename = "contenuto")]
        content: &'a RawValue,
    }
    let raw: Raw = serde_json::from_slice(payload).ok()?;
    let (title, content) = (raw.title.get(), raw.content.get());
    if !title.starts_with('"') || !content.starts_with('"') {
        return None;
    }
    let mut fields = Vec::with_capacity(title.len() + content.len() + 24);
    fields.extend_from_slice(b"\"titolo\":");
    fields.extend_from_slice(title.as_bytes());
    fields.extend_from_slice(b",\"contenuto\":");
    fields.extend_from_slice(content.as_bytes());
    Some(fields)
}

/// A `store` request built around fields from `encode_document_fields`.
pub fn encode_forward(
    id: u64,
    request_number: u64,
    not_after_ms: Option<u64>,
    fields: &[u8],
) -> Vec<u8> {
    encode_forward_keyed(id, request_number, not_after_ms, None, fields)
}

/// `encode_forward` with the client's key of the document, if it has one.
pub fn encode_forward_keyed(
    id: u64,
    request_number: u64,
    not_after_ms: Option<u64>,
    key: Option<ClientKey>,
    fields: &[u8],
) -> Vec<u8> {
    let mut head = format!(r#"{{"type":"store","id":{id},"numero_richiesta":{request_number},"#);
    if let Some(t) = not_after_ms {
        head.push_str(&format!(r#""not_after_ms":{t},"#));
    }
    if let Some(key) = key {
        head.push_str(&format!(r#""key":"{key}","#));
    }
    let mut bytes = Vec::with_capacity(head.len() + fields.len() + 1);
    bytes.extend_from_slice(head.as_bytes());
    bytes.extend_from_slice(fields);
    bytes.push(b'}');
    bytes
}

/// The document inside fields from `encode_document_fields`.
pub fn decode_document_fields(fields: &[u8]) -> Result<Document, serde_json::Error> {
    let mut object = Vec::with_capacity(fields.len() + 2);
    object.push(b'{');
    object.extend_from_slice(fields);
    object.push(b'}');
    serde_json::from_slice(&object)
}

/// The answer to a request other than `chunk` or `upload_end` in the
/// middle of an upload (the connection then closes).
pub fn out_of_step(id: u64, kind: &str) -> Reply {
    Reply::error(
        Some(id),
        ErrorCode::BadRequest,
        format!("`{kind}` in the middle of an upload (expected `chunk` or `upload_end`)"),
    )
}
