//! The server's side of file conversations on a connection: receiving an
//! upload chunk by chunk, sending a file back, removing one.

use super::files::{Begun, FileError, FileMeta, Receiving};
use super::Shared;
use crate::proto::file::{read_body, BodyError, CHUNK_SIZE};
use crate::proto::{
    Chunk, Connection, Deadline, Deleted, ErrorCode, FileHeader, FileStored, FrameReader,
    FrameWriter, Reply, Request, StoredFile, TransferEvent, UploadReady, UploadRequest,
};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

/// How a conversation ended for the connection.
pub(super) enum Next {
    /// Go on reading requests.
    Continue,
    /// The stream is out of step or gone: close it.
    Close,
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
    let now = super::storage::unix_ms(SystemTime::now());
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
/// never waits for them.
fn report(shared: &Shared, req: &UploadRequest, outcome: Outcome<'_>) {
    let (Some(key), Some(ticket)) = (&shared.config.cluster_key, &req.ticket) else {
        return;
    };
    let Some(balancer) = ticket.report_to.as_deref().and_then(|a| a.parse().ok()) else {
        return;
    };
    let (state, file, error, stored) = match outcome {
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
    };
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
    let send = move || {
        let answer = crate::net::connect(&balancer, REPORT_TIMEOUT, REPORT_TIMEOUT)
            .map_err(|e| e.to_string())
            .and_then(|stream| {
                Connection::new(stream, 64 * 1024)
                    .call(&Request::TransferEvent(event))
                    .map_err(|e| e.to_string())
            });
        match answer {
            Ok(Reply::Recorded { .. }) => {}
            Ok(other) => log::warn!(
                "server {addr}: balancer {balancer} refused a transfer report: {other:?}"
            ),
            Err(e) => {
                log::warn!("server {addr}: cannot report a transfer to balancer {balancer}: {e}")
            }
        }
    };
    if wait {
        send();
        return;
    }
    let name = format!("srv{}-report", addr.port());
    if let Err(e) = crate::net::spawn_named(name, Some(128 * 1024), send) {
        log::warn!("server {addr}: cannot report a transfer: {e}");
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
    let send = |writer: &mut FrameWriter<W>, reply: &Reply| match writer.message(reply) {
        Ok(()) => Next::Continue,
        Err(e) => {
            log::warn!("server {addr}: cannot reply to {peer}: {e}");
            Next::Close
        }
    };
    if let Err(why) = check_ticket(&req, shared) {
        log::warn!("server {addr}: upload refused from {peer}: {why}");
        return send(writer, &Reply::error(Some(id), ErrorCode::BadTicket, why));
    }
    let max = shared.config.max_file_size;
    if req.size > max {
        let why = format!(
            "the file has {} bytes, more than this server takes (--max-file-size {max})",
            req.size
        );
        return send(writer, &Reply::error(Some(id), ErrorCode::TooLarge, why));
    }
    let _active = shared.load.begin();
    // A ticket says whose the file is; else the (authenticated) balancer.
    let owner = match &req.ticket {
        Some(t) => t.owner.clone(),
        None => req.owner.clone(),
    };
    let upload = match shared
        .files
        .begin(&req.upload_id, &req.name, req.size, owner)
    {
        Ok(Begun::Receiving(r)) => r,
        Ok(Begun::Complete(meta)) => {
            // Only the answer was lost: the client ends it again.
            let ready = Reply::UploadReady(UploadReady {
                id,
                upload_id: req.upload_id.clone(),
                server: addr.to_string(),
                offset: meta.size,
            });
            if let Next::Close = send(writer, &ready) {
                return Next::Close;
            }
            return match reader.message_within::<Request>(shared.config.frame_timeout) {
                Ok(Some(Ok(Request::UploadEnd { id, .. }))) => {
                    send(writer, &stored(id, meta, true, shared))
                }
                _ => Next::Close,
            };
        }
        Err(e) => {
            log::warn!("server {addr}: upload from {peer}: {e}");
            return send(writer, &e.reply(id));
        }
    };
    if upload.offset() > 0 {
        log::info!(
            "server {addr}: resuming upload {} of {:?} from {peer} at byte {} of {}",
            req.upload_id,
            crate::proto::truncate(&req.name, 80),
            upload.offset(),
            req.size
        );
    }
    let ready = Reply::UploadReady(UploadReady {
        id,
        upload_id: req.upload_id.clone(),
        server: addr.to_string(),
        offset: upload.offset(),
    });
    if let Next::Close = send(writer, &ready) {
        return Next::Close;
    }
    let upload_id = req.upload_id.clone();
    report(shared, &req, Outcome::Started);
    // The upload is given back (ended) before the reply goes out, so a
    // client that resumes at once finds it free.
    let (next, reply, meta) = take_chunks(upload, id, reader, peer, shared);
    match (&reply, &meta) {
        (_, Some(meta)) => report(shared, &req, Outcome::Stored(meta)),
        (Some(Reply::Error(e)), _) if client_left(e.code) => {
            report(shared, &req, Outcome::Interrupted)
        }
        (Some(Reply::Error(e)), _) => report(shared, &req, Outcome::Failed(e.message.clone())),
        _ => report(shared, &req, Outcome::Interrupted),
    }
    match reply {
        Some(reply) => {
            if let Reply::Error(e) = &reply {
                log::warn!(
                    "server {addr}: upload {upload_id} from {peer}: {}",
                    e.message
                );
            }
            match (send(writer, &reply), next) {
                (Next::Continue, Next::Continue) => Next::Continue,
                _ => Next::Close,
            }
        }
        None => next,
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
    let max_body = shared.frame_limit() as u64;
    loop {
        let request = match reader.message_within::<Request>(shared.config.frame_timeout) {
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
            Request::Chunk(Chunk {
                offset, body_len, ..
            }) => {
                if body_len > max_body {
                    let reply = Reply::error(
                        Some(id),
                        ErrorCode::FrameTooLarge,
                        format!("chunk of {body_len} bytes exceeds the maximum of {max_body}"),
                    );
                    return (Next::Close, Some(reply), None);
                }
                let deadline = Instant::now() + shared.config.frame_timeout;
                reader.get_mut().set_deadline(Some(deadline));
                let body = read_body(reader, body_len);
                reader.get_mut().set_deadline(None);
                let body = match body {
                    Ok(b) => b,
                    Err(e @ BodyError::Length { .. }) => {
                        let reply = Reply::error(Some(id), ErrorCode::SizeMismatch, e.to_string());
                        return (Next::Close, Some(reply), None);
                    }
                    Err(BodyError::Frame(e)) => {
                        return (Next::Close, e.reply().map(Reply::Error), None)
                    }
                };
                if let Err(e) = upload.write(offset, &body) {
                    if e.code() == ErrorCode::DiskFull {
                        shared.load.note_disk_full(shared.storage.dir());
                    }
                    return (Next::Close, Some(e.reply(id)), None);
                }
            }
            Request::UploadEnd { id: end_id, sha256 } => {
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
                    Err(e) => {
                        if e.code() == ErrorCode::DiskFull {
                            shared.load.note_disk_full(shared.storage.dir());
                        }
                        (Next::Continue, Some(e.reply(end_id)), None)
                    }
                };
            }
            other => {
                let reply = crate::proto::out_of_step(&other);
                return (Next::Close, Some(reply), None);
            }
        }
    }
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
    let result = (|| -> io::Result<()> {
        writer.message(&header)?;
        file.seek(SeekFrom::Start(offset))?;
        let mut buf = vec![0u8; CHUNK_SIZE];
        let mut at = offset;
        while at < meta.size {
            let want = ((meta.size - at) as usize).min(CHUNK_SIZE);
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
    })();
    match result {
        Ok(()) => Next::Continue,
        Err(e) => {
            log::warn!("server {addr}: sending {} to {peer}: {e}", meta.name);
            Next::Close
        }
    }
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
