//! Test helpers: start the real binaries on port 0, wait for their
//! "listening on ADDR" line, talk the protocol with raw frames, and clean
//! up every child process on drop.
//!
//! A child's log (its standard error) goes to a file of its own, not to the
//! test's output: a passing test prints nothing, and a failing one prints
//! the end of each of its children's logs as it unwinds.
#![allow(dead_code)]

pub mod batches;
pub mod pg;
pub mod relay;
pub mod uploads;

use lbft::proto::{self, ClientRequest, FrameReader, Reply, StoreRequest};
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

/// How long a child may take to print its readiness line.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Lines of a child's log shown when its test fails.
const LOG_TAIL: usize = 40;
/// Read timeout for replies in tests.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(20);

/// A child process that is killed and reaped when dropped.
pub struct Proc {
    pub child: Child,
    pub addr: SocketAddr,
    /// Lines printed before the readiness line (embedded servers...).
    pub banner: Vec<String>,
    pub stdout: mpsc::Receiver<String>,
    /// Its standard error: every log line it printed.
    pub log: ChildLog,
}

impl Proc {
    /// Kills the process (if still running) and waits for it.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
        // Dropped while a failed assertion unwinds: show what it logged.
        if thread::panicking() {
            self.log.print_tail();
        }
    }
}

/// A child's standard error, kept in a temporary file of its own.
pub struct ChildLog {
    name: String,
    file: tempfile::NamedTempFile,
}

impl ChildLog {
    /// A new log for a child called `name` (the program's file name).
    pub fn new(bin: &str) -> ChildLog {
        let name = Path::new(bin)
            .file_name()
            .map_or_else(|| bin.to_string(), |n| n.to_string_lossy().into_owned());
        let file = tempfile::Builder::new()
            .prefix(&format!("lbft-test-{name}-"))
            .suffix(".log")
            .tempfile()
            .expect("a temporary file for a child's log");
        ChildLog { name, file }
    }

    /// Where the child writes: hand it as its standard error.
    pub fn stdio(&self) -> Stdio {
        Stdio::from(self.file.reopen().expect("the child's log reopens"))
    }

    pub fn path(&self) -> &Path {
        self.file.path()
    }

    /// Everything logged so far.
    pub fn text(&self) -> String {
        std::fs::read_to_string(self.file.path()).unwrap_or_default()
    }

    /// The last lines, for a test that failed.
    pub fn tail(&self, lines: usize) -> String {
        let text = self.text();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    pub fn print_tail(&self) {
        let tail = self.tail(LOG_TAIL);
        if !tail.is_empty() {
            eprintln!(
                "--- last {LOG_TAIL} lines logged by {} ({}) ---\n{tail}\n---",
                self.name,
                self.file.path().display()
            );
        }
    }
}

fn forward_lines(stdout: ChildStdout) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Spawns `bin` with `args` in `cwd` and waits for its "listening on ADDR"
/// line.
pub fn start(bin: &str, args: &[String], cwd: &Path) -> Proc {
    let log = ChildLog::new(bin);
    let mut child = Command::new(bin)
        .args(args)
        .current_dir(cwd)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log.stdio())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {bin}: {e}"));
    let stdout = forward_lines(child.stdout.take().expect("piped stdout"));
    let mut banner = Vec::new();
    loop {
        match stdout.recv_timeout(READY_TIMEOUT) {
            Ok(line) => {
                if let Some(rest) = line.strip_prefix("listening on ") {
                    let addr = rest.split([',', ' ']).next().unwrap().parse().unwrap();
                    return Proc {
                        child,
                        addr,
                        banner,
                        stdout,
                        log,
                    };
                }
                banner.push(line);
            }
            Err(e) => {
                let _ = child.kill();
                let status = child.wait();
                panic!(
                    "{bin} never said it was listening ({e}); exit: {status:?}; output: {banner:?}; \
                     its log ends:\n{}",
                    log.tail(LOG_TAIL)
                );
            }
        }
    }
}

pub fn server_bin() -> &'static str {
    env!("CARGO_BIN_EXE_server")
}
pub fn balancer_bin() -> &'static str {
    env!("CARGO_BIN_EXE_balancer")
}
pub fn client_bin() -> &'static str {
    env!("CARGO_BIN_EXE_client")
}

pub fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// The cluster key file of a program started in `cwd` without
/// `--cluster-key-file` (created there at its start when missing).
pub fn default_key(cwd: &Path) -> PathBuf {
    cwd.join("cluster.key")
}

/// Starts a storage server on port 0 storing into `dir`.
pub fn start_server(dir: &Path, extra: &[&str]) -> Proc {
    let mut args = strings(&["--listen", "127.0.0.1:0", "--dir"]);
    args.push(dir.display().to_string());
    args.extend(strings(extra));
    start(server_bin(), &args, dir.parent().unwrap_or(dir))
}

/// Starts a balancer on port 0 in `workdir` (its log goes to
/// `workdir/loadbalancer.log`) in front of `servers`.
pub fn start_balancer(workdir: &Path, servers: &[SocketAddr], extra: &[&str]) -> Proc {
    let list: Vec<String> = servers.iter().map(|a| a.to_string()).collect();
    let mut args = strings(&[
        "--listen",
        "127.0.0.1:0",
        "--check-interval",
        "100ms",
        "--servers",
    ]);
    args.push(list.join(","));
    args.extend(strings(extra));
    start(balancer_bin(), &args, workdir)
}

/// A temporary work folder with `count` servers and a balancer in front.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub servers: Vec<Proc>,
    pub server_dirs: Vec<PathBuf>,
    pub balancer: Proc,
}

impl Cluster {
    pub fn start(count: usize, server_args: &[&str], balancer_args: &[&str]) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let mut servers = Vec::new();
        let mut server_dirs = Vec::new();
        for i in 0..count {
            let sdir = dir.path().join(format!("server{i}"));
            servers.push(start_server(&sdir, server_args));
            server_dirs.push(sdir);
        }
        let addrs: Vec<SocketAddr> = servers.iter().map(|s| s.addr).collect();
        let balancer = start_balancer(dir.path(), &addrs, balancer_args);
        Cluster {
            dir,
            servers,
            server_dirs,
            balancer,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("loadbalancer.log")).unwrap_or_default()
    }
}

/// The stored documents of a folder, parsed, keyed by file name.
pub fn stored_files(dir: &Path) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for entry in entries {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if name.ends_with(".json") {
            // A server may move a duplicate aside while this runs.
            let bytes = match std::fs::read(&path) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                other => other.unwrap(),
            };
            let value = serde_json::from_slice(&bytes)
                .unwrap_or_else(|e| panic!("{name} is not JSON: {e}"));
            out.push((name, value));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Bounded poll, for the original wire format only: it has no
/// acknowledgement to wait on, so the disk is checked until `condition`
/// holds or the deadline passes.
pub fn eventually(condition: impl FnMut() -> bool) -> bool {
    poll_until(REPLY_TIMEOUT, condition)
}

/// Polls `condition` until it holds or `within` passes; whether it held.
/// For what gives no signal to wait on (files on disk, another process's
/// view).
pub fn poll_until(within: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + within;
    while std::time::Instant::now() < deadline {
        if condition() {
            return true;
        }
        thread::sleep(Duration::from_millis(20));
    }
    condition()
}

/// Every file below `dir`, recursively.
pub fn all_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let p = entry.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// A raw protocol connection for tests.
pub struct Raw {
    pub stream: TcpStream,
}

impl Raw {
    pub fn connect(addr: SocketAddr) -> Raw {
        Raw::with_timeouts(TcpStream::connect(addr).unwrap())
    }

    /// Connects from the loopback address `source` (any of 127.0.0.0/8),
    /// as another client machine would.
    pub fn connect_from(addr: SocketAddr, source: [u8; 4]) -> Raw {
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket.bind(&SocketAddr::from((source, 0)).into()).unwrap();
        socket.connect(&addr.into()).unwrap();
        Raw::with_timeouts(socket.into())
    }

    fn with_timeouts(stream: TcpStream) -> Raw {
        stream.set_read_timeout(Some(REPLY_TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(REPLY_TIMEOUT)).unwrap();
        Raw { stream }
    }

    /// Connects to a server started by `start_server(server_dir, ..)` and
    /// proves its cluster key (the default `cluster.key` in the folder it
    /// was started from), as the balancer does before it sends work.
    pub fn connect_to_server(addr: SocketAddr, server_dir: &Path) -> Raw {
        Raw::connect_proven(
            addr,
            &default_key(server_dir.parent().unwrap_or(server_dir)),
        )
    }

    /// Connects and proves the cluster key in `key_file`.
    pub fn connect_proven(addr: SocketAddr, key_file: &Path) -> Raw {
        let raw = Raw::connect(addr);
        let key = lbft::auth::ClusterKey::from_file(key_file)
            .unwrap_or_else(|e| panic!("no cluster key: {e}"));
        let mut conn = proto::Connection::new(raw.stream.try_clone().unwrap(), 1 << 16);
        lbft::handshake::initiate(&mut conn, &key, addr, 1_000_000)
            .unwrap_or_else(|e| panic!("cluster handshake with {addr}: {e}"));
        raw
    }

    /// Sends raw bytes as they are.
    pub fn send_bytes(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// Sends one frame with `payload`.
    pub fn send_frame(&mut self, payload: &[u8]) {
        proto::write_frame(&mut self.stream, payload).unwrap();
    }

    pub fn send_json(&mut self, value: &Value) {
        self.send_frame(value.to_string().as_bytes());
    }

    pub fn store(&mut self, id: u64, title: &str, content: &str) {
        self.send_json(&serde_json::json!({
            "type": "store", "id": id, "titolo": title, "contenuto": content
        }));
    }

    /// Sends documents in one write, so that the balancer reads them at
    /// once: a client that pipelines. (Sent one by one, the first may be
    /// read and forwarded before the next arrives.)
    pub fn store_at_once(&mut self, docs: &[(u64, &str, &str)]) {
        let mut bytes = Vec::new();
        for (id, title, content) in docs {
            let doc = serde_json::json!({
                "type": "store", "id": id, "titolo": title, "contenuto": content
            });
            proto::write_frame(&mut bytes, doc.to_string().as_bytes()).unwrap();
        }
        self.send_bytes(&bytes);
    }

    /// Reads one reply; panics on timeout or a closed connection.
    pub fn reply(&mut self) -> Reply {
        self.try_reply().expect("connection closed before a reply")
    }

    /// Reads one reply; `None` when the peer closed the connection.
    pub fn try_reply(&mut self) -> Option<Reply> {
        let payload = proto::read_frame(&mut self.stream, proto::DEFAULT_MAX_FRAME)
            .unwrap_or_else(|e| panic!("reading a reply: {e}"))?;
        Some(proto::decode(&payload).unwrap_or_else(|e| panic!("bad reply: {e}")))
    }

    /// True when the peer has closed the connection (reads end of stream).
    pub fn is_closed(&mut self) -> bool {
        let mut byte = [0u8; 1];
        matches!(self.stream.read(&mut byte), Ok(0) | Err(_))
    }
}

/// `balancer --state PATH user ...`, with `password` (if any) as the one
/// line of standard input.
pub fn user_cmd(state: &Path, args: &[&str], password: Option<&str>) -> std::process::Output {
    let mut child = Command::new(balancer_bin())
        .arg("--state")
        .arg(state)
        .arg("user")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    if let Some(p) = password {
        writeln!(stdin, "{p}").unwrap();
    }
    drop(stdin);
    child.wait_with_output().unwrap()
}

/// Runs the client binary with `args` after `--balancer ADDR`, in `cwd`.
pub fn run_client(balancer: SocketAddr, args: &[&str], cwd: &Path) -> std::process::Output {
    Command::new(client_bin())
        .arg("--balancer")
        .arg(balancer.to_string())
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("client runs")
}

/// The balancer's servers (its answer to `servers`).
pub fn servers(balancer: SocketAddr) -> Vec<proto::ServerView> {
    let mut raw = Raw::connect(balancer);
    raw.send_json(&serde_json::json!({"type": "servers", "id": 1}));
    match raw.reply() {
        Reply::Servers(list) => list.servers,
        other => panic!("{other:?}"),
    }
}

/// Sends a signal (`TERM`, `STOP`, `CONT`...) to a child process.
pub fn signal(proc: &Proc, sig: &str) {
    let status = Command::new("kill")
        .args([format!("-{sig}"), proc.child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill -{sig} failed");
}

/// What one client saw: acknowledged contents, and every other answer.
#[derive(Default)]
pub struct Seen {
    pub stored: BTreeMap<u64, proto::Stored>,
    pub errors: Vec<proto::ErrorReply>,
    /// The final `shutting_down` error without an id, if one came.
    pub closing: Option<proto::ErrorReply>,
}

/// Sends `contents` as documents on one connection, pipelined, and reads
/// answers until each has one or the balancer closes. `on_ack` runs per
/// acknowledgement.
pub fn send_batch(addr: SocketAddr, contents: Vec<String>, mut on_ack: impl FnMut()) -> Seen {
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(REPLY_TIMEOUT)).unwrap();
    let mut write_half = stream.try_clone().unwrap();
    let total = contents.len();
    let writer = thread::spawn(move || {
        for (i, content) in contents.into_iter().enumerate() {
            let request = ClientRequest::Store(StoreRequest {
                id: i as u64 + 1,
                doc: proto::Document {
                    title: format!("doc {}", i + 1),
                    content,
                },
                request_number: None,
                not_after_ms: None,
                key: None,
                resent: false,
            });
            if proto::write_frame(&mut write_half, &proto::encode(&request)).is_err() {
                return; // the balancer closed; the reader reports it
            }
        }
    });
    let mut seen = Seen::default();
    let mut reader = FrameReader::new(&stream, proto::DEFAULT_MAX_FRAME);
    while seen.stored.len() + seen.errors.len() < total {
        match reader.message::<Reply>() {
            Ok(Some(Ok(Reply::Stored(s)))) => {
                on_ack();
                seen.stored.insert(s.id, s);
            }
            Ok(Some(Ok(Reply::Error(e)))) if e.id.is_none() => {
                seen.closing = Some(e);
                break;
            }
            Ok(Some(Ok(Reply::Error(e)))) => seen.errors.push(e),
            Ok(Some(other)) => panic!("unexpected answer {other:?}"),
            Ok(None) => break,
            Err(e) => panic!("reading answers: {e}"),
        }
    }
    let _ = stream.shutdown(std::net::Shutdown::Both);
    let _ = writer.join();
    seen
}

/// A folder with one sample document for `ftp` to pick.
pub fn sample_documents() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("sample.json"),
        r#"{"titolo": "sample", "contenuto": "banana"}"#,
    )
    .unwrap();
    dir
}

/// The address a balancer started with `--metrics` printed for them.
pub fn metrics_addr(balancer: &Proc) -> SocketAddr {
    balancer
        .banner
        .iter()
        .find_map(|l| l.strip_prefix("metrics listening on "))
        .expect("metrics address printed")
        .parse()
        .unwrap()
}

/// A small tmpfs mounted for one test (needs root), unmounted when
/// dropped.
pub struct SmallDisk {
    pub path: PathBuf,
}

impl SmallDisk {
    pub fn mount(path: PathBuf, size: &str) -> Result<SmallDisk, String> {
        std::fs::create_dir_all(&path).map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(SmallDisk { path })
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.path).status();
    }
}
