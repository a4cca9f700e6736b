//! Balancing policies and server health against the real binaries: a slow
//! server under least-active and round robin, a server killed and
//! restarted under --rise/--fall, a server whose folder cannot be written.

mod util;

use lbft::proto::Reply;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};
use util::*;

const DOCUMENTS: u64 = 300;
/// Requests the test keeps unanswered at once: a steady load, below
/// `MAX_IN_FLIGHT` so that round robin never has to skip the slow server
/// for being full.
const WINDOW: u64 = 24;
const MAX_IN_FLIGHT: &str = "32";

fn log_of(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("loadbalancer.log")).unwrap_or_default()
}

/// Waits until the balancer's log holds `needle` at least `times` times.
fn wait_for_log(dir: &Path, needle: &str, times: usize) {
    assert!(
        eventually(|| log_of(dir).matches(needle).count() >= times),
        "the log never showed {needle:?} {times} times:\n{}",
        log_of(dir)
    );
}

/// Sends `total` documents of about 200 characters, keeping `WINDOW`
/// unanswered, and counts the stored ones per server.
fn send_documents(balancer: SocketAddr, total: u64) -> BTreeMap<String, u64> {
    let mut conn = Raw::connect(balancer);
    let content = |id: u64| format!("{id:>4}:{}", "a".repeat(195));
    let mut sent = 0;
    let mut per_server = BTreeMap::new();
    while sent < WINDOW.min(total) {
        sent += 1;
        conn.store(sent, &format!("doc {sent}"), &content(sent));
    }
    for _ in 0..total {
        match conn.reply() {
            Reply::Stored(s) => *per_server.entry(s.server).or_default() += 1,
            other => panic!("not stored: {other:?}"),
        }
        if sent < total {
            sent += 1;
            conn.store(sent, &format!("doc {sent}"), &content(sent));
        }
    }
    per_server
}

/// Three servers, the first one slow (2 ms a character: 0.4 s a
/// document); returns what the slow one got of `DOCUMENTS`.
fn slow_server_share(policy: &str) -> (u64, BTreeMap<String, u64>) {
    let dir = tempfile::tempdir().unwrap();
    let mut servers = Vec::new();
    for i in 0..3 {
        let extra: &[&str] = if i == 0 {
            &["--char-delay-ms", "2"]
        } else {
            &[]
        };
        servers.push(start_server(&dir.path().join(format!("s{i}")), extra));
    }
    let addrs: Vec<SocketAddr> = servers.iter().map(|s| s.addr).collect();
    let _balancer = start_balancer(
        dir.path(),
        &addrs,
        &["--policy", policy, "--max-in-flight", MAX_IN_FLIGHT],
    );
    let balancer = _balancer.addr;
    // All up before the first document, so no server starts ahead.
    wait_for_log(dir.path(), " is up", 3);
    assert!(log_of(dir.path()).contains(&format!("{policy} policy over 3 servers")));
    let per_server = send_documents(balancer, DOCUMENTS);
    assert_eq!(per_server.values().sum::<u64>(), DOCUMENTS);
    let slow = per_server.get(&addrs[0].to_string()).copied().unwrap_or(0);
    println!("{policy}: slow server {slow} of {DOCUMENTS} ({per_server:?})");
    (slow, per_server)
}

#[test]
fn least_active_sends_a_slow_server_less_than_round_robin_does() {
    let (slow, all) = slow_server_share("least-active");
    assert!(
        slow < DOCUMENTS / 5,
        "least-active gave the slow server {slow} of {DOCUMENTS}: {all:?}"
    );
    let (slow, all) = slow_server_share("round-robin");
    let third = DOCUMENTS / 3;
    assert!(
        (third - 10..=third + 10).contains(&slow),
        "round robin gave the slow server {slow} of {DOCUMENTS}: {all:?}"
    );
}

#[test]
fn a_restarted_server_is_up_again_only_after_rise_probes() {
    let dir = tempfile::tempdir().unwrap();
    let dirs = [dir.path().join("s0"), dir.path().join("s1")];
    let keep = start_server(&dirs[0], &[]);
    let mut restarted = start_server(&dirs[1], &[]);
    let addr = restarted.addr;
    // Probes every 100 ms (start_balancer's default).
    let balancer = start_balancer(
        dir.path(),
        &[keep.addr, addr],
        &["--rise", "5", "--fall", "2"],
    );
    let up = format!("server {addr} is up");
    wait_for_log(dir.path(), &up, 1);

    restarted.stop();
    wait_for_log(dir.path(), &format!("server {addr} is down"), 1);
    // Documents still go through, to the other server.
    let per_server = send_documents(balancer.addr, 10);
    assert_eq!(per_server.get(&keep.addr.to_string()), Some(&10));

    let mut args = strings(&["--listen", &addr.to_string(), "--dir"]);
    args.push(dirs[1].display().to_string());
    let _again = start(server_bin(), &args, dir.path());
    let back = Instant::now();
    wait_for_log(dir.path(), &up, 2);
    // Five good probes in a row, 100 ms apart, span at least 400 ms.
    let took = back.elapsed();
    assert!(
        took >= Duration::from_millis(300),
        "up again after {took:?}, before 5 probes could pass"
    );
}

/// Whether permissions bind this process (they do not for root).
fn permissions_apply(dir: &Path) -> bool {
    let probe = dir.join("root-check");
    let bound = std::fs::write(&probe, b"x").is_err();
    let _ = std::fs::remove_file(&probe);
    bound
}

fn set_mode(dir: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn a_server_that_cannot_write_its_folder_gets_no_documents() {
    let dir = tempfile::tempdir().unwrap();
    let dirs = [dir.path().join("s0"), dir.path().join("s1")];
    let good = start_server(&dirs[0], &[]);
    let read_only = start_server(&dirs[1], &[]);
    let balancer = start_balancer(dir.path(), &[good.addr, read_only.addr], &[]);
    let up = format!("server {} is up", read_only.addr);
    wait_for_log(dir.path(), &up, 1);

    set_mode(&dirs[1], 0o555);
    if !permissions_apply(&dirs[1]) {
        set_mode(&dirs[1], 0o755);
        println!("note: running as root, a read-only folder is still writable; test skipped");
        return;
    }
    wait_for_log(
        dir.path(),
        &format!("server {} is down (storage unavailable)", read_only.addr),
        1,
    );
    let per_server = send_documents(balancer.addr, 40);
    set_mode(&dirs[1], 0o755);
    assert_eq!(
        per_server,
        BTreeMap::from([(good.addr.to_string(), 40)]),
        "documents reached the read-only server"
    );
    // Writable again: back in rotation.
    wait_for_log(dir.path(), &up, 2);
}
