//! Files of any size: uploads in chunks, listing and download.
//!
//! An upload is a conversation on one connection:
//! `upload` → `upload_ready {offset}`, then `chunk {offset, body_len}`
//! messages each followed by a raw frame of `body_len` bytes, then
//! `upload_end {sha256}` → `file_stored`. A download is `get {offset}` →
//! `file {size, sha256}` followed by `chunk` replies with their bodies up to
//! `size`. While an upload or download runs, nothing else travels on its
//! connection.

use super::frame::{read_header, read_payload_into, write_frame, FrameError};
use crate::auth::ClusterKey;
use crate::text::{from_hex, to_hex};
use serde::{Deserialize, Serialize};
use std::io::{self, Read, Write};

/// Bytes per chunk that clients and servers send.
pub const CHUNK_SIZE: usize = 1024 * 1024;

/// Start or resume an upload (client → balancer, balancer or client →
/// server).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UploadRequest {
    pub id: u64,
    /// Chosen by the client, the same for every attempt of one file:
    /// 8 to 64 letters, digits, `-` or `_`.
    pub upload_id: String,
    /// The file's name; servers store it under a safe version of it.
    pub name: String,
    /// Total size in bytes.
    pub size: u64,
    /// The server this upload went to before (from `upload_ready`): the
    /// balancer resumes there when it can.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
    /// A redirect ticket from the balancer (servers that require one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ticket: Option<Ticket>,
    /// The user the file belongs to: set by the balancer when users are on
    /// (a client's value is replaced); a ticket's owner wins over it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Refuse (`exists`) instead of replacing a file of the same name
    /// (balancer only; `client send --no-clobber`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub no_clobber: bool,
}

/// Permission from the balancer to upload one file to one server, signed
/// with the cluster key: `mac` is the hex HMAC-SHA-256 of upload id, size
/// and every other field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ticket {
    pub server: String,
    pub expires_ms: u64,
    /// The balancer's request number for the transfer, and where the
    /// server reports its start and end (`transfer_event`).
    #[serde(default)]
    pub number: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report_to: Option<String>,
    /// The user the file will belong to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    pub mac: String,
}

impl Ticket {
    fn parts(&self, upload_id: &str, size: u64) -> Vec<Vec<u8>> {
        vec![
            b"upload-ticket".to_vec(),
            upload_id.as_bytes().to_vec(),
            size.to_be_bytes().to_vec(),
            self.server.as_bytes().to_vec(),
            self.expires_ms.to_be_bytes().to_vec(),
            self.number.to_be_bytes().to_vec(),
            self.report_to.clone().unwrap_or_default().into_bytes(),
            self.owner.clone().unwrap_or_default().into_bytes(),
        ]
    }

    /// An unsigned ticket for `server`, valid until `expires_ms`; fill in
    /// the rest, then `signed`.
    pub fn new(server: &str, expires_ms: u64) -> Ticket {
        Ticket {
            server: server.to_string(),
            expires_ms,
            number: 0,
            report_to: None,
            owner: None,
            mac: String::new(),
        }
    }

    /// This ticket signed for uploading `size` bytes as `upload_id`.
    pub fn signed(mut self, key: &ClusterKey, upload_id: &str, size: u64) -> Ticket {
        self.mac = to_hex(&key.sign(&as_slices(&self.parts(upload_id, size))));
        self
    }

    /// Whether `key` signed this ticket for `upload_id` of `size` bytes
    /// (expiry and server are the caller's to check).
    pub fn is_signed(&self, key: &ClusterKey, upload_id: &str, size: u64) -> bool {
        let mac = from_hex(&self.mac).unwrap_or_default();
        key.verify(&as_slices(&self.parts(upload_id, size)), &mac)
    }
}

/// A server tells the balancer that signed a ticket where the transfer is
/// (redirect mode). Signed with the cluster key like the ticket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TransferEvent {
    pub id: u64,
    /// From the ticket.
    pub number: u64,
    pub server: String,
    /// `started`, `stored`, `interrupted` (the client went away; the bytes
    /// so far are kept for a resume) or `failed`.
    pub state: String,
    /// The name of the file on the server, once stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// What the balancer's catalog needs of a stored file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stored: Option<StoredFile>,
    pub mac: String,
}

/// A stored file as the catalog records it: the name its user sent, its
/// owner, size, checksum, and the upload that wrote it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredFile {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    pub size: u64,
    pub sha256: String,
    pub upload_id: String,
    /// Unix milliseconds.
    pub stored_ms: u64,
}

impl TransferEvent {
    fn parts(&self) -> Vec<Vec<u8>> {
        vec![
            b"transfer-event".to_vec(),
            self.number.to_be_bytes().to_vec(),
            self.server.as_bytes().to_vec(),
            self.state.as_bytes().to_vec(),
            self.file.clone().unwrap_or_default().into_bytes(),
            self.error.clone().unwrap_or_default().into_bytes(),
            self.stored
                .as_ref()
                .map(|s| serde_json::to_vec(s).unwrap_or_default())
                .unwrap_or_default(),
        ]
    }

    /// Fills in `mac`.
    pub fn signed(mut self, key: &ClusterKey) -> TransferEvent {
        self.mac = to_hex(&key.sign(&as_slices(&self.parts())));
        self
    }

    pub fn is_signed(&self, key: &ClusterKey) -> bool {
        let mac = from_hex(&self.mac).unwrap_or_default();
        key.verify(&as_slices(&self.parts()), &mac)
    }
}

fn as_slices(parts: &[Vec<u8>]) -> Vec<&[u8]> {
    parts.iter().map(Vec::as_slice).collect()
}

/// The server is ready for bytes from `offset` on (0 for a new upload, what
/// it already holds when resuming; `size` when the upload is complete and
/// only `upload_end` is missing).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UploadReady {
    pub id: u64,
    pub upload_id: String,
    pub server: String,
    pub offset: u64,
}

/// Redirect mode: upload straight to `server` with `ticket`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Redirect {
    pub id: u64,
    pub upload_id: String,
    pub server: String,
    pub ticket: Ticket,
}

/// Header of a chunk of file bytes, in either direction; the next frame
/// holds the `body_len` bytes, raw.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Chunk {
    pub id: u64,
    pub offset: u64,
    pub body_len: u64,
}

/// A file is in place on a server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileStored {
    pub id: u64,
    pub upload_id: String,
    /// The name the file was sent with, which `get` takes.
    pub name: String,
    /// Its name in the server's folder (the safe form of the name sent,
    /// with `~N` before the extension when another file had that name).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub file: String,
    pub size: u64,
    pub sha256: String,
    pub server: String,
    /// When the server put it in place (Unix milliseconds; 0 if not said).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub stored_ms: u64,
    /// The upload had already completed (an attempt whose answer was lost).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub existing: bool,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// What a listing entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    /// A file sent with `upload`.
    #[default]
    File,
    /// A document sent with `store`.
    Document,
}

impl EntryKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::File => "file",
            EntryKind::Document => "document",
        }
    }

    fn is_file(&self) -> bool {
        *self == EntryKind::File
    }
}

/// One stored file (or document) in a listing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileEntry {
    /// A file: the name it was sent with (what `get` takes). A document:
    /// its title.
    pub name: String,
    pub size: u64,
    /// Files only.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sha256: String,
    /// The server holding it.
    pub server: String,
    /// Unix milliseconds.
    pub stored_ms: u64,
    /// The user it belongs to, when users are on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    #[serde(default, skip_serializing_if = "EntryKind::is_file")]
    pub kind: EntryKind,
    /// Its name in the server's folder, when it differs from `name`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub file: String,
    /// A document's request number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub number: Option<u64>,
    /// A file's upload (servers' listings, for the balancer's catalog).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload_id: Option<String>,
    /// False when every server holding it is down (balancer only): `get`
    /// has to wait until `server` is back.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub available: bool,
    /// Copies the catalog knows on servers that are up (balancer only,
    /// with `--replicas` above 1).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub copies: u64,
    /// Fewer copies on servers that are up than `--replicas` asks.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub under_replicated: bool,
}

fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

impl FileEntry {
    /// A file entry with nothing optional set.
    pub fn file(name: &str, size: u64, sha256: &str, server: &str, stored_ms: u64) -> FileEntry {
        FileEntry {
            name: name.to_string(),
            size,
            sha256: sha256.to_string(),
            server: server.to_string(),
            stored_ms,
            owner: None,
            kind: EntryKind::File,
            file: String::new(),
            number: None,
            upload_id: None,
            available: true,
            copies: 0,
            under_replicated: false,
        }
    }

    /// Its name in the server's folder.
    pub fn server_file(&self) -> &str {
        if self.file.is_empty() {
            &self.name
        } else {
            &self.file
        }
    }
}

/// The answer to `list`: one frame of it. A long listing comes as several
/// `files` frames with the request's `id`, each but the last with `more`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileList {
    pub id: u64,
    pub files: Vec<FileEntry>,
    /// Servers that could not be asked (balancer without a state file),
    /// with why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unreachable: Vec<String>,
    /// Servers whose listing the balancer is still taking into its
    /// catalog: their files may be missing from this one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rebuilding: Vec<String>,
    /// More `files` frames follow for this request.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub more: bool,
}

/// Entries per `files` frame of a long listing.
pub const LIST_PAGE: usize = 1000;

/// Which entries a `list` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ListKind {
    Files,
    Documents,
    /// Both (the balancer's default).
    All,
}

impl ListKind {
    pub fn has(self, kind: EntryKind) -> bool {
        match self {
            ListKind::All => true,
            ListKind::Files => kind == EntryKind::File,
            ListKind::Documents => kind == EntryKind::Document,
        }
    }
}

/// What a server holds, in short: the balancer compares it with its
/// catalog to tell whether it is in step (`inventory`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryReport {
    pub id: u64,
    /// Complete files.
    pub files: u64,
    /// The XOR of `file_digest` over them, 16 hex digits.
    pub files_digest: String,
    /// Stored documents.
    pub documents: u64,
}

/// A complete file's part of `InventoryReport::files_digest`: the first 8
/// bytes of SHA-256 over its name in the server's folder and its checksum.
pub fn file_digest(file: &str, sha256: &str) -> u64 {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(file.as_bytes());
    h.update([0]);
    h.update(sha256.to_ascii_lowercase().as_bytes());
    let d = h.finalize();
    u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
}

/// Answer to `delete`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Deleted {
    pub id: u64,
    pub name: String,
    /// Servers whose copy was removed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub servers: Vec<String>,
    /// Servers that were down: their copy is removed once they are back
    /// (balancer only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending: Vec<String>,
}

/// The answer to `get`: the file's bytes from `offset` follow in chunks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileHeader {
    pub id: u64,
    pub name: String,
    pub size: u64,
    pub sha256: String,
    pub server: String,
    pub offset: u64,
}

/// Whether an upload id is acceptable: it names files on servers.
pub fn valid_upload_id(id: &str) -> bool {
    (8..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Reads the raw frame after a `chunk` header. Its length must be
/// `expected`, which the caller has checked against its limits.
pub fn read_body<R: Read>(r: &mut R, expected: u64) -> Result<Vec<u8>, BodyError> {
    let mut buf = Vec::new();
    read_body_into(r, expected, &mut buf)?;
    Ok(buf)
}

/// Like `read_body`, into `buf` (its allocation is reused: a relay
/// passes the same few buffers around).
pub fn read_body_into<R: Read>(
    r: &mut R,
    expected: u64,
    buf: &mut Vec<u8>,
) -> Result<(), BodyError> {
    let max = usize::try_from(expected).unwrap_or(usize::MAX);
    let len = body_len(read_header(r, max), expected)?;
    buf.clear();
    // Room for a whole chunk at once; a larger body grows as it arrives.
    buf.reserve(len.min(CHUNK_SIZE));
    read_payload_into(r, len, buf).map_err(BodyError::Frame)
}

/// The length of a body frame from its header, which must say `expected`
/// bytes: a header that says more (or is too large to read) or less is a
/// length mismatch, a missing one a truncated frame.
pub fn body_len(
    header: Result<Option<usize>, FrameError>,
    expected: u64,
) -> Result<usize, BodyError> {
    match header {
        Ok(Some(len)) if len as u64 == expected => Ok(len),
        Ok(Some(len)) => Err(BodyError::Length {
            declared: expected,
            got: len as u64,
        }),
        Ok(None) => Err(BodyError::Frame(FrameError::Truncated {
            expected: 4,
            got: 0,
        })),
        Err(FrameError::TooLarge { len, .. }) => Err(BodyError::Length {
            declared: expected,
            got: len,
        }),
        Err(e) => Err(BodyError::Frame(e)),
    }
}

/// Writes a body frame.
pub fn write_body<W: Write>(w: &mut W, body: &[u8]) -> io::Result<()> {
    write_frame(w, body)
}

/// Why a chunk's body could not be read.
#[derive(Debug)]
pub enum BodyError {
    /// The body frame is not as long as its header said.
    Length {
        declared: u64,
        got: u64,
    },
    Frame(FrameError),
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BodyError::Length { declared, got } => write!(
                f,
                "chunk body of {got} bytes where its header declared {declared}"
            ),
            BodyError::Frame(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for BodyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            BodyError::Frame(e) => Some(e),
            BodyError::Length { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tickets_and_events_are_signed_over_every_field() {
        let key = ClusterKey::generate();
        let t = Ticket {
            number: 7,
            report_to: Some("b:1".into()),
            owner: Some("ann".into()),
            ..Ticket::new("127.0.0.1:1", 99)
        }
        .signed(&key, "upload-1234", 10);
        assert!(t.is_signed(&key, "upload-1234", 10));
        assert!(!t.is_signed(&key, "upload-1234", 11));
        assert!(!t.is_signed(&key, "upload-1235", 10));
        assert!(!t.is_signed(&ClusterKey::generate(), "upload-1234", 10));
        for tamper in [
            |t: &mut Ticket| t.server = "127.0.0.1:2".into(),
            |t: &mut Ticket| t.expires_ms += 1,
            |t: &mut Ticket| t.number += 1,
            |t: &mut Ticket| t.report_to = None,
            |t: &mut Ticket| t.owner = Some("bob".into()),
        ] {
            let mut bad = t.clone();
            tamper(&mut bad);
            assert!(!bad.is_signed(&key, "upload-1234", 10));
        }
        let e = TransferEvent {
            id: 1,
            number: 7,
            server: "s".into(),
            state: "stored".into(),
            file: Some("f".into()),
            error: None,
            stored: Some(StoredFile {
                name: "f.txt".into(),
                owner: Some("ann".into()),
                size: 3,
                sha256: "ab".into(),
                upload_id: "upload-1234".into(),
                stored_ms: 5,
            }),
            mac: String::new(),
        }
        .signed(&key);
        assert!(e.is_signed(&key));
        let mut bad = e.clone();
        bad.state = "failed".into();
        assert!(!bad.is_signed(&key));
        let mut bad = e.clone();
        if let Some(s) = &mut bad.stored {
            s.owner = Some("bob".into());
        }
        assert!(!bad.is_signed(&key));
    }

    #[test]
    fn upload_ids() {
        assert!(valid_upload_id("abcdEF12-_"));
        for bad in [
            "short",
            "../../etc/passwd",
            "a/bcdefgh",
            "abcdefgh\0",
            &"x".repeat(65),
        ] {
            assert!(!valid_upload_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn bodies_must_match_their_header() {
        let mut wire = Vec::new();
        write_body(&mut wire, b"hello").unwrap();
        assert_eq!(read_body(&mut &wire[..], 5).unwrap(), b"hello");
        let e = read_body(&mut &wire[..], 4).unwrap_err();
        assert!(
            matches!(
                e,
                BodyError::Length {
                    declared: 4,
                    got: 5
                }
            ),
            "{e}"
        );
        let e = read_body(&mut &wire[..], 6).unwrap_err();
        assert!(
            matches!(
                e,
                BodyError::Length {
                    declared: 6,
                    got: 5
                }
            ),
            "{e}"
        );
        let e = read_body(&mut &wire[..7], 5).unwrap_err();
        assert!(
            matches!(e, BodyError::Frame(FrameError::Truncated { .. })),
            "{e}"
        );
    }
}
