//! A server killed with SIGKILL under load: a fresh cluster (default
//! balancer settings), 8 pipelined clients storing `--kill-docs` documents
//! in all, and one server killed once a third of them are acknowledged.
//!
//! Measured: documents acknowledged but not on disk (lost), documents
//! stored more than once (duplicates: the dead server may have written a
//! document whose answer it never sent, which the balancer then stored
//! elsewhere; it is told to `forget` its copy only when it comes back, and
//! here it does not), the time from the kill until the balancer last sent
//! the dead server a request and until it reported it down (polling its
//! `servers` request every 20 ms), and the acknowledgements per 100 ms
//! before, during and after.

use crate::common::clients::{self, balancer_args, json_files, pipeline_config, store_request};
use crate::common::median;
use crate::common::process::Child;
use crate::Options;
use lbft::client::{self as lbft_client, Fate};
use lbft::proto::{self, ClientRequest, Connection, Reply, Stored};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

const CLIENTS: usize = 8;
const BUCKET: Duration = Duration::from_millis(100);
const POLL: Duration = Duration::from_millis(20);
/// Which of the three servers dies.
const VICTIM: usize = 1;

#[derive(Debug, Clone)]
pub struct KillRun {
    pub acked: usize,
    /// Answered with an error, or never answered.
    pub failed: usize,
    pub lost: usize,
    pub duplicates: usize,
    /// From the kill until the balancer last handed the dead server a
    /// request (to the poll after it).
    pub moved_off: Option<Duration>,
    /// From the kill until the balancer reported it `down`.
    pub down_after: Option<Duration>,
    /// Acknowledgements per second in the 2 s before the kill, the 2 s
    /// after, and 2-4 s after (None when the run ended before).
    pub before: f64,
    pub after: f64,
    pub later: Option<f64>,
    /// From the kill until the rate over the next 500 ms is back to 2/3 of
    /// the rate before (two of three servers are left).
    pub recovered: Option<Duration>,
    /// Acknowledgements per 100 ms from 1 s before the kill to 3 s after.
    pub around: Vec<usize>,
}

#[derive(Debug, Clone)]
pub struct Kill {
    pub docs: usize,
    pub runs: Vec<KillRun>,
}

impl Kill {
    pub fn median_of(&self, f: impl Fn(&KillRun) -> Option<f64>) -> Option<f64> {
        let values: Vec<f64> = self.runs.iter().filter_map(f).collect();
        (values.len() == self.runs.len()).then(|| median(values))
    }

    pub fn total(&self, f: impl Fn(&KillRun) -> usize) -> usize {
        self.runs.iter().map(f).sum()
    }
}

pub fn measure(root: &Path, options: &Options) -> Kill {
    let runs = (1..=options.runs)
        .map(|run| {
            let r = run_once(root, options, run);
            println!(
                "  kill r{run}: {} acknowledged, {} failed, {} lost, {} duplicates; \
                 last request to the dead server {}, reported down {}; \
                 docs/s {:.0} before, {:.0} 0-2 s after, {} 2-4 s after; back to 2/3 in {}",
                r.acked,
                r.failed,
                r.lost,
                r.duplicates,
                ms(r.moved_off),
                ms(r.down_after),
                r.before,
                r.after,
                r.later.map_or("-".into(), |v| format!("{v:.0}")),
                ms(r.recovered),
            );
            println!(
                "    acks per 100 ms, 1 s before to 3 s after: {:?}",
                r.around
            );
            r
        })
        .collect();
    Kill {
        docs: options.kill_docs,
        runs,
    }
}

pub fn ms(d: Option<Duration>) -> String {
    d.map_or("never".into(), |d| format!("{} ms", d.as_millis()))
}

/// One poll of the balancer's view of the victim.
struct Sample {
    at: Instant,
    requests: u64,
    down: bool,
}

fn run_once(root: &Path, options: &Options, run: usize) -> KillRun {
    let (servers, dirs) = clients::start_servers(root, &format!("k{run}-"));
    let addrs: Vec<SocketAddr> = servers.iter().map(|s| s.addr).collect();
    let balancer = Child::start(
        "balancer",
        env!("CARGO_BIN_EXE_balancer"),
        &balancer_args(&addrs, &root.join(format!("lb-kill{run}.log")), &[]),
    );
    clients::warm_up(balancer.addr);
    let victim_name = addrs[VICTIM].to_string();
    let mut servers: Vec<Option<Child>> = servers.into_iter().map(Some).collect();
    let mut victim = servers[VICTIM].take().expect("every server is there");

    let docs = options.kill_docs;
    let acked = Arc::new(AtomicUsize::new(0));
    let start = Arc::new(Barrier::new(CLIENTS + 2));
    let text: Arc<str> = clients::content(options.size).into();
    let clients: Vec<_> =
        (0..CLIENTS)
            .map(|c| {
                let share = docs / CLIENTS + usize::from(c < docs % CLIENTS);
                let config = pipeline_config(balancer.addr, options.depth);
                let (acked, start, text) = (acked.clone(), start.clone(), text.clone());
                thread::spawn(move || {
                    start.wait();
                    let make = move |id: u64| {
                        Ok::<_, (u64, String)>((
                            store_request(id, format!("kill c{c} {id}"), &text),
                            id,
                        ))
                    };
                    let mut stored: Vec<(Instant, Stored)> = Vec::with_capacity(share);
                    let mut failed = 0;
                    let outcome =
                        lbft_client::pipeline::run(&config, share as u64, make, |_, _, fate| {
                            match fate {
                                Fate::Answered(Ok(Reply::Stored(s))) => {
                                    acked.fetch_add(1, Relaxed);
                                    stored.push((Instant::now(), s));
                                }
                                _ => failed += 1,
                            }
                        });
                    if let Err(e) = outcome {
                        eprintln!("kill run client {c}: {e}");
                    }
                    let unanswered = share - stored.len() - failed;
                    (stored, failed + unanswered)
                })
            })
            .collect();
    let killer = {
        let (acked, start) = (acked.clone(), start.clone());
        thread::spawn(move || {
            start.wait();
            let deadline = Instant::now() + Duration::from_secs(120);
            while acked.load(Relaxed) < docs / 3 && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(1));
            }
            let at = Instant::now();
            victim.kill9();
            at
        })
    };
    let (stop_polling, stopped) = mpsc::channel::<()>();
    let poller = {
        let (addr, name) = (balancer.addr, victim_name.clone());
        thread::spawn(move || poll_victim(addr, &name, stopped))
    };
    start.wait();
    let began = Instant::now();
    let mut acks: Vec<(Instant, Stored)> = Vec::with_capacity(docs);
    let mut failed = 0;
    for client in clients {
        let (stored, f) = client.join().expect("a kill-run client panicked");
        acks.extend(stored);
        failed += f;
    }
    let killed_at = killer.join().expect("the killer panicked");
    drop(stop_polling);
    let samples = poller.join().expect("the poller panicked");
    drop(balancer);
    drop(servers);

    let (lost, duplicates) = check_disk(&acks, &addrs, &dirs);
    let since = |at: Instant| at.saturating_duration_since(began);
    let kill = since(killed_at);
    let mut times: Vec<Duration> = acks.iter().map(|(at, _)| since(*at)).collect();
    times.sort();
    let end = times.last().copied().unwrap_or_default();
    let rate = |from: Duration, to: Duration| {
        let to = to.min(end);
        let n = times.iter().filter(|t| **t >= from && **t < to).count();
        n as f64 / (to.saturating_sub(from)).as_secs_f64().max(1e-3)
    };
    let two = Duration::from_secs(2);
    let before = rate(kill.saturating_sub(two), kill);
    let buckets = buckets(&times);
    let kill_bucket = (kill.as_nanos() / BUCKET.as_nanos()) as usize;
    let recovered = (kill_bucket..buckets.len().saturating_sub(5))
        .find(|&b| {
            let n: usize = buckets[b..b + 5].iter().sum();
            n as f64 / 0.5 >= before * 2.0 / 3.0
        })
        .map(|b| (BUCKET * b as u32).saturating_sub(kill));
    KillRun {
        acked: acks.len(),
        failed,
        lost,
        duplicates,
        moved_off: moved_off(&samples, killed_at),
        down_after: samples
            .iter()
            .find(|s| s.at > killed_at && s.down)
            .map(|s| s.at - killed_at),
        before,
        after: rate(kill, kill + two),
        later: (end > kill + two + Duration::from_millis(500))
            .then(|| rate(kill + two, kill + 2 * two)),
        recovered,
        around: (kill_bucket.saturating_sub(10)..(kill_bucket + 30).min(buckets.len()))
            .map(|b| buckets[b])
            .collect(),
    }
}

/// Acknowledgements per 100 ms.
fn buckets(times: &[Duration]) -> Vec<usize> {
    let mut buckets = Vec::new();
    for t in times {
        let b = (t.as_nanos() / BUCKET.as_nanos()) as usize;
        if buckets.len() <= b {
            buckets.resize(b + 1, 0);
        }
        buckets[b] += 1;
    }
    buckets
}

/// Polls the balancer's `servers` request every 20 ms until `stop` is
/// disconnected.
fn poll_victim(addr: SocketAddr, victim: &str, stop: mpsc::Receiver<()>) -> Vec<Sample> {
    let mut samples = Vec::new();
    let stream = lbft::net::connect(&addr, clients::CONNECT_TIMEOUT, clients::REPLY_TIMEOUT)
        .expect("cannot connect to the balancer to poll it");
    let mut connection = Connection::new(stream, proto::DEFAULT_MAX_FRAME);
    for id in 1.. {
        match connection.call(&ClientRequest::Servers { id }) {
            Ok(Reply::Servers(list)) => {
                if let Some(v) = list.servers.iter().find(|v| v.name == victim) {
                    samples.push(Sample {
                        at: Instant::now(),
                        requests: v.requests,
                        down: v.state == "down",
                    });
                }
            }
            other => panic!("the balancer answered `servers` with {other:?}"),
        }
        if let Err(RecvTimeoutError::Disconnected) = stop.recv_timeout(POLL) {
            break;
        }
    }
    samples
}

/// From the kill to the first poll that saw the dead server's request count
/// at its final value.
fn moved_off(samples: &[Sample], killed_at: Instant) -> Option<Duration> {
    let before = samples.iter().rev().find(|s| s.at <= killed_at)?;
    let mut last_change = killed_at;
    let mut previous = before.requests;
    for s in samples.iter().filter(|s| s.at > killed_at) {
        if s.requests != previous {
            (last_change, previous) = (s.at, s.requests);
        }
    }
    Some(last_change - killed_at)
}

/// Acknowledged documents missing from the folder of the server that
/// acknowledged them, and documents stored more than once anywhere.
fn check_disk(
    acks: &[(Instant, Stored)],
    addrs: &[SocketAddr],
    dirs: &[PathBuf],
) -> (usize, usize) {
    let dir_of: HashMap<String, &PathBuf> = addrs
        .iter()
        .map(|a| a.to_string())
        .zip(dirs.iter())
        .collect();
    let lost = acks
        .iter()
        .filter(|(_, s)| {
            dir_of
                .get(&s.server)
                .is_none_or(|d| !d.join(&s.file).exists())
        })
        .count();
    let mut copies: HashMap<String, usize> = HashMap::new();
    for file in dirs.iter().flat_map(|d| json_files(d)) {
        let title = std::fs::read(&file)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v.get("titolo")?.as_str().map(String::from))
            .unwrap_or_else(|| format!("unreadable {}", file.display()));
        if title.starts_with("kill ") {
            *copies.entry(title).or_default() += 1;
        }
    }
    let duplicates = copies.values().map(|n| n - 1).sum();
    (lost, duplicates)
}
