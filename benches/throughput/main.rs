//! Throughput, latency and memory of storing documents through our
//! balancer, against the same clients talking straight to the servers and
//! through HAProxy; a 1 GiB file streamed the same three ways; then 10,000
//! idle connections, and a server killed with SIGKILL under load.
//!
//! Everything runs as real processes on 127.0.0.1, started from the binaries
//! cargo built: three storage servers, one balancer in front of them and,
//! when installed, `haproxy` in TCP round-robin mode in front of the same
//! servers; each server in a temporary folder. Every table scenario is a
//! number of clients (1, 8, 64), a mode (one request at a time, or
//! pipelined with 8 outstanding) and a path (through the balancer; direct:
//! client `i` talks to server `i % 3`; through HAProxy, which pins each
//! connection to one server). Each client opens its own connection and
//! stores documents of 1 KiB; every reply must be `stored` and every
//! document a new file on disk. A scenario runs `--runs` times, the paths
//! interleaved so that drift of the machine hits them alike, each run
//! starting with the next path; the table shows the median of each column,
//! and the peak resident memory of the balancer or HAProxy seen during the
//! scenario's runs. Servers fsync each document, so the disk bounds the
//! numbers.
//!
//! Between runs the stored files are moved aside, not removed (see
//! `empty_folders`): on ext4 without a journal, files created within a
//! minute or more of many removals are several times slower to create,
//! which once made the servers, not the paths, the measure. For the same
//! reason a run started right after another one (whose temporary folder
//! was just removed) is slower throughout: wait a few minutes, or run with
//! `--keep` and remove the folders later.
//!
//! ```text
//! cargo bench --bench throughput [-- --docs N --runs R --size BYTES --depth D
//!     --idle N --kill-docs N --bulk-mib N --only table|bulk|idle|kill
//!     --clients 1,8,64 --paths balancer,direct,haproxy,balancer-pg
//!     --state-postgres --write BENCHMARKS.md --keep --quick]
//! ```
//!
//! `--docs` is the count of a 64-client scenario (default 19200); fewer
//! clients send proportionally fewer, but at least a sixteenth of it, so
//! that the one-client numbers rest on enough samples. `--idle` is the
//! count of idle connections (10000), `--kill-docs` the documents of the
//! kill run (10000), `--bulk-mib` the size of the file streamed through
//! each path (1024). `--clients` runs the table for some client counts
//! only, `--paths` for some paths only (to profile one). `--keep` leaves the
//! temporary folder in place, so that a run's removal of its files does
//! not slow the next run down (see above). `--write` also writes the report, with the machine and
//! versions, to a file. `--quick` is a smoke run: 640 documents, a 256 MiB
//! file, 2000 idle connections, 3000 documents in the kill run, one run of
//! each. `--state-postgres` adds the path `balancer-pg`: a second balancer
//! in front of the same servers whose state is a PostgreSQL database
//! (`--state postgres://...`) of a throwaway cluster started for the run
//! (`tests/util/pg.rs`; durable settings, as a deployment has them), beside
//! the first with its SQLite file, and the report gives the ratio of the
//! two. `--replicas-path` adds the path `balancer-r2`: a balancer with
//! `--replicas 2` in front of the same servers (each document acknowledged
//! once two of them hold it).

mod bulk;
#[path = "../common/mod.rs"]
mod common;
mod failover;
mod idle;
#[path = "../../tests/util/pg.rs"]
mod pg;
mod report;

use common::clients::{self, empty_folders, json_files, one_at_a_time, pipelined, warm_up};
use common::haproxy;
use common::process::{cpu_secs, Child, PeakRss, Switches};
use common::{median, percentile_ms};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Instant;

const CLIENT_COUNTS: [usize; 3] = [1, 8, 64];

#[derive(Debug, Clone)]
pub struct Options {
    /// Documents of a 64-client scenario.
    docs: usize,
    runs: usize,
    size: usize,
    /// Outstanding requests per client in pipelined mode.
    depth: usize,
    /// Idle connections held on the balancer.
    idle: usize,
    /// Documents of the kill run.
    kill_docs: usize,
    /// Size of the streamed file, MiB.
    bulk_mib: u64,
    /// Parts to run: table, idle, kill.
    only: Option<String>,
    /// Client counts of the table (default: all of `CLIENT_COUNTS`).
    clients: Vec<usize>,
    /// Paths of the table (default: all), by `Route::name`; fewer paths
    /// make a run short enough to profile one of them.
    paths: Vec<String>,
    write: Option<PathBuf>,
    /// Leave the temporary folder (servers' files, logs) in place.
    keep: bool,
    /// Extra arguments for the balancer of the table (e.g. --no-state).
    balancer_args: Vec<String>,
    /// A folder with `server` and `balancer` built from an earlier commit:
    /// the table also runs every path on a cluster of those (rows marked
    /// "base"), so that a change is measured against it in the same run.
    pub base_bin: Option<PathBuf>,
    /// Also a balancer on a PostgreSQL state (path `balancer-pg`).
    postgres: bool,
    /// Also a balancer with `--replicas 2` (path `balancer-r2`).
    replicas: bool,
}

impl Options {
    /// Documents of a scenario with `clients` clients.
    fn docs_for(&self, clients: usize) -> usize {
        let max_clients = CLIENT_COUNTS[CLIENT_COUNTS.len() - 1];
        (self.docs * clients / max_clients)
            .max(self.docs / 16)
            .max(clients)
    }

    fn runs_part(&self, part: &str) -> bool {
        self.only.as_deref().is_none_or(|only| only == part)
    }
}

fn parse_args() -> Result<Options, String> {
    let mut options = Options {
        docs: 19_200,
        runs: 3,
        size: 1024,
        depth: 8,
        idle: 10_000,
        kill_docs: 10_000,
        bulk_mib: 1024,
        only: None,
        clients: CLIENT_COUNTS.to_vec(),
        paths: ROUTES.iter().map(|r| r.name().to_string()).collect(),
        write: None,
        keep: false,
        balancer_args: Vec::new(),
        base_bin: None,
        postgres: false,
        replicas: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let target = match arg.as_str() {
            "--docs" => &mut options.docs,
            "--runs" => &mut options.runs,
            "--size" => &mut options.size,
            "--depth" => &mut options.depth,
            "--idle" => &mut options.idle,
            "--kill-docs" => &mut options.kill_docs,
            "--keep" => {
                options.keep = true;
                continue;
            }
            "--state-postgres" => {
                options.postgres = true;
                continue;
            }
            "--replicas-path" => {
                options.replicas = true;
                continue;
            }
            "--quick" => {
                options.docs = 640;
                options.runs = 1;
                options.idle = 2000;
                options.kill_docs = 3000;
                options.bulk_mib = 256;
                continue;
            }
            "--only" => {
                let part = args
                    .next()
                    .ok_or("--only needs table, bulk, idle or kill")?;
                if !["table", "bulk", "idle", "kill"].contains(&part.as_str()) {
                    return Err(format!("--only {part}: not table, bulk, idle or kill"));
                }
                options.only = Some(part);
                continue;
            }
            "--clients" => {
                let value = args.next().ok_or("--clients needs a list such as 1,64")?;
                options.clients = value
                    .split(',')
                    .map(|c| c.trim().parse().ok().filter(|c| CLIENT_COUNTS.contains(c)))
                    .collect::<Option<Vec<usize>>>()
                    .ok_or(format!("--clients {value}: not a list of 1, 8 and 64"))?;
                continue;
            }
            "--paths" => {
                let value = args
                    .next()
                    .ok_or("--paths needs a list such as balancer,direct")?;
                let names: Vec<String> = value.split(',').map(str::to_string).collect();
                if let Some(bad) = names
                    .iter()
                    .find(|n| !ROUTES.iter().any(|r| r.name() == n.as_str()))
                {
                    return Err(format!(
                        "--paths {value}: {bad} is not balancer, direct, haproxy, balancer-pg or balancer-r2"
                    ));
                }
                options.paths = names;
                continue;
            }
            "--balancer-arg" => {
                let extra = args.next().ok_or("--balancer-arg needs a value")?;
                options.balancer_args.push(extra);
                continue;
            }
            "--bulk-mib" => {
                let value = args.next().ok_or("--bulk-mib needs a value")?;
                options.bulk_mib = value
                    .parse()
                    .ok()
                    .filter(|&v| v > 0)
                    .ok_or(format!("--bulk-mib {value}: not a positive whole number"))?;
                continue;
            }
            "--base-bin" => {
                let dir = PathBuf::from(args.next().ok_or("--base-bin needs a folder")?);
                if !dir.join("server").is_file() || !dir.join("balancer").is_file() {
                    return Err(format!(
                        "--base-bin {}: no server and balancer binaries there",
                        dir.display()
                    ));
                }
                options.base_bin = Some(dir);
                continue;
            }
            "--write" => {
                options.write = Some(args.next().ok_or("--write needs a file name")?.into());
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

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    OneAtATime,
    Pipelined,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Route {
    Balancer,
    Direct,
    HaProxy,
    /// A balancer whose state is PostgreSQL (`--state-postgres`).
    BalancerPg,
    /// A balancer that stores each document on two servers
    /// (`--replicas-path`).
    BalancerR2,
}

const ROUTES: [Route; 5] = [
    Route::Balancer,
    Route::Direct,
    Route::HaProxy,
    Route::BalancerPg,
    Route::BalancerR2,
];

impl Route {
    pub fn name(self) -> &'static str {
        match self {
            Route::Balancer => "balancer",
            Route::Direct => "direct",
            Route::HaProxy => "haproxy",
            Route::BalancerPg => "balancer-pg",
            Route::BalancerR2 => "balancer-r2",
        }
    }

    /// Files a document becomes on the servers.
    pub fn copies(self) -> usize {
        match self {
            Route::BalancerR2 => 2,
            _ => 1,
        }
    }
}

/// Everything a run needs to know about the cluster.
struct Cluster<'a> {
    /// Built from the `--base-bin` binaries.
    base: bool,
    balancer: &'a Child,
    haproxy: Option<&'a Child>,
    balancer_pg: Option<&'a Child>,
    balancer_r2: Option<&'a Child>,
    servers: Vec<SocketAddr>,
    server_pids: Vec<u32>,
    dirs: Vec<PathBuf>,
}

impl Cluster<'_> {
    fn routes(&self) -> Vec<Route> {
        let mut routes = vec![Route::Balancer, Route::Direct];
        if self.haproxy.is_some() {
            routes.push(Route::HaProxy);
        }
        if self.balancer_pg.is_some() {
            routes.push(Route::BalancerPg);
        }
        if self.balancer_r2.is_some() {
            routes.push(Route::BalancerR2);
        }
        routes
    }

    /// The address client `c` talks to, and the process whose memory the
    /// scenario records.
    fn target(&self, route: Route, c: usize) -> (SocketAddr, Option<u32>) {
        if let (Route::BalancerR2, Some(b)) = (route, self.balancer_r2) {
            return (b.addr, Some(b.pid()));
        }
        match (route, self.haproxy, self.balancer_pg) {
            (Route::BalancerPg, _, Some(b)) => (b.addr, Some(b.pid())),
            (Route::Balancer, _, _) => (self.balancer.addr, Some(self.balancer.pid())),
            (Route::HaProxy, Some(h), _) => (h.addr, Some(h.pid())),
            _ => (self.servers[c % self.servers.len()], None),
        }
    }
}

/// One scenario: one run, or the medians of several.
#[derive(Debug, Clone)]
pub struct Measured {
    pub docs_per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Peak resident memory of the balancer or HAProxy, in MiB.
    pub peak_mib: Option<f64>,
    /// CPU time the balancer or HAProxy used per document, in µs.
    pub cpu_us_per_doc: Option<f64>,
    /// CPU time the three servers together used per document, in µs: a
    /// path can make the servers' work dearer or cheaper.
    pub servers_cpu_us_per_doc: Option<f64>,
    /// Context switches of the three servers' threads per document: what
    /// a document costs them in wake-ups and hand-offs.
    pub servers_switches_per_doc: f64,
    /// The same for the balancer or HAProxy.
    pub switches_per_doc: Option<f64>,
}

impl Measured {
    /// Medians of the runs; the memory is the largest peak of any run.
    fn summary(runs: &[Measured]) -> Measured {
        let peaks: Vec<f64> = runs.iter().filter_map(|m| m.peak_mib).collect();
        let cpu: Vec<f64> = runs.iter().filter_map(|m| m.cpu_us_per_doc).collect();
        let servers_cpu: Vec<f64> = runs
            .iter()
            .filter_map(|m| m.servers_cpu_us_per_doc)
            .collect();
        Measured {
            docs_per_sec: median(runs.iter().map(|m| m.docs_per_sec).collect()),
            p50_ms: median(runs.iter().map(|m| m.p50_ms).collect()),
            p99_ms: median(runs.iter().map(|m| m.p99_ms).collect()),
            peak_mib: peaks.into_iter().reduce(f64::max),
            cpu_us_per_doc: (!cpu.is_empty()).then(|| median(cpu)),
            servers_cpu_us_per_doc: (!servers_cpu.is_empty()).then(|| median(servers_cpu)),
            servers_switches_per_doc: median(
                runs.iter().map(|m| m.servers_switches_per_doc).collect(),
            ),
            switches_per_doc: {
                let s: Vec<f64> = runs.iter().filter_map(|m| m.switches_per_doc).collect();
                (!s.is_empty()).then(|| median(s))
            },
        }
    }
}

/// One line of the table.
#[derive(Debug, Clone)]
pub struct Row {
    /// Measured on the `--base-bin` cluster.
    pub base: bool,
    pub clients: usize,
    pub mode: Mode,
    pub route: Route,
    pub m: Measured,
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
    empty_folders(&cluster.dirs);
    let docs = options.docs_for(clients);
    let text: Arc<str> = clients::content(options.size).into();
    let a_count = clients::a_count(&text);
    // The clock starts when every client thread is ready to go, so thread
    // start-up is not measured; connecting is, once per client.
    let start = Arc::new(Barrier::new(clients + 1));
    let mut watched = None;
    let handles: Vec<_> = (0..clients)
        .map(|c| {
            let (addr, pid) = cluster.target(route, c);
            watched = pid;
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
    let memory = watched.map(PeakRss::start);
    let cpu_before = watched.and_then(cpu_secs);
    let servers_cpu = || -> Option<f64> { cluster.server_pids.iter().map(|&p| cpu_secs(p)).sum() };
    let servers_before = servers_cpu();
    let switches = Switches::start(cluster.server_pids.clone());
    let own_switches = watched.map(|pid| Switches::start(vec![pid]));
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
    let servers_switches = switches.finish();
    let own_switches = own_switches.map(Switches::finish);
    let peak_mib = memory.map(PeakRss::finish);
    let cpu_us_per_doc = match (watched.and_then(cpu_secs), cpu_before) {
        (Some(after), Some(before)) => Some((after - before) * 1e6 / docs as f64),
        _ => None,
    };
    let servers_cpu_us_per_doc = match (servers_cpu(), servers_before) {
        (Some(after), Some(before)) => Some((after - before) * 1e6 / docs as f64),
        _ => None,
    };
    assert!(errors.is_empty(), "{tag}: {}", errors.join("; "));
    assert_eq!(
        latencies.len(),
        docs,
        "{tag}: not every document was answered"
    );
    let files: usize = cluster.dirs.iter().map(|d| json_files(d).len()).sum();
    assert_eq!(
        files,
        docs * route.copies(),
        "{tag}: {docs} documents stored but {files} files in the server folders"
    );
    latencies.sort();
    Measured {
        docs_per_sec: docs as f64 / secs,
        p50_ms: percentile_ms(&latencies, 50),
        p99_ms: percentile_ms(&latencies, 99),
        peak_mib,
        cpu_us_per_doc,
        servers_cpu_us_per_doc,
        servers_switches_per_doc: servers_switches as f64 / docs as f64,
        switches_per_doc: own_switches.map(|n| n as f64 / docs as f64),
    }
}

pub fn mode_name(mode: Mode, depth: usize) -> String {
    match mode {
        Mode::OneAtATime => "one-at-a-time".into(),
        Mode::Pipelined => format!("pipelined x{depth}"),
    }
}

/// Every client count, mode and path (on each cluster), `--runs` times
/// each.
fn table(clusters: &[Cluster], options: &Options) -> Vec<Row> {
    // The first scenario after the servers start warms them up (thread
    // stacks, caches, the folder's first blocks): it is run first and not
    // counted.
    let clients = options.clients.iter().copied().max().unwrap_or(1);
    for cluster in clusters {
        run_once(
            cluster,
            options,
            clients,
            Mode::OneAtATime,
            Route::Direct,
            "settling run (not counted)",
        );
    }
    let paths: Vec<(&Cluster, Route)> = clusters
        .iter()
        .flat_map(|c| c.routes().into_iter().map(move |r| (c, r)))
        .filter(|(_, r)| options.paths.iter().any(|p| p == r.name()))
        .collect();
    let mut rows = Vec::new();
    for &clients in &options.clients {
        for mode in [Mode::OneAtATime, Mode::Pipelined] {
            let runs = scenario(&paths, options, clients, mode);
            for ((cluster, route), runs) in paths.iter().zip(runs) {
                rows.push(Row {
                    base: cluster.base,
                    clients,
                    mode,
                    route: *route,
                    m: Measured::summary(&runs),
                });
            }
        }
    }
    rows
}

/// The runs of one scenario on every path: each run starts with another
/// path, so that whatever changes within a scenario (a folder that keeps
/// growing, write-back of the last run) hits the paths alike.
fn scenario(
    paths: &[(&Cluster, Route)],
    options: &Options,
    clients: usize,
    mode: Mode,
) -> Vec<Vec<Measured>> {
    let n = paths.len();
    let mut runs: Vec<Vec<Measured>> = vec![Vec::new(); n];
    for run in 1..=options.runs {
        for i in (0..n).map(|k| (k + run - 1) % n) {
            let (cluster, route) = paths[i];
            let tag = format!(
                "{clients}c {} {}{} r{run}",
                mode_name(mode, options.depth),
                route.name(),
                if cluster.base { " (base)" } else { "" }
            );
            let m = run_once(cluster, options, clients, mode, route, &tag);
            println!("  {tag}: {}", m.line());
            runs[i].push(m);
        }
    }
    runs
}

impl Measured {
    /// One run, as printed while the benchmark goes.
    fn line(&self) -> String {
        let opt = |v: Option<f64>, f: &dyn Fn(f64) -> String| v.map(f).unwrap_or_default();
        format!(
            "{:.0} docs/s, p50 {:.2} ms, p99 {:.2} ms{}{}{}, servers {:.1} switches/doc{}",
            self.docs_per_sec,
            self.p50_ms,
            self.p99_ms,
            opt(self.peak_mib, &|p| format!(", peak RSS {p:.1} MiB")),
            opt(self.cpu_us_per_doc, &|c| format!(", CPU {c:.0} µs/doc")),
            opt(self.servers_cpu_us_per_doc, &|c| format!(
                ", servers {c:.0} µs/doc"
            )),
            self.servers_switches_per_doc,
            opt(self.switches_per_doc, &|c| format!(
                ", proxy {c:.1} switches/doc"
            )),
        )
    }
}

/// The processes of a cluster built from other binaries (`--base-bin`):
/// three servers, a balancer and HAProxy in front of them.
struct BaseCluster {
    servers: Vec<Child>,
    dirs: Vec<PathBuf>,
    balancer: Child,
    haproxy: Option<Child>,
}

impl BaseCluster {
    fn start(bin: &Path, root: &Path, haproxy_bin: Option<&Path>) -> Self {
        let server_bin = bin.join("server").display().to_string();
        let open = help_mentions(&server_bin, "--no-cluster-key");
        let base_root = root.join("base");
        std::fs::create_dir_all(&base_root).expect("cannot create the base folder");
        let (servers, dirs) = clients::start_servers_of(&server_bin, open, &base_root, "s");
        let addrs: Vec<SocketAddr> = servers.iter().map(|s| s.addr).collect();
        let balancer_bin = bin.join("balancer").display().to_string();
        let balancer_open = help_mentions(&balancer_bin, "--no-cluster-key");
        let args: Vec<String> = clients::balancer_args(
            &addrs,
            &base_root.join("lb.log"),
            &["--check-interval", "100ms"],
        )
        .into_iter()
        .filter(|a| balancer_open || a != "--no-cluster-key")
        .collect();
        let balancer = Child::start("base balancer", &balancer_bin, &args);
        let haproxy = haproxy_bin.and_then(|h| {
            haproxy::start(h, &base_root, &addrs)
                .map_err(|e| eprintln!("haproxy (base): {e}; its rows are skipped"))
                .ok()
        });
        warm_up(balancer.addr);
        for addr in addrs.iter().chain(haproxy.as_ref().map(|h| &h.addr)) {
            warm_up(*addr);
        }
        BaseCluster {
            servers,
            dirs,
            balancer,
            haproxy,
        }
    }

    fn cluster(&self) -> Cluster<'_> {
        Cluster {
            base: true,
            balancer: &self.balancer,
            haproxy: self.haproxy.as_ref(),
            balancer_pg: None,
            balancer_r2: None,
            servers: self.servers.iter().map(|s| s.addr).collect(),
            server_pids: self.servers.iter().map(Child::pid).collect(),
            dirs: self.dirs.clone(),
        }
    }
}

/// Whether `bin --help` mentions `flag`.
fn help_mentions(bin: &str, flag: &str) -> bool {
    std::process::Command::new(bin)
        .arg("--help")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(flag))
        .unwrap_or(false)
}

fn main() {
    let options = parse_args().unwrap_or_else(|e| {
        eprintln!("throughput: {e}");
        std::process::exit(2);
    });
    let run_start = Instant::now();
    let temp = tempfile::tempdir().expect("cannot create a temporary folder");
    let (servers, dirs) = clients::start_servers(temp.path(), "s");
    let server_addrs: Vec<SocketAddr> = servers.iter().map(|s| s.addr).collect();
    let balancer = Child::start(
        "balancer",
        env!("CARGO_BIN_EXE_balancer"),
        &clients::balancer_args(
            &server_addrs,
            &temp.path().join("lb.log"),
            &["--check-interval", "100ms"]
                .into_iter()
                .chain(options.balancer_args.iter().map(String::as_str))
                .collect::<Vec<_>>(),
        ),
    );
    // Declared before its balancer, so dropped after it.
    let postgres = options.postgres.then(pg::Pg::start_with_defaults);
    let balancer_pg = postgres.as_ref().map(|pg| {
        let url = pg.create_db("lbft");
        let balancer = Child::start(
            "balancer-pg",
            env!("CARGO_BIN_EXE_balancer"),
            &clients::balancer_args(
                &server_addrs,
                &temp.path().join("lb-pg.log"),
                &["--check-interval", "100ms", "--state", &url]
                    .into_iter()
                    .chain(options.balancer_args.iter().map(String::as_str))
                    .collect::<Vec<_>>(),
            ),
        );
        warm_up(balancer.addr);
        balancer
    });
    let balancer_r2 = options.replicas.then(|| {
        let balancer = Child::start(
            "balancer-r2",
            env!("CARGO_BIN_EXE_balancer"),
            &clients::balancer_args(
                &server_addrs,
                &temp.path().join("lb-r2.log"),
                &["--check-interval", "100ms", "--replicas", "2"]
                    .into_iter()
                    .chain(options.balancer_args.iter().map(String::as_str))
                    .collect::<Vec<_>>(),
            ),
        );
        warm_up(balancer.addr);
        balancer
    });
    let haproxy_bin = haproxy::find();
    let haproxy = haproxy_bin.as_ref().and_then(|bin| {
        haproxy::start(bin, temp.path(), &server_addrs)
            .map_err(|e| eprintln!("haproxy: {e}; its rows are skipped"))
            .ok()
    });
    if haproxy_bin.is_none() {
        eprintln!("{}", haproxy::INSTALL_HINT);
    }
    warm_up(balancer.addr);
    for addr in server_addrs.iter().chain(haproxy.as_ref().map(|h| &h.addr)) {
        warm_up(*addr);
    }
    let cluster = Cluster {
        base: false,
        balancer: &balancer,
        haproxy: haproxy.as_ref(),
        balancer_pg: balancer_pg.as_ref(),
        balancer_r2: balancer_r2.as_ref(),
        servers: server_addrs.clone(),
        server_pids: servers.iter().map(Child::pid).collect(),
        dirs: dirs.clone(),
    };

    let counts: Vec<String> = CLIENT_COUNTS
        .iter()
        .map(|&c| format!("{} for {c}", options.docs_for(c)))
        .collect();
    let setup = format!(
        "3 servers; documents of {} bytes, fsynced by the servers; documents per scenario: {}; \
         {} run(s) of each, median shown",
        options.size,
        counts.join(", "),
        options.runs
    );
    println!("lbft throughput: {setup}");

    let rows = if options.runs_part("table") {
        let base = options
            .base_bin
            .as_deref()
            .map(|bin| BaseCluster::start(bin, temp.path(), haproxy_bin.as_deref()));
        let mut clusters = vec![cluster];
        clusters.extend(base.as_ref().map(BaseCluster::cluster));
        let rows = table(&clusters, &options);
        if let Some(base) = &base {
            empty_folders(&base.dirs);
        }
        rows
    } else {
        Vec::new()
    };
    let bulk = options.runs_part("bulk").then(|| {
        let targets = bulk::Targets {
            balancer: &balancer,
            haproxy: haproxy.as_ref(),
            balancer_r2: balancer_r2.as_ref(),
            servers: &servers,
            dirs: &dirs,
        };
        bulk::measure(temp.path(), &targets, &options)
    });
    drop(haproxy);
    drop(balancer);
    drop(balancer_pg);
    drop(balancer_r2);
    drop(postgres);
    empty_folders(&dirs);

    let idle = options
        .runs_part("idle")
        .then(|| idle::measure(temp.path(), &server_addrs, &options));
    // The kill run has servers of its own: one of them dies.
    drop(servers);
    let kill = options
        .runs_part("kill")
        .then(|| failover::measure(temp.path(), &options));

    let report = report::Report {
        options: &options,
        setup,
        rows,
        bulk,
        haproxy_version: haproxy_bin.as_deref().map(haproxy::version),
        idle,
        kill,
        seconds: run_start.elapsed().as_secs_f64(),
    };
    let text = report.markdown();
    println!();
    println!("{text}");
    if let Some(path) = &options.write {
        std::fs::write(path, &text)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        println!("written to {}", path.display());
    }
    if options.keep {
        println!("kept {}", temp.keep().display());
    }
}
