//! Idle connections: this process opens `--idle` TCP connections to a
//! fresh balancer and sends nothing on them; then the balancer's resident
//! memory, threads and open files are read from /proc, and one normal
//! client stores 10 documents while they are all open.
//!
//! The balancer serves each connection on a thread of its own and holds
//! three descriptors for it, so it is started with its limit on open files
//! raised (`ulimit -n`, as root may); this process needs one per
//! connection and uses fewer connections, saying so, when its own limit is
//! too low.

use crate::common::clients::{self, balancer_args, check_stored, store_request, CONNECT_TIMEOUT};
use crate::common::median;
use crate::common::process::{self, Child, PeakRss};
use crate::Options;
use lbft::proto::{self, Connection};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

/// Documents the normal client stores while the idle connections are open.
const NORMAL_DOCS: usize = 10;
/// How long the normal client waits for each answer: a balancer that
/// cannot accept it leaves it in the listen queue, unanswered.
const NORMAL_TIMEOUT: Duration = Duration::from_secs(10);
/// Descriptors the balancer holds per idle connection: the stream, the
/// clone its registry keeps to end reading at shutdown, and the reading
/// half it clones before the first byte arrives.
const FILES_PER_CONNECTION: u64 = 1;

#[derive(Debug, Clone)]
pub struct IdleRun {
    /// Connections this process opened (the balancer may not have
    /// accepted them all: the kernel completes a handshake before).
    pub opened: usize,
    /// Connections the balancer serves: descriptors added.
    pub accepted: u64,
    /// What the balancer had before any connection was opened.
    pub base_rss_mib: f64,
    pub base_threads: u64,
    /// With every connection open.
    pub rss_mib: f64,
    pub threads: u64,
    pub open_files: usize,
    pub peak_mib: f64,
    /// The normal client's result: how long its 10 documents took, or why
    /// it failed.
    pub normal: Result<Duration, String>,
}

#[derive(Debug, Clone)]
pub struct Idle {
    pub wanted: usize,
    pub runs: Vec<IdleRun>,
    pub notes: Vec<String>,
}

impl Idle {
    pub fn median_of(&self, f: impl Fn(&IdleRun) -> f64) -> f64 {
        median(self.runs.iter().map(f).collect())
    }

    pub fn all_served(&self) -> bool {
        self.runs.iter().all(|r| r.normal.is_ok())
    }
}

pub fn measure(root: &Path, servers: &[SocketAddr], options: &Options) -> Idle {
    let mut notes = Vec::new();
    let mut wanted = options.idle;
    // This process holds one descriptor per connection beside those it has.
    if let (Some(limit), Some(open)) = (
        process::open_files_limit("self"),
        process::open_files("self"),
    ) {
        let room = (limit as usize).saturating_sub(open + 256);
        if room < wanted {
            notes.push(format!(
                "this process may open {limit} files (`ulimit -n`): {room} idle connections \
                 instead of {wanted}; raise the limit to hold them all"
            ));
            wanted = room;
        }
    }
    let text = clients::content(1024);
    let a_count = clients::a_count(&text);
    let mut runs = Vec::new();
    for run in 1..=options.runs {
        let balancer = Child::start_with_open_files(
            "balancer",
            env!("CARGO_BIN_EXE_balancer"),
            &balancer_args(servers, &root.join("lb-idle.log"), &[]),
            Some(wanted as u64 * 4 + 1024),
        );
        let pid = balancer.pid();
        clients::warm_up(balancer.addr);
        if run == 1 {
            let limit = process::open_files_limit(&pid.to_string()).unwrap_or(0);
            let room = limit.saturating_sub(64) / FILES_PER_CONNECTION;
            notes.push(if room < wanted as u64 {
                format!(
                    "the balancer may open {limit} files (the hard limit here, which this \
                     process cannot raise) and holds {FILES_PER_CONNECTION} per idle \
                     connection: it can serve about {room} of the {wanted}"
                )
            } else {
                format!("the balancer may open {limit} files")
            });
        }
        let base_rss_mib = process::rss_mib(pid).unwrap_or(0.0);
        let base_threads = process::threads(pid).unwrap_or(0);
        let base_files = steady_open_files(pid);
        let memory = PeakRss::start(pid);
        let mut idle = Vec::with_capacity(wanted);
        for _ in 0..wanted {
            match TcpStream::connect_timeout(&balancer.addr, CONNECT_TIMEOUT) {
                Ok(stream) => idle.push(stream),
                Err(e) => {
                    notes.push(format!(
                        "run {run}: connection {} failed: {e}",
                        idle.len() + 1
                    ));
                    break;
                }
            }
        }
        let opened = idle.len();
        wait_for_threads(pid, base_threads + opened as u64);
        let rss_mib = process::rss_mib(pid).unwrap_or(0.0);
        let threads = process::threads(pid).unwrap_or(0);
        let open_files = steady_open_files(pid);
        let normal = normal_client(balancer.addr, &text, a_count);
        drop(idle);
        let peak_mib = memory.finish();
        let r = IdleRun {
            opened,
            // One descriptor per accepted connection; the thread count also
            // moves with the monitor's short-lived probe threads.
            accepted: open_files.saturating_sub(base_files) as u64,
            base_rss_mib,
            base_threads,
            rss_mib,
            threads,
            open_files,
            peak_mib,
            normal,
        };
        println!(
            "  idle r{run}: {opened} connections, {} served: RSS {:.1} MiB (was {:.1}), {} threads (were {}), \
             {} open files; normal client: {:?}",
            r.accepted, r.rss_mib, r.base_rss_mib, r.threads, r.base_threads, r.open_files, r.normal
        );
        runs.push(r);
    }
    Idle {
        wanted,
        runs,
        notes,
    }
}

/// The balancer's open files, without the sockets its monitor opens for a
/// moment every check interval: the least of a few samples.
fn steady_open_files(pid: u32) -> usize {
    (0..5)
        .map(|i| {
            if i > 0 {
                thread::sleep(Duration::from_millis(25));
            }
            process::open_files(&pid.to_string()).unwrap_or(0)
        })
        .min()
        .unwrap_or(0)
}

/// Waits until the balancer runs `threads` threads (one per accepted
/// connection), or its count has not moved for 2 s (it may have hit a
/// limit), or 20 s pass.
fn wait_for_threads(pid: u32, threads: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let (mut last, mut since) = (0, Instant::now());
    loop {
        let now = process::threads(pid).unwrap_or(0);
        if now >= threads || Instant::now() > deadline {
            return;
        }
        if now != last {
            (last, since) = (now, Instant::now());
        } else if since.elapsed() > Duration::from_secs(2) {
            return;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Stores 10 documents one at a time; returns how long they took.
fn normal_client(addr: SocketAddr, text: &str, a_count: u64) -> Result<Duration, String> {
    let started = Instant::now();
    let stream = lbft::net::connect(&addr, CONNECT_TIMEOUT, NORMAL_TIMEOUT)
        .map_err(|e| format!("cannot connect: {e}"))?;
    let mut connection = Connection::new(stream, proto::DEFAULT_MAX_FRAME);
    for id in 1..=NORMAL_DOCS as u64 {
        let reply = connection
            .call(&store_request(id, format!("idle normal {id}"), text))
            .map_err(|e| format!("document {id}: {e}"))?;
        check_stored(&reply, a_count)?;
    }
    Ok(started.elapsed())
}
