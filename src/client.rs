//! The client: sends documents to the balancer on one connection and
//! reports where each one landed; also the compute service (`calc`), the
//! servers' status (`status`) and recent transfers (`transfers`).
//!
//! `ftp`, `send` and `calc` run in flat memory whatever their count: requests
//! are made one at a time as a bounded window allows (`pipeline`), and the
//! summary comes from running counts (`report`).

pub mod pipeline;
pub mod report;
pub mod status;
pub mod transfers;

pub use pipeline::{Answer, Fate, DEFAULT_WINDOW};

use crate::proto::{Document, Operation, Request, StoreRequest};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use report::{Tally, Verdict};
use std::fmt;
use std::io::{self, BufRead, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Config {
    pub balancer: SocketAddr,
    /// Folder of sample documents for `ftp`.
    pub documents: PathBuf,
    pub connect_timeout: Duration,
    /// How long to wait for the next reply.
    pub reply_timeout: Duration,
    /// Requests sent and not yet answered, at most.
    pub window: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            balancer: SocketAddr::from(([127, 0, 0, 1], 60002)),
            documents: PathBuf::from("file"),
            connect_timeout: Duration::from_secs(5),
            reply_timeout: Duration::from_secs(60),
            window: DEFAULT_WINDOW,
        }
    }
}

#[derive(Debug)]
pub enum Error {
    NoDocuments(PathBuf),
    ReadDir(PathBuf, io::Error),
    ReadFile(PathBuf, io::Error),
    BadDocument(PathBuf, String),
    Connect(SocketAddr, io::Error),
    Io(io::Error),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::NoDocuments(dir) => write!(
                f,
                "the folder {} has no .json documents in it",
                dir.display()
            ),
            Error::ReadDir(dir, e) => write!(f, "cannot list {}: {e}", dir.display()),
            Error::ReadFile(path, e) => write!(f, "cannot read {}: {e}", path.display()),
            Error::BadDocument(path, why) => {
                write!(f, "{} is not a document: {why}", path.display())
            }
            Error::Connect(addr, e) => write!(f, "cannot connect to the balancer at {addr}: {e}"),
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

/// Reads a document: a JSON object with string fields `titolo` and
/// `contenuto` (other fields are ignored).
pub fn load_document(path: &Path) -> Result<Document, Error> {
    let bytes = std::fs::read(path).map_err(|e| Error::ReadFile(path.to_path_buf(), e))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| Error::BadDocument(path.to_path_buf(), e.to_string()))
}

/// Loads every `.json` document of a folder, once: `ftp` picks from these
/// for each request instead of reading a file per request.
pub fn load_samples(dir: &Path) -> Result<Vec<Document>, Error> {
    list_documents(dir)?
        .iter()
        .map(|path| load_document(path))
        .collect()
}

/// Sends `count` documents, document `index` made by `make(index)` on the
/// writer thread when its turn comes (or the title to show and the reason it
/// could not be made); prints a line per document and the summary. Returns
/// whether every document was stored.
fn store_documents(
    config: &Config,
    count: u64,
    mut make: impl FnMut(u64) -> Result<Document, (String, String)> + Send + 'static,
    out: &mut impl Write,
) -> Result<bool, Error> {
    writeln!(out, "sending {count} documents to {}", config.balancer)?;
    // Only the title of an outstanding document is kept, to print its line.
    let make_request = move |id: u64| {
        make(id - 1).map(|doc| {
            let title = doc.title.clone();
            let request = Request::Store(StoreRequest {
                id,
                doc,
                request_number: None,
                not_after_ms: None,
            });
            (request, title)
        })
    };
    let mut printer = Printer::new(out);
    let note = pipeline::run(config, count, make_request, |id, title, fate| {
        let (line, verdict) = report::describe(id - 1, count, title.as_deref(), &fate);
        printer.line(&line, verdict);
    })?;
    printer.finish(note, "documents", "stored")
}

/// Sends the given files, each read when its turn comes; a file that cannot
/// be read or is not a document is reported as failed and not sent. Prints
/// a line per document and a summary; returns whether every document was
/// stored.
pub fn send_files(
    config: &Config,
    files: Vec<PathBuf>,
    out: &mut impl Write,
) -> Result<bool, Error> {
    let count = files.len() as u64;
    let make = move |index: u64| {
        let path = &files[index as usize];
        load_document(path).map_err(|e| (path.display().to_string(), e.to_string()))
    };
    store_documents(config, count, make, out)
}

/// Sends `n` documents, each a sample from the documents folder picked at
/// random when its turn comes.
pub fn ftp(config: &Config, n: u64, out: &mut impl Write) -> Result<bool, Error> {
    let samples = load_samples(&config.documents)?;
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
    writeln!(out, "sending {n} compute requests to {}", config.balancer)?;
    let mut rng = StdRng::from_entropy();
    let make = move |id| {
        let operation = Operation::ALL[rng.gen_range(0..Operation::ALL.len())];
        Ok((Request::Calc { id, operation }, ()))
    };
    let mut printer = Printer::new(out);
    let note = pipeline::run(config, n, make, |id, _, fate| {
        let (line, verdict) = report::describe_calc(id - 1, n, &fate);
        printer.line(&line, verdict);
    })?;
    printer.finish(note, "requests", "computed")
}

/// Prints a line per request as it is reported and keeps the counts.
struct Printer<'a, W: Write> {
    out: &'a mut W,
    tally: Tally,
    /// The first failed write; the run goes on (documents are still being
    /// stored) and the error is returned at the end.
    write_err: Option<io::Error>,
}

impl<'a, W: Write> Printer<'a, W> {
    fn new(out: &'a mut W) -> Self {
        Printer {
            out,
            tally: Tally::default(),
            write_err: None,
        }
    }

    fn line(&mut self, line: &str, verdict: Verdict<'_>) {
        self.tally.add(verdict);
        if self.write_err.is_none() {
            self.write_err = writeln!(self.out, "{line}").err();
        }
    }

    /// Prints how the connection ended early (if it did) and the summary;
    /// returns whether every request was done.
    fn finish(self, note: Option<String>, noun: &str, verb: &str) -> Result<bool, Error> {
        if let Some(e) = self.write_err {
            return Err(e.into());
        }
        if let Some(note) = note {
            writeln!(self.out, "connection ended early: {note}")?;
        }
        writeln!(self.out, "{}", self.tally.summary(noun, verb))?;
        Ok(self.tally.all_done())
    }
}

const HELP: &str = "commands:
  FTP    send documents picked at random from the documents folder
  CALC   send compute requests with random operations
  help   show this help
  exit   quit (end of input quits too)
commands are case-insensitive";

/// The interactive prompt. Returns whether every batch sent was stored.
pub fn interactive(
    config: &Config,
    input: &mut impl BufRead,
    out: &mut impl Write,
) -> Result<bool, Error> {
    let files = list_documents(&config.documents)?;
    writeln!(
        out,
        "documents available in {}:",
        config.documents.display()
    )?;
    for f in &files {
        let name = f
            .file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default();
        writeln!(out, "  {name}")?;
    }
    writeln!(out, "{HELP}")?;
    let mut all_ok = true;
    while let Some(line) = prompt(input, out, "command> ")? {
        match line.to_ascii_lowercase().as_str() {
            "" => {}
            "exit" | "quit" => break,
            "help" | "?" => writeln!(out, "{HELP}")?,
            command @ ("ftp" | "calc") => {
                let question = if command == "ftp" {
                    "how many documents? "
                } else {
                    "how many requests? "
                };
                let Some(answer) = prompt(input, out, question)? else {
                    break;
                };
                let n = match answer.parse::<u64>() {
                    Ok(n) if n > 0 => n,
                    _ => {
                        writeln!(
                            out,
                            "please type a whole number greater than 0, not `{answer}`"
                        )?;
                        continue;
                    }
                };
                let result = if command == "ftp" {
                    ftp(config, n, out)
                } else {
                    calc(config, n, out)
                };
                match result {
                    Ok(ok) => all_ok &= ok,
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
            .into_iter()
            .map(|d| d.title)
            .collect();
        assert_eq!(titles, ["a", "b"]);

        std::fs::write(dir.path().join("c.json"), r#"{"titolo":"c"}"#).unwrap();
        let err = load_samples(dir.path()).unwrap_err().to_string();
        assert!(err.contains("c.json") && err.contains("contenuto"), "{err}");
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
        let ok = interactive(&config, &mut &b"HeLp\nfoo\nftp\nzero\n"[..], &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(ok);
        assert!(text.contains("a.json"));
        assert!(text.contains("unknown command `foo`"));
        assert!(text.contains("not `zero`"));
        assert!(text.trim_end().ends_with("bye"));
    }
}
