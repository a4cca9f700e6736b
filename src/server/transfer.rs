//! The server's side of file conversations on a connection: receiving an
//! upload chunk by chunk, sending a file back, removing one.

use super::files::{Begun, FileError, FileMeta, Receiving};
use super::Shared;
use crate::proto::file::{read_body, BodyError, CHUNK_SIZE};
use crate::proto::{
    Chunk, Connection, Deadline, Deleted, ErrorCode, FileHeader, FileStored, FrameReader,
    FrameWriter, PoolRequest, Reply, StorageRequest, StoredFile, TransferEvent, UploadReady,
    UploadRequest,
};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::SocketAddr;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How a conversation ended for the connection.
pub(super) enum Next {
    /// Go on reading requests.
    Continue,
    /// The stream is out of step or gone: close it.
    Close,
}

impl Next {
    /// Goes on only when both go on.
    fn and(self, then: Next) -> Next {
        match (self, then) {
            (Next::Continue, Next::Continue) => Next::Continue,
            _ => Next::Close,
        }
    }
}

impl FileError {
    pub fn code(&self) -> ErrorCode {
        match self {
            FileError::Invalid(_) => ErrorCode::BadRequest,
            FileError::InProgress(_) => ErrorCode::InProgress,
            FileError::Offset { .. } => ErrorCode::BadOffset,
            FileError::Size { .. } => ErrorCode::SizeMismatch,
            FileError::Checksum { .. } => ErrorCode::ChecksumMismatch,
            FileError::NotFound(_) | FileError::Replaced { .. } => ErrorCode::NotFound,
            FileError::Io(e) if super::storage::is_disk_full(e) => ErrorCode::DiskFull,
            FileError::Io(_) => ErrorCode::Storage,
        }
    }

    fn reply(&self, id: u64) -> Reply {
        Reply::error(Some(id), self.code(), self.to_string())
    }
}

/// Checks a redirect ticket when this server holds a cluster key: without
/// a key every upload is accepted (a trusted network), with one only those
/// the balancer signed for this server, before they expire.
fn check_ticket(req: &UploadRequest, shared: &Shared) -> Result<(), String> {
    let Some(key) = &shared.config.cluster_key else {
        return Ok(());
    };
    let Some(ticket) = &req.ticket else {
        return Err("this server takes uploads only with a ticket from the balancer".into());
    };
    if !ticket.is_signed(key, &req.upload_id, req.size) {
        return Err("the ticket's signature is not valid".into());
    }
    if ticket.server != shared.addr.to_string() {
        return Err(format!(
            "the ticket is for server {}, not {}",
            crate::proto::truncate(&ticket.server, 64),
            shared.addr
        ));
    }
    let now = crate::text::now_ms();
    if now > ticket.expires_ms {
        return Err(format!(
            "the ticket expired {} ms ago",
            now - ticket.expires_ms
        ));
    }
    Ok(())
}

/// How an upload went, for the balancer that signed its ticket.
enum Outcome<'a> {
    Started,
    Stored(&'a FileMeta),
    /// The client went away; the bytes so far stay for a resume.
    Interrupted,
    Failed(String),
}

/// How long a report to the balancer may take.
const REPORT_TIMEOUT: Duration = Duration::from_secs(2);

/// Tells the balancer that signed the upload's ticket how it goes
/// (redirect mode). A stored file is reported before the client gets its
/// answer (at most `REPORT_TIMEOUT`), so that the balancer's catalog
/// points at it by then; the rest on a thread of its own, so the client
/// never waits for them: its handle is returned, for the connection to
/// join once the client has its answer.
fn report(shared: &Shared, req: &UploadRequest, outcome: Outcome<'_>) -> Option<JoinHandle<()>> {
    let (Some(key), Some(ticket)) = (&shared.config.cluster_key, &req.ticket) else {
        return None;
    };
    let balancer: SocketAddr = ticket.report_to.as_deref().and_then(|a| a.parse().ok())?;
    let (state, file, error, stored) = outcome.parts();
    let wait = stored.is_some();
    let event = TransferEvent {
        id: 1,
        number: ticket.number,
        server: shared.addr.to_string(),
        state: state.to_string(),
        file,
        error,
        stored,
        mac: String::new(),
    }
    .signed(key);
    let addr = shared.addr;
    let send = move || send_report(addr, balancer, event);
    if wait {
        send();
        return None;
    }
    let name = format!("srv{}-report", addr.port());
    match crate::sync::spawn_named(name, Some(128 * 1024), send) {
        Ok(handle) => Some(handle),
        Err(e) => {
            log::warn!("server {addr}: cannot report a transfer: {e}");
            None
        }
    }
}

impl Outcome<'_> {
    /// The state, file, error and stored file of its `transfer_event`.
    fn parts(
        self,
    ) -> (
        &'static str,
        Option<String>,
        Option<String>,
        Option<StoredFile>,
    ) {
        match self {
            Outcome::Started => ("started", None, None, None),
            Outcome::Stored(meta) => (
                "stored",
                Some(meta.name.clone()),
                None,
                Some(StoredFile {
                    name: meta.sent_as().to_string(),
                    owner: meta.owner.clone(),
                    size: meta.size,
                    sha256: meta.sha256.clone(),
                    upload_id: meta.upload_id.clone(),
                    stored_ms: meta.stored_ms,
                }),
            ),
            Outcome::Interrupted => (
                "interrupted",
                None,
                Some("the client went away; the bytes so far are kept for a resume".to_string()),
                None,
            ),
            Outcome::Failed(why) => ("failed", None, Some(why), None),
        }
    }
}

/// Sends one signed report to the balancer; a failure is only logged.
fn send_report(addr: SocketAddr, balancer: SocketAddr, event: TransferEvent) {
    let answer = crate::net::connect(&balancer, REPORT_TIMEOUT, REPORT_TIMEOUT)
        .map_err(|e| e.to_string())
        .and_then(|stream| {
            Connection::new(stream, 64 * 1024)
                .call(&PoolRequest::TransferEvent(Box::new(event)))
                .map_err(|e| e.to_string())
        });
    match answer {
        Ok(Reply::Recorded { .. }) => {}
        Ok(other) => {
            log::warn!("server {addr}: balancer {balancer} refused a transfer report: {other:?}")
        }
        Err(e) => {
            log::warn!("server {addr}: cannot report a transfer to balancer {balancer}: {e}")
        }
    }
}

fn stored(id: u64, meta: FileMeta, existing: bool, shared: &Shared) -> Reply {
    Reply::FileStored(FileStored {
        id,
        upload_id: meta.upload_id.clone(),
        name: meta.sent_as().to_string(),
        file: meta.name,
        size: meta.size,
        sha256: meta.sha256,
        server: shared.addr.to_string(),
        stored_ms: meta.stored_ms,
        existing,
    })
}

/// Receives an upload: answers `upload_ready`, then takes chunks until
/// `upload_end`. Any error is answered and ends the upload; the connection
/// closes when chunks may still be on their way.
pub(super) fn receive<R: Read + Deadline, W: Write>(
    req: UploadRequest,
    reader: &mut FrameReader<R>,
    writer: &mut FrameWriter<W>,
    peer: SocketAddr,
    shared: &Shared,
) -> Next {
    let id = req.id;
    let addr = shared.addr;
    if let Some(refusal) = refuse(&req, peer, shared) {
        return answer(writer, &refusal, addr, peer);
    }
    let _active = shared.load.begin();
    // A ticket says whose the file is; else the (authenticated) balancer.
    let owner = req.ticket.as_ref().map_or(&req.owner, |t| &t.owner).clone();
    let upload = match shared
        .files
        .begin(&req.upload_id, &req.name, req.size, owner)
    {
        Ok(Begun::Receiving(r)) => r,
        Ok(Begun::Complete(meta)) => return end_again(&req, meta, reader, writer, peer, shared),
        Err(e) => {
            log::warn!("server {addr}: upload from {peer}: {e}");
            return answer(writer, &e.reply(id), addr, peer);
        }
    };
    if upload.offset() > 0 {
        log_resume(&req, upload.offset(), peer, addr);
    }
    let ready = ready(&req, upload.offset(), shared);
    if let Next::Close = answer(writer, &ready, addr, peer) {
        return Next::Close;
    }
    let started = report(shared, &req, Outcome::Started);
    // The upload is given back (ended) before the reply goes out, so a
    // client that resumes at once finds it free.
    let (next, reply, meta) = take_chunks(upload, id, reader, peer, shared);
    let ended = report(shared, &req, ended(&reply, &meta));
    let next = match reply {
        Some(reply) => {
            if let Reply::Error(e) = &reply {
                log::warn!(
                    "server {addr}: upload {} from {peer}: {}",
                    req.upload_id,
                    e.message
                );
            }
            answer(writer, &reply, addr, peer).and(next)
        }
        None => next,
    };
    // The client has its answer: the reports' threads are waited for.
    for report in [started, ended].into_iter().flatten() {
        if report.join().is_err() {
            log::error!("server {addr}: a transfer report's thread panicked");
        }
    }
    next
}

fn log_resume(req: &UploadRequest, offset: u64, peer: SocketAddr, addr: SocketAddr) {
    log::info!(
        "server {addr}: resuming upload {} of {:?} from {peer} at byte {offset} of {}",
        req.upload_id,
        crate::proto::truncate(&req.name, 80),
        req.size
    );
}

/// Writes a reply of an upload conversation; a connection that cannot
/// take it closes.
fn answer<W: Write>(
    writer: &mut FrameWriter<W>,
    reply: &Reply,
    addr: SocketAddr,
    peer: SocketAddr,
) -> Next {
    match writer.message(reply) {
        Ok(()) => Next::Continue,
        Err(e) => {
            log::warn!("server {addr}: cannot reply to {peer}: {e}");
            Next::Close
        }
    }
}

/// Why an upload is refused before anything is written, if it is.
fn refuse(req: &UploadRequest, peer: SocketAddr, shared: &Shared) -> Option<Reply> {
    if let Err(why) = check_ticket(req, shared) {
        log::warn!("server {}: upload refused from {peer}: {why}", shared.addr);
        return Some(Reply::error(Some(req.id), ErrorCode::BadTicket, why));
    }
    let max = shared.config.max_file_size;
    if req.size > max {
        let why = format!(
            "the file has {} bytes, more than this server takes (--max-file-size {max})",
            req.size
        );
        return Some(Reply::error(Some(req.id), ErrorCode::TooLarge, why));
    }
    None
}

fn ready(req: &UploadRequest, offset: u64, shared: &Shared) -> Reply {
    Reply::UploadReady(UploadReady {
        id: req.id,
        upload_id: req.upload_id.clone(),
        server: shared.addr.to_string(),
        offset,
    })
}

/// An upload already complete: only the answer was lost, and the client
/// ends it again.
fn end_again<R: Read + Deadline, W: Write>(
    req: &UploadRequest,
    meta: FileMeta,
    reader: &mut FrameReader<R>,
    writer: &mut FrameWriter<W>,
    peer: SocketAddr,
    shared: &Shared,
) -> Next {
    let addr = shared.addr;
    if let Next::Close = answer(writer, &ready(req, meta.size, shared), addr, peer) {
        return Next::Close;
    }
    match reader.message_within::<StorageRequest>(shared.config.frame_timeout) {
        Ok(Some(Ok(StorageRequest::UploadEnd { id, .. }))) => {
            answer(writer, &stored(id, meta, true, shared), addr, peer)
        }
        _ => Next::Close,
    }
}

/// How an upload ended, for its report, from its reply and stored file.
fn ended<'a>(reply: &Option<Reply>, meta: &'a Option<FileMeta>) -> Outcome<'a> {
    match (reply, meta) {
        (_, Some(meta)) => Outcome::Stored(meta),
        (Some(Reply::Error(e)), _) if client_left(e.code) => Outcome::Interrupted,
        (Some(Reply::Error(e)), _) => Outcome::Failed(e.message.clone()),
        _ => Outcome::Interrupted,
    }
}

/// Whether an upload's error says its sender went away (a frame cut
/// short, or never finished) rather than that something was wrong.
fn client_left(code: ErrorCode) -> bool {
    code == ErrorCode::Timeout
}

/// Takes chunks until `upload_end` (then puts the file in place) or until
/// something goes wrong. Returns what the connection does next, the
/// reply to send, and the file once in place.
fn take_chunks<R: Read + Deadline>(
    mut upload: Receiving<'_>,
    id: u64,
    reader: &mut FrameReader<R>,
    peer: SocketAddr,
    shared: &Shared,
) -> (Next, Option<Reply>, Option<FileMeta>) {
    let addr = shared.addr;
    let started = Instant::now();
    let from = upload.offset();
    loop {
        let request = match reader.message_within::<StorageRequest>(shared.config.frame_timeout) {
            Ok(Some(Ok(r))) => r,
            Ok(None) => {
                log::info!(
                    "server {addr}: upload from {peer} interrupted at byte {} of {}",
                    upload.offset(),
                    upload.size()
                );
                return (Next::Close, None, None);
            }
            Err(e) => return (Next::Close, e.reply().map(Reply::Error), None),
            Ok(Some(Err(bad))) => return (Next::Close, Some(Reply::Error(bad.into())), None),
        };
        match request {
            StorageRequest::Chunk(chunk) => {
                if let Err(reply) = take_chunk(&mut upload, id, &chunk, reader, shared) {
                    return (Next::Close, reply.map(|r| *r), None);
                }
            }
            StorageRequest::UploadEnd { id: end_id, sha256 } => {
                let size = upload.offset();
                return match upload.finish(&sha256) {
                    Ok(meta) => {
                        let secs = started.elapsed().as_secs_f64().max(1e-3);
                        log::info!(
                            "server {addr}: stored file {} ({} bytes, {:.1} MB/s) from {peer}",
                            meta.name,
                            meta.size,
                            (size - from) as f64 / secs / 1e6
                        );
                        let reply = stored(end_id, meta.clone(), false, shared);
                        (Next::Continue, Some(reply), Some(meta))
                    }
                    Err(e) => (Next::Continue, Some(file_failed(e, end_id, shared)), None),
                };
            }
            other => {
                let reply = crate::proto::out_of_step(other.id(), other.kind());
                return (Next::Close, Some(reply), None);
            }
        }
    }
}

/// Reads one chunk's body and writes it into the upload. `Err` holds the
/// reply, if any, when the upload cannot go on.
fn take_chunk<R: Read + Deadline>(
    upload: &mut Receiving<'_>,
    id: u64,
    chunk: &Chunk,
    reader: &mut FrameReader<R>,
    shared: &Shared,
) -> Result<(), Option<Box<Reply>>> {
    let max_body = shared.frame_limit() as u64;
    let body_len = chunk.body_len;
    if body_len > max_body {
        return Err(Some(Box::new(Reply::error(
            Some(id),
            ErrorCode::FrameTooLarge,
            format!("chunk of {body_len} bytes exceeds the maximum of {max_body}"),
        ))));
    }
    let deadline = Instant::now() + shared.config.frame_timeout;
    reader.get_mut().set_deadline(Some(deadline));
    let body = read_body(reader, body_len);
    reader.get_mut().set_deadline(None);
    let body = match body {
        Ok(b) => b,
        Err(e @ BodyError::Length { .. }) => {
            return Err(Some(Box::new(Reply::error(
                Some(id),
                ErrorCode::SizeMismatch,
                e.to_string(),
            ))))
        }
        Err(BodyError::Frame(e)) => return Err(e.reply().map(|r| Box::new(Reply::Error(r)))),
    };
    upload
        .write(chunk.offset, &body)
        .map_err(|e| Some(Box::new(file_failed(e, id, shared))))
}

/// The reply to a file error; a full disk is noted in the server's load.
fn file_failed(e: FileError, id: u64, shared: &Shared) -> Reply {
    if e.code() == ErrorCode::DiskFull {
        shared.load.note_disk_full(shared.storage.dir());
    }
    e.reply(id)
}

/// Sends a stored file from `offset`: a `file` header, then chunks.
pub(super) fn send<W: Write>(
    id: u64,
    name: &str,
    offset: u64,
    owner: Option<&str>,
    writer: &mut FrameWriter<W>,
    peer: SocketAddr,
    shared: &Shared,
) -> Next {
    let addr = shared.addr;
    let found = match shared.files.open_file(name, owner) {
        Err(e) if e.code() == ErrorCode::NotFound => {
            super::replicate::open_document(shared, name).ok_or(e)
        }
        found => found,
    };
    let (mut file, meta) = match found {
        Ok(found) => found,
        Err(e) => {
            return match writer.message(&e.reply(id)) {
                Ok(()) => Next::Continue,
                Err(_) => Next::Close,
            }
        }
    };
    if offset > meta.size {
        let e = FileError::Offset {
            expected: meta.size,
            got: offset,
        };
        return match writer.message(&e.reply(id)) {
            Ok(()) => Next::Continue,
            Err(_) => Next::Close,
        };
    }
    let _active = shared.load.begin();
    let header = Reply::File(FileHeader {
        id,
        name: meta.sent_as().to_string(),
        size: meta.size,
        sha256: meta.sha256.clone(),
        server: addr.to_string(),
        offset,
    });
    let result = write_file(writer, id, &mut file, offset, meta.size, &header);
    match result {
        Ok(()) => Next::Continue,
        Err(e) => {
            log::warn!("server {addr}: sending {} to {peer}: {e}", meta.name);
            Next::Close
        }
    }
}

/// Writes `header`, then the file from `offset` to `size` in chunks.
fn write_file<W: Write>(
    writer: &mut FrameWriter<W>,
    id: u64,
    file: &mut (impl Read + Seek),
    offset: u64,
    size: u64,
    header: &Reply,
) -> io::Result<()> {
    writer.message(header)?;
    file.seek(SeekFrom::Start(offset))?;
    let mut buf = vec![0u8; CHUNK_SIZE];
    let mut at = offset;
    while at < size {
        let want = ((size - at) as usize).min(CHUNK_SIZE);
        file.read_exact(&mut buf[..want])?;
        writer.message(&Reply::Chunk(Chunk {
            id,
            offset: at,
            body_len: want as u64,
        }))?;
        writer.body(&buf[..want])?;
        at += want as u64;
    }
    Ok(())
}

/// `delete`: a complete file (by its name in the folder, or the name it
/// was sent with; only `owner`'s, and only the copy `upload_id` wrote,
/// when given), or with no name, the partial upload `upload_id`.
pub(super) fn delete(
    id: u64,
    name: &str,
    owner: Option<&str>,
    upload_id: Option<&str>,
    peer: SocketAddr,
    shared: &Shared,
) -> Reply {
    let addr = shared.addr;
    let done = match (name, upload_id) {
        ("", Some(upload_id)) => shared
            .files
            .delete_partial(upload_id, owner)
            .map(|()| upload_id.to_string()),
        ("", None) => Err(FileError::Invalid(
            "`delete` needs a name (or, for a partial upload, an upload_id)".into(),
        )),
        (name, upload_id) => shared
            .files
            .delete(name, owner, upload_id)
            .map(|meta| meta.name),
    };
    match done {
        Ok(removed) => {
            log::info!("server {addr}: removed {removed:?} (asked by {peer})");
            Reply::Deleted(Deleted {
                id,
                name: removed,
                servers: vec![addr.to_string()],
                pending: Vec::new(),
            })
        }
        Err(e) => e.reply(id),
    }
}
