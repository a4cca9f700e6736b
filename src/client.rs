//! The client: sends documents to the balancer on one connection and
//! reports where each one landed; also the compute service (`calc`), the
//! servers' status (`status`) and recent transfers (`transfers`).
//!
//! `ftp`, `send` and `calc` run in flat memory whatever their count: requests
//! are made one at a time as a bounded window allows (`pipeline`), and the
//! summary comes from running counts (`report`).

pub mod admin;
pub mod failover;
pub mod files;
pub mod login;
pub mod pipeline;
pub mod report;
pub mod status;
pub mod transfers;

pub use pipeline::{Answer, Fate, DEFAULT_WINDOW};

use crate::net;
use crate::proto::{self, Document, Operation, Request};
use crossbeam_channel::Receiver;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};
use pipeline::{Observer, Outcome};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use report::{counted, Tally, Verdict};
use std::fmt;
use std::io::{self, BufRead, Write};
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

/// The `.json` files of a folder, sorted by name.
/// Sends one request to the balancer on a fresh connection (so a command
/// that repeats it survives a balancer restart) and returns its answer;
/// an error reply, or no answer, is an error naming the request.
pub fn ask(config: &Config, request: &Request) -> Result<proto::Reply, Error> {
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

pub fn list_documents(dir: &Path) -> Result<Vec<PathBuf>, Error> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::ReadDir(dir.to_path_buf(), e))?;
    let mut files = Vec::new();
    for entry in entries {
        let path = entry
            .map_err(|e| Error::ReadDir(dir.to_path_buf(), e))?
            .path();
        if path.is_file() && path.extension().is_some_and(|e| e == "json") {
            files.push(path);
        }
    }
    if files.is_empty() {
        return Err(Error::NoDocuments(dir.to_path_buf()));
    }
    files.sort();
    Ok(files)
}

/// What a document file must hold, said the same way for every mistake.
const DOCUMENT_SHAPE: &str = "expected an object with titolo and contenuto";

/// Reads a document: a JSON object with string fields `titolo` and
/// `contenuto` (other fields are ignored). A UTF-8 byte-order mark at the
/// start is skipped, as editors on Windows write one.
pub fn load_document(path: &Path) -> Result<Document, Error> {
    let bytes = std::fs::read(path).map_err(|e| Error::ReadFile(path.to_path_buf(), e))?;
    parse_document(&bytes).map_err(|why| Error::BadDocument(path.to_path_buf(), why))
}

fn parse_document(bytes: &[u8]) -> Result<Document, String> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| format!("not valid JSON: {e}"))?;
    let serde_json::Value::Object(mut object) = value else {
        return Err(DOCUMENT_SHAPE.into());
    };
    let mut field = |name: &str| match object.remove(name) {
        Some(serde_json::Value::String(s)) => Ok(s),
        Some(_) => Err(format!("{DOCUMENT_SHAPE}: `{name}` is not a string")),
        None => Err(format!("{DOCUMENT_SHAPE}: `{name}` is missing")),
    };
    Ok(Document {
        title: field("titolo")?,
        content: field("contenuto")?,
    })
}

/// Loads every `.json` document of a folder, once: `ftp` picks from these
/// for each request instead of reading a file per request. Returns the
/// documents and the files that are not documents, each with its reason;
/// it is an error only when no file is a document.
pub fn load_samples(dir: &Path) -> Result<(Vec<Document>, Vec<Error>), Error> {
    let mut good = Vec::new();
    let mut bad = Vec::new();
    for path in list_documents(dir)? {
        match load_document(&path) {
            Ok(doc) => good.push(doc),
            Err(e) => bad.push(e),
        }
    }
    if good.is_empty() {
        return Err(Error::NoUsableDocuments(dir.to_path_buf(), bad));
    }
    Ok((good, bad))
}

/// A folder as the user would type it: `file/`.
fn folder(dir: &Path) -> String {
    let text = dir.display().to_string();
    if text.ends_with('/') {
        text
    } else {
        format!("{text}/")
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
fn too_large(request: &Request, max_frame: usize) -> Option<String> {
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
        Ok((Request::Calc { id, operation }, ()))
    };
    let mut batch = Batch::new(config, n, out);
    let outcome = pipeline::run_on(stream, config, n, make, &mut batch)?;
    batch.printer.finish(outcome, "request", "computed")
}

/// What one batch reports to: prints each request's line, and says so when
/// the balancer is waiting for a server.
struct Batch<'a, W: Write> {
    config: &'a Config,
    printer: Printer<'a, W>,
    count: u64,
    /// Requests the client refused to send (unreadable file, not a
    /// document, too large).
    refused: u64,
    /// "waiting" has been printed; once per batch is enough.
    waiting_told: bool,
}

impl<'a, W: Write> Batch<'a, W> {
    fn new(config: &'a Config, count: u64, out: &'a mut W) -> Self {
        Batch {
            config,
            printer: Printer::new(out, count, config.terminal),
            count,
            refused: 0,
            waiting_told: false,
        }
    }

    /// No answer for a while: if no server is up, say that the balancer is
    /// holding the requests, so a silent client does not look hung. Asked
    /// on a connection of its own.
    fn check_servers(&mut self) {
        if self.waiting_told {
            return;
        }
        let config = Config {
            reply_timeout: pipeline::QUIET_AFTER,
            connect_timeout: pipeline::QUIET_AFTER,
            ..self.config.clone()
        };
        let Ok(views) = status::fetch(&config, 1) else {
            return;
        };
        if views.is_empty() || views.iter().any(|v| v.state == "up") {
            return;
        }
        self.waiting_told = true;
        let states: Vec<String> = views
            .iter()
            .map(|v| format!("{} {}", v.name, v.state))
            .collect();
        self.printer.say(&format!(
            "waiting: every server is down ({}); the balancer holds the requests \
             until one is back or its --queue-timeout passes",
            states.join(", ")
        ));
    }
}

impl<W: Write> Observer<String> for &mut Batch<'_, W> {
    fn report(&mut self, id: u64, title: Option<String>, fate: Fate) {
        let made = title.is_some();
        if made && matches!(fate, Fate::NotSent(_)) {
            self.refused += 1;
        }
        let (line, verdict) = report::describe(id - 1, self.count, title.as_deref(), &fate);
        self.printer.line(&line, verdict);
    }

    fn quiet(&mut self) {
        self.check_servers();
    }
}

impl<W: Write> Observer<()> for &mut Batch<'_, W> {
    fn report(&mut self, id: u64, _made: Option<()>, fate: Fate) {
        let (line, verdict) = report::describe_calc(id - 1, self.count, &fate);
        self.printer.line(&line, verdict);
    }

    fn quiet(&mut self) {
        self.check_servers();
    }
}

/// How a batch shows its progress.
enum Display {
    /// A line per request (short batches).
    Lines,
    /// A long batch on a terminal: a progress bar, failures printed above.
    Bar(ProgressBar),
    /// A long batch elsewhere: failures, and a progress line every tenth.
    Milestones { next: u64 },
}

/// Prints what happens to each request and keeps the counts.
struct Printer<'a, W: Write> {
    out: &'a mut W,
    tally: Tally,
    count: u64,
    display: Display,
    /// The first failed write; the run goes on (documents are still being
    /// stored) and the error is returned at the end.
    write_err: Option<io::Error>,
}

impl<'a, W: Write> Printer<'a, W> {
    fn new(out: &'a mut W, count: u64, terminal: bool) -> Self {
        let display = if count <= LONG_BATCH {
            Display::Lines
        } else if terminal {
            // Drawn on this thread only (no ticker thread), which holds the
            // lock of stdout.
            let bar = ProgressBar::with_draw_target(Some(count), ProgressDrawTarget::stdout());
            // Narrow, so that the `^C` a terminal echoes does not wrap the
            // line and leave the bar behind when it is cleared.
            if let Ok(style) = ProgressStyle::with_template(
                "{bar:40} {pos}/{len}  {rate}  ETA {eta}  (Ctrl-C stops with a summary)",
            ) {
                bar.set_style(style.with_key(
                    "rate",
                    |state: &ProgressState, w: &mut dyn fmt::Write| {
                        let _ = write!(w, "{:.0}/s", state.per_sec());
                    },
                ));
            }
            Display::Bar(bar)
        } else {
            Display::Milestones {
                next: count.div_ceil(10),
            }
        };
        let _ = out.flush();
        Printer {
            out,
            tally: Tally::default(),
            count,
            display,
            write_err: None,
        }
    }

    fn write(&mut self, line: &str) {
        if self.write_err.is_none() {
            self.write_err = writeln!(self.out, "{line}").err();
        }
    }

    /// Records one request. A long batch lists every request that was not
    /// done (failed, unknown, not sent), and only counts those done.
    fn line(&mut self, line: &str, verdict: Verdict<'_>) {
        self.tally.add(verdict);
        let listed = !matches!(verdict, Verdict::Done(_));
        match &mut self.display {
            Display::Lines => self.write(line),
            Display::Bar(bar) => {
                if listed {
                    bar.println(line);
                }
                bar.inc(1);
            }
            Display::Milestones { next } => {
                let done = self.tally.total() as u64;
                let milestone = done >= *next;
                if milestone {
                    *next = (done + self.count.div_ceil(10)).min(self.count);
                }
                if listed {
                    self.write(line);
                }
                if milestone {
                    let progress = format!(
                        "  ...   {done}/{} ({}%), {} failed so far",
                        self.count,
                        done * 100 / self.count,
                        self.tally.failed()
                    );
                    self.write(&progress);
                }
            }
        }
    }

    /// A message between the lines (above the bar, if there is one).
    fn say(&mut self, text: &str) {
        match &self.display {
            Display::Bar(bar) => bar.println(text),
            _ => {
                self.write(text);
                if self.write_err.is_none() {
                    self.write_err = self.out.flush().err();
                }
            }
        }
    }

    /// Prints how the connection ended early (if it did) and the summary;
    /// returns whether every request was done, or `Interrupted` once the
    /// summary of an interrupted batch is printed.
    fn finish(self, outcome: Outcome, noun: &str, verb: &str) -> Result<bool, Error> {
        if let Display::Bar(bar) = &self.display {
            // An interrupted batch leaves its bar where it stopped.
            if outcome.interrupted.is_some() {
                bar.abandon();
            } else {
                bar.finish_and_clear();
            }
        }
        if let Some(e) = self.write_err {
            return Err(e.into());
        }
        if let Some(note) = outcome.note {
            writeln!(self.out, "connection ended early: {note}")?;
        }
        if let Some(left) = outcome.interrupted {
            writeln!(
                self.out,
                "{}",
                self.tally.summary_interrupted(
                    self.count,
                    noun,
                    verb,
                    left.in_flight,
                    left.never_sent
                )
            )?;
            self.out.flush()?;
            return Err(Error::Interrupted);
        }
        writeln!(self.out, "{}", self.tally.summary(noun, verb))?;
        Ok(self.tally.all_done())
    }
}

const HELP: &str = "commands:
  FTP [N]    send N documents picked at random from the documents folder
  CALC [N]   send N compute requests with random operations
  help       show this help
  exit       quit (end of input, Ctrl-D, quits too)
commands are case-insensitive; without N you are asked for it, and there an
empty line goes back, and exit or another command is taken as typed";

/// The words the prompt takes as commands.
const COMMANDS: [&str; 6] = ["ftp", "calc", "help", "?", "exit", "quit"];

/// What the user answered when asked for a count.
#[derive(Debug, PartialEq)]
enum CountAnswer {
    Count(u64),
    /// An empty line: back to the prompt.
    Cancel,
    /// A command instead of a count (`exit`, `ftp 3`...): to be run as if
    /// typed at the prompt.
    Command(String),
    EndOfInput,
}

/// Asks for a count until one is typed, or something else that answers:
/// an empty line, another command, the end of input. `given` is what was
/// typed after the command, if anything.
fn ask_count(
    input: &mut impl BufRead,
    out: &mut impl Write,
    question: &str,
    mut given: Option<String>,
) -> io::Result<CountAnswer> {
    loop {
        let answer = match given.take() {
            Some(answer) => answer,
            None => match prompt(input, out, question)? {
                Some(answer) => answer,
                None => return Ok(CountAnswer::EndOfInput),
            },
        };
        if answer.is_empty() {
            return Ok(CountAnswer::Cancel);
        }
        let first = answer.split_whitespace().next().unwrap_or("");
        if COMMANDS.contains(&first.to_ascii_lowercase().as_str()) {
            return Ok(CountAnswer::Command(answer));
        }
        match crate::cli::parse_count(&answer) {
            Ok(n) => return Ok(CountAnswer::Count(n)),
            Err(e) => writeln!(
                out,
                "{e} (an empty line goes back to the prompt; exit quits)"
            )?,
        }
    }
}

/// The interactive prompt. Returns whether every batch sent was stored.
pub fn interactive(
    config: &Config,
    input: &mut impl BufRead,
    out: &mut impl Write,
) -> Result<bool, Error> {
    let files = list_documents(&config.documents)?;
    writeln!(out, "documents available in {}", folder(&config.documents))?;
    for f in &files {
        let name = f
            .file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default();
        writeln!(out, "  {name}")?;
    }
    writeln!(out, "{HELP}")?;
    let mut all_ok = true;
    // A command typed where a count was asked for runs next.
    let mut typed: Option<String> = None;
    loop {
        let line = match typed.take() {
            Some(line) => line,
            None => match prompt(input, out, "command> ")? {
                Some(line) => line,
                None => break,
            },
        };
        let line = line.to_ascii_lowercase();
        let mut words = line.split_whitespace();
        let command = words.next().unwrap_or("");
        let given = words.next().map(str::to_string);
        if words.next().is_some() {
            writeln!(out, "too many words in `{line}`\n{HELP}")?;
            continue;
        }
        match command {
            "" => {}
            "exit" | "quit" => break,
            "help" | "?" => writeln!(out, "{HELP}")?,
            "ftp" | "calc" => {
                let question = if command == "ftp" {
                    "how many documents? "
                } else {
                    "how many requests? "
                };
                let n = match ask_count(input, out, question, given)? {
                    CountAnswer::Count(n) => n,
                    CountAnswer::Cancel => continue,
                    CountAnswer::Command(line) => {
                        typed = Some(line);
                        continue;
                    }
                    CountAnswer::EndOfInput => break,
                };
                let result = if command == "ftp" {
                    ftp(config, n, out)
                } else {
                    calc(config, n, out)
                };
                match result {
                    Ok(ok) => all_ok &= ok,
                    Err(Error::Interrupted) => return Err(Error::Interrupted),
                    Err(Error::Io(e)) if e.kind() == io::ErrorKind::BrokenPipe => {
                        return Err(Error::Io(e))
                    }
                    Err(e) => {
                        all_ok = false;
                        writeln!(out, "error: {e}")?;
                    }
                }
            }
            other => writeln!(out, "unknown command `{other}`\n{HELP}")?,
        }
    }
    writeln!(out, "bye")?;
    Ok(all_ok)
}

/// Prints a prompt and reads one trimmed line; `None` at end of input.
fn prompt(
    input: &mut impl BufRead,
    out: &mut impl Write,
    text: &str,
) -> io::Result<Option<String>> {
    write!(out, "{text}")?;
    out.flush()?;
    let mut line = String::new();
    if input.read_line(&mut line)? == 0 {
        writeln!(out)?;
        return Ok(None);
    }
    Ok(Some(line.trim().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_folder_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = list_documents(dir.path()).unwrap_err();
        assert!(err.to_string().contains("has no .json documents"), "{err}");
    }

    #[test]
    fn samples_are_loaded_once_each_and_a_bad_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("b.json"),
            r#"{"titolo":"b","contenuto":"2"}"#,
        )
        .unwrap();
        std::fs::write(
            dir.path().join("a.json"),
            r#"{"titolo":"a","contenuto":"1"}"#,
        )
        .unwrap();
        std::fs::write(dir.path().join("notes.txt"), "not a document").unwrap();
        let titles: Vec<String> = load_samples(dir.path())
            .unwrap()
            .0
            .into_iter()
            .map(|d| d.title)
            .collect();
        assert_eq!(titles, ["a", "b"]);

        // A bad file is left out and named with its reason.
        std::fs::write(dir.path().join("c.json"), r#"{"titolo":"c"}"#).unwrap();
        let (good, bad) = load_samples(dir.path()).unwrap();
        assert_eq!(good.len(), 2);
        let err = bad[0].to_string();
        assert!(err.contains("c.json") && err.contains("contenuto"), "{err}");

        // Only when no file is a document is it an error, listing each.
        let only_bad = tempfile::tempdir().unwrap();
        std::fs::write(only_bad.path().join("x.json"), "[1,2,3]").unwrap();
        std::fs::write(only_bad.path().join("y.json"), "{").unwrap();
        let err = load_samples(only_bad.path()).unwrap_err().to_string();
        assert!(err.contains("x.json") && err.contains("y.json"), "{err}");
        assert!(err.contains("nothing was sent"), "{err}");
    }

    #[test]
    fn documents_say_what_is_wrong_in_the_users_terms() {
        let shape = "expected an object with titolo and contenuto";
        assert_eq!(parse_document(b"[1,2,3]").unwrap_err(), shape);
        let err = parse_document(br#"{"titolo": 1, "contenuto": "x"}"#).unwrap_err();
        assert_eq!(err, format!("{shape}: `titolo` is not a string"));
        let err = parse_document(br#"{"titolo": "t"}"#).unwrap_err();
        assert_eq!(err, format!("{shape}: `contenuto` is missing"));
        assert!(parse_document(b"{")
            .unwrap_err()
            .starts_with("not valid JSON"));
        let bom = b"\xEF\xBB\xBF{\"titolo\": \"t\", \"contenuto\": \"c\"}";
        assert_eq!(parse_document(bom).unwrap().title, "t");
    }

    #[test]
    fn prompt_handles_unknown_commands_and_eof() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("a.json"),
            r#"{"titolo":"t","contenuto":"c"}"#,
        )
        .unwrap();
        let config = Config {
            documents: dir.path().to_path_buf(),
            ..Config::default()
        };
        let mut out = Vec::new();
        let input = b"HeLp\nfoo\nftp\nzero\n0\n\nftp 0\n";
        let ok = interactive(&config, &mut &input[..], &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(ok);
        assert!(text.contains("documents available in "), "{text}");
        assert!(text.contains("a.json"));
        assert!(text.contains("unknown command `foo`"));
        // An invalid count asks again; an empty line goes back.
        assert!(text.contains("`zero` is not a count"), "{text}");
        assert!(text.contains("a count must be at least 1"), "{text}");
        assert_eq!(text.matches("how many documents? ").count(), 4, "{text}");
        assert!(text.trim_end().ends_with("bye"));
    }

    /// What the prompt printed for `input`, with a documents folder.
    fn prompt_output(input: &[u8]) -> String {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("a.json"),
            r#"{"titolo":"t","contenuto":"c"}"#,
        )
        .unwrap();
        let config = Config {
            documents: dir.path().to_path_buf(),
            ..Config::default()
        };
        let mut out = Vec::new();
        interactive(&config, &mut &input[..], &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn a_question_for_a_count_always_lets_the_user_out() {
        // `exit` quits.
        let text = prompt_output(b"FTP abc\nexit\nftp 1\n");
        assert_eq!(text.matches("how many documents? ").count(), 1, "{text}");
        assert!(text.trim_end().ends_with("bye"), "{text}");
        assert!(!text.contains("sending"), "{text}");
        // The end of input (Ctrl-D) quits.
        let text = prompt_output(b"FTP abc\n");
        assert!(text.trim_end().ends_with("bye"), "{text}");
        // Another command is taken as typed: `ftp 0` says why not and
        // asks for its own count; `help` answers and goes back.
        let text = prompt_output(b"FTP abc\nftp 0\nquit\n");
        assert!(text.contains("a count must be at least 1"), "{text}");
        assert_eq!(text.matches("how many documents? ").count(), 2, "{text}");
        let text = prompt_output(b"calc x\nHELP\nexit\n");
        assert_eq!(text.matches("how many requests? ").count(), 1, "{text}");
        assert_eq!(text.matches("commands:").count(), 2, "{text}");
    }

    #[test]
    fn count_answers() {
        let ask = |typed: &str| {
            let mut out = Vec::new();
            ask_count(&mut typed.as_bytes(), &mut out, "n? ", None).unwrap()
        };
        assert_eq!(ask("3\n"), CountAnswer::Count(3));
        assert_eq!(ask("\n"), CountAnswer::Cancel);
        assert_eq!(ask(""), CountAnswer::EndOfInput);
        assert_eq!(ask("x\nExit\n"), CountAnswer::Command("Exit".into()));
        assert_eq!(ask("CALC 2\n"), CountAnswer::Command("CALC 2".into()));
        assert_eq!(ask("0\n\n"), CountAnswer::Cancel);
    }
}
