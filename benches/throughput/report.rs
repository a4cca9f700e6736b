//! The report of one run, in Markdown: the machine, the command, the date
//! and the versions, the tables, and whether each goal of the benchmark
//! was met, with its numbers.

use crate::bulk::Bulk;
use crate::common::process::first_line;
use crate::failover::{ms, Kill};
use crate::idle::Idle;
use crate::{mode_name, Mode, Options, Route, Row};
use std::fmt::Write;
use std::process::Command;

pub struct Report<'a> {
    pub options: &'a Options,
    pub setup: String,
    pub rows: Vec<Row>,
    pub bulk: Option<Bulk>,
    pub haproxy_version: Option<String>,
    pub idle: Option<Idle>,
    pub kill: Option<Kill>,
    pub seconds: f64,
}

fn memory_total() -> String {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            let kib: f64 = m
                .lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))?
                .split_whitespace()
                .next()?
                .parse()
                .ok()?;
            Some(format!("{:.1} GiB", kib / 1024.0 / 1024.0))
        })
        .unwrap_or_else(|| "unknown".into())
}

fn commit() -> String {
    let dir = env!("CARGO_MANIFEST_DIR");
    let hash = first_line("git", &["-C", dir, "rev-parse", "--short", "HEAD"]);
    let dirty = Command::new("git")
        .args(["-C", dir, "status", "--porcelain", "--untracked-files=no"])
        .output()
        .is_ok_and(|o| !o.stdout.is_empty());
    if dirty {
        format!("{hash} with uncommitted changes")
    } else {
        hash
    }
}

fn ratio(a: f64, b: f64) -> String {
    format!("{:.2}x", a / b)
}

impl Report<'_> {
    fn find(&self, clients: usize, mode: Mode, route: Route) -> Option<&Row> {
        self.find_in(false, clients, mode, route)
    }

    /// The row of a path on this build's cluster or (`base`) on the
    /// `--base-bin` one.
    fn find_in(&self, base: bool, clients: usize, mode: Mode, route: Route) -> Option<&Row> {
        self.rows
            .iter()
            .find(|r| r.base == base && r.clients == clients && r.mode == mode && r.route == route)
    }

    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let args: Vec<String> = std::env::args()
            .skip(1)
            .filter(|a| a != "--bench")
            .collect();
        let command = if args.is_empty() {
            "cargo bench --bench throughput".to_string()
        } else {
            format!("cargo bench --bench throughput -- {}", args.join(" "))
        };
        let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
        let _ = writeln!(out, "# Benchmarks\n");
        let _ = writeln!(out, "Written by one run of `{command}`.\n");
        let _ = writeln!(
            out,
            "- date: {}\n- machine: {cores} cores, {} memory, Linux {}\n- versions: {}, {}, lbft commit {}\n- run time: {:.0} s\n- setup: {}",
            first_line("date", &["-u"]),
            memory_total(),
            first_line("uname", &["-r"]),
            first_line("rustc", &["--version"]),
            self.haproxy_version.as_deref().unwrap_or("HAProxy not installed"),
            commit(),
            self.seconds,
            self.setup,
        );
        let _ = writeln!(
            out,
            "\nThe machine is shared and single runs vary by up to 2x: the ratios matter, \
             not the absolute numbers. Clients, balancer, HAProxy and servers share the cores."
        );
        self.table(&mut out);
        self.bulk(&mut out);
        self.idle(&mut out);
        self.kill(&mut out);
        self.goals(&mut out);
        out
    }

    fn table(&self, out: &mut String) {
        if self.rows.is_empty() {
            return;
        }
        let _ = writeln!(
            out,
            "\n## Storing 1 KiB documents\n\n\
             Median of {} runs; peak RSS is the largest resident memory of the balancer or \
             HAProxy sampled every 50 ms during the scenario's runs; CPU is the time the balancer \
             or HAProxy ran (user and system, from /proc) per document, servers CPU the same for the three \
             servers together; switches are the context switches (voluntary and not, from \
             /proc/PID/task/*/status every 50 ms) per document of the balancer's or HAProxy's \
             threads, and of the servers' threads together. A warm-up scenario runs first, not \
             counted, and each run starts with another path. Between runs the stored files are \
             moved aside, not removed: on ext4 without a journal, creating files right after \
             many removals is several times slower. Direct: client i talks to server i mod 3; HAProxy pins each \
             connection to one server, round robin.\n",
            self.options.runs
        );
        if self.options.base_bin.is_some() {
            let _ = writeln!(
                out,
                "Rows marked (base) ran on a second cluster of servers and balancer built from \
                 an earlier commit (`--base-bin`), in the same run, with the paths of both \
                 clusters taking turns; its ratios are against its own direct and HAProxy rows.\n"
            );
        }
        let _ = writeln!(
            out,
            "| clients | mode | path | docs/s | p50 ms | p99 ms | vs direct | vs haproxy | peak RSS MiB | CPU µs/doc | switches/doc | servers CPU µs/doc | servers switches/doc |"
        );
        let _ = writeln!(
            out,
            "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
        );
        for row in &self.rows {
            self.table_row(out, row);
        }
    }

    fn table_row(&self, out: &mut String, row: &Row) {
        let direct = self.find_in(row.base, row.clients, row.mode, Route::Direct);
        let haproxy = self.find_in(row.base, row.clients, row.mode, Route::HaProxy);
        let vs = |other: Option<&Row>| match (row.route, other) {
            (Route::Direct, _) | (_, None) => String::new(),
            (r, Some(o)) if r == o.route => String::new(),
            (_, Some(o)) => ratio(row.m.docs_per_sec, o.m.docs_per_sec),
        };
        let vs_haproxy = match row.route {
            Route::Balancer | Route::BalancerPg | Route::BalancerR2 => vs(haproxy),
            _ => String::new(),
        };
        let num =
            |v: Option<f64>, digits: usize| v.map_or(String::new(), |v| format!("{v:.digits$}"));
        let _ = writeln!(
            out,
            "| {} | {} | {}{} | {:.0} | {:.2} | {:.2} | {} | {} | {} | {} | {} | {} | {:.1} |",
            row.clients,
            mode_name(row.mode, self.options.depth),
            row.route.name(),
            if row.base { " (base)" } else { "" },
            row.m.docs_per_sec,
            row.m.p50_ms,
            row.m.p99_ms,
            vs(direct),
            vs_haproxy,
            num(row.m.peak_mib, 1),
            num(row.m.cpu_us_per_doc, 0),
            num(row.m.switches_per_doc, 1),
            num(row.m.servers_cpu_us_per_doc, 0),
            row.m.servers_switches_per_doc,
        );
    }

    fn bulk(&self, out: &mut String) {
        let Some(bulk) = &self.bulk else { return };
        let _ = writeln!(
            out,
            "\n## Streaming a {} MiB file\n\n\
             `client send` of one file of random bytes (1 MiB chunks, SHA-256 checked by the \
             server before the file is put in place, fsynced). One upload straight to a server \
             runs first, not counted. Median of {} runs, each starting with another path; peak \
             RSS sampled every 50 ms. Direct: to one server; HAProxy: TCP, to the server it picks.\n",
            bulk.mib, self.options.runs
        );
        let _ = writeln!(
            out,
            "| path | MiB/s | vs direct | vs haproxy | peak RSS balancer/HAProxy MiB | peak RSS server MiB |"
        );
        let _ = writeln!(out, "| --- | ---: | ---: | ---: | ---: | ---: |");
        let direct = bulk.find(Route::Direct);
        let haproxy = bulk.find(Route::HaProxy);
        for row in &bulk.rows {
            let vs = |o: Option<&crate::bulk::BulkRow>| match o {
                Some(o) if o.route != row.route && row.route != Route::Direct => {
                    ratio(row.mib_per_sec, o.mib_per_sec)
                }
                _ => String::new(),
            };
            let vs_haproxy = if matches!(row.route, Route::Balancer | Route::BalancerR2) {
                vs(haproxy)
            } else {
                String::new()
            };
            let _ = writeln!(
                out,
                "| {} | {:.0} | {} | {} | {} | {:.1} |",
                row.route.name(),
                row.mib_per_sec,
                vs(direct),
                vs_haproxy,
                row.proxy_peak_mib
                    .map_or(String::new(), |m| format!("{m:.1}")),
                row.server_peak_mib
            );
        }
    }

    fn idle(&self, out: &mut String) {
        let Some(idle) = &self.idle else { return };
        let _ = writeln!(
            out,
            "\n## {} idle connections on the balancer\n\n\
             Opened from the benchmark process, nothing sent on them; then one client stores \
             10 documents. Each run on a fresh balancer.\n",
            idle.wanted
        );
        let _ = writeln!(
            out,
            "| run | connections opened | served by the balancer | RSS before MiB | RSS MiB | peak RSS MiB | threads | open files | normal client |"
        );
        let _ = writeln!(
            out,
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
        );
        for (i, r) in idle.runs.iter().enumerate() {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {:.1} | {:.1} | {:.1} | {} | {} | {} |",
                i + 1,
                r.opened,
                r.accepted,
                r.base_rss_mib,
                r.rss_mib,
                r.peak_mib,
                r.threads,
                r.open_files,
                match &r.normal {
                    Ok(d) => format!("10 stored in {} ms", d.as_millis()),
                    Err(e) => format!("FAILED: {e}"),
                }
            );
        }
        for note in &idle.notes {
            let _ = writeln!(out, "\nNote: {note}.");
        }
    }

    fn kill(&self, out: &mut String) {
        let Some(kill) = &self.kill else { return };
        let _ = writeln!(
            out,
            "\n## kill -9 of one server during {} documents\n\n\
             8 pipelined clients (8 outstanding each) on a fresh cluster with the balancer's \
             default settings; one of the three servers is killed with SIGKILL once a third of \
             the documents are acknowledged. Lost: acknowledged but not in the folder of the \
             server that acknowledged it. Duplicates: documents in more than one file (the dead \
             server's copy of a document it wrote but never acknowledged; the balancer has it \
             set aside by `forget` when that server comes back, which it does not here). Last \
             request: from the kill to the first 20 ms poll of the balancer's `servers` that saw \
             the dead server's request count at its final value. Back: from the kill until \
             500 ms in a row run at 2/3 of the rate before (two servers of three are left).\n",
            kill.docs
        );
        let _ = writeln!(
            out,
            "| run | acknowledged | failed | lost | duplicates | last request to dead server | reported down | docs/s 2 s before | 0-2 s after | 2-4 s after | back |"
        );
        let _ = writeln!(
            out,
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
        );
        for (i, r) in kill.runs.iter().enumerate() {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {:.0} | {:.0} | {} | {} |",
                i + 1,
                r.acked,
                r.failed,
                r.lost,
                r.duplicates,
                ms(r.moved_off),
                ms(r.down_after),
                r.before,
                r.after,
                r.later.map_or("run over".into(), |v| format!("{v:.0}")),
                ms(r.recovered),
            );
        }
        let _ = writeln!(
            out,
            "\nAcknowledgements per 100 ms, from 1 s before the kill (the 11th value is the \
             100 ms in which it happened) to 3 s after:\n"
        );
        for (i, r) in kill.runs.iter().enumerate() {
            let _ = writeln!(out, "- run {}: {:?}", i + 1, r.around);
        }
    }

    /// Each goal of `RATIO_GOALS` whose two rows this run has.
    fn ratio_goals(&self, out: &mut String) {
        for g in RATIO_GOALS {
            let (Some(a), Some(b)) = (
                self.find(g.clients, g.mode, g.route),
                self.find(g.clients, g.mode, g.against),
            ) else {
                continue;
            };
            let vs = a.m.docs_per_sec / b.m.docs_per_sec;
            let _ = writeln!(
                out,
                "- {} client{}, {}, {} at least {:.2}x {}: {} ({:.0} vs {:.0} docs/s, {vs:.2}x).",
                g.clients,
                if g.clients == 1 { "" } else { "s" },
                mode_name(g.mode, self.options.depth),
                g.route.name(),
                g.at_least,
                g.against.name(),
                if vs >= g.at_least { "met" } else { "MISSED" },
                a.m.docs_per_sec,
                b.m.docs_per_sec
            );
        }
    }

    /// The balancer's CPU per document at 64 clients one at a time, and
    /// the servers' against the base build's (`--base-bin`) on each path.
    fn cpu_goals(&self, out: &mut String) {
        if let Some(cpu) = self
            .find(64, Mode::OneAtATime, Route::Balancer)
            .and_then(|b| b.m.cpu_us_per_doc)
        {
            let verdict = if cpu <= 25.0 { "met" } else { "MISSED" };
            let _ = writeln!(
                out,
                "- 64 clients, one-at-a-time, balancer CPU at most 25 µs/doc: {verdict} ({cpu:.0})."
            );
        }
        for (mode, most) in [(Mode::OneAtATime, 2.0 / 3.0), (Mode::Pipelined, 0.5)] {
            for route in [Route::Balancer, Route::Direct, Route::HaProxy] {
                let servers = |base| {
                    self.find_in(base, 64, mode, route)
                        .and_then(|r| r.m.servers_cpu_us_per_doc)
                };
                let (Some(now), Some(before)) = (servers(false), servers(true)) else {
                    continue;
                };
                let vs = now / before;
                let _ = writeln!(
                    out,
                    "- 64 clients, {}, {}: servers' CPU at most {most:.2} of the base build's: {} ({now:.0} vs {before:.0} µs/doc, {vs:.2}x).",
                    mode_name(mode, self.options.depth),
                    route.name(),
                    if vs <= most { "met" } else { "MISSED" }
                );
            }
        }
    }

    fn goals(&self, out: &mut String) {
        let _ = writeln!(out, "\n## Goals\n");
        let met = |ok: bool| if ok { "met" } else { "MISSED" };
        self.ratio_goals(out);
        self.cpu_goals(out);
        if let Some(idle) = &self.idle {
            let rss = idle.median_of(|r| r.rss_mib);
            let opened = idle.median_of(|r| r.accepted as f64);
            let _ = writeln!(
                out,
                "- {} idle connections under 512 MiB resident, a normal client still served: {} \
                 (median {rss:.1} MiB with {opened:.0} connections served, {:.0} threads; normal \
                 client served in {} of {} runs).",
                idle.wanted,
                met(rss < 512.0 && idle.all_served() && opened as usize >= idle.wanted),
                idle.median_of(|r| r.threads as f64),
                idle.runs.iter().filter(|r| r.normal.is_ok()).count(),
                idle.runs.len(),
            );
        }
        if let Some(kill) = &self.kill {
            let lost = kill.total(|r| r.lost);
            let moved = kill.median_of(|r| r.moved_off.map(|d| d.as_secs_f64()));
            let back = kill.median_of(|r| r.recovered.map(|d| d.as_secs_f64()));
            let secs = |v: Option<f64>| {
                v.map_or("not in every run".into(), |v| {
                    format!("{:.0} ms", v * 1000.0)
                })
            };
            let _ = writeln!(
                out,
                "- kill -9: 0 documents lost: {} ({lost} lost, {} failed, {} duplicates over {} runs).",
                met(lost == 0),
                kill.total(|r| r.failed),
                kill.total(|r| r.duplicates),
                kill.runs.len()
            );
            let _ = writeln!(
                out,
                "- kill -9: traffic off the dead server within 1 s: {} (median {}).",
                met(moved.is_some_and(|v| v <= 1.0)),
                secs(moved)
            );
            let _ = writeln!(
                out,
                "- kill -9: throughput back within 2 s: {} (median {}).",
                met(back.is_some_and(|v| v <= 2.0)),
                secs(back)
            );
        }
        if let Some(bulk) = &self.bulk {
            if let (Some(b), Some(d)) = (bulk.find(Route::Balancer), bulk.find(Route::Direct)) {
                let vs = b.mib_per_sec / d.mib_per_sec;
                let _ = writeln!(
                    out,
                    "- Bulk ({} MiB): through the balancer at least 0.8 of direct: {} ({:.0} vs {:.0} MiB/s, {vs:.2}x).",
                    bulk.mib,
                    met(vs >= 0.8),
                    b.mib_per_sec,
                    d.mib_per_sec
                );
                if let Some(h) = bulk.find(Route::HaProxy) {
                    let vs = b.mib_per_sec / h.mib_per_sec;
                    let _ = writeln!(
                        out,
                        "- Bulk: at least HAProxy: {} ({:.0} vs {:.0} MiB/s, {vs:.2}x).",
                        met(vs >= 1.0),
                        b.mib_per_sec,
                        h.mib_per_sec
                    );
                }
                let peak = b.proxy_peak_mib.unwrap_or(0.0);
                let server = bulk
                    .rows
                    .iter()
                    .map(|r| r.server_peak_mib)
                    .fold(0.0, f64::max);
                let _ = writeln!(
                    out,
                    "- Bulk: balancer and server under 64 MiB while relaying: {} (balancer {peak:.1} MiB, server {server:.1} MiB).",
                    met(peak < 64.0 && server < 64.0)
                );
            }
        }
    }
}

/// A goal on the documents/s of one row against another's in the same
/// run.
struct RatioGoal {
    clients: usize,
    mode: Mode,
    route: Route,
    against: Route,
    at_least: f64,
}

const fn goal(
    clients: usize,
    mode: Mode,
    route: Route,
    against: Route,
    at_least: f64,
) -> RatioGoal {
    RatioGoal {
        clients,
        mode,
        route,
        against,
        at_least,
    }
}

/// The request path's goals against HAProxy and direct, and those of a
/// PostgreSQL state and of two copies against the plain balancer.
const RATIO_GOALS: [RatioGoal; 11] = [
    goal(64, Mode::OneAtATime, Route::Balancer, Route::HaProxy, 1.0),
    goal(64, Mode::OneAtATime, Route::Balancer, Route::Direct, 0.9),
    goal(64, Mode::Pipelined, Route::Balancer, Route::HaProxy, 0.85),
    goal(8, Mode::OneAtATime, Route::Balancer, Route::HaProxy, 1.0),
    goal(8, Mode::Pipelined, Route::Balancer, Route::HaProxy, 1.0),
    goal(1, Mode::OneAtATime, Route::Balancer, Route::HaProxy, 0.9),
    goal(1, Mode::Pipelined, Route::Balancer, Route::HaProxy, 2.5),
    goal(
        64,
        Mode::OneAtATime,
        Route::BalancerPg,
        Route::Balancer,
        0.9,
    ),
    goal(64, Mode::Pipelined, Route::BalancerPg, Route::Balancer, 0.9),
    goal(
        64,
        Mode::OneAtATime,
        Route::BalancerR2,
        Route::Balancer,
        0.6,
    ),
    goal(64, Mode::Pipelined, Route::BalancerR2, Route::Balancer, 0.6),
];
