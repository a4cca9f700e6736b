//! The client: picks documents, sends them to the balancer on one
//! connection (all requests written ahead, replies read as they come) and
//! reports where each one landed. Also the compute service (`calc`) and the
//! servers' status (`status`).

pub mod status;

use crate::proto::{
    self, Document, ErrorReply, FrameReader, FrameWriter, Reply, Request, StoreRequest,
};
use rand::seq::SliceRandom;
use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, BufRead, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Config {
    pub balancer: SocketAddr,
    /// Folder of sample documents for `ftp`.
    pub documents: PathBuf,
    pub connect_timeout: Duration,
    /// How long to wait for the next reply.
    pub reply_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            balancer: SocketAddr::from(([127, 0, 0, 1], 60002)),
            documents: PathBuf::from("file"),
            connect_timeout: Duration::from_secs(5),
            reply_timeout: Duration::from_secs(60),
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

/// Picks `n` documents at random (with repetition) from `files`.
pub fn pick_random(files: &[PathBuf], n: usize) -> Vec<PathBuf> {
    let mut rng = rand::thread_rng();
    (0..n)
        .filter_map(|_| files.choose(&mut rng).cloned())
        .collect()
}

/// The answer to one request: its reply, or the error that took its place.
pub type Answer = Result<Reply, ErrorReply>;

/// What happened to one document.
pub type Outcome = Result<proto::Stored, ErrorReply>;

/// Sends requests on one connection, all written ahead by a writer thread,
/// and calls `on_answer(index, answer)` as each reply arrives. Request `i`
/// must carry id `i + 1`. Requests left unanswered when the connection ends
/// get an error answer too, so every index is reported exactly once.
pub fn pipeline(
    config: &Config,
    requests: Vec<Request>,
    mut on_answer: impl FnMut(usize, &Answer),
) -> Result<Vec<Answer>, Error> {
    let count = requests.len();
    let stream = crate::net::connect(
        &config.balancer,
        config.connect_timeout,
        config.reply_timeout,
    )
    .map_err(|e| Error::Connect(config.balancer, e))?;
    let write_half = stream.try_clone()?;
    // Writing on its own thread: a long batch must not fill the socket
    // buffers while nobody reads the replies.
    let writer = thread::Builder::new()
        .name("client-writer".into())
        .spawn(move || write_requests(write_half, requests))?;

    let mut answers: Vec<Option<Answer>> = vec![None; count];
    let mut answered = 0;
    let mut reader = FrameReader::new(&stream, proto::DEFAULT_MAX_FRAME);
    let mut end_reason = None;
    while answered < count {
        let reply = match reader.message::<Reply>() {
            Ok(Some(Ok(reply))) => reply,
            Ok(Some(Err(e))) => {
                end_reason = Some(format!("unreadable reply from the balancer: {e}"));
                break;
            }
            Ok(None) => break,
            Err(e) => {
                end_reason = Some(format!("connection to the balancer failed: {e}"));
                break;
            }
        };
        let answer = match reply {
            Reply::Error(e) if e.id.is_none() => {
                // An error not tied to a request ends the connection.
                end_reason = Some(format!(
                    "balancer closed the connection: {}: {}",
                    e.code, e.message
                ));
                break;
            }
            Reply::Error(e) => Err(e),
            other => Ok(other),
        };
        let id = match &answer {
            Ok(reply) => reply.id(),
            Err(e) => e.id,
        };
        let Some(index) = id.and_then(|id| id.checked_sub(1)).map(|i| i as usize) else {
            continue;
        };
        let Some(slot) = answers.get_mut(index) else {
            continue; // not one of ours
        };
        if slot.is_none() {
            on_answer(index, &answer);
            *slot = Some(answer);
            answered += 1;
        }
    }
    let _ = stream.shutdown(std::net::Shutdown::Both);
    let _ = writer.join();
    let reason = end_reason.unwrap_or_else(|| "connection closed before a reply arrived".into());
    Ok(answers
        .into_iter()
        .enumerate()
        .map(|(i, a)| {
            a.unwrap_or_else(|| {
                let failed = Err(unexpected(&reason));
                on_answer(i, &failed);
                failed
            })
        })
        .collect())
}

/// Sends documents on one connection and calls `on_outcome(index, outcome)`
/// as each one is acknowledged or fails.
pub fn send_documents(
    config: &Config,
    docs: Vec<Document>,
    mut on_outcome: impl FnMut(usize, &Outcome),
) -> Result<Vec<Outcome>, Error> {
    let requests = docs
        .into_iter()
        .enumerate()
        .map(|(i, doc)| {
            Request::Store(StoreRequest {
                id: i as u64 + 1,
                doc,
                request_number: None,
                not_after_ms: None,
            })
        })
        .collect();
    let to_outcome = |answer: &Answer| match answer {
        Ok(Reply::Stored(s)) => Ok(s.clone()),
        Ok(other) => Err(unexpected(&format!("unexpected reply {other:?}"))),
        Err(e) => Err(e.clone()),
    };
    let answers = pipeline(config, requests, |i, answer| {
        on_outcome(i, &to_outcome(answer))
    })?;
    Ok(answers.iter().map(to_outcome).collect())
}

fn unexpected(message: &str) -> ErrorReply {
    ErrorReply {
        id: None,
        code: proto::ErrorCode::Internal,
        message: message.to_string(),
    }
}

fn write_requests(stream: TcpStream, requests: Vec<Request>) {
    let mut writer = FrameWriter::new(stream);
    for request in requests {
        // A failed write shows up on the reading side.
        if writer.message(&request).is_err() {
            return;
        }
    }
}

/// One line per document, as printed to the user.
pub fn describe(index: usize, total: usize, title: &str, outcome: &Outcome) -> String {
    let width = total.to_string().len();
    let title = proto::truncate(title, 60);
    match outcome {
        Ok(s) => format!(
            "  ok    [{:>width$}/{total}] \"{title}\" -> server {}, request #{}, stored as {}, {} letters A",
            index + 1,
            s.server,
            s.request_number,
            s.file,
            s.a_count
        ),
        Err(e) => format!(
            "  FAIL  [{:>width$}/{total}] \"{title}\": {}: {}",
            index + 1,
            e.code,
            e.message
        ),
    }
}

/// The closing summary: counts, and documents per server.
pub fn summary(outcomes: &[Outcome]) -> String {
    let stored = outcomes.iter().filter(|o| o.is_ok()).count();
    let mut per_server: BTreeMap<&str, usize> = BTreeMap::new();
    for s in outcomes.iter().flatten() {
        *per_server.entry(s.server.as_str()).or_default() += 1;
    }
    let mut text = format!(
        "{} documents: {stored} stored, {} failed",
        outcomes.len(),
        outcomes.len() - stored
    );
    if !per_server.is_empty() {
        let spread: Vec<String> = per_server
            .iter()
            .map(|(s, n)| format!("{s}: {n}"))
            .collect();
        text.push_str(&format!(" (per server: {})", spread.join(", ")));
    }
    text
}

/// Sends the given files and prints a line per document and a summary.
/// Returns whether every document was stored.
pub fn send_files(config: &Config, files: &[PathBuf], out: &mut impl Write) -> Result<bool, Error> {
    let docs = files
        .iter()
        .map(|p| load_document(p))
        .collect::<Result<Vec<_>, _>>()?;
    let titles: Vec<String> = docs.iter().map(|d| d.title.clone()).collect();
    let total = docs.len();
    writeln!(out, "sending {total} documents to {}", config.balancer)?;
    let mut write_err = None;
    let outcomes = send_documents(config, docs, |i, outcome| {
        if let Err(e) = writeln!(out, "{}", describe(i, total, &titles[i], outcome)) {
            write_err.get_or_insert(e);
        }
    })?;
    if let Some(e) = write_err {
        return Err(e.into());
    }
    writeln!(out, "{}", summary(&outcomes))?;
    Ok(outcomes.iter().all(|o| o.is_ok()))
}

/// One line per computation, as printed to the user.
pub fn describe_calc(index: usize, total: usize, answer: &Answer) -> String {
    let width = total.to_string().len();
    let n = index + 1;
    match answer {
        Ok(Reply::Calc(c)) => format!(
            "  ok    [{n:>width$}/{total}] {} {} {} = {} ({}) computed by server {}",
            c.a,
            c.operation.symbol(),
            c.b,
            c.result,
            c.operation,
            c.server
        ),
        Ok(other) => format!("  FAIL  [{n:>width$}/{total}] unexpected reply {other:?}"),
        Err(e) => format!("  FAIL  [{n:>width$}/{total}] {}: {}", e.code, e.message),
    }
}

/// Sends `n` compute requests with operations drawn at random and prints
/// each result with the server that computed it. Returns whether all
/// succeeded.
pub fn calc(config: &Config, n: usize, out: &mut impl Write) -> Result<bool, Error> {
    let mut rng = rand::thread_rng();
    let requests = (0..n)
        .map(|i| Request::Calc {
            id: i as u64 + 1,
            operation: *proto::Operation::ALL
                .choose(&mut rng)
                .expect("four operations"),
        })
        .collect();
    writeln!(out, "sending {n} compute requests to {}", config.balancer)?;
    let mut write_err = None;
    let answers = pipeline(config, requests, |i, answer| {
        if let Err(e) = writeln!(out, "{}", describe_calc(i, n, answer)) {
            write_err.get_or_insert(e);
        }
    })?;
    if let Some(e) = write_err {
        return Err(e.into());
    }
    let mut per_server: BTreeMap<&str, usize> = BTreeMap::new();
    for answer in &answers {
        if let Ok(Reply::Calc(c)) = answer {
            *per_server.entry(c.server.as_str()).or_default() += 1;
        }
    }
    let done: usize = per_server.values().sum();
    let spread: Vec<String> = per_server
        .iter()
        .map(|(s, n)| format!("{s}: {n}"))
        .collect();
    writeln!(
        out,
        "{n} requests: {done} computed, {} failed (per server: {})",
        n - done,
        spread.join(", ")
    )?;
    Ok(done == n)
}

/// Sends `n` documents picked at random from the documents folder.
pub fn ftp(config: &Config, n: usize, out: &mut impl Write) -> Result<bool, Error> {
    let files = list_documents(&config.documents)?;
    send_files(config, &pick_random(&files, n), out)
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
                let n = match answer.parse::<usize>() {
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
                    send_files(config, &pick_random(&files, n), out)
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
    use crate::proto::{ErrorCode, Stored};

    fn stored(server: &str, n: u64) -> Outcome {
        Ok(Stored {
            id: n,
            server: server.into(),
            request_number: n,
            file: format!("{n}_x.json"),
            a_count: 2,
            existing: false,
        })
    }

    #[test]
    fn summary_counts_per_server() {
        let outcomes = vec![
            stored("s1", 1),
            stored("s2", 2),
            stored("s1", 3),
            Err(ErrorReply {
                id: Some(4),
                code: ErrorCode::NoServer,
                message: "none".into(),
            }),
        ];
        assert_eq!(
            summary(&outcomes),
            "4 documents: 3 stored, 1 failed (per server: s1: 2, s2: 1)"
        );
    }

    #[test]
    fn describe_lines() {
        let line = describe(0, 12, "Città", &stored("127.0.0.1:5001", 9));
        assert_eq!(
            line,
            "  ok    [ 1/12] \"Città\" -> server 127.0.0.1:5001, request #9, stored as 9_x.json, 2 letters A"
        );
    }

    #[test]
    fn empty_folder_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = list_documents(dir.path()).unwrap_err();
        assert!(err.to_string().contains("has no .json documents"), "{err}");
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
