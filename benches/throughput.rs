//! Throughput and latency of storing documents through the balancer, against
//! the same clients talking straight to the servers.
//!
//! Everything runs as real processes on 127.0.0.1, started from the binaries
//! cargo built: three storage servers and one balancer in front of them,
//! each in a temporary folder. Every scenario is a number of clients
//! (1, 8, 64), a mode (one request at a time, or pipelined with 8
//! outstanding) and a path (through the balancer, or direct: client `i`
//! talks to server `i % 3`). Each client opens its own connection and stores
//! documents of 1 KiB; every reply must be `stored` and every document a new
//! file on disk. A scenario runs `--runs` times, balancer and direct runs
//! interleaved so that drift of the machine hits both alike; the table shows
//! the median of each column. Servers fsync each document, so the disk
//! bounds the numbers.
//!
//! ```text
//! cargo bench --bench throughput [-- --docs N --runs R --size BYTES --depth D --quick]
//! ```
//!
//! `--docs` is the count of a 64-client scenario (default 19200); fewer
//! clients send proportionally fewer, but at least a sixteenth of it, so
//! that the one-client numbers rest on enough samples. `--quick` is a smoke
//! run: 640 documents, one run.

use lbft::client::{self, Fate};
use lbft::proto::{self, Connection, Document, Reply, Request, StoreRequest};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{mpsc, Arc, Barrier};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Generous: with 64 clients a document may wait behind hundreds of others.
const REPLY_TIMEOUT: Duration = Duration::from_secs(120);
const READY_TIMEOUT: Duration = Duration::from_secs(30);
const CLIENT_COUNTS: [usize; 3] = [1, 8, 64];

#[derive(Debug, Clone)]
struct Options {
    /// Documents of a 64-client scenario.
    docs: usize,
    runs: usize,
    size: usize,
    /// Outstanding requests per client in pipelined mode.
    depth: usize,
}

impl Options {
    /// Documents of a scenario with `clients` clients.
    fn docs_for(&self, clients: usize) -> usize {
        let max_clients = CLIENT_COUNTS[CLIENT_COUNTS.len() - 1];
        (self.docs * clients / max_clients)
            .max(self.docs / 16)
            .max(clients)
    }
}

fn parse_args() -> Result<Options, String> {
    let mut options = Options {
        docs: 19_200,
        runs: 3,
        size: 1024,
        depth: 8,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let target = match arg.as_str() {
            "--docs" => &mut options.docs,
            "--runs" => &mut options.runs,
            "--size" => &mut options.size,
            "--depth" => &mut options.depth,
            "--quick" => {
                options.docs = 640;
                options.runs = 1;
                continue;
            }
            // Cargo passes --bench to every bench binary.
            "--bench" => continue,
            other => return Err(format!("unknown option {other}")),
        };
        let value = args.next().ok_or(format!("{arg} needs a value"))?;
        *target = value
            .parse()
            .map_err(|e| format!("{arg} {value}: not a whole number ({e})"))?;
        if *target == 0 {
            return Err(format!("{arg} must be at least 1"));
        }
    }
    Ok(options)
}

/// A child process, killed and reaped when dropped.
struct Child {
    name: String,
    process: std::process::Child,
    addr: SocketAddr,
    /// Reads the child's stdout to the end, so the child never blocks on a
    /// full pipe.
    stdout: Option<JoinHandle<()>>,
}

impl Child {
    /// Starts `bin` and waits for its `listening on ADDR` line.
    fn start(name: &str, bin: &str, args: &[String]) -> Child {
        let mut process = Command::new(bin)
            .args(args)
            .env("RUST_LOG", "error")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({bin}): {e}"));
        let stdout = process.stdout.take().expect("stdout is piped");
        let (lines_tx, lines) = mpsc::channel();
        let reader = thread::Builder::new()
            .name(format!("{name}-stdout"))
            .spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    // Once the address is known nobody listens; keep reading.
                    let _ = lines_tx.send(line);
                }
            })
            .expect("cannot start a thread to read a child's output");
        let mut child = Child {
            name: name.to_string(),
            process,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            stdout: Some(reader),
        };
        let mut seen = Vec::new();
        loop {
            let line = lines.recv_timeout(READY_TIMEOUT).unwrap_or_else(|e| {
                panic!("{name} never said it was listening ({e}); it printed {seen:?}")
            });
            if let Some(rest) = line.strip_prefix("listening on ") {
                let addr = rest.split([',', ' ']).next().unwrap_or_default();
                child.addr = addr
                    .parse()
                    .unwrap_or_else(|e| panic!("{name}: bad address in `{line}`: {e}"));
                return child;
            }
            seen.push(line);
        }
    }

    /// Peak resident memory (`VmHWM`) in KiB, while the process runs.
    fn peak_memory_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.process.id())).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if let Err(e) = self.process.kill() {
            eprintln!("cannot stop {}: {e}", self.name);
        }
        let _ = self.process.wait();
        // The pipe closed with the process, so the reader is at its end.
        if let Some(reader) = self.stdout.take() {
            let _ = reader.join();
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    OneAtATime,
    Pipelined,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Route {
    Balancer,
    Direct,
}

impl Route {
    fn name(self) -> &'static str {
        match self {
            Route::Balancer => "balancer",
            Route::Direct => "direct",
        }
    }
}

/// Everything a run needs to know about the cluster.
struct Cluster {
    balancer: SocketAddr,
    servers: Vec<SocketAddr>,
    dirs: Vec<PathBuf>,
}

/// One run of one scenario.
struct Measured {
    docs_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// `size` bytes of ASCII text with some letters `a` in it.
fn content(size: usize) -> String {
    const TEXT: &str = "lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod. ";
    TEXT.chars().cycle().take(size).collect()
}

fn store_request(id: u64, title: String, content: &str) -> Request {
    Request::Store(StoreRequest {
        id,
        doc: Document {
            title,
            content: content.to_string(),
        },
        request_number: None,
        not_after_ms: None,
    })
}

/// Checks that a reply is `stored` with the right count of letters A.
fn check_stored(reply: &Reply, a_count: u64) -> Result<(), String> {
    match reply {
        Reply::Stored(s) if s.a_count == a_count => Ok(()),
        Reply::Stored(s) => Err(format!(
            "request {}: {} letters A, expected {a_count}",
            s.id, s.a_count
        )),
        other => Err(format!("expected `stored`, got {other:?}")),
    }
}

/// One client storing `docs` documents one at a time; returns each latency.
fn one_at_a_time(
    addr: SocketAddr,
    tag: &str,
    docs: usize,
    text: &str,
    a_count: u64,
) -> Result<Vec<Duration>, String> {
    let stream = lbft::net::connect(&addr, CONNECT_TIMEOUT, REPLY_TIMEOUT)
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    let mut connection = Connection::new(stream, proto::DEFAULT_MAX_FRAME);
    let mut latencies = Vec::with_capacity(docs);
    for i in 0..docs {
        let request = store_request(i as u64 + 1, format!("{tag} {i}"), text);
        let sent = Instant::now();
        let reply = connection
            .call(&request)
            .map_err(|e| format!("{addr}: request {}: {e}", i + 1))?;
        latencies.push(sent.elapsed());
        check_stored(&reply, a_count).map_err(|e| format!("{addr}: {e}"))?;
    }
    Ok(latencies)
}

/// One client storing `docs` documents with the client's own pipeline,
/// `depth` outstanding; returns each latency, from the moment the request
/// was made (just before it is written) to its answer.
fn pipelined(
    addr: SocketAddr,
    tag: &str,
    docs: usize,
    depth: usize,
    text: &Arc<str>,
    a_count: u64,
) -> Result<Vec<Duration>, String> {
    let config = client::Config {
        balancer: addr,
        connect_timeout: CONNECT_TIMEOUT,
        reply_timeout: REPLY_TIMEOUT,
        window: depth,
        ..client::Config::default()
    };
    let (tag, text) = (tag.to_string(), Arc::clone(text));
    let make = move |id: u64| {
        Ok((
            store_request(id, format!("{tag} {id}"), &text),
            Instant::now(),
        ))
    };
    let mut latencies = Vec::with_capacity(docs);
    let mut first_error = None;
    client::pipeline::run(&config, docs as u64, make, |id, sent, fate| {
        let checked = match (&fate, sent) {
            (Fate::Answered(Ok(reply)), Some(sent)) => {
                latencies.push(sent.elapsed());
                check_stored(reply, a_count)
            }
            _ => Err(format!("request {id}: {fate:?}")),
        };
        if let Err(e) = checked {
            first_error.get_or_insert(format!("{addr}: {e}"));
        }
    })
    .map_err(|e| e.to_string())?;
    match first_error {
        Some(e) => Err(e),
        None => Ok(latencies),
    }
}

/// Stored documents (visible `.json` files) in a server folder.
fn json_files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.path())
        .filter(|path| {
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            !name.starts_with('.') && name.ends_with(".json")
        })
        .collect()
}

/// Nearest-rank percentile of sorted latencies, in milliseconds.
fn percentile_ms(sorted: &[Duration], p: usize) -> f64 {
    let rank = (p * sorted.len()).div_ceil(100).max(1);
    sorted[rank - 1].as_secs_f64() * 1000.0
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

/// Runs one scenario once and checks that every document became a file.
fn run_once(
    cluster: &Cluster,
    options: &Options,
    clients: usize,
    mode: Mode,
    route: Route,
    tag: &str,
) -> Measured {
    // Empty folders keep runs alike (a folder of thousands of files is
    // slower to add to) and bound the disk the benchmark takes.
    for dir in &cluster.dirs {
        for file in json_files(dir) {
            std::fs::remove_file(&file)
                .unwrap_or_else(|e| panic!("cannot remove {}: {e}", file.display()));
        }
    }
    let docs = options.docs_for(clients);
    let text: Arc<str> = content(options.size).into();
    let a_count = text.chars().filter(|c| matches!(c, 'a' | 'A')).count() as u64;
    // The clock starts when every client thread is ready to go, so thread
    // start-up is not measured; connecting is, once per client.
    let start = Arc::new(Barrier::new(clients + 1));
    let handles: Vec<_> = (0..clients)
        .map(|c| {
            let addr = match route {
                Route::Balancer => cluster.balancer,
                Route::Direct => cluster.servers[c % cluster.servers.len()],
            };
            let share = docs / clients + usize::from(c < docs % clients);
            let tag = format!("{tag} c{c}");
            let (text, start, depth) = (Arc::clone(&text), Arc::clone(&start), options.depth);
            thread::Builder::new()
                .name(format!("bench-client{c}"))
                .spawn(move || {
                    start.wait();
                    match mode {
                        Mode::OneAtATime => one_at_a_time(addr, &tag, share, &text, a_count),
                        Mode::Pipelined => pipelined(addr, &tag, share, depth, &text, a_count),
                    }
                })
                .expect("cannot start a client thread")
        })
        .collect();
    start.wait();
    let began = Instant::now();
    let mut latencies = Vec::with_capacity(docs);
    let mut errors = Vec::new();
    for handle in handles {
        match handle.join() {
            Ok(Ok(l)) => latencies.extend(l),
            Ok(Err(e)) => errors.push(e),
            Err(_) => errors.push("a client thread panicked".into()),
        }
    }
    let secs = began.elapsed().as_secs_f64();
    assert!(errors.is_empty(), "{tag}: {}", errors.join("; "));
    assert_eq!(
        latencies.len(),
        docs,
        "{tag}: not every document was answered"
    );
    let files: usize = cluster.dirs.iter().map(|d| json_files(d).len()).sum();
    assert_eq!(
        files, docs,
        "{tag}: {docs} documents stored but {files} files in the server folders"
    );
    latencies.sort();
    Measured {
        docs_per_sec: docs as f64 / secs,
        p50_ms: percentile_ms(&latencies, 50),
        p99_ms: percentile_ms(&latencies, 99),
    }
}

/// Stores one document until it is stored, so that the balancer has found
/// its servers up before anything is measured.
fn warm_up(addr: SocketAddr) {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let answer = lbft::net::connect(&addr, CONNECT_TIMEOUT, REPLY_TIMEOUT)
            .map_err(|e| e.to_string())
            .and_then(|stream| {
                Connection::new(stream, proto::DEFAULT_MAX_FRAME)
                    .call(&store_request(1, "warm-up".into(), "warm-up"))
                    .map_err(|e| e.to_string())
            });
        match answer {
            Ok(Reply::Stored(_)) => return,
            other if Instant::now() > deadline => panic!("{addr} is not storing: {other:?}"),
            // Not ready yet (no server probed): poll again shortly.
            _ => thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn mode_name(mode: Mode, depth: usize) -> String {
    match mode {
        Mode::OneAtATime => "one-at-a-time".into(),
        Mode::Pipelined => format!("pipelined x{depth}"),
    }
}

fn main() {
    let options = parse_args().unwrap_or_else(|e| {
        eprintln!("throughput: {e}");
        std::process::exit(2);
    });
    let run_start = Instant::now();
    let temp = tempfile::tempdir().expect("cannot create a temporary folder");
    let mut servers = Vec::new();
    let mut dirs = Vec::new();
    for i in 0..3 {
        let dir = temp.path().join(format!("s{i}"));
        let args = vec![
            "--listen".to_string(),
            "127.0.0.1:0".into(),
            "--dir".into(),
            dir.display().to_string(),
        ];
        servers.push(Child::start(
            &format!("server{i}"),
            env!("CARGO_BIN_EXE_server"),
            &args,
        ));
        dirs.push(dir);
    }
    let server_addrs: Vec<SocketAddr> = servers.iter().map(|s| s.addr).collect();
    let list: Vec<String> = server_addrs.iter().map(|a| a.to_string()).collect();
    let balancer = Child::start(
        "balancer",
        env!("CARGO_BIN_EXE_balancer"),
        &[
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--servers".into(),
            list.join(","),
            "--check-interval".into(),
            "100ms".into(),
            "--log-file".into(),
            temp.path().join("lb.log").display().to_string(),
        ],
    );
    warm_up(balancer.addr);
    for addr in &server_addrs {
        warm_up(*addr);
    }
    let cluster = Cluster {
        balancer: balancer.addr,
        servers: server_addrs,
        dirs,
    };

    let counts: Vec<String> = CLIENT_COUNTS
        .iter()
        .map(|&c| format!("{} for {c}", options.docs_for(c)))
        .collect();
    println!(
        "lbft throughput: 3 servers, 1 balancer; documents of {} bytes, fsynced by the servers; \
         documents per scenario: {}; {} run(s) each, median shown",
        options.size,
        counts.join(", "),
        options.runs
    );

    let mut rows = Vec::new();
    for &clients in &CLIENT_COUNTS {
        for mode in [Mode::OneAtATime, Mode::Pipelined] {
            let mut runs: [Vec<Measured>; 2] = [Vec::new(), Vec::new()];
            for run in 1..=options.runs {
                for (i, route) in [Route::Balancer, Route::Direct].into_iter().enumerate() {
                    let tag = format!(
                        "{clients}c {} {} r{run}",
                        mode_name(mode, options.depth),
                        route.name()
                    );
                    let m = run_once(&cluster, &options, clients, mode, route, &tag);
                    println!(
                        "  {tag}: {:.0} docs/s, p50 {:.2} ms, p99 {:.2} ms",
                        m.docs_per_sec, m.p50_ms, m.p99_ms
                    );
                    runs[i].push(m);
                }
            }
            let [balanced, direct] = runs.map(|runs| Measured {
                docs_per_sec: median(runs.iter().map(|m| m.docs_per_sec).collect()),
                p50_ms: median(runs.iter().map(|m| m.p50_ms).collect()),
                p99_ms: median(runs.iter().map(|m| m.p99_ms).collect()),
            });
            rows.push((clients, mode, Route::Balancer, balanced));
            rows.push((clients, mode, Route::Direct, direct));
        }
    }

    println!();
    println!(
        "{:>7}  {:<14} {:<9} {:>9} {:>9} {:>9} {:>10}",
        "clients", "mode", "path", "docs/s", "p50 ms", "p99 ms", "vs direct"
    );
    for pair in rows.chunks(2) {
        let direct = pair[1].3.docs_per_sec;
        for (clients, mode, route, m) in pair {
            let ratio = match route {
                Route::Balancer => format!("{:.2}x", m.docs_per_sec / direct),
                Route::Direct => String::new(),
            };
            let line = format!(
                "{clients:>7}  {:<14} {:<9} {:>9.0} {:>9.2} {:>9.2} {ratio:>10}",
                mode_name(*mode, options.depth),
                route.name(),
                m.docs_per_sec,
                m.p50_ms,
                m.p99_ms,
            );
            println!("{}", line.trim_end());
        }
    }
    println!();
    match balancer.peak_memory_kib() {
        Some(kib) => println!(
            "balancer peak resident memory (VmHWM): {:.1} MiB",
            kib as f64 / 1024.0
        ),
        None => println!("balancer peak resident memory: unavailable (no /proc)"),
    }
    println!("total run time {:.1} s", run_start.elapsed().as_secs_f64());
}
