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
    let contents: Vec<String> = (0..300)
        .map(|i| format!("content {i} {}", "a".repeat(i % 7)))
        .collect();
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
        assert_eq!(
            (dirs.len(), distinct.len()),
            (2, 2),
            "request {number}: {dirs:?}"
        );
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
    let out = run_client(
        cluster.balancer.addr,
        &["list", "--docs"],
        cluster.dir.path(),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("under-replicated"), "{text}");
}

/// The files below `dir/files` (not hidden), by name.
fn files_on_disk(dir: &std::path::Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir.join("files")) else {
        return Vec::new();
    };
    entries
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| !n.starts_with('.'))
        .collect()
}

/// Copies on disk of every document and file, across `dirs`: each
/// document number and file name with the count of folders holding it.
fn counts(dirs: &[PathBuf]) -> (BTreeMap<u64, usize>, BTreeMap<String, usize>) {
    let docs = copies_on_disk(dirs)
        .into_iter()
        .map(|(n, d)| (n, d.len()))
        .collect();
    let mut files: BTreeMap<String, usize> = BTreeMap::new();
    for dir in dirs {
        for name in files_on_disk(dir) {
            *files.entry(name).or_default() += 1;
        }
    }
    (docs, files)
}

fn client_ok(cluster: &Cluster, args: &[&str]) -> String {
    let out = run_client(cluster.balancer.addr, args, cluster.dir.path());
    assert!(
        out.status.success(),
        "client {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[test]
fn a_lost_server_loses_nothing_and_repair_makes_two_copies_again() {
    let mut cluster = Cluster::start(4, &[], &["--replicas", "2"]);
    let contents: Vec<String> = (0..1000)
        .map(|i| format!("document {i} {}", "a".repeat(i % 13)))
        .collect();
    let seen = send_batch(cluster.balancer.addr, contents.clone(), || {});
    assert!(seen.errors.is_empty(), "{:?}", seen.errors.first());
    assert_eq!(seen.stored.len(), 1000);
    // Files: uploaded once, their second copies made by repair.
    let work = cluster.dir.path().join("upload");
    std::fs::create_dir_all(&work).unwrap();
    let mut files = Vec::new();
    for i in 0..20u32 {
        let bytes: Vec<u8> = (0..(2 << 20) + i * 1000)
            .map(|b| (b.wrapping_mul(31).wrapping_add(i)) as u8)
            .collect();
        let path = work.join(format!("file{i}.bin"));
        std::fs::write(&path, &bytes).unwrap();
        client_ok(&cluster, &["send", path.to_str().unwrap()]);
        files.push((format!("file{i}.bin"), bytes));
    }
    client_ok(&cluster, &["admin", "repair"]);
    let dirs = cluster.server_dirs.clone();
    assert!(
        util::poll_until(std::time::Duration::from_secs(60), || two_copies_of_each(
            &dirs, 1000, 20
        )),
        "not two copies of everything: {:?}",
        counts(&dirs).1
    );
    // One server's disk dies.
    let lost = 0;
    let status = std::process::Command::new("kill")
        .args(["-9", &cluster.servers[lost].child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let _ = cluster.servers[lost].child.wait();
    std::fs::remove_dir_all(&cluster.server_dirs[lost]).unwrap();
    // Every file and a sample of documents are read back, bytes checked.
    let out_dir = cluster.dir.path().join("got");
    std::fs::create_dir_all(&out_dir).unwrap();
    for (name, bytes) in &files {
        let to = out_dir.join(name);
        client_ok(&cluster, &["get", name, "-o", to.to_str().unwrap()]);
        assert_eq!(&std::fs::read(&to).unwrap(), bytes, "{name}");
    }
    for s in seen.stored.values().step_by(20) {
        let to = out_dir.join(&s.file);
        client_ok(&cluster, &["get", &s.file, "-o", to.to_str().unwrap()]);
        let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&to).unwrap()).unwrap();
        assert_eq!(
            doc["contenuto"].as_str(),
            Some(contents[s.id as usize - 1].as_str())
        );
    }
    let gone = cluster.servers[lost].addr.to_string();
    client_ok(&cluster, &["admin", "remove", &gone]);
    let left: Vec<PathBuf> = dirs.iter().skip(1).cloned().collect();
    assert!(
        util::poll_until(std::time::Duration::from_secs(90), || two_copies_of_each(
            &left, 1000, 20
        )),
        "repair did not make two copies of everything: {} documents, {:?}",
        counts(&left).0.len(),
        counts(&left).0.values().filter(|&&n| n != 2).count()
    );
    let status = client_ok(&cluster, &["status"]);
    assert!(status.contains("repair: 0 entries short"), "{status}");
}

/// Whether `dirs` hold exactly two copies of each of `documents` documents
/// and `files` files.
fn two_copies_of_each(dirs: &[PathBuf], documents: usize, files: usize) -> bool {
    let (docs, f) = counts(dirs);
    docs.len() == documents
        && docs.values().all(|&n| n == 2)
        && f.len() == files
        && f.values().all(|&n| n == 2)
}
