//! Files of any size: `send` streams a file in chunks (resuming after a
//! broken connection, balancer or server), `get` downloads one (resuming
//! from what is already on disk), `list` shows what the servers hold.
//!
//! No whole file is ever in memory: one chunk at a time, with SHA-256
//! computed as the bytes go by and checked by whoever receives them.

use super::{Config, Error};
use crate::proto::file::CHUNK_SIZE;
use crate::proto::{
    Chunk, Connection, ErrorCode, FileEntry, FileHeader, FileStored, Reply, Request, UploadReady,
    UploadRequest,
};
use crate::text::to_hex;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rand::RngCore;
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Attempts at one file before giving up (each resumes where the last
/// stopped).
pub const MAX_ATTEMPTS: u32 = 12;
/// Files larger than this show a progress bar on a terminal.
const PROGRESS_FROM: u64 = 4 * 1024 * 1024;

/// Why one attempt stopped.
enum Stop {
    /// Worth another attempt: the connection, the balancer or the server
    /// broke. `server` is the server the bytes went to, if known.
    Retry { server: Option<String>, why: String },
    /// Another attempt would fail the same way.
    Fatal(String),
    /// Nothing answers at the address: said as every command says it when
    /// nothing was done yet, else worth another attempt.
    Unreachable(SocketAddr, io::Error),
}

impl Stop {
    /// An unreachable peer as a reason to try again.
    fn or_retry(self) -> Stop {
        match self {
            Stop::Unreachable(addr, e) => retry(None, format!("cannot connect to {addr}: {e}")),
            other => other,
        }
    }
}

/// What nothing answering at `addr` reads as, in every command.
fn unreachable(config: &Config, addr: SocketAddr, e: io::Error) -> Error {
    if addr == config.balancer {
        Error::Connect(addr, e)
    } else {
        Error::ConnectServer(addr, e)
    }
}

fn retry(server: Option<&str>, why: impl ToString) -> Stop {
    Stop::Retry {
        server: server.map(str::to_owned),
        why: why.to_string(),
    }
}

/// An error reply: retried when a later attempt may succeed.
fn refused(server: Option<&str>, code: ErrorCode, message: &str) -> Stop {
    let why = format!("{code}: {message}");
    match code {
        ErrorCode::NoServer
        | ErrorCode::ServerFailed
        | ErrorCode::Storage
        | ErrorCode::DiskFull
        | ErrorCode::Timeout
        | ErrorCode::InProgress
        | ErrorCode::ShuttingDown
        | ErrorCode::Internal
        | ErrorCode::BadOffset
        | ErrorCode::BadTicket
        | ErrorCode::ChecksumMismatch => retry(server, why),
        _ => Stop::Fatal(why),
    }
}

/// A connection to the balancer (logged in, with credentials) or to the
/// server it redirected an upload to.
fn connect(addr: SocketAddr, config: &Config) -> Result<Connection<crate::net::Stream>, Stop> {
    let stream = crate::net::connect(&addr, config.connect_timeout, config.reply_timeout)
        .map_err(|e| Stop::Unreachable(addr, e))?;
    if let (true, Some(credentials)) = (addr == config.balancer, &config.login) {
        super::login::login(&stream, credentials).map_err(|e| {
            Stop::Fatal(format!(
                "the balancer at {addr} refused the login as {}: {e}",
                credentials.user
            ))
        })?;
    }
    Ok(Connection::new(stream, config.max_frame + 1024))
}

/// A new upload id: 24 random hex digits.
fn new_upload_id() -> String {
    let mut bytes = [0u8; 12];
    rand::thread_rng().fill_bytes(&mut bytes);
    to_hex(&bytes)
}

/// SHA-256 of the first `len` bytes of `file`, leaving it positioned at
/// `len`.
fn hash_prefix(file: &mut File, len: u64) -> io::Result<Sha256> {
    file.seek(SeekFrom::Start(0))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK_SIZE];
    let mut left = len;
    while left > 0 {
        let n = file.read(&mut buf[..(left.min(CHUNK_SIZE as u64) as usize)])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the file got shorter",
            ));
        }
        hasher.update(&buf[..n]);
        left -= n as u64;
    }
    Ok(hasher)
}

fn progress(config: &Config, size: u64, verb: &str, name: &str) -> ProgressBar {
    if !config.terminal || size < PROGRESS_FROM {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(size), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_message(format!("{verb} {name}"));
    bar
}

pub fn human_bytes(n: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < units.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", units[unit])
    }
}

/// Uploads one file, resuming as often as needed; returns what the server
/// said once it is in place.
pub fn upload(config: &Config, path: &Path, out: &mut impl Write) -> Result<FileStored, Error> {
    let fail = |why: String| Error::File(path.to_path_buf(), why);
    let mut file = File::open(path).map_err(|e| Error::ReadFile(path.to_path_buf(), e))?;
    let size = file
        .metadata()
        .map_err(|e| Error::ReadFile(path.to_path_buf(), e))?
        .len();
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into());
    let upload_id = new_upload_id();
    let bar = progress(config, size, "sending", &name);
    let started = Instant::now();
    let mut server: Option<String> = None;
    let mut last = String::new();
    for attempt in 1..=MAX_ATTEMPTS {
        if attempt > 1 {
            // Give a restarting balancer or server a moment; longer each time.
            std::thread::sleep(Duration::from_millis(200 * u64::from(attempt - 1).min(10)));
        }
        let request = UploadRequest {
            id: u64::from(attempt),
            upload_id: upload_id.clone(),
            name: name.clone(),
            size,
            server: server.clone(),
            ticket: None,
            owner: None,
            no_clobber: false,
        };
        let attempted = match attempt_upload(config, &mut file, &request, &bar, out) {
            // No balancer at all: said at once, as every command says it.
            Err(Stop::Unreachable(addr, e)) if attempt == 1 && addr == config.balancer => {
                bar.abandon();
                return Err(Error::Connect(addr, e));
            }
            other => other.map_err(Stop::or_retry),
        };
        match attempted {
            Ok(stored) => {
                bar.finish_and_clear();
                let secs = started.elapsed().as_secs_f64().max(1e-3);
                writeln!(
                    out,
                    "stored {} as {} on {} ({}, {:.1} MB/s, sha256 {}){}",
                    path.display(),
                    stored.name,
                    stored.server,
                    human_bytes(stored.size),
                    stored.size as f64 / secs / 1e6,
                    stored.sha256,
                    if attempt > 1 {
                        format!(" after {attempt} attempts")
                    } else {
                        String::new()
                    }
                )?;
                return Ok(stored);
            }
            Err(Stop::Fatal(why)) => {
                bar.abandon();
                return Err(fail(why));
            }
            Err(Stop::Unreachable(addr, e)) => {
                bar.abandon();
                return Err(unreachable(config, addr, e));
            }
            Err(Stop::Retry { server: s, why }) => {
                bar.suspend(|| {
                    let _ = writeln!(
                        out,
                        "{}: {why}; trying again ({} of {MAX_ATTEMPTS})",
                        path.display(),
                        attempt + 1
                    );
                });
                if why.starts_with("storage:") {
                    // That server cannot store it: let the balancer choose.
                    server = None;
                } else if s.is_some() {
                    server = s;
                }
                last = why;
            }
        }
    }
    bar.abandon();
    Err(fail(format!(
        "gave up after {MAX_ATTEMPTS} attempts; last: {last}"
    )))
}

/// Answer to `upload`, following a redirect to the server it names.
fn ready(
    config: &Config,
    request: &UploadRequest,
) -> Result<(Connection<crate::net::Stream>, UploadReady), Stop> {
    let mut conn = connect(config.balancer, config)?;
    let hint = request.server.as_deref();
    let reply = conn
        .call(&Request::Upload(request.clone()))
        .map_err(|e| retry(hint, format!("the balancer did not answer: {e}")))?;
    match reply {
        Reply::UploadReady(r) => Ok((conn, r)),
        Reply::Redirect(r) => {
            let addr: SocketAddr = r
                .server
                .parse()
                .map_err(|_| Stop::Fatal(format!("redirected to a bad address {:?}", r.server)))?;
            let mut direct = connect(addr, config)?;
            let mut request = request.clone();
            request.server = None;
            request.ticket = Some(r.ticket);
            match direct.call(&Request::Upload(request)) {
                Ok(Reply::UploadReady(r)) => Ok((direct, r)),
                Ok(Reply::Error(e)) => Err(refused(Some(&r.server), e.code, &e.message)),
                Ok(other) => Err(Stop::Fatal(format!("unexpected answer {other:?}"))),
                Err(e) => Err(retry(Some(&r.server), format!("server {addr}: {e}"))),
            }
        }
        Reply::Error(e) => Err(refused(hint, e.code, &e.message)),
        other => Err(Stop::Fatal(format!("unexpected answer {other:?}"))),
    }
}

fn attempt_upload(
    config: &Config,
    file: &mut File,
    request: &UploadRequest,
    bar: &ProgressBar,
    out: &mut impl Write,
) -> Result<FileStored, Stop> {
    let (mut conn, ready) = ready(config, request)?;
    let server = ready.server.clone();
    let size = request.size;
    if ready.offset > size {
        return Err(Stop::Fatal(format!(
            "server {server} holds {} bytes of a {size}-byte file",
            ready.offset
        )));
    }
    let note = match (&request.server, ready.offset) {
        (Some(before), 0) if *before != server => {
            Some(format!("{before} is gone: starting again on {server}"))
        }
        (_, 0) => None,
        (_, n) => Some(format!("resuming at byte {n} of {size} on {server}")),
    };
    if let Some(note) = note {
        bar.suspend(|| {
            let _ = writeln!(out, "{note}");
        });
    }
    let local = |e: io::Error| Stop::Fatal(format!("cannot read the file: {e}"));
    let mut hasher = hash_prefix(file, ready.offset).map_err(local)?;
    let mut offset = ready.offset;
    bar.set_position(offset);
    let mut buf = vec![0u8; CHUNK_SIZE];
    while offset < size {
        let want = (size - offset).min(CHUNK_SIZE as u64) as usize;
        file.read_exact(&mut buf[..want]).map_err(local)?;
        let chunk = Chunk {
            id: request.id,
            offset,
            body_len: want as u64,
        };
        let sent = conn
            .send(&Request::Chunk(chunk))
            .and_then(|()| conn.send_payload(&buf[..want]));
        if let Err(e) = sent {
            return Err(explain_break(&mut conn, &server, offset, e));
        }
        hasher.update(&buf[..want]);
        offset += want as u64;
        bar.set_position(offset);
    }
    let sha256 = to_hex(&hasher.finalize());
    let end = Request::UploadEnd {
        id: request.id,
        sha256,
    };
    match conn.call(&end) {
        Ok(Reply::FileStored(stored)) => Ok(stored),
        Ok(Reply::Error(e)) => Err(refused(Some(&server), e.code, &e.message)),
        Ok(other) => Err(Stop::Fatal(format!("unexpected answer {other:?}"))),
        Err(e) => Err(retry(
            Some(&server),
            format!("no answer after the last byte: {e}"),
        )),
    }
}

/// After a failed write: the error the other side sent before closing, if
/// there is one, else the write error.
fn explain_break(
    conn: &mut Connection<crate::net::Stream>,
    server: &str,
    offset: u64,
    e: io::Error,
) -> Stop {
    let _ = conn
        .get_ref()
        .set_read_timeout(Some(Duration::from_millis(500)));
    match conn.parting_error() {
        Some(reply) => refused(Some(server), reply.code, &reply.message),
        None => retry(
            Some(server),
            format!("connection broke at byte {offset}: {e}"),
        ),
    }
}

/// `list`: the files of every server (through the balancer) or of one.
pub fn list(
    config: &Config,
    server: Option<SocketAddr>,
    out: &mut impl Write,
) -> Result<bool, Error> {
    let request = Request::List {
        id: 1,
        owner: None,
        kind: None,
    };
    let reply = match server {
        // Through the balancer: asked as every other request is.
        None => super::ask(config, &request)?,
        Some(addr) => {
            let mut conn = match connect(addr, config) {
                Ok(c) => c,
                Err(Stop::Unreachable(addr, e)) => return Err(unreachable(config, addr, e)),
                Err(Stop::Retry { why, .. } | Stop::Fatal(why)) => {
                    return Err(Error::Io(io::Error::other(why)))
                }
            };
            let reply = conn.call(&request).map_err(|e| {
                Error::Io(io::Error::other(format!(
                    "the server at {addr} did not answer the `list` request: {e}"
                )))
            })?;
            if let Reply::Error(e) = reply {
                return Err(Error::Io(io::Error::other(format!(
                    "the server at {addr} refused the `list` request: {}: {}",
                    e.code, e.message
                ))));
            }
            reply
        }
    };
    let list = match reply {
        Reply::Files(list) => list,
        other => {
            return Err(Error::Io(io::Error::other(format!(
                "unexpected answer {other:?}"
            ))))
        }
    };
    write_listing(&list.files, out)?;
    for problem in &list.unreachable {
        writeln!(out, "not listed: {problem}")?;
    }
    Ok(list.unreachable.is_empty())
}

fn write_listing(files: &[FileEntry], out: &mut impl Write) -> io::Result<()> {
    if files.is_empty() {
        return writeln!(out, "no files stored");
    }
    let width = files
        .iter()
        .map(|f| f.name.chars().count())
        .max()
        .unwrap_or(4);
    // The owner column only when users are on (an admin's listing).
    let owners = files.iter().any(|f| f.owner.is_some());
    let owner = |f: Option<&FileEntry>| match (owners, f) {
        (false, _) => String::new(),
        (true, None) => format!("{:<12}  ", "owner"),
        (true, Some(f)) => format!("{:<12}  ", f.owner.as_deref().unwrap_or("-")),
    };
    writeln!(
        out,
        "{:<width$}  {}{:>10}  {:<21}  {:<24}  sha256",
        "name",
        owner(None),
        "size",
        "server",
        "stored at"
    )?;
    for f in files {
        let at = std::time::UNIX_EPOCH + Duration::from_millis(f.stored_ms);
        writeln!(
            out,
            "{:<width$}  {}{:>10}  {:<21}  {:<24}  {}",
            f.name,
            owner(Some(f)),
            human_bytes(f.size),
            f.server,
            crate::text::rfc3339(at),
            f.sha256
        )?;
    }
    let total: u64 = files.iter().map(|f| f.size).sum();
    writeln!(
        out,
        "{}, {}",
        super::report::counted(files.len() as u64, "file"),
        human_bytes(total)
    )
}

/// `get`: downloads `name` into `output` (default: the name, in the
/// current folder). Bytes arrive in `<output>.part` first, which a later
/// `get` resumes from; the file takes its name only once its checksum
/// matches.
pub fn get(
    config: &Config,
    name: &str,
    output: Option<PathBuf>,
    server: Option<SocketAddr>,
    out: &mut impl Write,
) -> Result<FileHeader, Error> {
    let output = output.unwrap_or_else(|| {
        // Only the last component of the name: never outside this folder.
        PathBuf::from(
            Path::new(name)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "download".into()),
        )
    });
    let mut part = output.clone().into_os_string();
    part.push(".part");
    let part = PathBuf::from(part);
    let addr = server.unwrap_or(config.balancer);
    let fail = |why: String| Error::File(PathBuf::from(name), why);
    let started = Instant::now();
    let mut last = String::new();
    for attempt in 1..=MAX_ATTEMPTS {
        if attempt > 1 {
            std::thread::sleep(Duration::from_millis(200 * u64::from(attempt - 1).min(10)));
        }
        let attempted = match attempt_get(config, addr, name, &part, attempt, out) {
            // Nothing there at all: said at once, as every command says it.
            Err(Stop::Unreachable(addr, e)) if attempt == 1 => {
                return Err(unreachable(config, addr, e))
            }
            other => other.map_err(Stop::or_retry),
        };
        match attempted {
            Ok(header) => {
                std::fs::rename(&part, &output).map_err(|e| Error::ReadFile(output.clone(), e))?;
                let secs = started.elapsed().as_secs_f64().max(1e-3);
                writeln!(
                    out,
                    "got {} from {} into {} ({}, {:.1} MB/s, sha256 verified)",
                    header.name,
                    header.server,
                    output.display(),
                    human_bytes(header.size),
                    (header.size - header.offset) as f64 / secs / 1e6
                )?;
                return Ok(header);
            }
            Err(Stop::Fatal(why)) => return Err(fail(why)),
            Err(Stop::Unreachable(addr, e)) => return Err(unreachable(config, addr, e)),
            Err(Stop::Retry { why, .. }) => {
                writeln!(
                    out,
                    "{name}: {why}; trying again ({} of {MAX_ATTEMPTS})",
                    attempt + 1
                )?;
                last = why;
            }
        }
    }
    Err(fail(format!(
        "gave up after {MAX_ATTEMPTS} attempts; last: {last}"
    )))
}

fn attempt_get(
    config: &Config,
    addr: SocketAddr,
    name: &str,
    part: &Path,
    attempt: u32,
    out: &mut impl Write,
) -> Result<FileHeader, Stop> {
    let local = |e: io::Error| Stop::Fatal(format!("cannot write {}: {e}", part.display()));
    let mut file = File::options()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(part)
        .map_err(local)?;
    let held = file.metadata().map_err(local)?.len();
    let mut conn = connect(addr, config)?;
    let request = Request::Get {
        id: u64::from(attempt),
        name: name.to_string(),
        offset: held,
        owner: None,
    };
    let header = match conn.call(&request) {
        Ok(Reply::File(h)) => h,
        Ok(Reply::Error(e)) if e.code == ErrorCode::BadOffset => {
            // What is on disk is not a prefix of this file: start over.
            file.set_len(0).map_err(local)?;
            return Err(retry(None, format!("{}: starting over", e.message)));
        }
        Ok(Reply::Error(e)) => return Err(refused(None, e.code, &e.message)),
        Ok(other) => return Err(Stop::Fatal(format!("unexpected answer {other:?}"))),
        Err(e) => return Err(retry(None, format!("{addr} did not answer: {e}"))),
    };
    if held > 0 {
        let _ = writeln!(
            out,
            "resuming {name} at byte {held} of {} from {}",
            header.size, header.server
        );
    }
    let mut hasher = hash_prefix(&mut file, held).map_err(local)?;
    let bar = progress(config, header.size, "getting", name);
    bar.set_position(held);
    let mut at = held;
    while at < header.size {
        let chunk = match conn.recv::<Reply>() {
            Ok(Reply::Chunk(c)) if c.offset == at && c.body_len <= header.size - at => c,
            Ok(Reply::Error(e)) => {
                bar.abandon();
                return Err(refused(Some(&header.server), e.code, &e.message));
            }
            Ok(other) => {
                bar.abandon();
                return Err(Stop::Fatal(format!("unexpected answer {other:?}")));
            }
            Err(e) => {
                bar.abandon();
                return Err(retry(
                    Some(&header.server),
                    format!("download broke at byte {at}: {e}"),
                ));
            }
        };
        let body = conn.read_body(chunk.body_len).map_err(|e| {
            retry(
                Some(&header.server),
                format!("download broke at byte {at}: {e}"),
            )
        })?;
        file.write_all(&body).map_err(local)?;
        hasher.update(&body);
        at += chunk.body_len;
        bar.set_position(at);
    }
    bar.finish_and_clear();
    file.sync_all().map_err(local)?;
    let got = to_hex(&hasher.finalize());
    if !got.eq_ignore_ascii_case(&header.sha256) {
        let _ = std::fs::remove_file(part);
        return Err(retry(
            Some(&header.server),
            format!(
                "checksum mismatch (expected {}, got {got}): discarded",
                header.sha256
            ),
        ));
    }
    Ok(header)
}
