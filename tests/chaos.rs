//! The core under faults: servers killed, hung and restarted while clients
//! send; a balancer restarted, shut down mid-batch, or put beside another
//! in front of the same servers. Everything runs as real processes.

mod util;

use lbft::proto::{ErrorCode, Reply};
use rand::{Rng, SeedableRng};
use serde_json::Value;
use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use util::*;

fn start_server_at(dir: &Path, listen: &str) -> Proc {
    let args = strings(&["--listen", listen, "--dir", &dir.display().to_string()]);
    start(server_bin(), &args, dir.parent().unwrap())
}

/// Every stored document below the server folders (not counting copies set
/// aside in `.duplicates/`), by content.
fn stored_by_content(dirs: &[PathBuf]) -> HashMap<String, Vec<(String, Value)>> {
    let mut out: HashMap<String, Vec<(String, Value)>> = HashMap::new();
    for dir in dirs {
        for (name, v) in stored_files(dir) {
            let content = v["contenuto"].as_str().unwrap_or_default().to_string();
            out.entry(content).or_default().push((name, v));
        }
    }
    out
}

#[test]
fn kills_and_hangs_lose_nothing_and_leave_no_duplicate() {
    let seed: u64 = rand::random();
    eprintln!("chaos seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let work = tempfile::tempdir().unwrap();
    let dirs: Vec<PathBuf> = (0..3).map(|i| work.path().join(format!("s{i}"))).collect();
    let mut servers: Vec<Proc> = dirs
        .iter()
        .map(|d| start_server_at(d, "127.0.0.1:0"))
        .collect();
    let addrs: Vec<SocketAddr> = servers.iter().map(|s| s.addr).collect();
    let balancer = start_balancer(
        work.path(),
        &addrs,
        &[
            "--server-timeout",
            "2s",
            "--probe-timeout",
            "300ms",
            "--max-attempts",
            "50",
            "--queue-timeout",
            "60s",
        ],
    );

    const CLIENTS: usize = 3;
    const PER_CLIENT: usize = 667;
    let (acks_tx, acks_rx) = crossbeam_channel::unbounded::<()>();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let contents: Vec<String> = (0..PER_CLIENT)
                .map(|i| format!("chaos {seed} client {c} doc {i} {}", "a".repeat(i % 50)))
                .collect();
            let acks = acks_tx.clone();
            let addr = balancer.addr;
            thread::spawn(move || {
                let seen = send_batch(addr, contents.clone(), || {
                    let _ = acks.send(());
                });
                (contents, seen)
            })
        })
        .collect();
    drop(acks_tx);

    // Faults at random points of progress: every 120-300 acknowledgements
    // one server is killed and restarted, or hung until the next fault.
    let mut hung: Option<usize> = None;
    let mut faults = Vec::new();
    let mut next = rng.gen_range(120..300);
    let mut acked = 0;
    while acks_rx.recv().is_ok() {
        acked += 1;
        if acked < next {
            continue;
        }
        next += rng.gen_range(120..300);
        if let Some(i) = hung.take() {
            signal(&servers[i], "CONT");
        }
        let i = rng.gen_range(0..servers.len());
        if rng.gen_bool(0.5) {
            servers[i].child.kill().unwrap();
            servers[i].child.wait().unwrap();
            servers[i] = start_server_at(&dirs[i], &addrs[i].to_string());
            faults.push(format!("kill -9 + restart s{i} at {acked}"));
        } else {
            signal(&servers[i], "STOP");
            hung = Some(i);
            faults.push(format!("SIGSTOP s{i} at {acked}"));
        }
    }
    if let Some(i) = hung.take() {
        signal(&servers[i], "CONT");
    }
    eprintln!("faults: {faults:?}");
    assert!(faults.len() >= 4, "too few faults: {faults:?}");

    let mut acked_contents = BTreeSet::new();
    for client in clients {
        let (contents, seen) = client.join().unwrap();
        assert!(seen.errors.is_empty(), "failures: {:?}", seen.errors);
        assert!(seen.closing.is_none(), "{:?}", seen.closing);
        assert_eq!(seen.stored.len(), contents.len());
        for (id, s) in &seen.stored {
            acked_contents.insert(contents[*id as usize - 1].clone());
            let _ = s;
        }
    }
    assert_eq!(acked_contents.len(), CLIENTS * PER_CLIENT);

    // Copies left by servers that were killed or hung are set aside once
    // the balancer has told them (at their next status check when up).
    let mut report = String::new();
    let settled = eventually(|| {
        let stored = stored_by_content(&dirs);
        let missing = acked_contents
            .iter()
            .filter(|c| !stored.contains_key(*c))
            .count();
        let doubled: Vec<_> = stored
            .iter()
            .filter(|(_, copies)| copies.len() > 1)
            .map(|(_, copies)| copies.iter().map(|c| c.0.clone()).collect::<Vec<_>>())
            .collect();
        report = format!("{missing} missing, duplicates: {doubled:?}");
        missing == 0 && doubled.is_empty() && stored.len() == acked_contents.len()
    });
    assert!(settled, "after chaos ({faults:?}): {report}");
    drop(balancer);
}

#[test]
fn request_numbers_never_repeat_across_restarts_and_balancers() {
    let mut cluster = Cluster::start(2, &[], &["--balancer-id", "1"]);
    let addrs: Vec<SocketAddr> = cluster.servers.iter().map(|s| s.addr).collect();
    let docs = |tag: &str| -> Vec<String> { (0..40).map(|i| format!("{tag} {i}")).collect() };
    let mut numbers = BTreeSet::new();
    let mut record = |seen: Seen| {
        assert!(seen.errors.is_empty(), "{:?}", seen.errors);
        assert_eq!(seen.stored.len(), 40);
        for s in seen.stored.values() {
            assert!(
                numbers.insert(s.request_number),
                "{} repeated",
                s.request_number
            );
        }
    };
    record(send_batch(cluster.balancer.addr, docs("first run"), || {}));
    // Killed, not shut down: nothing could have been saved on the way out.
    cluster.balancer.child.kill().unwrap();
    cluster.balancer.child.wait().unwrap();
    let restarted = start_balancer(cluster.dir.path(), &addrs, &["--balancer-id", "1"]);
    let other = start_balancer(cluster.dir.path(), &addrs, &["--balancer-id", "2"]);
    let (a, b) = thread::scope(|s| {
        let a = s.spawn(|| send_batch(restarted.addr, docs("restarted"), || {}));
        let b = s.spawn(|| send_batch(other.addr, docs("second balancer"), || {}));
        (a.join().unwrap(), b.join().unwrap())
    });
    record(a);
    record(b);
    // And a server numbering a document sent straight to it.
    let mut raw = Raw::connect_to_server(addrs[0], &cluster.server_dirs[0]);
    raw.store(1, "direct", "sent to the server itself");
    match raw.reply() {
        Reply::Stored(s) => assert!(numbers.insert(s.request_number)),
        other => panic!("{other:?}"),
    }
    let on_disk: usize = cluster
        .server_dirs
        .iter()
        .map(|d| stored_files(d).len())
        .sum();
    assert_eq!(on_disk, numbers.len());
}

#[test]
fn sigterm_mid_batch_exits_cleanly_and_answers_everyone() {
    let cluster = Cluster::start(
        2,
        &["--char-delay-ms", "1"],
        &["--drain-timeout", "20s", "--client-window", "64"],
    );
    let contents: Vec<String> = (0..400)
        .map(|i| format!("term {i} {}", "x".repeat(20)))
        .collect();
    let (acks_tx, acks_rx) = crossbeam_channel::unbounded::<()>();
    let addr = cluster.balancer.addr;
    let batch = contents.clone();
    let client = thread::spawn(move || {
        send_batch(addr, batch, || {
            let _ = acks_tx.send(());
        })
    });
    for _ in 0..20 {
        acks_rx.recv().expect("the first documents are stored");
    }
    signal(&cluster.balancer, "TERM");
    let seen = client.join().unwrap();
    let mut balancer = cluster.balancer;
    let status = balancer.child.wait().unwrap();
    assert!(status.success(), "balancer exit: {status:?}");

    // Everything acknowledged is on disk; everything else got a clear
    // answer: an error of its own, or the final word that it was not read.
    let stored = stored_by_content(&cluster.server_dirs);
    for (id, s) in &seen.stored {
        let content = &contents[*id as usize - 1];
        assert_eq!(stored.get(content).map(Vec::len), Some(1), "{s:?}");
    }
    for e in &seen.errors {
        assert_eq!(e.code, ErrorCode::ShuttingDown, "{e:?}");
    }
    let closing = seen.closing.expect("a final shutting_down answer");
    assert_eq!(closing.code, ErrorCode::ShuttingDown);
    assert!(seen.stored.len() >= 20);
    assert!(
        seen.stored.len() + seen.errors.len() < contents.len(),
        "the batch was meant to be cut short"
    );
    let log = std::fs::read_to_string(cluster.dir.path().join("loadbalancer.log")).unwrap();
    assert!(log.contains("balancer on"), "{log}");
    assert!(log.contains("stopped"), "{log}");
}

#[test]
fn a_batch_far_larger_than_the_servers_take_at_once_completes() {
    let work = tempfile::tempdir().unwrap();
    let docs = work.path().join("docs");
    std::fs::create_dir_all(&docs).unwrap();
    for i in 0..4 {
        let doc = serde_json::json!({
            "titolo": format!("slow {i}"),
            "contenuto": format!("{i} {}", "abc".repeat(100)),
        });
        std::fs::write(docs.join(format!("{i}.json")), doc.to_string()).unwrap();
    }
    let storage = work.path().join("json_files");
    let balancer = start(
        balancer_bin(),
        &strings(&[
            "--listen",
            "127.0.0.1:0",
            "--local-servers",
            "3",
            "--local-base-port",
            "0",
            "--storage-dir",
            &storage.display().to_string(),
            "--char-delay-ms",
            "1",
            "--queue-timeout",
            "2s",
        ]),
        work.path(),
    );
    let out = Command::new(client_bin())
        .args(strings(&[
            "--balancer",
            &balancer.addr.to_string(),
            "--documents",
            &docs.display().to_string(),
            "ftp",
            "600",
        ]))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("600 documents: 600 stored, 0 failed"),
        "{stdout}"
    );
    let files: usize = std::fs::read_dir(&storage)
        .unwrap()
        .map(|d| stored_files(&d.unwrap().path()).len())
        .sum();
    assert_eq!(files, 600);
}
