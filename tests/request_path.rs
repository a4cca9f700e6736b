//! The request path as a client sees it: round robin gives equal servers
//! equal shares, and servers taken out of the pool in the middle of a
//! batch leave no document stored twice.

mod util;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use util::*;

/// The request numbers of the documents stored in a folder (not counting
/// `.duplicates/`), from their file names.
fn numbers(dir: &Path) -> Vec<u64> {
    stored_files(dir)
        .into_iter()
        .map(|(_, v)| v["numero_richiesta"].as_u64().expect("a number"))
        .collect()
}

#[test]
fn round_robin_gives_equal_servers_equal_shares() {
    let cluster = Cluster::start(3, &[], &[]);
    let documents = sample_documents();
    let out = run_client(
        cluster.balancer.addr,
        &[
            "--documents",
            &documents.path().display().to_string(),
            "ftp",
            "3000",
        ],
        cluster.dir.path(),
    );
    assert!(out.status.success(), "{out:?}");
    let shares: Vec<usize> = cluster
        .server_dirs
        .iter()
        .map(|d| numbers(d).len())
        .collect();
    assert_eq!(shares.iter().sum::<usize>(), 3000, "{shares:?}");
    let (min, max) = (shares.iter().min().unwrap(), shares.iter().max().unwrap());
    // Within 1 % of one another.
    assert!(max - min <= 10, "{shares:?}");
}

/// Sends 2,500 documents 16 at a time from the client binary while
/// `act` takes one of four servers out once it holds some documents;
/// then checks that every document is stored once, on one server only.
fn take_one_out_mid_batch(act: &str) {
    let cluster = Cluster::start(4, &[], &[]);
    let documents = sample_documents();
    let client = Command::new(client_bin())
        .args(["--balancer", &cluster.balancer.addr.to_string()])
        .args(["--documents", &documents.path().display().to_string()])
        .args(["--window", "16", "ftp", "2500"])
        .current_dir(cluster.dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let victim = &cluster.server_dirs[1];
    let deadline = Instant::now() + REPLY_TIMEOUT;
    while numbers(victim).len() < 50 {
        assert!(Instant::now() < deadline, "no documents reached the server");
        std::thread::sleep(Duration::from_millis(5));
    }
    let out = Command::new(client_bin())
        .args(["--balancer", &cluster.balancer.addr.to_string()])
        .args(["admin", act, &cluster.servers[1].addr.to_string()])
        .current_dir(cluster.dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let out = client.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("2500 documents: 2500 stored"), "{said}");
    let mut holders: BTreeMap<u64, usize> = BTreeMap::new();
    for dir in &cluster.server_dirs {
        for n in numbers(dir) {
            *holders.entry(n).or_default() += 1;
        }
    }
    assert_eq!(holders.len(), 2500);
    let twice: Vec<_> = holders.iter().filter(|(_, c)| **c > 1).collect();
    assert!(twice.is_empty(), "stored on two servers: {twice:?}");
}

#[test]
fn a_server_removed_mid_batch_leaves_no_document_stored_twice() {
    take_one_out_mid_batch("remove");
}

#[test]
fn a_server_drained_mid_batch_leaves_no_document_stored_twice() {
    take_one_out_mid_batch("drain");
}
