//! `--replicas`: every document on N distinct servers, acknowledged once
//! all N hold it; too few servers refused or, with `--min-replicas`,
//! stored fewer times and flagged; copies read from any live server.

mod util;

use lbft::proto::{ErrorCode, Reply};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use util::*;

/// Every stored document's request number, with the folders holding it.
fn copies_on_disk(dirs: &[PathBuf]) -> BTreeMap<u64, Vec<usize>> {
    let mut held: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
    for (i, dir) in dirs.iter().enumerate() {
        for (_, doc) in stored_files(dir) {
            held.entry(doc["numero_richiesta"].as_u64().unwrap())
                .or_default()
                .push(i);
        }
    }
    held
}

#[test]
fn every_document_is_on_two_distinct_servers_when_acknowledged() {
    let cluster = Cluster::start(4, &[], &["--replicas", "2"]);
    let contents: Vec<String> = (0..300).map(|i| format!("content {i} {}", "a".repeat(i % 7))).collect();
    let seen = send_batch(cluster.balancer.addr, contents, || {});
    assert!(seen.errors.is_empty(), "{:?}", seen.errors.first());
    assert_eq!(seen.stored.len(), 300);
    for s in seen.stored.values() {
        let servers: BTreeSet<&str> = s.copies.iter().map(|c| c.server.as_str()).collect();
        assert_eq!(servers.len(), 2, "{s:?}");
        assert!(!s.under_replicated);
    }
    let held = copies_on_disk(&cluster.server_dirs);
    assert_eq!(held.len(), 300);
    for (number, dirs) in &held {
        let distinct: BTreeSet<&usize> = dirs.iter().collect();
        assert_eq!((dirs.len(), distinct.len()), (2, 2), "request {number}: {dirs:?}");
    }
}

fn store_one(cluster: &Cluster) -> Reply {
    let mut raw = Raw::connect(cluster.balancer.addr);
    raw.store(1, "lonely", "a banana");
    raw.reply()
}

#[test]
fn fewer_servers_than_replicas_is_refused_clearly() {
    let cluster = Cluster::start(1, &[], &["--replicas", "2"]);
    match store_one(&cluster) {
        Reply::Error(e) => {
            assert_eq!(e.code, ErrorCode::TooFewServers, "{e:?}");
            assert!(e.message.contains("--replicas 2"), "{}", e.message);
        }
        other => panic!("{other:?}"),
    }
    assert!(copies_on_disk(&cluster.server_dirs).is_empty());
}

#[test]
fn min_replicas_stores_fewer_copies_flagged_under_replicated() {
    let cluster = Cluster::start(1, &[], &["--replicas", "2", "--min-replicas", "1"]);
    let Reply::Stored(s) = store_one(&cluster) else {
        panic!("not stored")
    };
    assert!(s.under_replicated);
    assert_eq!(s.copies.len(), 1);
    let out = run_client(cluster.balancer.addr, &["list", "--docs"], cluster.dir.path());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("under-replicated"), "{text}");
}
