//! Files of any size: `send` streams a file in chunks (resuming after a
//! broken connection, balancer or server, and across runs), `get`
//! downloads one (resuming from what is already on disk), `list` shows the
//! balancer's catalog of files and documents, `delete` removes a file.
//!
//! No whole file is ever in memory: one chunk at a time, with SHA-256
//! computed as the bytes go by and checked by whoever receives them.
//!
//! An upload's id is made from the file (its path, size and modification
//! time) and the user: running the same `send` again after Ctrl-C, a crash
//! or a lost network asks for the same upload, which the balancer sends
//! back to the server holding its bytes so far.

use super::{Config, Error};
use crate::proto::file::CHUNK_SIZE;
use crate::proto::{
    Chunk, ClientRequest, Connection, EntryKind, ErrorCode, FileEntry, FileHeader, FileList,
    FileStored, ListKind, Reply, StorageRequest, UploadReady, UploadRequest,
};
use crate::text::to_hex;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Attempts at one file before giving up (each resumes where the last
/// stopped).
pub const MAX_ATTEMPTS: u32 = 12;
/// Files larger than this show a progress bar on a terminal.
const PROGRESS_FROM: u64 = 4 * 1024 * 1024;

/// Why one attempt stopped.
enum Stop {
    /// Worth another attempt: the connection, the balancer or the server
    /// broke. `server` is the server the bytes went to, if known; `code`
    /// the error the other side answered with, if it answered.
    Retry {
        server: Option<String>,
        why: String,
        code: Option<ErrorCode>,
    },
    /// Another attempt would fail the same way.
    Fatal(String),
    /// Nothing answers at the address: said as every command says it when
    /// nothing was done yet, else worth another attempt.
    Unreachable(SocketAddr, io::Error),
    /// The user pressed Ctrl-C after `offset` bytes went to `server`.
    Interrupted { offset: u64, server: String },
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

/// How `send` treats a file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SendOptions {
    /// Refuse instead of replacing a file of the same name.
    pub no_clobber: bool,
}

fn retry(server: Option<&str>, why: impl ToString) -> Stop {
    Stop::Retry {
        server: server.map(str::to_owned),
        why: why.to_string(),
        code: None,
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
        | ErrorCode::ChecksumMismatch => Stop::Retry {
            server: server.map(str::to_owned),
            why,
            code: Some(code),
        },
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

/// The upload id of `path` as it is now (24 hex digits): the same for
/// the same file, unchanged, sent by the same user, so that a new run
/// resumes where the last one stopped; another as soon as the file
/// changes. (Should two runs mistake a changed file for the same one, the
/// server's SHA-256 check refuses the mixture and the upload starts over.)
fn upload_id_for(path: &Path, meta: &std::fs::Metadata, user: Option<&str>) -> String {
    let full = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let modified = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let mut h = Sha256::new();
    h.update(b"lbft upload\0");
    h.update(full.to_string_lossy().as_bytes());
    h.update(b"\0");
    h.update(meta.len().to_be_bytes());
    h.update(modified.to_be_bytes());
    h.update(user.unwrap_or("").as_bytes());
    to_hex(&h.finalize()[..12])
}

/// Watches for Ctrl-C (a message on `config.interrupt`) while an upload
/// writes to `stream`: a write blocked on a slow peer would not see it, so
/// the watcher shuts the stream down, and the upload, finding its write
/// failed, asks `interrupted`.
struct Watch {
    flag: Arc<AtomicBool>,
    done: Option<crossbeam_channel::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watch {
    fn new(config: &Config, stream: crate::net::Stream) -> Watch {
        let flag = Arc::new(AtomicBool::new(false));
        let Some(interrupt) = config.interrupt.clone() else {
            return Watch {
                flag,
                done: None,
                thread: None,
            };
        };
        let (done, stop) = crossbeam_channel::bounded::<()>(0);
        let seen = flag.clone();
        let thread = crate::sync::spawn_named("send-watch".into(), None, move || {
            crossbeam_channel::select! {
                recv(interrupt) -> signal => if signal.is_ok() {
                    seen.store(true, Ordering::SeqCst);
                    let _ = stream.shutdown(std::net::Shutdown::Both);
                },
                recv(stop) -> _ => {}
            }
        })
        .ok();
        Watch {
            flag,
            done: Some(done),
            thread,
        }
    }

    fn interrupted(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.done.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Waits `wait` before another attempt; false when the user pressed
/// Ctrl-C meanwhile.
fn pause(config: &Config, wait: Duration) -> bool {
    match &config.interrupt {
        Some(interrupt) => interrupt.recv_timeout(wait).is_err(),
        None => {
            std::thread::sleep(wait);
            true
        }
    }
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
    upload_with(config, path, SendOptions::default(), out)
}

/// `upload` with options.
pub fn upload_with(
    config: &Config,
    path: &Path,
    options: SendOptions,
    out: &mut impl Write,
) -> Result<FileStored, Error> {
    let fail = |why: String| Error::File(path.to_path_buf(), why);
    let (mut file, mut request) = upload_request(config, path, options)?;
    let size = request.size;
    let bar = progress(config, size, "sending", &request.name);
    let started = Instant::now();
    let mut last = String::new();
    let mut through = Turns::new(config);
    for attempt in 1..=MAX_ATTEMPTS {
        // Give a restarting balancer or server a moment; longer each time.
        let wait = Duration::from_millis(200 * u64::from(attempt - 1).min(10));
        if attempt > 1 && !pause(config, wait) {
            bar.abandon();
            say_not_stored(out, path, request.server.as_deref())?;
            return Err(Error::Interrupted);
        }
        request.id = u64::from(attempt);
        let config = &through.config;
        let attempted = match attempt_upload(config, &mut file, &request, &bar, out) {
            // No balancer at all: said at once, as every command says it.
            Err(Stop::Unreachable(addr, e))
                if attempt == 1 && addr == config.balancer && !through.several() =>
            {
                bar.abandon();
                return Err(Error::Connect(addr, e));
            }
            other => other.map_err(Stop::or_retry),
        };
        match attempted {
            Ok(stored) => {
                bar.finish_and_clear();
                say_stored(out, path, &stored, started.elapsed(), attempt)?;
                return Ok(stored);
            }
            Err(Stop::Retry { server, why, code }) => {
                bar.suspend(|| say_retry(out, path, &why, attempt, code, &mut through));
                request.server = next_server(request.server.take(), server, code);
                last = why;
            }
            Err(stop) => {
                bar.abandon();
                return Err(upload_stopped(config, path, size, stop, out));
            }
        }
    }
    bar.abandon();
    Err(fail(format!(
        "gave up after {MAX_ATTEMPTS} attempts; last: {last}"
    )))
}

/// Says why an attempt failed and whether another follows; when nothing
/// answered (no `code`), the next balancer is tried, if there is one.
fn say_retry(
    out: &mut impl Write,
    path: &Path,
    why: &str,
    attempt: u32,
    code: Option<ErrorCode>,
    through: &mut Turns,
) {
    let again = if attempt < MAX_ATTEMPTS {
        format!("; trying again ({} of {MAX_ATTEMPTS})", attempt + 1)
    } else {
        String::new()
    };
    let _ = writeln!(out, "{}: {why}{again}", path.display());
    if code.is_none() && attempt < MAX_ATTEMPTS {
        if let Some(said) = through.next(why) {
            let _ = writeln!(out, "{said}");
        }
    }
}

/// The balancers an upload goes through (`--balancer A,B`): the first, and
/// the next one each time the one in use stops answering.
struct Turns {
    balancers: Vec<SocketAddr>,
    at: usize,
    /// The command's settings, with the balancer in use.
    config: Config,
}

impl Turns {
    fn new(config: &Config) -> Turns {
        Turns {
            balancers: config.all_balancers(),
            at: 0,
            config: config.clone(),
        }
    }

    fn several(&self) -> bool {
        self.balancers.len() > 1
    }

    /// Goes on with the next balancer, if there is another; what to say.
    fn next(&mut self, why: &str) -> Option<String> {
        if !self.several() {
            return None;
        }
        let failed = self.balancers[self.at];
        self.at = (self.at + 1) % self.balancers.len();
        self.config.balancer = self.balancers[self.at];
        Some(format!(
            "balancer {failed} failed ({why}); going on through {}",
            self.config.balancer
        ))
    }
}

/// The file to upload, opened, and the request for it (its id set at
/// each attempt).
fn upload_request(
    config: &Config,
    path: &Path,
    options: SendOptions,
) -> Result<(File, UploadRequest), Error> {
    let file = File::open(path).map_err(|e| Error::ReadFile(path.to_path_buf(), e))?;
    let meta = file
        .metadata()
        .map_err(|e| Error::ReadFile(path.to_path_buf(), e))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into());
    let user = config.login.as_ref().map(|c| c.user.as_str());
    let request = UploadRequest {
        id: 0,
        upload_id: upload_id_for(path, &meta, user),
        name,
        size: meta.len(),
        server: None,
        ticket: None,
        owner: None,
        no_clobber: options.no_clobber,
    };
    Ok((file, request))
}

/// The server to ask for at the next attempt, after one on `tried` failed
/// (answering `code`, if it answered); `named` is the one the bytes went
/// to, if known.
fn next_server(
    tried: Option<String>,
    named: Option<String>,
    code: Option<ErrorCode>,
) -> Option<String> {
    if code == Some(ErrorCode::Storage) {
        // That server cannot store it: let the balancer choose.
        None
    } else {
        named.or(tried)
    }
}

fn say_not_stored(out: &mut impl Write, path: &Path, server: Option<&str>) -> io::Result<()> {
    writeln!(
        out,
        "interrupted: {} was not stored; run the same command again to resume{}",
        path.display(),
        server
            .map(|s| format!(" from what {s} holds"))
            .unwrap_or_default()
    )
}

/// Says where a file was stored, how fast, and after how many attempts.
fn say_stored(
    out: &mut impl Write,
    path: &Path,
    stored: &FileStored,
    took: Duration,
    attempt: u32,
) -> io::Result<()> {
    let secs = took.as_secs_f64().max(1e-3);
    let on_server = if stored.file.is_empty() || stored.file == stored.name {
        String::new()
    } else {
        format!(" (as {} there)", stored.file)
    };
    writeln!(
        out,
        "stored {} as {} on {}{on_server} ({}, {:.1} MB/s, sha256 {}){}",
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
    )
}

/// The error an upload ends with when an attempt stops it; an
/// interruption is said to the user first.
fn upload_stopped(
    config: &Config,
    path: &Path,
    size: u64,
    stop: Stop,
    out: &mut impl Write,
) -> Error {
    match stop {
        Stop::Unreachable(addr, e) => unreachable(config, addr, e),
        Stop::Interrupted { offset, server } => {
            let said = writeln!(
                out,
                "interrupted: {} stopped after {offset} of {size} bytes were sent to {server}; \
                 run the same command again to resume from what {server} holds",
                path.display()
            );
            match said {
                Ok(()) => Error::Interrupted,
                Err(e) => e.into(),
            }
        }
        Stop::Fatal(why) | Stop::Retry { why, .. } => Error::File(path.to_path_buf(), why),
    }
}

/// Answer to `upload`, following a redirect to the server it names.
fn ready(
    config: &Config,
    request: &UploadRequest,
) -> Result<(Connection<crate::net::Stream>, UploadReady), Stop> {
    let mut conn = connect(config.balancer, config)?;
    let hint = request.server.as_deref();
    let reply = conn
        .call(&ClientRequest::Upload(request.clone()))
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
            match direct.call(&StorageRequest::Upload(request)) {
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

/// One attempt at an upload: `upload` (followed to a server if
/// redirected), the chunks, then `upload_end`. The chunks are the same
/// bytes whichever end took the upload, balancer or server.
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
    if let Some(note) = resume_note(request, &server, ready.offset) {
        bar.suspend(|| {
            let _ = writeln!(out, "{note}");
        });
    }
    let local = |e: io::Error| Stop::Fatal(format!("cannot read the file: {e}"));
    let mut hasher = hash_prefix(file, ready.offset).map_err(local)?;
    let mut offset = ready.offset;
    bar.set_position(offset);
    let mut buf = vec![0u8; CHUNK_SIZE];
    let watch = Watch::new(config, conn.get_ref().clone());
    while offset < size {
        if watch.interrupted() {
            return Err(Stop::Interrupted { offset, server });
        }
        let want = (size - offset).min(CHUNK_SIZE as u64) as usize;
        file.read_exact(&mut buf[..want]).map_err(local)?;
        let chunk = Chunk {
            id: request.id,
            offset,
            body_len: want as u64,
        };
        let sent = conn
            .send(&ClientRequest::Chunk(chunk))
            .and_then(|()| conn.send_payload(&buf[..want]));
        if let Err(e) = sent {
            if watch.interrupted() {
                return Err(Stop::Interrupted { offset, server });
            }
            return Err(explain_break(&mut conn, &server, offset, e));
        }
        hasher.update(&buf[..want]);
        offset += want as u64;
        bar.set_position(offset);
    }
    let sha256 = to_hex(&hasher.finalize());
    match conn.call(&ClientRequest::UploadEnd {
        id: request.id,
        sha256,
    }) {
        Err(_) if watch.interrupted() => Err(Stop::Interrupted { offset, server }),
        answer => upload_ended(answer, &server),
    }
}

/// What the user is told when an upload starts again or resumes.
fn resume_note(request: &UploadRequest, server: &str, offset: u64) -> Option<String> {
    let size = request.size;
    match (&request.server, offset) {
        (Some(before), 0) if *before != server => {
            Some(format!("{before} is gone: starting again on {server}"))
        }
        (_, 0) => None,
        (_, n) if n == size => None,
        (_, n) => Some(format!("resuming at byte {n} of {size} on {server}")),
    }
}

/// The server's answer to `upload_end`.
fn upload_ended(
    answer: Result<Reply, crate::proto::CallError>,
    server: &str,
) -> Result<FileStored, Stop> {
    match answer {
        Ok(Reply::FileStored(stored)) => Ok(stored),
        Ok(Reply::Error(e)) => Err(refused(Some(server), e.code, &e.message)),
        Ok(other) => Err(Stop::Fatal(format!("unexpected answer {other:?}"))),
        Err(e) => Err(retry(
            Some(server),
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

/// `list`: the balancer's catalog of files and documents (`kind`), or
/// the files of one server. Returns false when part of it could not be
/// read (servers the balancer could not ask).
pub fn list(
    config: &Config,
    server: Option<SocketAddr>,
    kind: Option<ListKind>,
    out: &mut impl Write,
) -> Result<bool, Error> {
    let addr = server.unwrap_or(config.balancer);
    let mut conn = match connect(addr, config) {
        Ok(c) => c,
        Err(Stop::Unreachable(addr, e)) => return Err(unreachable(config, addr, e)),
        Err(Stop::Retry { why, .. } | Stop::Fatal(why)) => {
            return Err(Error::Io(io::Error::other(why)))
        }
        Err(Stop::Interrupted { .. }) => return Err(Error::Interrupted),
    };
    let listed = fetch_listing(&mut conn, addr, kind)?;
    let (mut documents, files): (Vec<FileEntry>, Vec<FileEntry>) = listed
        .files
        .into_iter()
        .partition(|f| f.kind == EntryKind::Document);
    // ClientRequest numbers are in the order documents were received.
    documents.sort_by_key(|d| d.number);
    let wants = kind.unwrap_or(if server.is_some() {
        ListKind::Files
    } else {
        ListKind::All
    });
    if wants.has(EntryKind::File) {
        write_listing(&files, out)?;
    }
    if wants.has(EntryKind::Document) {
        if wants.has(EntryKind::File) {
            writeln!(out)?;
        }
        write_documents(&documents, out)?;
    }
    write_unavailable(&files, &documents, out)?;
    if !listed.rebuilding.is_empty() {
        writeln!(
            out,
            "the balancer is still taking in the listing of {}: entries may be missing",
            listed.rebuilding.join(", ")
        )?;
    }
    for problem in &listed.unreachable {
        writeln!(out, "not listed: {problem}")?;
    }
    Ok(listed.unreachable.is_empty())
}

/// Asks `addr` for a listing and gathers its pages into one.
fn fetch_listing(
    conn: &mut Connection<crate::net::Stream>,
    addr: SocketAddr,
    kind: Option<ListKind>,
) -> Result<FileList, Error> {
    // A server reads the same request (its own files only).
    let request = ClientRequest::List { id: 1, kind };
    let failed = |why: String| Error::Io(io::Error::other(why));
    conn.send(&request)
        .map_err(|e| failed(format!("{addr} did not answer: {e}")))?;
    let mut all = FileList {
        id: 1,
        files: Vec::new(),
        unreachable: Vec::new(),
        rebuilding: Vec::new(),
        more: false,
    };
    loop {
        match conn.recv::<Reply>() {
            Ok(Reply::Files(page)) => {
                all.files.extend(page.files);
                all.unreachable.extend(page.unreachable);
                all.rebuilding.extend(page.rebuilding);
                if !page.more {
                    return Ok(all);
                }
            }
            Ok(Reply::Error(e)) => {
                return Err(failed(format!("{addr} refused: {}: {}", e.code, e.message)))
            }
            Ok(other) => return Err(failed(format!("unexpected answer {other:?}"))),
            Err(e) => return Err(failed(format!("{addr} did not answer: {e}"))),
        }
    }
}

/// Says which entries are held only by servers that cannot be reached.
fn write_unavailable(
    files: &[FileEntry],
    documents: &[FileEntry],
    out: &mut impl Write,
) -> io::Result<()> {
    let unavailable: Vec<&FileEntry> = files
        .iter()
        .chain(documents)
        .filter(|f| !f.available)
        .collect();
    if unavailable.is_empty() {
        return Ok(());
    }
    let mut servers: Vec<&str> = unavailable.iter().map(|f| f.server.as_str()).collect();
    servers.sort_unstable();
    servers.dedup();
    writeln!(
        out,
        "{} unavailable: held only by {}, which cannot be reached now; `get` works again \
         once {} back",
        super::report::counted(unavailable.len() as u64, "entry"),
        servers.join(", "),
        if servers.len() == 1 {
            "it is"
        } else {
            "they are"
        }
    )
}

/// Where an entry is, as a table shows it: its server, and whether that
/// is down.
fn location(f: &FileEntry) -> String {
    let mut at = if f.available {
        f.server.clone()
    } else {
        format!("{} (unavailable)", f.server)
    };
    // With --replicas: how many copies are live, and whether too few.
    if f.copies > 0 {
        at.push_str(&format!(" [{} live copies]", f.copies));
    }
    if f.under_replicated {
        at.push_str(" under-replicated");
    }
    at
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
    let where_width = files
        .iter()
        .map(|f| location(f).chars().count())
        .max()
        .unwrap_or(6)
        .max(21);
    let owner = owner_column(files);
    writeln!(
        out,
        "{:<width$}  {}{:>10}  {:<where_width$}  {:<24}  sha256",
        "name",
        owner(None),
        "size",
        "server",
        "stored at"
    )?;
    for f in files {
        writeln!(
            out,
            "{:<width$}  {}{:>10}  {:<where_width$}  {:<24}  {}",
            f.name,
            owner(Some(f)),
            human_bytes(f.size),
            location(f),
            stored_at(f.stored_ms),
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

/// The owner column of a listing: its heading (`None`) or an entry's
/// owner, only when users are on (an admin's listing).
fn owner_column(entries: &[FileEntry]) -> impl Fn(Option<&FileEntry>) -> String {
    let owners = entries.iter().any(|f| f.owner.is_some());
    move |f| match (owners, f) {
        (false, _) => String::new(),
        (true, None) => format!("{:<12}  ", "owner"),
        (true, Some(f)) => format!("{:<12}  ", f.owner.as_deref().unwrap_or("-")),
    }
}

/// When an entry was stored, as RFC 3339.
fn stored_at(stored_ms: u64) -> String {
    crate::text::rfc3339(std::time::UNIX_EPOCH + Duration::from_millis(stored_ms))
}

fn write_documents(docs: &[FileEntry], out: &mut impl Write) -> io::Result<()> {
    if docs.is_empty() {
        return writeln!(out, "no documents stored");
    }
    let width = docs
        .iter()
        .map(|f| f.name.chars().count())
        .max()
        .unwrap_or(5)
        .clamp(5, 40);
    let owner = owner_column(docs);
    writeln!(
        out,
        "{:<20}  {:<width$}  {}{:>10}  {:<21}  {:<24}  file",
        "document",
        "title",
        owner(None),
        "size",
        "server",
        "stored at"
    )?;
    for d in docs {
        writeln!(
            out,
            "{:<20}  {:<width$}  {}{:>10}  {:<21}  {:<24}  {}",
            d.number.map_or("-".to_string(), |n| n.to_string()),
            crate::proto::truncate(&d.name, 40),
            owner(Some(d)),
            human_bytes(d.size),
            location(d),
            stored_at(d.stored_ms),
            d.server_file()
        )?;
    }
    let total: u64 = docs.iter().map(|f| f.size).sum();
    writeln!(
        out,
        "{}, {}",
        super::report::counted(docs.len() as u64, "document"),
        human_bytes(total)
    )
}

/// Which file `get` fetches and where it puts it.
#[derive(Debug, Clone, Default)]
pub struct GetOptions {
    /// Where to write it (default: the name, in the current folder).
    pub output: Option<PathBuf>,
    /// Ask this server directly instead of the balancer.
    pub server: Option<SocketAddr>,
    /// Whose file, for an admin.
    pub owner: Option<String>,
}

/// `get`: downloads `name` into `output` (default: the name, in the
/// current folder). Bytes arrive in `<output>.part` first, which a later
/// `get` resumes from; the file takes its name only once its checksum
/// matches. Nothing is written before a server has the file.
pub fn get(
    config: &Config,
    name: &str,
    options: GetOptions,
    out: &mut impl Write,
) -> Result<FileHeader, Error> {
    let (output, part) = output_paths(name, &options);
    let addr = options.server.unwrap_or(config.balancer);
    let fail = |why: String| Error::File(PathBuf::from(name), why);
    let started = Instant::now();
    let mut last = String::new();
    for attempt in 1..=MAX_ATTEMPTS {
        if attempt > 1 {
            std::thread::sleep(Duration::from_millis(200 * u64::from(attempt - 1).min(10)));
        }
        let fetch = Fetch {
            addr,
            name,
            owner: options.owner.as_deref(),
            part: &part,
            attempt,
        };
        let attempted = match attempt_get(config, &fetch, out) {
            // Nothing there at all: said at once, as every command says it.
            Err(Stop::Unreachable(addr, e)) if attempt == 1 => {
                return Err(unreachable(config, addr, e))
            }
            other => other.map_err(Stop::or_retry),
        };
        match attempted {
            Ok(header) => {
                std::fs::rename(&part, &output).map_err(|e| Error::ReadFile(output.clone(), e))?;
                say_got(out, &header, &output, started.elapsed())?;
                return Ok(header);
            }
            Err(Stop::Fatal(why)) => return Err(fail(why)),
            Err(Stop::Unreachable(addr, e)) => return Err(unreachable(config, addr, e)),
            Err(Stop::Interrupted { .. }) => return Err(Error::Interrupted),
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

/// One attempt of `get`.
struct Fetch<'a> {
    addr: SocketAddr,
    name: &'a str,
    owner: Option<&'a str>,
    part: &'a Path,
    attempt: u32,
}

fn say_got(
    out: &mut impl Write,
    header: &FileHeader,
    output: &Path,
    took: Duration,
) -> io::Result<()> {
    let secs = took.as_secs_f64().max(1e-3);
    writeln!(
        out,
        "got {} from {} into {} ({}, {:.1} MB/s, sha256 verified)",
        header.name,
        header.server,
        output.display(),
        human_bytes(header.size),
        (header.size - header.offset) as f64 / secs / 1e6
    )
}

/// The bytes an earlier attempt left in the partial file (none when there
/// is none).
fn held_bytes(part: &Path) -> io::Result<u64> {
    match std::fs::metadata(part) {
        Ok(m) => Ok(m.len()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e),
    }
}

/// Where a download goes, and the partial file it is written into
/// first.
fn output_paths(name: &str, options: &GetOptions) -> (PathBuf, PathBuf) {
    let output = options.output.clone().unwrap_or_else(|| {
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
    (output, PathBuf::from(part))
}

/// Sends `get`; the file's header when it comes.
fn ask_for_file(
    conn: &mut Connection<crate::net::Stream>,
    request: &ClientRequest,
    fetch: &Fetch<'_>,
) -> Result<FileHeader, Stop> {
    match conn.call(request) {
        Ok(Reply::File(h)) => Ok(h),
        Ok(Reply::Error(e)) if e.code == ErrorCode::BadOffset => {
            // What is on disk is not a prefix of this file: start over.
            let _ = std::fs::remove_file(fetch.part);
            Err(retry(None, format!("{}: starting over", e.message)))
        }
        Ok(Reply::Error(e)) => Err(refused(None, e.code, &e.message)),
        Ok(other) => Err(Stop::Fatal(format!("unexpected answer {other:?}"))),
        Err(e) => Err(retry(None, format!("{} did not answer: {e}", fetch.addr))),
    }
}

/// The next chunk's header of a download, which must start at `at`.
fn next_chunk(
    conn: &mut Connection<crate::net::Stream>,
    header: &FileHeader,
    at: u64,
) -> Result<Chunk, Stop> {
    match conn.recv::<Reply>() {
        Ok(Reply::Chunk(c)) if c.offset == at && c.body_len <= header.size - at => Ok(c),
        Ok(Reply::Error(e)) => Err(refused(Some(&header.server), e.code, &e.message)),
        Ok(other) => Err(Stop::Fatal(format!("unexpected answer {other:?}"))),
        Err(e) => Err(retry(
            Some(&header.server),
            format!("download broke at byte {at}: {e}"),
        )),
    }
}

/// Writes a download's chunks from byte `held` into `file`, hashing
/// them. `Err` holds why it stopped: the other side (`Ok`) or the local
/// file (`Err`).
fn receive_body(
    conn: &mut Connection<crate::net::Stream>,
    header: &FileHeader,
    file: &mut File,
    hasher: &mut Sha256,
    bar: &ProgressBar,
    held: u64,
) -> Result<(), Result<Stop, io::Error>> {
    let mut at = held;
    while at < header.size {
        let chunk = next_chunk(conn, header, at).map_err(|stop| {
            bar.abandon();
            Ok(stop)
        })?;
        let body = conn.read_body(chunk.body_len).map_err(|e| {
            Ok(retry(
                Some(&header.server),
                format!("download broke at byte {at}: {e}"),
            ))
        })?;
        file.write_all(&body).map_err(Err)?;
        hasher.update(&body);
        at += chunk.body_len;
        bar.set_position(at);
    }
    Ok(())
}

fn attempt_get(
    config: &Config,
    fetch: &Fetch<'_>,
    out: &mut impl Write,
) -> Result<FileHeader, Stop> {
    let Fetch {
        addr,
        name,
        part,
        attempt,
        ..
    } = *fetch;
    let local = |e: io::Error| Stop::Fatal(format!("cannot write {}: {e}", part.display()));
    // What an earlier attempt left; nothing is created until the file is
    // found.
    let held = held_bytes(part).map_err(local)?;
    let mut conn = connect(addr, config)?;
    let request = ClientRequest::Get {
        id: u64::from(attempt),
        name: name.to_string(),
        offset: held,
        owner: fetch.owner.map(str::to_owned),
    };
    let header = ask_for_file(&mut conn, &request, fetch)?;
    let mut file = File::options()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(part)
        .map_err(local)?;
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
    receive_body(&mut conn, &header, &mut file, &mut hasher, &bar, held)
        .map_err(|stop| stop.unwrap_or_else(&local))?;
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

/// `delete`: removes the file `name` (for an admin, of user `owner`, or
/// the only one of that name) from the catalog and from its servers.
pub fn delete(
    config: &Config,
    name: &str,
    owner: Option<String>,
    out: &mut impl Write,
) -> Result<bool, Error> {
    let request = ClientRequest::Delete {
        id: 1,
        name: name.to_string(),
        owner,
    };
    let reply = super::ask(config, &request)?;
    let Reply::Deleted(deleted) = reply else {
        return Err(Error::Io(io::Error::other(format!(
            "unexpected answer {reply:?}"
        ))));
    };
    let mut line = format!("deleted {}", deleted.name);
    if !deleted.servers.is_empty() {
        line.push_str(&format!(": removed from {}", deleted.servers.join(", ")));
    }
    if !deleted.pending.is_empty() {
        line.push_str(&format!(
            "; {} cannot be reached now: the copy there goes once it is back",
            deleted.pending.join(", ")
        ));
    }
    writeln!(out, "{line}")?;
    Ok(true)
}
