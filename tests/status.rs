//! `client status` against real processes: the table, the history file, the
//! averages every 10 samples, and the errors.

mod util;
use util::*;

use lbft::proto::Reply;
use serde_json::Value;
use std::path::Path;
use std::time::Instant;

use util::run_client as client;

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn history_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad line {l}: {e}")))
        .collect()
}

#[test]
fn status_reports_every_server_with_its_resources() {
    let cluster = Cluster::start(2, &[], &[]);
    let names: Vec<String> = cluster.servers.iter().map(|s| s.addr.to_string()).collect();
    // A stored document means a probe round has marked servers up.
    let mut raw = Raw::connect(cluster.balancer.addr);
    raw.store(1, "t", "c");
    let holder = match raw.reply() {
        Reply::Stored(s) => s.server,
        other => panic!("not stored: {other:?}"),
    };
    assert!(names.contains(&holder), "{holder} not in {names:?}");

    let work = tempfile::tempdir().unwrap();
    let history = work.path().join("h.json");
    let args = ["status", "--count", "1", "--history", "h.json"];
    // The report counting the new file may come one probe (100ms) later:
    // sample until it shows, within a deadline.
    let deadline = Instant::now() + REPLY_TIMEOUT;
    let (stdout, last) = loop {
        let out = client(cluster.balancer.addr, &args, work.path());
        assert!(out.status.success(), "client failed: {}", text(&out.stderr));
        let last = history_lines(&history).pop().expect("a history line");
        let servers = last["servers"].as_array().unwrap();
        let settled = servers.iter().all(|s| {
            s["state"] == "up" && (s["name"] != holder.as_str() || s["status"]["files_stored"] == 1)
        });
        if settled || Instant::now() > deadline {
            break (text(&out.stdout), last);
        }
    };

    assert_eq!(last["balancer"], cluster.balancer.addr.to_string());
    let time = last["time"].as_str().unwrap();
    assert!(time.len() == 24 && time.ends_with('Z'), "{time}");
    let servers = last["servers"].as_array().unwrap();
    let mut listed: Vec<&str> = servers
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    listed.sort();
    let mut expected: Vec<&str> = names.iter().map(String::as_str).collect();
    expected.sort();
    assert_eq!(listed, expected);
    let cores = std::thread::available_parallelism().unwrap().get() as f64;
    for s in servers {
        let name = s["name"].as_str().unwrap();
        assert_eq!(s["state"], "up", "{s}");
        assert!(s["in_flight"].is_u64(), "{s}");
        assert!(s["check_ms"].as_f64().unwrap() >= 0.0, "{s}");
        let st = &s["status"];
        assert!(st.is_object(), "no status: {s}");
        let cpu = st["cpu_percent"].as_f64().unwrap();
        assert!((0.0..=100.0 * cores).contains(&cpu), "{s}");
        let own = st["process_cpu_percent"].as_f64().unwrap();
        assert!((0.0..=100.0 * cores).contains(&own), "{s}");
        assert_eq!(st["storage_writable"], true, "{s}");
        assert!(s["status_age_ms"].is_u64(), "{s}");
        let total = st["memory_total_bytes"].as_u64().unwrap();
        let used = st["memory_used_bytes"].as_u64().unwrap();
        assert!(total > used && used > 0, "{s}");
        assert!(st["disk_free_bytes"].as_u64().unwrap() > 0, "{s}");
        assert!(st["disk_used_bytes"].is_u64(), "{s}");
        assert!(
            st["net_rx_bytes"].is_u64() && st["net_tx_bytes"].is_u64(),
            "{s}"
        );
        assert!(st["uptime_secs"].is_u64(), "{s}");
        assert!(st["active"].is_u64(), "{s}");
        let files = if name == holder { 1 } else { 0 };
        assert_eq!(st["files_stored"], files, "{s}");

        let row = stdout
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no row for {name} in:\n{stdout}"));
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cells.len(), 11, "{row}");
        assert_eq!(cells[1], "up", "{row}");
        assert!(cells[2].contains('/'), "process/host CPU: {row}");
        assert!(cells[10].ends_with('s'), "report age: {row}");
        assert_eq!(cells[8], files.to_string(), "{row}");
    }
    let first = stdout.lines().next().unwrap();
    assert!(
        first.contains(&cluster.balancer.addr.to_string()) && first.contains(time),
        "{stdout}"
    );
    assert!(
        stdout.lines().nth(1).unwrap().starts_with("SERVER"),
        "{stdout}"
    );
}

/// The averages blocks of a run: each with the lines of its table.
fn average_blocks(stdout: &str) -> Vec<Vec<String>> {
    let lines: Vec<&str> = stdout.lines().collect();
    let mut blocks = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if *line == "averages over the last 10 samples" {
            blocks.push(
                lines[i + 1..]
                    .iter()
                    .take_while(|l| !l.is_empty())
                    .map(|l| l.to_string())
                    .collect(),
            );
        }
    }
    blocks
}

#[test]
fn watch_prints_averages_every_ten_samples_and_keeps_history() {
    let cluster = Cluster::start(2, &[], &[]);
    let names: Vec<String> = cluster.servers.iter().map(|s| s.addr.to_string()).collect();
    let work = tempfile::tempdir().unwrap();
    let history = work.path().join("h.json");
    let watch = |count: &str| {
        let args = [
            "status",
            "--watch",
            "--interval",
            "10ms",
            "--count",
            count,
            "--history",
            "h.json",
        ];
        let out = client(cluster.balancer.addr, &args, work.path());
        assert!(out.status.success(), "client failed: {}", text(&out.stderr));
        text(&out.stdout)
    };
    let check_block = |block: &[String]| {
        assert!(block[0].starts_with("SERVER"), "{block:?}");
        assert_eq!(block.len(), 1 + names.len(), "{block:?}");
        for name in &names {
            let rows: Vec<&String> = block.iter().filter(|l| l.starts_with(name)).collect();
            assert_eq!(rows.len(), 1, "{name}: {block:?}");
            assert!(rows[0].ends_with("/10"), "{}", rows[0]);
        }
    };

    let first = watch("10");
    let blocks = average_blocks(&first);
    assert_eq!(blocks.len(), 1, "{first}");
    check_block(&blocks[0]);
    let tables = first
        .lines()
        .filter(|l| l.starts_with("SERVER") && l.contains("STATE"))
        .count();
    assert_eq!(tables, 10, "{first}");
    let before = history_lines(&history);
    assert_eq!(before.len(), 10);

    let second = watch("25");
    let blocks = average_blocks(&second);
    assert_eq!(blocks.len(), 2, "{second}");
    blocks.iter().for_each(|b| check_block(b));
    let after = history_lines(&history);
    assert_eq!(after.len(), 35);
    // Appended after the earlier run, not rewritten.
    assert_eq!(after[..10], before[..]);
    let times: Vec<&str> = after.iter().map(|l| l["time"].as_str().unwrap()).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
    for line in &after {
        assert_eq!(line["servers"].as_array().unwrap().len(), 2, "{line}");
    }
}

#[test]
fn unreachable_balancer_is_an_error() {
    // A port nobody listens on: bound, then released.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let work = tempfile::tempdir().unwrap();
    let out = client(addr, &["status", "--history", "h.json"], work.path());
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(stderr.contains("no balancer answers at"), "{stderr}");
    assert!(stderr.contains(&addr.to_string()), "{stderr}");
    assert!(!text(&out.stdout).contains("SERVER"));
    assert!(history_lines(&work.path().join("h.json")).is_empty());
}

#[test]
fn unwritable_history_is_an_error() {
    let cluster = Cluster::start(1, &[], &[]);
    let work = tempfile::tempdir().unwrap();
    let args = ["status", "--history", "no/such/folder/h.json"];
    let out = client(cluster.balancer.addr, &args, work.path());
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(stderr.contains("cannot write the history file"), "{stderr}");
    assert!(stderr.contains("no/such/folder/h.json"), "{stderr}");
}
