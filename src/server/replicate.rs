//! Copies between servers, for the balancer's repair (`--replicas`): a
//! `fetch` asks this server to take a copy of a document or file from
//! another server. The bytes come by the other server's `get`, are hashed
//! as they arrive and checked against the SHA-256 it announced before
//! anything is put in place: a document through the storage folder's
//! committer under its request number (so it is held once, as a store
//! would be), a file through the file store under its upload id.
//!
//! Documents are served by `get` here too (`open_document`), by their
//! name in the folder, so that a peer (or a client, through the balancer)
//! can read them.

use super::files::{Begun, FileMeta};
use super::storage::{self, Claim, StoreError};
use super::Shared;
use crate::handshake;
use crate::net;
use crate::proto::{CallError, Connection, ErrorCode, FileHeader, Reply, StorageRequest};
use sha2::{Digest, Sha256};
use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::net::SocketAddr;
use std::time::Duration;

/// How long connecting to the other server, and each exchange, may take.
const PEER_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a copy was not made.
#[derive(Debug)]
pub enum FetchError {
    /// The request itself is wrong (a bad address or name).
    Bad(String),
    /// The other server could not be reached or did not send the copy.
    Source(String),
    /// The bytes that came do not have the SHA-256 announced.
    Checksum { announced: String, got: String },
    /// This server could not store it.
    Store(String, ErrorCode),
}

impl fmt::Display for FetchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FetchError::Bad(why) | FetchError::Source(why) | FetchError::Store(why, _) => {
                f.write_str(why)
            }
            FetchError::Checksum { announced, got } => write!(
                f,
                "the copy's SHA-256 is {got}, the source announced {announced}; nothing stored"
            ),
        }
    }
}

impl std::error::Error for FetchError {}

impl FetchError {
    fn code(&self) -> ErrorCode {
        match self {
            FetchError::Bad(_) => ErrorCode::BadRequest,
            FetchError::Source(_) => ErrorCode::ServerFailed,
            FetchError::Checksum { .. } => ErrorCode::ChecksumMismatch,
            FetchError::Store(_, code) => *code,
        }
    }
}

impl From<CallError> for FetchError {
    fn from(e: CallError) -> Self {
        FetchError::Source(format!("the source server: {e}"))
    }
}

/// `fetch`: takes a copy of `name` from server `from` (a file of `owner`
/// with `upload_id`, else a document) and answers where it is now.
pub(super) fn fetch(
    id: u64,
    from: &str,
    name: &str,
    owner: Option<String>,
    upload_id: Option<String>,
    shared: &Shared,
) -> Reply {
    let _active = shared.load.begin();
    match fetch_copy(from, name, owner, upload_id, shared) {
        Ok((file, size, sha256)) => {
            log::info!(
                "server {}: copied {name} from {from} as {file} ({size} bytes, SHA-256 checked)",
                shared.addr
            );
            Reply::Fetched {
                id,
                file,
                size,
                sha256,
            }
        }
        Err(e) => {
            log::warn!("server {}: copying {name} from {from}: {e}", shared.addr);
            Reply::error(Some(id), e.code(), e.to_string())
        }
    }
}

fn fetch_copy(
    from: &str,
    name: &str,
    owner: Option<String>,
    upload_id: Option<String>,
    shared: &Shared,
) -> Result<(String, u64, String), FetchError> {
    let addr: SocketAddr = from
        .parse()
        .map_err(|_| FetchError::Bad(format!("`from` is not an address: {from:?}")))?;
    if addr == shared.addr {
        return Err(FetchError::Bad("a server does not copy from itself".into()));
    }
    let stream = net::connect(&addr, PEER_TIMEOUT, PEER_TIMEOUT)
        .map_err(|e| FetchError::Source(format!("cannot connect to {addr}: {e}")))?;
    let mut conn = Connection::new(stream, shared.frame_limit());
    if let Some(key) = &shared.config.cluster_key {
        handshake::initiate(&mut conn, key, addr, 0).map_err(|e| {
            FetchError::Source(format!("{addr} did not prove the cluster key: {e}"))
        })?;
    }
    let request = StorageRequest::Get {
        id: 2,
        name: name.to_string(),
        offset: 0,
        owner: owner.clone(),
    };
    let header = match conn.call(&request)? {
        Reply::File(header) => header,
        Reply::Error(e) => {
            return Err(FetchError::Source(format!(
                "{addr}: {}: {}",
                e.code, e.message
            )))
        }
        other => {
            return Err(FetchError::Source(format!(
                "{addr} answered {}",
                crate::proto::truncate(&format!("{other:?}"), 120)
            )))
        }
    };
    match upload_id {
        Some(upload) => fetch_file(&mut conn, &header, &upload, owner, shared),
        None => fetch_document(&mut conn, &header, name, shared),
    }
}

/// Reads the chunks of `header`'s file, giving each to `put`; returns the
/// SHA-256 of all of them, checked against the one announced.
fn receive<S: Read + io::Write>(
    conn: &mut Connection<S>,
    header: &FileHeader,
    mut put: impl FnMut(u64, &[u8]) -> Result<(), FetchError>,
) -> Result<String, FetchError> {
    let mut hasher = Sha256::new();
    let mut at = 0u64;
    while at < header.size {
        let chunk = match conn.recv::<Reply>()? {
            Reply::Chunk(chunk) if chunk.offset == at => chunk,
            other => {
                return Err(FetchError::Source(format!(
                    "unexpected {}",
                    crate::proto::truncate(&format!("{other:?}"), 120)
                )))
            }
        };
        let body = conn
            .read_body(chunk.body_len)
            .map_err(|e| FetchError::Source(format!("reading a chunk: {e}")))?;
        hasher.update(&body);
        put(at, &body)?;
        at += body.len() as u64;
    }
    let got = crate::text::to_hex(&hasher.finalize());
    if !got.eq_ignore_ascii_case(&header.sha256) {
        return Err(FetchError::Checksum {
            announced: header.sha256.clone(),
            got,
        });
    }
    Ok(got)
}

fn fetch_document<S: Read + io::Write>(
    conn: &mut Connection<S>,
    header: &FileHeader,
    name: &str,
    shared: &Shared,
) -> Result<(String, u64, String), FetchError> {
    let Some((number, _)) = storage::parse_name(name) else {
        return Err(FetchError::Bad(format!(
            "{name:?} is not a document's name"
        )));
    };
    let mut bytes = Vec::with_capacity(header.size as usize);
    let sha256 = receive(conn, header, |_, body| {
        bytes.extend_from_slice(body);
        Ok(())
    })?;
    let stored = |e: StoreError| FetchError::Store(e.to_string(), ErrorCode::Storage);
    let file = match shared.storage.claim(number, None).map_err(stored)? {
        Claim::Existing { file } => file,
        Claim::New(writer) => {
            let base = name.strip_suffix(".json").unwrap_or(name).to_string();
            writer.write_copy(bytes, base).map_err(stored)?
        }
    };
    Ok((file, header.size, sha256))
}

fn fetch_file<S: Read + io::Write>(
    conn: &mut Connection<S>,
    header: &FileHeader,
    upload: &str,
    owner: Option<String>,
    shared: &Shared,
) -> Result<(String, u64, String), FetchError> {
    let stored = |e: super::files::FileError| FetchError::Store(e.to_string(), e.code());
    let mut receiving = match shared
        .files
        .begin(upload, &header.name, header.size, owner)
        .map_err(stored)?
    {
        Begun::Complete(meta) => return Ok((meta.name, meta.size, meta.sha256)),
        Begun::Receiving(r) => r,
    };
    if receiving.offset() > 0 {
        // Bytes of an earlier attempt: start over, so that every byte is
        // hashed here.
        return Err(FetchError::Store(
            format!("upload {upload} is partly here already; try again later"),
            ErrorCode::InProgress,
        ));
    }
    let sha256 = receive(conn, header, |at, body| {
        receiving.write(at, body).map_err(stored)
    })?;
    let meta = receiving.finish(&sha256).map_err(stored)?;
    Ok((meta.name, meta.size, sha256))
}

/// A stored document by its name in the folder, as `get` serves files:
/// the open file and what its header says. `None` when `name` is not a
/// document held here.
pub(super) fn open_document(shared: &Shared, name: &str) -> Option<(File, FileMeta)> {
    if !storage::is_document_name(name)
        || name.contains(['/', '\\'])
        || storage::parse_name(name).is_none()
    {
        return None;
    }
    let path = shared.storage.dir().join(name);
    let mut file = File::open(&path).ok()?;
    let mut hasher = Sha256::new();
    let size = io::copy(&mut file, &mut hasher).ok()?;
    let meta = FileMeta {
        upload_id: String::new(),
        name: name.to_string(),
        size,
        sha256: crate::text::to_hex(&hasher.finalize()),
        stored_ms: 0,
        owner: None,
        original: None,
    };
    Some((File::open(&path).ok()?, meta))
}
