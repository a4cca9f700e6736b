//! The client: sends documents to the balancer on one connection and
//! reports where each one landed; also the compute service (`calc`), the
//! servers' status (`status`) and recent transfers (`transfers`).
//!
//! `ftp`, `send` and `calc` run in flat memory whatever their count: requests
//! are made one at a time as a bounded window allows (`pipeline`), each
//! batch prints as it goes (`batch`), and the summary comes from running
//! counts (`report`). Documents are read from their folder by `documents`;
//! the prompt without a command is `interactive`.

pub mod admin;
mod batch;
mod documents;
pub mod failover;
pub mod files;
mod interactive;
pub mod login;
pub mod pipeline;
pub mod report;
pub mod status;
pub mod transfers;

use batch::Batch;
use documents::folder;
pub use documents::{list_documents, load_document, load_samples};
pub use interactive::interactive;
pub use pipeline::{Answer, Fate, DEFAULT_WINDOW};

use crate::net;
use crate::proto::{self, ClientRequest, Document, Operation};
use crossbeam_channel::Receiver;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use report::counted;
use std::fmt;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Batches up to this many requests print one line per request; longer ones
/// show progress and list only what failed.
pub const LONG_BATCH: u64 = 50;

#[derive(Debug, Clone)]
pub struct Config {
    pub balancer: SocketAddr,
    /// Balancers to go on through when `balancer` fails mid-batch, in
    /// turn (`--balancer A,B`); `balancer` is the first of them.
    pub fallbacks: Vec<SocketAddr>,
    /// Folder of sample documents for `ftp`.
    pub documents: PathBuf,
    pub connect_timeout: Duration,
    /// How long to wait for the next reply.
    pub reply_timeout: Duration,
    /// Requests sent and not yet answered, at most.
    pub window: usize,
    /// The balancer's frame limit: a larger request is refused before it is
    /// sent.
    pub max_frame: usize,
    /// Output goes to a terminal: long batches show a progress bar.
    pub terminal: bool,
    /// A message here (the user pressed Ctrl-C) stops a batch with a
    /// summary of what was done so far.
    pub interrupt: Option<Receiver<()>>,
    /// Logs in with these on every connection (balancers with `--users`).
    pub login: Option<login::Credentials>,
    /// Where the cluster key may be: admin requests prove it when the
    /// file exists.
    pub cluster_key_file: Option<PathBuf>,
}

impl Config {
    /// Every balancer to try, the first one first.
    pub fn all_balancers(&self) -> Vec<SocketAddr> {
        let mut all = vec![self.balancer];
        all.extend(self.fallbacks.iter().filter(|a| **a != self.balancer));
        all
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            balancer: SocketAddr::from(([127, 0, 0, 1], 60002)),
            fallbacks: Vec::new(),
            documents: PathBuf::from("file"),
            connect_timeout: Duration::from_secs(5),
            reply_timeout: Duration::from_secs(60),
            window: DEFAULT_WINDOW,
            max_frame: proto::DEFAULT_MAX_FRAME,
            terminal: false,
            interrupt: None,
            login: None,
            cluster_key_file: None,
        }
    }
}

#[derive(Debug)]
pub enum Error {
    NoDocuments(PathBuf),
    /// The folder has `.json` files and none of them is a document: each
    /// with its reason.
    NoUsableDocuments(PathBuf, Vec<Error>),
    ReadDir(PathBuf, io::Error),
    ReadFile(PathBuf, io::Error),
    BadDocument(PathBuf, String),
    /// A file could not be sent or fetched, and why.
    File(PathBuf, String),
    /// No balancer answers at the address.
    Connect(SocketAddr, io::Error),
    /// No server answers at the address (`list --server`, `get --server`).
    ConnectServer(SocketAddr, io::Error),
    /// The user interrupted a batch; its summary has been printed.
    Interrupted,
    Io(io::Error),
}

impl Error {
    /// Why a file could not be sent, without its name.
    fn reason(&self) -> String {
        match self {
            Error::ReadFile(_, e) => format!("cannot read it: {e}"),
            Error::BadDocument(_, why) => format!("not a document: {why}"),
            other => other.to_string(),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::NoDocuments(dir) => write!(
                f,
                "the folder {} has no .json documents in it",
                dir.display()
            ),
            Error::NoUsableDocuments(dir, bad) => {
                write!(
                    f,
                    "none of the .json files in {} is a document; nothing was sent:",
                    dir.display()
                )?;
                for e in bad {
                    write!(f, "\n  {e}")?;
                }
                Ok(())
            }
            Error::ReadDir(dir, e) => write!(f, "cannot list {}: {e}", dir.display()),
            Error::ReadFile(path, e) => write!(f, "cannot read {}: {e}", path.display()),
            Error::BadDocument(path, why) => {
                write!(f, "{} is not a document: {why}", path.display())
            }
            Error::File(path, why) => write!(f, "{}: {why}", path.display()),
            Error::Connect(addr, e) => write!(
                f,
                "no balancer answers at {addr} ({e}). Start one with \
                 `cargo run --release --bin balancer -- --local-servers 3` \
                 (or `balancer --local-servers 3` after `cargo install --path .`), \
                 or give the address of yours with --balancer HOST:PORT"
            ),
            Error::ConnectServer(addr, e) => write!(f, "no server answers at {addr} ({e})"),
            Error::Interrupted => f.write_str("interrupted"),
            Error::Io(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for Error {}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        Error::Io(e)
    }
}

/// Sends one request to the balancer on a fresh connection (so a command
/// that repeats it survives a balancer restart) and returns its answer;
/// an error reply, or no answer, is an error naming the request.
pub fn ask(config: &Config, request: &ClientRequest) -> Result<proto::Reply, Error> {
    let addr = config.balancer;
    let stream = login::open(config)?;
    let mut conn = proto::Connection::new(stream, proto::DEFAULT_MAX_FRAME);
    let kind = request.kind();
    let failed =
        |what: String| Error::Io(io::Error::other(format!("the balancer at {addr} {what}")));
    let reply = conn
        .call(request)
        .map_err(|e| failed(format!("did not answer the `{kind}` request: {e}")))?;
    let _ = conn.get_ref().shutdown(std::net::Shutdown::Both);
    match reply {
        proto::Reply::Error(e) => Err(failed(format!(
            "refused the `{kind}` request: {}: {}",
            e.code, e.message
        ))),
        reply if reply.id() == Some(request.id()) => Ok(reply),
        other => Err(failed(format!(
            "answered the `{kind}` request with {other:?}"
        ))),
    }
}

/// Sends `count` documents, document `index` made by `make(index)` on the
/// writer thread when its turn comes (or the title to show and the reason it
/// could not be made); prints a line per document (or progress, for a long
/// batch) and the summary. Returns whether every document was stored.
fn store_documents(
    config: &Config,
    count: u64,
    make: impl FnMut(u64) -> Result<Document, (String, String)> + Send + 'static,
    out: &mut impl Write,
) -> Result<bool, Error> {
    // Connect first: with no balancer there is nothing to announce.
    let first = connect_first(config)?;
    writeln!(
        out,
        "sending {} to {}",
        counted(count, "document"),
        config.all_balancers()[first.0]
    )?;
    let mut batch = Batch::new(config, count, out);
    let outcome = failover::send(config, count, Box::new(make), &mut batch, first)?;
    let refused = batch.refused;
    let printer = batch.printer;
    let all_done = printer.finish(outcome, "document", "stored")?;
    if refused > 0 {
        let sent = count - refused;
        writeln!(
            out,
            "{} not sent (reasons above); {}",
            counted(refused, "document"),
            match sent {
                0 => "no other document to send".to_string(),
                1 => "the other one was sent, as reported above".to_string(),
                n => format!("the other {n} were sent, as reported above"),
            }
        )?;
    }
    Ok(all_done)
}

/// Connects to the first of the balancers that answers; with none, the
/// error of the first.
fn connect_first(config: &Config) -> Result<(usize, net::Stream), Error> {
    let mut first_error = None;
    for (i, addr) in config.all_balancers().into_iter().enumerate() {
        let config = Config {
            balancer: addr,
            ..config.clone()
        };
        match pipeline::connect(&config) {
            Ok(stream) => return Ok((i, stream)),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    Err(first_error.expect("there is always a first balancer"))
}

/// Why a request is not sent: larger than the balancer's frame limit.
fn too_large(request: &ClientRequest, max_frame: usize) -> Option<String> {
    let size = proto::encoded_len(request);
    (size > max_frame).then(|| {
        format!(
            "too large: {} as a request, over the balancer's frame limit of {} \
             (--max-frame)",
            status::human_bytes(size as u64),
            status::human_bytes(max_frame as u64)
        )
    })
}

/// Sends the given paths: `.json` files as documents, unless `as_files`,
/// and anything else as files, streamed in chunks. A `.json` file that is
/// not a document is reported with its reason and not sent (`--file` sends
/// it as a plain file). Returns whether every one was stored.
pub fn send_paths(
    config: &Config,
    paths: Vec<PathBuf>,
    as_files: bool,
    options: files::SendOptions,
    out: &mut impl Write,
) -> Result<bool, Error> {
    let (documents, files): (Vec<PathBuf>, Vec<PathBuf>) =
        paths.into_iter().partition(|p| !as_files && is_json(p));
    let mut all_ok = true;
    if !documents.is_empty() {
        all_ok &= send_files(config, documents, out)?;
    }
    for path in files {
        match files::upload_with(config, &path, options, out) {
            Ok(_) => {}
            // No balancer: said once, as every command says it.
            Err(e @ Error::Connect(..)) => return Err(e),
            // Where it stopped has been said; the rest is not sent.
            Err(Error::Interrupted) => return Err(Error::Interrupted),
            Err(e) => {
                writeln!(out, "not stored: {e}")?;
                all_ok = false;
            }
        }
    }
    Ok(all_ok)
}

/// Whether a path is meant as a document: a `.json` file.
fn is_json(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"))
}

/// Sends the given `.json` files as documents, each read when its turn
/// comes; one that cannot be read or is not a document is reported with
/// its reason and not sent. Prints a line per document and a summary;
/// returns whether every document was stored.
pub fn send_files(
    config: &Config,
    files: Vec<PathBuf>,
    out: &mut impl Write,
) -> Result<bool, Error> {
    let count = files.len() as u64;
    let max_frame = config.max_frame as u64;
    let make = move |index: u64| {
        let path = &files[index as usize];
        let shown = path.display().to_string();
        let as_file = "`send --file` stores it as a plain file";
        // Not read at all when even its shortest form (escapes undone)
        // would not fit in a request.
        match std::fs::metadata(path) {
            Ok(m) if m.len() > max_frame.saturating_mul(6) => {
                return Err((
                    shown,
                    format!(
                        "too large: {}, more than a document request may carry ({}, \
                         --max-frame) ({as_file})",
                        status::human_bytes(m.len()),
                        status::human_bytes(max_frame)
                    ),
                ))
            }
            _ => {}
        }
        load_document(path).map_err(|e| match e {
            Error::BadDocument(..) => (shown, format!("{} ({as_file})", e.reason())),
            other => (shown, other.reason()),
        })
    };
    store_documents(config, count, make, out)
}

/// Sends `n` documents, each a sample from the documents folder picked at
/// random when its turn comes. Files of the folder that are not documents
/// are listed and left out.
pub fn ftp(config: &Config, n: u64, out: &mut impl Write) -> Result<bool, Error> {
    let (samples, bad) = load_samples(&config.documents)?;
    if !bad.is_empty() {
        writeln!(
            out,
            "leaving out {} of {} that {} not documents:",
            counted(bad.len() as u64, "file"),
            folder(&config.documents),
            if bad.len() == 1 { "is" } else { "are" }
        )?;
        for e in &bad {
            writeln!(out, "  {e}")?;
        }
        writeln!(
            out,
            "picking from the other {}",
            counted(samples.len() as u64, "document")
        )?;
    }
    let mut rng = StdRng::from_entropy();
    let make = move |_| {
        samples
            .choose(&mut rng)
            .cloned()
            .ok_or_else(|| (String::new(), "no sample documents".to_string()))
    };
    store_documents(config, n, make, out)
}

/// Sends `n` compute requests with operations drawn at random and prints
/// each result with the server that computed it. Returns whether all
/// succeeded.
pub fn calc(config: &Config, n: u64, out: &mut impl Write) -> Result<bool, Error> {
    let stream = pipeline::connect(config)?;
    writeln!(
        out,
        "sending {} to {}",
        counted(n, "compute request"),
        config.balancer
    )?;
    let mut rng = StdRng::from_entropy();
    let make = move |id| {
        let operation = Operation::ALL[rng.gen_range(0..Operation::ALL.len())];
        Ok((ClientRequest::Calc { id, operation }, ()))
    };
    let mut batch = Batch::new(config, n, out);
    let outcome = pipeline::run_on(stream, config, n, make, &mut batch)?;
    batch.printer.finish(outcome, "request", "computed")
}
