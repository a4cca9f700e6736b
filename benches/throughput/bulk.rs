//! Streaming one large file (1 GiB by default): through the balancer
//! (proxy mode, every chunk relayed), straight to a server, and through
//! HAProxy in front of the same servers. The client is the real one
//! (`client::files::upload`: 1 MiB chunks, SHA-256 computed as it reads,
//! verified by the server before the file is put in place). Each run checks
//! that the stored file has the size and checksum sent, and records the
//! peak resident memory of the balancer (or HAProxy) and of the servers.

use crate::common::median;
use crate::common::process::{Child, PeakRss};
use crate::{Options, Route};
use lbft::client;
use rand::{RngCore, SeedableRng};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct BulkRow {
    pub route: Route,
    /// Median of the runs, in MiB/s.
    pub mib_per_sec: f64,
    /// Largest peak of the balancer or HAProxy over the runs, MiB.
    pub proxy_peak_mib: Option<f64>,
    /// Largest peak of any server over the runs, MiB.
    pub server_peak_mib: f64,
}

#[derive(Debug, Clone)]
pub struct Bulk {
    pub mib: u64,
    pub rows: Vec<BulkRow>,
}

impl Bulk {
    pub fn find(&self, route: Route) -> Option<&BulkRow> {
        self.rows.iter().find(|r| r.route == route)
    }
}

fn write_random(path: &Path, bytes: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).expect("create bulk file"));
    let mut buf = vec![0u8; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill_bytes(&mut buf[..n]);
        f.write_all(&buf[..n]).expect("write bulk file");
        left -= n as u64;
    }
    // On disk before anything is measured: the write-back of a fresh 1 GiB
    // would slow the first run down.
    f.into_inner()
        .expect("write bulk file")
        .sync_all()
        .expect("write bulk file");
}

/// Removes stored files (and what a run left in `.uploads`).
fn empty_files(dirs: &[PathBuf]) {
    for dir in dirs {
        for sub in ["files", ".uploads", ".partial"] {
            let _ = std::fs::remove_dir_all(dir.join(sub));
            let _ = std::fs::create_dir_all(dir.join(sub));
        }
    }
}

pub struct Targets<'a> {
    pub balancer: &'a Child,
    pub haproxy: Option<&'a Child>,
    /// A balancer with `--replicas 2` (`--replicas-path`).
    pub balancer_r2: Option<&'a Child>,
    pub servers: &'a [Child],
    pub dirs: &'a [PathBuf],
}

pub fn measure(temp: &Path, targets: &Targets, options: &Options) -> Bulk {
    let bytes = options.bulk_mib << 20;
    let path = temp.join("bulk.bin");
    write_random(&path, bytes);
    let mut routes = vec![Route::Balancer, Route::Direct];
    if targets.haproxy.is_some() {
        routes.push(Route::HaProxy);
    }
    if targets.balancer_r2.is_some() {
        routes.push(Route::BalancerR2);
    }
    // The first upload after the table runs far slower whatever its path
    // (the balancer's first run, 252 MiB/s, against 466-629 for its
    // others in two full runs): one straight to a server, not counted.
    empty_files(targets.dirs);
    let warm_up = client::Config {
        balancer: targets.servers[0].addr,
        ..client::Config::default()
    };
    client::files::upload(&warm_up, &path, &mut Vec::new())
        .unwrap_or_else(|e| panic!("bulk warm-up: {e}"));
    let mut runs: Vec<Vec<(f64, Option<f64>, f64)>> = vec![Vec::new(); routes.len()];
    for run in 1..=options.runs {
        // Each run starts with another path, as in the table.
        let n = routes.len();
        for i in (0..n).map(|k| (k + run - 1) % n) {
            let route = routes[i];
            empty_files(targets.dirs);
            let (addr, proxy): (SocketAddr, Option<u32>) = match (route, targets.haproxy) {
                (Route::Balancer, _) => (targets.balancer.addr, Some(targets.balancer.pid())),
                (Route::BalancerR2, _) => {
                    let b = targets.balancer_r2.expect("a route only when started");
                    (b.addr, Some(b.pid()))
                }
                (Route::HaProxy, Some(h)) => (h.addr, Some(h.pid())),
                _ => (targets.servers[run % targets.servers.len()].addr, None),
            };
            let config = client::Config {
                balancer: addr,
                ..client::Config::default()
            };
            let proxy_peak = proxy.map(PeakRss::start);
            let server_peaks: Vec<PeakRss> = targets
                .servers
                .iter()
                .map(|s| PeakRss::start(s.pid()))
                .collect();
            let began = Instant::now();
            let mut sink = Vec::new();
            let stored = client::files::upload(&config, &path, &mut sink)
                .unwrap_or_else(|e| panic!("bulk {} run {run}: {e}", route.name()));
            let secs = began.elapsed().as_secs_f64();
            let proxy_mib = proxy_peak.map(PeakRss::finish);
            let server_mib = server_peaks
                .into_iter()
                .map(PeakRss::finish)
                .fold(0.0, f64::max);
            assert_eq!(stored.size, bytes, "bulk {}: size", route.name());
            let on_disk: u64 = targets
                .dirs
                .iter()
                .filter_map(|d| std::fs::metadata(d.join("files").join(&stored.file)).ok())
                .map(|m| m.len())
                .sum();
            assert_eq!(
                on_disk,
                bytes * route.copies() as u64,
                "bulk {}: bytes on disk",
                route.name()
            );
            let rate = bytes as f64 / (1 << 20) as f64 / secs;
            println!(
                "  bulk {} MiB {} r{run}: {rate:.0} MiB/s, peak RSS {} server {server_mib:.1} MiB",
                options.bulk_mib,
                route.name(),
                proxy_mib.map_or("-".into(), |m| format!("{m:.1} MiB,")),
            );
            runs[i].push((rate, proxy_mib, server_mib));
        }
    }
    empty_files(targets.dirs);
    let _ = std::fs::remove_file(&path);
    let rows = routes
        .into_iter()
        .zip(runs)
        .map(|(route, runs)| BulkRow {
            route,
            mib_per_sec: median(runs.iter().map(|r| r.0).collect()),
            proxy_peak_mib: runs.iter().filter_map(|r| r.1).reduce(f64::max),
            server_peak_mib: runs.iter().map(|r| r.2).fold(0.0, f64::max),
        })
        .collect();
    Bulk {
        mib: options.bulk_mib,
        rows,
    }
}
