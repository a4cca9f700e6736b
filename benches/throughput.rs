//! Throughput and latency of storing documents, with and without the balancer.
//!
//! Everything runs in this process on 127.0.0.1: three storage servers (each
//! in its own temporary folder), a balancer in front of all three and a
//! second balancer in front of only the first one. Each scenario sends the
//! same number of documents, pipelined on one connection (a writer thread
//! sends every `store` request while the main thread reads the replies), and
//! records the latency of each request from send to reply:
//!
//! - a. baseline: straight to one server, no balancer;
//! - b. balancer -> 1 server (the balancer's overhead against a);
//! - c. balancer -> 3 servers;
//! - d. balancer -> 3 servers, 4 client connections sharing the documents.
//!
//! Every reply must be `stored` and the servers' folders must gain exactly
//! one file per document. Servers fsync each document, so the disk bounds
//! the numbers.
//!
//! Run with `cargo bench --bench throughput [-- --docs N --size BYTES]`
//! (defaults: 2000 documents of 1024 bytes).

use lbft::balancer::{self, Backend, Balancer};
use lbft::proto::{self, Document, FrameReader, FrameWriter, Reply, Request, StoreRequest};
use lbft::server::{self, Server};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};
use sysinfo::{ProcessRefreshKind, ProcessesToUpdate, System};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const REPLY_TIMEOUT: Duration = Duration::from_secs(120);
const MIB: f64 = 1024.0 * 1024.0;

struct Options {
    docs: usize,
    size: usize,
}

/// Reads `--docs N` and `--size BYTES`; anything else (such as the `--bench`
/// cargo passes) is ignored.
fn parse_args() -> Options {
    let mut options = Options {
        docs: 2000,
        size: 1024,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let target = match arg.as_str() {
            "--docs" => &mut options.docs,
            "--size" => &mut options.size,
            _ => continue,
        };
        let value = args.next().unwrap_or_else(|| panic!("{arg} needs a value"));
        *target = value
            .parse()
            .unwrap_or_else(|e| panic!("{arg} {value}: not a whole number ({e})"));
    }
    assert!(options.docs >= 1, "--docs must be at least 1");
    options
}

/// Resident memory of this process, in MiB.
fn resident_mib() -> f64 {
    let pid = sysinfo::get_current_pid().expect("cannot find own process id");
    let mut system = System::new();
    system.refresh_processes_specifics(
        ProcessesToUpdate::Some(&[pid]),
        false,
        ProcessRefreshKind::nothing().with_memory(),
    );
    let process = system
        .process(pid)
        .expect("sysinfo cannot see this process");
    process.memory() as f64 / MIB
}

/// `size` bytes of ASCII text with some letters `a` in it.
fn content(size: usize) -> String {
    const TEXT: &str = "lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod. ";
    TEXT.chars().cycle().take(size).collect()
}

fn count_a(text: &str) -> u64 {
    text.chars().filter(|c| matches!(c, 'a' | 'A')).count() as u64
}

/// Stored documents (visible `.json` files) in a server folder.
fn count_files(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .filter_map(|entry| entry.ok())
        .filter(|entry| {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            !name.starts_with('.') && name.ends_with(".json")
        })
        .count()
}

fn connect(addr: SocketAddr) -> TcpStream {
    lbft::net::connect(&addr, CONNECT_TIMEOUT, REPLY_TIMEOUT)
        .unwrap_or_else(|e| panic!("cannot connect to {addr}: {e}"))
}

/// Reads the next reply, panicking unless it is `stored`.
fn read_stored(reader: &mut FrameReader<&TcpStream>, addr: SocketAddr) -> proto::Stored {
    match reader.message::<Reply>() {
        Ok(Some(Ok(Reply::Stored(stored)))) => stored,
        Ok(Some(Ok(other))) => panic!("{addr}: expected a `stored` reply, got {other:?}"),
        Ok(Some(Err(e))) => panic!("{addr}: unreadable reply: {e}"),
        Ok(None) => panic!("{addr}: connection closed before every reply arrived"),
        Err(e) => panic!("{addr}: reading replies failed: {e}"),
    }
}

/// Stores one document and waits for its reply. A balancer holds documents
/// until its first health probe has completed, so this tells it is ready.
fn warm_up(addr: SocketAddr, title: &str) {
    let stream = connect(addr);
    let mut writer = FrameWriter::new(&stream);
    let request = Request::Store(StoreRequest {
        id: 1,
        doc: Document {
            title: title.to_string(),
            content: "warm-up".into(),
        },
        request_number: None,
        not_after_ms: None,
    });
    writer
        .message(&request)
        .unwrap_or_else(|e| panic!("{addr}: cannot send the warm-up document: {e}"));
    let mut reader = FrameReader::new(&stream, proto::DEFAULT_MAX_FRAME);
    read_stored(&mut reader, addr);
}

/// Sends `docs` pipelined on one connection and returns each request's
/// latency (send to reply) and the server named by each reply.
fn send_pipelined(
    addr: SocketAddr,
    docs: Vec<Document>,
    a_count: u64,
) -> (Vec<Duration>, Vec<String>) {
    let count = docs.len();
    let stream = connect(addr);
    let write_half = stream.try_clone().expect("cannot clone the client socket");
    // The writer reports (id, send instant) just before writing each request,
    // so by the time a reply arrives its send instant is on the channel.
    let (sent_tx, sent_rx) = mpsc::channel::<(u64, Instant)>();
    let writer = thread::Builder::new()
        .name("bench-writer".into())
        .spawn(move || {
            let mut writer = FrameWriter::new(write_half);
            for (i, doc) in docs.into_iter().enumerate() {
                let id = i as u64 + 1;
                let request = Request::Store(StoreRequest {
                    id,
                    doc,
                    request_number: None,
                    not_after_ms: None,
                });
                sent_tx
                    .send((id, Instant::now()))
                    .expect("the reader stopped before the writer");
                writer
                    .message(&request)
                    .unwrap_or_else(|e| panic!("{addr}: cannot send request {id}: {e}"));
            }
        })
        .expect("cannot start the writer thread");

    // Index = id; slot 0 unused.
    let mut sent_at: Vec<Option<Instant>> = vec![None; count + 1];
    let mut latency: Vec<Option<Duration>> = vec![None; count + 1];
    let mut servers = Vec::with_capacity(count);
    let mut reader = FrameReader::new(&stream, proto::DEFAULT_MAX_FRAME);
    for _ in 0..count {
        let stored = read_stored(&mut reader, addr);
        let received = Instant::now();
        let id = stored.id as usize;
        assert!(
            (1..=count).contains(&id),
            "{addr}: reply for unknown request id {id}"
        );
        assert!(
            latency[id].is_none(),
            "{addr}: two replies for request {id}"
        );
        assert_eq!(
            stored.a_count, a_count,
            "{addr}: wrong count of letters A for request {id}"
        );
        while sent_at[id].is_none() {
            let (sent_id, at) = sent_rx
                .recv()
                .expect("the writer stopped before sending the request being answered");
            sent_at[sent_id as usize] = Some(at);
        }
        let sent = sent_at[id].expect("send instant just recorded");
        latency[id] = Some(received - sent);
        servers.push(stored.server);
    }
    writer.join().expect("the writer thread panicked");
    let latencies = latency.into_iter().flatten().collect();
    (latencies, servers)
}

struct Row {
    name: &'static str,
    docs: usize,
    secs: f64,
    latencies: Vec<Duration>,
}

impl Row {
    fn docs_per_sec(&self) -> f64 {
        self.docs as f64 / self.secs
    }

    /// Nearest-rank percentile, in milliseconds.
    fn percentile_ms(&self, p: usize) -> f64 {
        let rank = (p * self.latencies.len()).div_ceil(100).max(1);
        self.latencies[rank - 1].as_secs_f64() * 1000.0
    }
}

/// Runs one scenario: `docs` documents over `conns` connections to `addr`,
/// checked against the files that appear in `dirs`.
fn scenario(
    name: &'static str,
    tag: &str,
    addr: SocketAddr,
    conns: usize,
    options: &Options,
    dirs: &[PathBuf],
) -> Row {
    warm_up(addr, &format!("warm-up {tag}"));
    let files_before: Vec<usize> = dirs.iter().map(|d| count_files(d)).collect();

    let text = content(options.size);
    let a_count = count_a(&text);
    // Spread the documents over the connections; titles stay distinct.
    let mut batches: Vec<Vec<Document>> = vec![Vec::new(); conns];
    for i in 0..options.docs {
        batches[i % conns].push(Document {
            title: format!("bench {tag} {i:07}"),
            content: text.clone(),
        });
    }

    let start = Instant::now();
    let clients: Vec<_> = batches
        .into_iter()
        .filter(|batch| !batch.is_empty())
        .enumerate()
        .map(|(c, batch)| {
            thread::Builder::new()
                .name(format!("bench-client{c}"))
                .spawn(move || send_pipelined(addr, batch, a_count))
                .expect("cannot start a client thread")
        })
        .collect();
    let mut latencies = Vec::with_capacity(options.docs);
    let mut servers = Vec::with_capacity(options.docs);
    for client in clients {
        let (l, s) = client.join().expect("a client thread panicked");
        latencies.extend(l);
        servers.extend(s);
    }
    let secs = start.elapsed().as_secs_f64();
    latencies.sort();

    // Every document acknowledged must be a file on disk.
    let new_files: Vec<usize> = dirs
        .iter()
        .zip(&files_before)
        .map(|(d, before)| count_files(d) - before)
        .collect();
    let total: usize = new_files.iter().sum();
    assert_eq!(
        latencies.len(),
        options.docs,
        "{name}: not every document was acknowledged"
    );
    assert_eq!(
        total, options.docs,
        "{name}: {} documents acknowledged but {total} new files in the server folders",
        options.docs
    );
    let mut spread: Vec<(String, usize)> = Vec::new();
    for server in servers {
        match spread.iter_mut().find(|(s, _)| *s == server) {
            Some((_, n)) => *n += 1,
            None => spread.push((server, 1)),
        }
    }
    spread.sort();
    let spread: Vec<String> = spread.iter().map(|(s, n)| format!("{s}: {n}")).collect();
    println!(
        "  {name}: {} stored, {total} new files {new_files:?}; replies per server: {}",
        options.docs,
        spread.join(", ")
    );

    Row {
        name,
        docs: options.docs,
        secs,
        latencies,
    }
}

fn start_balancer(servers: &[SocketAddr], name: &str) -> SocketAddr {
    let balancer = Balancer::bind(balancer::Config {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        servers: servers.iter().map(|a| Backend::new(*a)).collect(),
        check_interval: Duration::from_millis(100),
        // A whole batch is queued at once; give the tail of it time to drain.
        queue_timeout: Duration::from_secs(120),
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
    let addr = balancer
        .local_addr()
        .unwrap_or_else(|e| panic!("{name} has no local address: {e}"));
    let thread_name = name.to_string();
    thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            // Only returns when the listener fails.
            if let Err(e) = balancer.run() {
                panic!("{thread_name} stopped: {e}");
            }
        })
        .expect("cannot start a balancer thread");
    addr
}

fn main() {
    let options = parse_args();
    let run_start = Instant::now();
    let memory_before = resident_mib();

    println!(
        "lbft throughput: {} documents of {} bytes per scenario, pipelined; \
         every stored document is fsynced, so the disk bounds throughput",
        options.docs, options.size
    );

    let temp = tempfile::tempdir().expect("cannot create a temporary folder");
    let mut servers = Vec::new();
    let mut dirs = Vec::new();
    // The servers run for as long as their handles live.
    let mut handles = Vec::new();
    for i in 0..3 {
        let dir = temp.path().join(format!("server{i}"));
        let server = Server::bind(server::Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            dir: Some(dir.clone()),
            ..Default::default()
        })
        .unwrap_or_else(|e| panic!("cannot start storage server {i}: {e}"));
        servers.push(server.local_addr());
        dirs.push(dir);
        handles.push(
            server
                .start()
                .unwrap_or_else(|e| panic!("cannot run storage server {i}: {e}")),
        );
    }
    let balancer_all = start_balancer(&servers, "balancer-3");
    let balancer_one = start_balancer(&servers[..1], "balancer-1");

    let rows = [
        scenario("a. direct, 1 server", "a", servers[0], 1, &options, &dirs),
        scenario(
            "b. balancer -> 1 server",
            "b",
            balancer_one,
            1,
            &options,
            &dirs,
        ),
        scenario(
            "c. balancer -> 3 servers",
            "c",
            balancer_all,
            1,
            &options,
            &dirs,
        ),
        scenario(
            "d. balancer -> 3, 4 conns",
            "d",
            balancer_all,
            4,
            &options,
            &dirs,
        ),
    ];
    let memory_after = resident_mib();

    let content_mib = (options.docs * options.size) as f64 / MIB;
    let baseline = rows[0].docs_per_sec();
    println!();
    println!(
        "{:<27} {:>6} {:>8} {:>9} {:>7} {:>9} {:>9} {:>9}",
        "scenario", "docs", "seconds", "docs/s", "MiB/s", "p50 ms", "p99 ms", "vs base"
    );
    for row in &rows {
        println!(
            "{:<27} {:>6} {:>8.3} {:>9.1} {:>7.2} {:>9.2} {:>9.2} {:>8.2}x",
            row.name,
            row.docs,
            row.secs,
            row.docs_per_sec(),
            content_mib / row.secs,
            row.percentile_ms(50),
            row.percentile_ms(99),
            row.docs_per_sec() / baseline
        );
    }
    println!();
    println!(
        "resident memory: {memory_before:.1} MiB before, {memory_after:.1} MiB after; \
         total run time {:.2} s",
        run_start.elapsed().as_secs_f64()
    );
}
