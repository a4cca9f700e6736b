//! Clients that store documents and check every answer: one request at a
//! time on a `Connection`, or pipelined with the client's own pipeline.
//! Each returns the latency of every document.

use lbft::client::{self, Fate};
use lbft::proto::{self, ClientRequest, Connection, Document, Reply, StoreRequest};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Generous: with 64 clients a document may wait behind hundreds of others.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(120);
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// `size` bytes of ASCII text with some letters `a` in it.
pub fn content(size: usize) -> String {
    const TEXT: &str = "lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod. ";
    TEXT.chars().cycle().take(size).collect()
}

pub fn a_count(text: &str) -> u64 {
    text.chars().filter(|c| matches!(c, 'a' | 'A')).count() as u64
}

pub fn store_request(id: u64, title: String, content: &str) -> ClientRequest {
    ClientRequest::Store(StoreRequest {
        id,
        doc: Document {
            title,
            content: content.to_string(),
        },
        request_number: None,
        not_after_ms: None,
        key: None,
        resent: false,
    })
}

/// Checks that a reply is `stored` with the right count of letters A.
pub fn check_stored(reply: &Reply, a_count: u64) -> Result<(), String> {
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
pub fn one_at_a_time(
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

/// The client's pipeline settings for `depth` outstanding requests.
pub fn pipeline_config(addr: SocketAddr, depth: usize) -> client::Config {
    client::Config {
        balancer: addr,
        connect_timeout: CONNECT_TIMEOUT,
        reply_timeout: REPLY_TIMEOUT,
        window: depth,
        ..client::Config::default()
    }
}

/// One client storing `docs` documents with the client's own pipeline,
/// `depth` outstanding; returns each latency, from the moment the request
/// was made (just before it is written) to its answer.
pub fn pipelined(
    addr: SocketAddr,
    tag: &str,
    docs: usize,
    depth: usize,
    text: &Arc<str>,
    a_count: u64,
) -> Result<Vec<Duration>, String> {
    let config = pipeline_config(addr, depth);
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
pub fn json_files(dir: &Path) -> Vec<PathBuf> {
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

/// Moves every stored document out of the server folders, so that runs
/// start alike (a folder of thousands of files is slower to add to).
///
/// The files are moved, not removed, until the benchmark's temporary folder
/// goes at the end: on ext4 without a journal (common on virtual machines),
/// a new file never takes the inode of one removed in the last minute or
/// more, and each file a server creates would then walk past every inode
/// freed since. Removing the documents of one run made the servers of the
/// next several times slower.
pub fn empty_folders(dirs: &[PathBuf]) {
    static BATCH: AtomicUsize = AtomicUsize::new(0);
    let batch = BATCH.fetch_add(1, Ordering::Relaxed);
    for dir in dirs {
        let name = dir.file_name().unwrap_or_default().to_string_lossy();
        let aside = dir.with_file_name(format!("{name}.moved-{batch}"));
        std::fs::create_dir_all(&aside)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", aside.display()));
        for file in json_files(dir) {
            let to = aside.join(file.file_name().unwrap_or_default());
            std::fs::rename(&file, &to)
                .unwrap_or_else(|e| panic!("cannot move {}: {e}", file.display()));
        }
    }
}

/// Stores one document until it is stored, so that the balancer has found
/// its servers up before anything is measured.
pub fn warm_up(addr: SocketAddr) {
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

/// Starts three storage servers, each in its own folder under `root`.
/// They run without a cluster key, so that the direct path and HAProxy
/// reach them as the balancer does (the key costs the balancer one
/// handshake per connection, and its connections persist).
pub fn start_servers(root: &Path, prefix: &str) -> (Vec<super::process::Child>, Vec<PathBuf>) {
    start_servers_of(env!("CARGO_BIN_EXE_server"), true, root, prefix)
}

/// The same, from the server binary `bin`; `open` adds `--no-cluster-key`
/// (a build from before cluster keys has no such flag and is open).
pub fn start_servers_of(
    bin: &str,
    open: bool,
    root: &Path,
    prefix: &str,
) -> (Vec<super::process::Child>, Vec<PathBuf>) {
    let mut servers = Vec::new();
    let mut dirs = Vec::new();
    for i in 0..3 {
        let dir = root.join(format!("{prefix}{i}"));
        let args = vec![
            "--listen".to_string(),
            "127.0.0.1:0".into(),
            "--dir".into(),
            dir.display().to_string(),
        ];
        let args: Vec<String> = args
            .into_iter()
            .chain(open.then(|| "--no-cluster-key".to_string()))
            .collect();
        servers.push(super::process::Child::start(
            &format!("server{i}"),
            bin,
            &args,
        ));
        dirs.push(dir);
    }
    (servers, dirs)
}

/// Arguments of a balancer on a free port in front of `servers` (started
/// by `start_servers`, without a key), logging to `log`, plus `extra`.
pub fn balancer_args(servers: &[SocketAddr], log: &Path, extra: &[&str]) -> Vec<String> {
    let list: Vec<String> = servers.iter().map(|a| a.to_string()).collect();
    let mut args: Vec<String> = vec![
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--servers".into(),
        list.join(","),
        "--log-file".into(),
        log.display().to_string(),
        "--no-cluster-key".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}
