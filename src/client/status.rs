//! `client status`: the servers known to the balancer, as a table, once or
//! refreshed (`--watch`), with averages every 10 samples and, when asked
//! for (`--history FILE`), a history file.
//!
//! Each sample is one `servers` request to the balancer. The formatting
//! (`table`, `human_bytes`, `human_duration`, `Averages::report`) is pure so
//! it can be tested without sockets; `run` only fetches, prints and appends.

use super::{Config, Error};
use crate::proto::{self, ClientRequest, Reply, ServerView};
use crate::text::rfc3339;
use serde::Serialize;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// How many samples the averages cover.
pub const AVERAGE_WINDOW: u64 = 10;

#[derive(Debug, Clone)]
pub struct StatusOptions {
    /// Refresh until `count` samples have been shown (forever if `None`).
    pub watch: bool,
    pub interval: Duration,
    /// Stop after this many samples (for scripts and tests).
    pub count: Option<u64>,
    /// Every sample is appended here as one JSON line, when given. Nothing
    /// is written otherwise: a look at the servers leaves no file behind.
    pub history: Option<PathBuf>,
}

/// Shows the servers' status; returns whether the balancer answered.
///
/// Without `--watch` one sample is taken (or `count`, `interval` apart).
/// With `--watch` samples are taken every `interval` until `count`, or
/// forever. The first sample must succeed (an unreachable balancer is an
/// error); in watch mode a later failure is printed and sampling goes on, and
/// the result is `Ok(false)` if any sample failed.
pub fn run(config: &Config, options: &StatusOptions, out: &mut impl Write) -> Result<bool, Error> {
    let mut history = options.history.as_deref().map(History::open).transpose()?;
    let total = match (options.count, options.watch) {
        (Some(n), _) => Some(n),
        (None, true) => None,
        (None, false) => Some(1),
    };
    if total == Some(0) {
        return Ok(true);
    }
    let ticker = crossbeam_channel::tick(options.interval);
    let mut averages = Averages::default();
    let mut all_answered = true;
    let mut taken: u64 = 0;
    loop {
        taken += 1;
        let time = rfc3339(SystemTime::now());
        match fetch_list(config, taken) {
            Ok(list) => {
                let views = list.servers;
                writeln!(out, "{}", header(&time, &config.balancer.to_string()))?;
                write!(out, "{}", table(&views))?;
                if let Some(r) = list.repair {
                    writeln!(
                        out,
                        "repair: {} entries short of copies, {} copies made ({} bytes)",
                        r.entries_left, r.copies_made, r.bytes_copied
                    )?;
                }
                if let Some(history) = &mut history {
                    history.append(&time, &config.balancer.to_string(), &views)?;
                }
                averages.add(&views);
                if averages.samples() >= AVERAGE_WINDOW {
                    writeln!(out)?;
                    write!(out, "{}", averages.report())?;
                    averages = Averages::default();
                }
            }
            // Nothing shown yet: the balancer is simply not there.
            Err(e) if taken == 1 => return Err(e),
            Err(e) => {
                all_answered = false;
                writeln!(out, "{time}: no answer from the balancer: {e}")?;
            }
        }
        out.flush()?;
        if total.is_some_and(|n| taken >= n) {
            return Ok(all_answered);
        }
        writeln!(out)?;
        // The ticker only stops when it is dropped, which is not before
        // this function returns.
        let _ = ticker.recv();
    }
}

/// Asks the balancer for its list of servers on a fresh connection (a fresh
/// one each time, so a watch survives a balancer restart).
pub(crate) fn fetch(config: &Config, id: u64) -> Result<Vec<ServerView>, Error> {
    fetch_list(config, id).map(|list| list.servers)
}

/// `fetch`, with the rest of the balancer's answer (repair's figures).
fn fetch_list(config: &Config, id: u64) -> Result<crate::proto::ServerList, Error> {
    match super::ask(config, &ClientRequest::Servers { id })? {
        Reply::Servers(list) => Ok(list),
        other => Err(Error::Io(io::Error::other(format!(
            "the balancer at {} answered `servers` with {other:?}",
            config.balancer
        )))),
    }
}

/// The history file, opened for appending.
struct History {
    path: PathBuf,
    file: File,
}

#[derive(Serialize)]
struct HistoryLine<'a> {
    time: &'a str,
    balancer: &'a str,
    servers: &'a [ServerView],
}

impl History {
    fn open(path: &Path) -> Result<History, Error> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| history_error(path, e))?;
        Ok(History {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Appends one sample as one line, written with a single call so lines
    /// of concurrent writers do not interleave.
    fn append(&mut self, time: &str, balancer: &str, servers: &[ServerView]) -> Result<(), Error> {
        let mut line = proto::encode(&HistoryLine {
            time,
            balancer,
            servers,
        });
        line.push(b'\n');
        self.file
            .write_all(&line)
            .map_err(|e| history_error(&self.path, e))
    }
}

fn history_error(path: &Path, e: io::Error) -> Error {
    Error::Io(io::Error::new(
        e.kind(),
        format!("cannot write the history file {}: {e}", path.display()),
    ))
}

/// The line above each table.
pub fn header(time: &str, balancer: &str) -> String {
    format!("{time}  servers known to the balancer at {balancer}")
}

/// One row per server, columns aligned, every line ending in `\n`.
///
/// CPU is the server process's and its machine's. The figures are those of
/// the server's last status report; REPORT says how old that is, and for a
/// server that is down, that its figures are stale: what it last said, not
/// what it is doing.
pub fn table(views: &[ServerView]) -> String {
    let heads = [
        "SERVER",
        "STATE",
        "CPU%(proc/host)",
        "MEM(used/total)",
        "DISK(used/free)",
        "NET(rx/tx)",
        "UPTIME",
        "ACTIVE",
        "FILES",
        "CHECK(ms)",
        "REPORT",
    ];
    // Text columns to the left, numbers to the right.
    let right = [
        false, false, true, true, true, true, true, true, true, true, false,
    ];
    let rows: Vec<Vec<String>> = views
        .iter()
        .map(|v| {
            let mut row = vec![v.name.clone(), v.state.clone()];
            match &v.status {
                Some(s) => row.extend([
                    format!("{:.1}/{:.1}", s.process_cpu_percent, s.cpu_percent),
                    format!(
                        "{}/{}",
                        human_bytes(s.memory_used_bytes),
                        human_bytes(s.memory_total_bytes)
                    ),
                    format!(
                        "{}/{}",
                        human_bytes(s.disk_used_bytes),
                        human_bytes(s.disk_free_bytes)
                    ),
                    format!(
                        "{}/{}",
                        human_bytes(s.net_rx_bytes),
                        human_bytes(s.net_tx_bytes)
                    ),
                    human_duration(s.uptime_secs),
                    s.active.to_string(),
                    s.files_stored.to_string(),
                ]),
                None => row.extend(std::iter::repeat_n("-".to_string(), 7)),
            }
            row.push(v.check_ms.map_or("-".into(), |ms| format!("{ms:.1}")));
            row.push(report_age(v));
            row
        })
        .collect();
    align(&heads, &right, &rows)
}

/// How old a server's figures are: `0.4s`, or `stale 12.0s` when it is
/// down; `-` when it never reported.
fn report_age(v: &ServerView) -> String {
    if v.status.is_none() {
        return "-".into();
    }
    let age = v.status_age_ms.map(human_age);
    match (v.state == "down", age) {
        (true, Some(age)) => format!("stale {age}"),
        // A balancer that does not say how old.
        (true, None) => "stale".into(),
        (false, Some(age)) => age,
        (false, None) => "-".into(),
    }
}

/// Milliseconds as `0.4s` under ten seconds, else as `human_duration`.
pub fn human_age(ms: u64) -> String {
    if ms < 10_000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else {
        human_duration(ms / 1000)
    }
}

/// Lays out a header and rows in columns two spaces apart.
pub(crate) fn align(heads: &[&str], right: &[bool], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = heads.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let heads: Vec<String> = heads.iter().map(|h| h.to_string()).collect();
    let mut out = String::new();
    for row in std::iter::once(&heads).chain(rows) {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .zip(right)
            .map(|((cell, &w), &right)| {
                if right {
                    format!("{cell:>w$}")
                } else {
                    format!("{cell:<w$}")
                }
            })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// Bytes in binary units with one decimal: `512B`, `1.5K`, `3.1G`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["K", "M", "G", "T", "P", "E"];
    if bytes < 1024 {
        return format!("{bytes}B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    // Round first, so 1023.96K shows as 1.0M and not 1024.0K.
    while (value * 10.0).round() / 10.0 >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1}{}", UNITS[unit])
}

/// Seconds as `45s`, `2m03s`, `1h02m03s` or `3d04h05m06s`.
pub fn human_duration(secs: u64) -> String {
    let (d, h, m, s) = (
        secs / 86_400,
        secs % 86_400 / 3600,
        secs % 3600 / 60,
        secs % 60,
    );
    if d > 0 {
        format!("{d}d{h:02}h{m:02}m{s:02}s")
    } else if h > 0 {
        format!("{h}h{m:02}m{s:02}s")
    } else if m > 0 {
        format!("{m}m{s:02}s")
    } else {
        format!("{s}s")
    }
}

/// Running sums of one server over the current window.
#[derive(Debug, Clone, Default)]
struct Sums {
    up: u64,
    /// Samples that carried a status report.
    reports: u64,
    cpu: f64,
    memory_used: f64,
    active: f64,
    checks: u64,
    check_ms: f64,
}

/// One server's averages over a window. A mean is `None` when no sample of
/// the window had that value (no status report yet, no probe yet).
#[derive(Debug, Clone, PartialEq)]
pub struct ServerMeans {
    pub name: String,
    pub cpu_percent: Option<f64>,
    pub memory_used_bytes: Option<f64>,
    pub active: Option<f64>,
    pub check_ms: Option<f64>,
    /// Samples of the window in which the server was `up`.
    pub up: u64,
}

/// Averages of the samples fed since it was created. Servers keep the order
/// in which they first appeared.
#[derive(Debug, Clone, Default)]
pub struct Averages {
    samples: u64,
    servers: Vec<(String, Sums)>,
}

impl Averages {
    /// Feeds one sample (the balancer's list at one moment).
    pub fn add(&mut self, views: &[ServerView]) {
        self.samples += 1;
        for v in views {
            let index = match self.servers.iter().position(|(n, _)| *n == v.name) {
                Some(i) => i,
                None => {
                    self.servers.push((v.name.clone(), Sums::default()));
                    self.servers.len() - 1
                }
            };
            let sums = &mut self.servers[index].1;
            if v.state == "up" {
                sums.up += 1;
            }
            if let Some(s) = &v.status {
                sums.reports += 1;
                sums.cpu += f64::from(s.cpu_percent);
                sums.memory_used += s.memory_used_bytes as f64;
                sums.active += s.active as f64;
            }
            if let Some(ms) = v.check_ms {
                sums.checks += 1;
                sums.check_ms += ms;
            }
        }
    }

    /// How many samples have been fed.
    pub fn samples(&self) -> u64 {
        self.samples
    }

    pub fn means(&self) -> Vec<ServerMeans> {
        let mean = |sum: f64, n: u64| (n > 0).then(|| sum / n as f64);
        self.servers
            .iter()
            .map(|(name, s)| ServerMeans {
                name: name.clone(),
                cpu_percent: mean(s.cpu, s.reports),
                memory_used_bytes: mean(s.memory_used, s.reports),
                active: mean(s.active, s.reports),
                check_ms: mean(s.check_ms, s.checks),
                up: s.up,
            })
            .collect()
    }

    /// A title line and an aligned table with one row per server.
    pub fn report(&self) -> String {
        let heads = ["SERVER", "CPU%", "MEM USED", "ACTIVE", "CHECK(ms)", "UP"];
        let right = [false, true, true, true, true, true];
        let dash = || "-".to_string();
        let rows: Vec<Vec<String>> = self
            .means()
            .into_iter()
            .map(|m| {
                vec![
                    m.name,
                    m.cpu_percent.map_or_else(dash, |c| format!("{c:.1}")),
                    m.memory_used_bytes
                        .map_or_else(dash, |b| human_bytes(b.round() as u64)),
                    m.active.map_or_else(dash, |a| format!("{a:.1}")),
                    m.check_ms.map_or_else(dash, |c| format!("{c:.1}")),
                    format!("{}/{}", m.up, self.samples),
                ]
            })
            .collect();
        format!(
            "averages over the last {} samples\n{}",
            self.samples,
            align(&heads, &right, &rows)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::StatusReport;

    fn view(
        name: &str,
        state: &str,
        status: Option<StatusReport>,
        check: Option<f64>,
    ) -> ServerView {
        ServerView {
            id: 0,
            name: name.into(),
            state: state.into(),
            in_flight: 0,
            status,
            check_ms: check,
            requests: 0,
            failures: 0,
            status_age_ms: check.map(|_| 400),
        }
    }

    fn report(cpu: f32, mem: u64, active: u64) -> StatusReport {
        StatusReport {
            cpu_percent: cpu,
            memory_used_bytes: mem,
            memory_total_bytes: 16_750_000_000,
            active,
            disk_used_bytes: 48_500_000_000,
            disk_free_bytes: 86_000_000_000,
            net_rx_bytes: 1536,
            net_tx_bytes: 512,
            uptime_secs: 3723,
            files_stored: 42,
            ..StatusReport::default()
        }
    }

    #[test]
    fn bytes_in_human_units() {
        assert_eq!(human_bytes(0), "0B");
        assert_eq!(human_bytes(1023), "1023B");
        assert_eq!(human_bytes(1024), "1.0K");
        assert_eq!(human_bytes(1536), "1.5K");
        assert_eq!(human_bytes(1024 * 1024 - 1), "1.0M");
        assert_eq!(human_bytes(3_328_599_654), "3.1G");
        assert_eq!(human_bytes(16_750_000_000), "15.6G");
        assert_eq!(human_bytes(5 << 40), "5.0T");
        assert_eq!(human_bytes(u64::MAX), "16.0E");
    }

    #[test]
    fn durations_in_human_units() {
        assert_eq!(human_duration(0), "0s");
        assert_eq!(human_duration(59), "59s");
        assert_eq!(human_duration(123), "2m03s");
        assert_eq!(human_duration(3723), "1h02m03s");
        assert_eq!(
            human_duration(86_400 * 3 + 4 * 3600 + 5 * 60 + 6),
            "3d04h05m06s"
        );
    }

    #[test]
    fn table_aligns_columns_and_dashes_missing_status() {
        let views = [
            view(
                "127.0.0.1:5001",
                "up",
                Some(report(12.34, 3_328_599_654, 2)),
                Some(1.25),
            ),
            view("10.0.0.2:5002", "unknown", None, None),
            ServerView {
                status_age_ms: Some(12_345),
                ..view(
                    "10.0.0.3:5003",
                    "down",
                    Some(StatusReport {
                        process_cpu_percent: 104.5,
                        ..report(80.0, 1024, 0)
                    }),
                    Some(1000.0),
                )
            },
        ];
        let text = table(&views);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "SERVER          STATE    CPU%(proc/host)  MEM(used/total)  DISK(used/free)  NET(rx/tx)    UPTIME  ACTIVE  FILES  CHECK(ms)  REPORT",
                "127.0.0.1:5001  up              0.0/12.3       3.1G/15.6G      45.2G/80.1G   1.5K/512B  1h02m03s       2     42        1.2  0.4s",
                "10.0.0.2:5002   unknown                -                -                -           -         -       -      -          -  -",
                "10.0.0.3:5003   down          104.5/80.0       1.0K/15.6G      45.2G/80.1G   1.5K/512B  1h02m03s       0     42     1000.0  stale 12s",
            ]
        );
        assert!(text.ends_with('\n'));
    }

    #[test]
    fn report_ages() {
        assert_eq!(human_age(0), "0.0s");
        assert_eq!(human_age(9_949), "9.9s");
        assert_eq!(human_age(65_000), "1m05s");
        let mut v = view("s", "down", Some(report(1.0, 1, 1)), None);
        assert_eq!(report_age(&v), "stale");
        v.status_age_ms = Some(30_000);
        assert_eq!(report_age(&v), "stale 30s");
        v.state = "overloaded".into();
        assert_eq!(report_age(&v), "30s");
        v.status = None;
        assert_eq!(report_age(&v), "-");
    }

    #[test]
    fn table_of_no_servers_is_just_the_header() {
        assert_eq!(table(&[]).lines().count(), 1);
    }

    #[test]
    fn averages_of_ten_known_samples() {
        let mut avg = Averages::default();
        for i in 0..10u64 {
            // s1: always up, cpu 1..10, memory 1000..10000, active 0..9,
            // check 0.5..9.5.
            let s1 = view(
                "s1",
                "up",
                Some(report((i + 1) as f32, (i + 1) * 1000, i)),
                Some(i as f64 + 0.5),
            );
            // s2: up in the even samples only; a report in the first four.
            let s2 = view(
                "s2",
                if i % 2 == 0 { "up" } else { "down" },
                (i < 4).then(|| report(50.0, 2048, 4)),
                (i < 6).then_some(2.0),
            );
            avg.add(&[s1, s2]);
        }
        assert_eq!(avg.samples(), 10);
        assert_eq!(
            avg.means(),
            [
                ServerMeans {
                    name: "s1".into(),
                    cpu_percent: Some(5.5),
                    memory_used_bytes: Some(5500.0),
                    active: Some(4.5),
                    check_ms: Some(5.0),
                    up: 10,
                },
                ServerMeans {
                    name: "s2".into(),
                    cpu_percent: Some(50.0),
                    memory_used_bytes: Some(2048.0),
                    active: Some(4.0),
                    check_ms: Some(2.0),
                    up: 5,
                },
            ]
        );
        assert_eq!(
            avg.report(),
            "averages over the last 10 samples\n\
             SERVER  CPU%  MEM USED  ACTIVE  CHECK(ms)     UP\n\
             s1       5.5      5.4K     4.5        5.0  10/10\n\
             s2      50.0      2.0K     4.0        2.0   5/10\n"
        );
    }

    #[test]
    fn averages_of_a_server_never_probed_are_dashes() {
        let mut avg = Averages::default();
        avg.add(&[view("s", "unknown", None, None)]);
        let m = &avg.means()[0];
        assert_eq!((m.cpu_percent, m.check_ms, m.up), (None, None, 0));
        assert_eq!(
            avg.report().lines().last(),
            Some("s          -         -       -          -  0/1")
        );
    }

    #[test]
    fn history_lines_are_appended() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.json");
        let views = [view("s", "up", Some(report(1.0, 2, 3)), Some(0.5))];
        for _ in 0..2 {
            let mut h = History::open(&path).unwrap();
            h.append("T", "B", &views).unwrap();
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        let v: serde_json::Value = serde_json::from_str(lines[1]).unwrap();
        assert_eq!(v["time"], "T");
        assert_eq!(v["balancer"], "B");
        let back: Vec<ServerView> = serde_json::from_value(v["servers"].clone()).unwrap();
        assert_eq!(back, views);
    }

    #[test]
    fn unwritable_history_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing").join("h.json");
        let err = History::open(&path).err().unwrap();
        let text = err.to_string();
        assert!(text.contains("cannot write the history file"), "{text}");
        assert!(text.contains("h.json"), "{text}");
    }
}
