//! Servers joining and leaving a running balancer's pool, under load.

mod util;

use std::net::SocketAddr;
use std::process::{Command, Output};
use std::thread;
use util::*;

/// `client admin ARGS` against `balancer`, run in the cluster's folder, so
/// that it proves the cluster key the balancer created there.
fn admin(cluster: &Cluster, balancer: SocketAddr, args: &[&str]) -> Output {
    let mut all = vec![
        "--balancer".to_string(),
        balancer.to_string(),
        "admin".into(),
    ];
    all.extend(args.iter().map(|s| s.to_string()));
    Command::new(client_bin())
        .args(all)
        .current_dir(cluster.dir.path())
        .output()
        .unwrap()
}

fn contents(tag: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("{tag} {i} {}", "a".repeat(40)))
        .collect()
}

/// Runs a batch on another thread; `during` runs once `after` documents
/// are acknowledged. Returns what the client saw.
fn batch_with(
    balancer: SocketAddr,
    docs: Vec<String>,
    after: usize,
    during: impl FnOnce(),
) -> Seen {
    let (acks_tx, acks_rx) = crossbeam_channel::unbounded::<()>();
    let client = thread::spawn(move || {
        send_batch(balancer, docs, || {
            let _ = acks_tx.send(());
        })
    });
    for _ in 0..after {
        acks_rx
            .recv()
            .expect("acknowledgements while the batch runs");
    }
    during();
    client.join().unwrap()
}

#[test]
fn a_server_added_mid_batch_takes_work() {
    let cluster = Cluster::start(1, &["--char-delay-ms", "1"], &[]);
    let extra_dir = cluster.dir.path().join("extra");
    let extra = start_server(&extra_dir, &[]);
    // Enough documents that the batch is still going when the server is
    // added, however long starting `client admin add` takes on a busy
    // machine.
    let seen = batch_with(cluster.balancer.addr, contents("add", 1500), 50, || {
        let out = admin(
            &cluster,
            cluster.balancer.addr,
            &["add", &extra.addr.to_string()],
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && text.contains("joined"), "{text}");
        let again = admin(
            &cluster,
            cluster.balancer.addr,
            &["add", &extra.addr.to_string()],
        );
        assert!(!again.status.success());
        assert!(String::from_utf8_lossy(&again.stdout).contains("already in the pool"));
    });
    assert!(seen.errors.is_empty(), "{:?}", seen.errors);
    assert_eq!(seen.stored.len(), 1500);
    let on_extra = seen
        .stored
        .values()
        .filter(|s| s.server == extra.addr.to_string())
        .count();
    assert!(on_extra > 50, "the added server took {on_extra} documents");
    assert_eq!(stored_files(&extra_dir).len(), on_extra);
    let table = admin(&cluster, cluster.balancer.addr, &["servers"]);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.contains(&extra.addr.to_string()), "{text}");
}

#[test]
fn a_server_drained_mid_batch_finishes_its_work_and_gets_no_more() {
    let cluster = Cluster::start(2, &["--char-delay-ms", "1"], &[]);
    let drained = cluster.servers[0].addr.to_string();
    let mut bound = 0;
    let seen = batch_with(cluster.balancer.addr, contents("drain", 600), 60, || {
        let out = admin(&cluster, cluster.balancer.addr, &["drain", &drained]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && text.contains("draining"), "{text}");
        // "ADDR is draining: N requests in flight; ..."
        let in_flight: usize = text
            .split("draining: ")
            .nth(1)
            .and_then(|rest| rest.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no in-flight count in {text:?}"));
        // Files there now include every one stored before the drain.
        bound = stored_files(&cluster.server_dirs[0]).len() + in_flight;
    });
    assert!(seen.errors.is_empty(), "{:?}", seen.errors);
    assert_eq!(seen.stored.len(), 600);
    let on_drained = seen.stored.values().filter(|s| s.server == drained).count();
    // What it had in flight when drained finished there; nothing new came.
    assert_eq!(stored_files(&cluster.server_dirs[0]).len(), on_drained);
    assert!(
        on_drained <= bound,
        "{on_drained} stored on the drained server, at most {bound} expected"
    );
    assert!(eventually(|| servers(cluster.balancer.addr).len() == 1));
    assert!(cluster
        .log()
        .contains(&format!("server {drained} left the pool")));
    // Its heartbeat cannot bring it back; an operator can.
    let out = admin(&cluster, cluster.balancer.addr, &["add", &drained]);
    assert!(out.status.success());
    assert_eq!(servers(cluster.balancer.addr).len(), 2);
}

#[test]
fn a_server_registers_itself_and_leaves_cleanly_on_sigterm() {
    let cluster = Cluster::start(1, &[], &[]);
    let dir = cluster.dir.path().join("joiner");
    let balancer = cluster.balancer.addr.to_string();
    let mut joiner = start_server(
        &dir,
        &[
            "--balancer",
            &balancer,
            "--heartbeat",
            "100ms",
            "--char-delay-ms",
            "1",
        ],
    );
    assert!(eventually(|| servers(cluster.balancer.addr)
        .iter()
        .any(|v| v.name == joiner.addr.to_string() && v.state == "up")));
    let seen = batch_with(cluster.balancer.addr, contents("joiner", 400), 100, || {
        signal(&joiner, "TERM");
    });
    let status = joiner.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(seen.errors.is_empty(), "{:?}", seen.errors);
    assert_eq!(seen.stored.len(), 400);
    let on_joiner = seen
        .stored
        .values()
        .filter(|s| s.server == joiner.addr.to_string())
        .count();
    assert!(on_joiner > 0);
    assert_eq!(stored_files(&dir).len(), on_joiner);
    assert_eq!(servers(cluster.balancer.addr).len(), 1);
}

#[test]
fn a_removed_server_gives_its_work_to_the_others_and_unknown_addresses_are_refused() {
    let cluster = Cluster::start(2, &["--char-delay-ms", "1"], &["--server-timeout", "5s"]);
    let removed = cluster.servers[1].addr.to_string();
    let seen = batch_with(cluster.balancer.addr, contents("remove", 300), 40, || {
        let out = admin(&cluster, cluster.balancer.addr, &["remove", &removed]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
    });
    assert!(seen.errors.is_empty(), "{:?}", seen.errors);
    assert_eq!(seen.stored.len(), 300);
    let out = admin(&cluster, cluster.balancer.addr, &["drain", "127.0.0.1:1"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("not in the pool"));
    let out = admin(
        &cluster,
        cluster.balancer.addr,
        &["add", "no-such-host.invalid:5001"],
    );
    assert!(!out.status.success());
}

#[test]
fn a_killed_server_is_detected_within_a_second_under_load() {
    let mut cluster = Cluster::start(3, &["--char-delay-ms", "1"], &[]);
    let victim = cluster.servers[2].addr.to_string();
    let balancer = cluster.balancer.addr;
    let mut detected_after = None;
    let seen = batch_with(balancer, contents("kill", 600), 60, || {
        cluster.servers[2].child.kill().unwrap();
        let killed = std::time::Instant::now();
        cluster.servers[2].child.wait().unwrap();
        assert!(eventually(|| servers(balancer)
            .iter()
            .any(|v| v.name == victim && v.state == "down")));
        detected_after = Some(killed.elapsed());
    });
    let took = detected_after.unwrap();
    eprintln!("killed server detected after {took:?}");
    assert!(took < std::time::Duration::from_secs(1), "{took:?}");
    assert!(seen.errors.is_empty(), "{:?}", seen.errors);
    assert_eq!(seen.stored.len(), 600);
}

#[test]
fn a_restarted_balancer_remembers_the_servers_that_joined() {
    let mut cluster = Cluster::start(1, &[], &[]);
    let extra_dir = cluster.dir.path().join("extra");
    let extra = start_server(&extra_dir, &[]);
    let out = admin(
        &cluster,
        cluster.balancer.addr,
        &["add", &extra.addr.to_string()],
    );
    assert!(out.status.success());
    signal(&cluster.balancer, "TERM");
    assert!(cluster.balancer.child.wait().unwrap().success());

    // Same work folder, so the same state file; only the first server on
    // the command line.
    let first = cluster.servers[0].addr;
    let restarted = start_balancer(cluster.dir.path(), &[first], &[]);
    let names: Vec<String> = servers(restarted.addr)
        .into_iter()
        .map(|v| v.name)
        .collect();
    assert_eq!(names, [first.to_string(), extra.addr.to_string()]);
    let seen = send_batch(restarted.addr, contents("remembered", 40), || {});
    assert!(seen.errors.is_empty(), "{:?}", seen.errors);
    assert!(seen
        .stored
        .values()
        .any(|s| s.server == extra.addr.to_string()));

    // A server drained away is forgotten for the next run.
    let out = admin(
        &cluster,
        restarted.addr,
        &["drain", &extra.addr.to_string()],
    );
    assert!(out.status.success());
    assert!(eventually(|| servers(restarted.addr).len() == 1));
    let mut restarted = restarted;
    signal(&restarted, "TERM");
    assert!(restarted.child.wait().unwrap().success());
    let again = start_balancer(cluster.dir.path(), &[first], &[]);
    assert_eq!(servers(again.addr).len(), 1);
}
