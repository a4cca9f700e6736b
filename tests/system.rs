//! End-to-end behaviour of balancer, servers and client, all as real
//! processes on loopback.

mod util;

use lbft::proto::Reply;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use util::*;

fn run_client(args: &[String], cwd: &Path) -> Output {
    Command::new(client_bin())
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .output()
        .expect("client runs")
}

fn write_docs(dir: &Path, prefix: &str, count: usize) -> Vec<(PathBuf, Value)> {
    std::fs::create_dir_all(dir).unwrap();
    (0..count)
        .map(|i| {
            let doc = json!({
                "titolo": format!("{prefix} città {i}"),
                "contenuto": format!("{prefix}-{i}: {} àèìòù", "Aa".repeat(i + 1)),
            });
            let path = dir.join(format!("{prefix}_{i}.json"));
            std::fs::write(&path, doc.to_string()).unwrap();
            (path, doc)
        })
        .collect()
}

fn count_a(s: &str) -> u64 {
    s.chars().filter(|c| *c == 'a' || *c == 'A').count() as u64
}

#[test]
fn thirty_documents_from_three_clients_spread_ten_per_server() {
    let cluster = Cluster::start(3, &[], &[]);
    let addr = cluster.balancer.addr.to_string();
    let mut sent: BTreeMap<String, Value> = BTreeMap::new();
    let clients: Vec<_> = ["alfa", "beta", "gamma"]
        .iter()
        .map(|prefix| {
            let docs = write_docs(&cluster.dir.path().join("docs"), prefix, 10);
            let mut args = strings(&["--balancer", &addr, "send"]);
            for (path, doc) in docs {
                args.push(path.display().to_string());
                sent.insert(doc["contenuto"].as_str().unwrap().to_string(), doc);
            }
            Command::new(client_bin())
                .args(&args)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in clients {
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "client failed: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains("10 documents: 10 stored, 0 failed"),
            "{stdout}"
        );
    }

    let mut numbers = BTreeSet::new();
    let mut seen = BTreeSet::new();
    for dir in &cluster.server_dirs {
        let files = stored_files(dir);
        assert_eq!(
            files.len(),
            10,
            "server {} holds {:?}",
            dir.display(),
            files
        );
        for (name, stored) in files {
            let content = stored["contenuto"].as_str().unwrap();
            let original = sent
                .get(content)
                .unwrap_or_else(|| panic!("{name} was never sent"));
            assert_eq!(stored["titolo"], original["titolo"]);
            assert_eq!(stored["a_count"], count_a(content));
            let number = stored["numero_richiesta"].as_u64().unwrap();
            assert!(name.starts_with(&format!("{number}_")), "{name}");
            assert!(stored["received_at"].as_str().unwrap().ends_with('Z'));
            numbers.insert(number);
            seen.insert(content.to_string());
        }
    }
    assert_eq!(numbers.len(), 30, "request numbers are unique and global");
    assert_eq!(seen.len(), 30, "every document stored exactly once");

    // A connection's closing line is written after the client has its
    // replies, so the log may lag behind the clients by a moment.
    assert!(eventually(|| cluster
        .log()
        .matches("closed (10 requests, 10 replies)")
        .count()
        == 3));
    let log = cluster.log();
    for needle in [
        "balancer listening on",
        "stored on server",
        "is up",
        "closed (10 requests, 10 replies)",
    ] {
        assert!(log.contains(needle), "log lacks {needle:?}:\n{log}");
    }
    assert_eq!(log.matches("stored on server").count(), 30);
}

#[test]
fn a_server_stopped_mid_run_loses_nothing() {
    // Each document takes a while to count, so the kill lands mid-run.
    let mut cluster = Cluster::start(3, &["--char-delay-ms", "1"], &[]);
    let mut conn = Raw::connect(cluster.balancer.addr);
    // More than the servers take at once (--max-in-flight), so that the
    // killed one still has work in progress and queued.
    let total = 300u64;
    for id in 1..=total {
        conn.store(
            id,
            &format!("doc {id}"),
            &format!("{id}:{}", "a".repeat(150)),
        );
    }
    let mut replies = Vec::new();
    // Stop the first server as soon as some documents are acknowledged.
    while replies.len() < 3 {
        replies.push(conn.reply());
    }
    let killed = cluster.servers[0].addr.to_string();
    cluster.servers[0].stop();
    while replies.len() < total as usize {
        replies.push(conn.reply());
    }

    let mut ids = BTreeSet::new();
    let mut per_server: BTreeMap<String, usize> = BTreeMap::new();
    for reply in replies {
        let Reply::Stored(s) = reply else {
            panic!("document lost: {reply:?}");
        };
        ids.insert(s.id);
        *per_server.entry(s.server.clone()).or_default() += 1;
        let index = cluster
            .servers
            .iter()
            .position(|p| p.addr.to_string() == s.server)
            .unwrap();
        let path = cluster.server_dirs[index].join(&s.file);
        let stored: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(stored["titolo"], format!("doc {}", s.id));
    }
    assert_eq!(ids, (1..=total).collect());
    assert!(
        per_server.get(&killed).copied().unwrap_or(0) < 100,
        "{per_server:?}"
    );
    let log = cluster.log();
    assert!(log.contains(&format!("server {killed} is down")), "{log}");
}

#[test]
fn embedded_servers_and_ftp_command() {
    let work = tempfile::tempdir().unwrap();
    let storage = work.path().join("json_files");
    let balancer = start(
        balancer_bin(),
        &strings(&[
            "--local-servers",
            "3",
            "--local-base-port",
            "0",
            "--listen",
            "127.0.0.1:0",
            "--storage-dir",
            storage.to_str().unwrap(),
        ]),
        work.path(),
    );
    assert_eq!(balancer.banner.len(), 3, "{:?}", balancer.banner);
    let docs = write_docs(&work.path().join("file"), "doc", 6);
    assert_eq!(docs.len(), 6);

    let out = run_client(
        &strings(&["--balancer", &balancer.addr.to_string(), "ftp", "20"]),
        work.path(),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("20 documents: 20 stored, 0 failed"),
        "{stdout}"
    );

    let mut counts: Vec<usize> = std::fs::read_dir(&storage)
        .unwrap()
        .map(|e| stored_files(&e.unwrap().path()).len())
        .collect();
    counts.sort();
    assert_eq!(counts, [6, 7, 7]);
    assert!(work.path().join("loadbalancer.log").exists());
}

#[test]
fn interactive_prompt_sends_and_exits() {
    let cluster = Cluster::start(2, &[], &[]);
    write_docs(&cluster.dir.path().join("file"), "doc", 3);
    let mut child = Command::new(client_bin())
        .args(["--balancer", &cluster.balancer.addr.to_string()])
        .current_dir(cluster.dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"ftp\n4\nlist\nExit\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("doc_0.json"),
        "lists the documents: {stdout}"
    );
    assert!(
        stdout.contains("4 documents: 4 stored, 0 failed"),
        "{stdout}"
    );
    assert!(stdout.contains("unknown command `list`"), "{stdout}");
    let stored: usize = cluster
        .server_dirs
        .iter()
        .map(|d| stored_files(d).len())
        .sum();
    assert_eq!(stored, 4);
}

#[test]
fn server_keeps_documents_across_restarts_unless_cleaned() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("store");
    for round in 1..=2u64 {
        let server = start_server(&dir, &[]);
        let mut conn = Raw::connect_to_server(server.addr, &dir);
        // Same request number both times: the restarted server knows it
        // holds it and does not store it again (nor replace it).
        conn.send_json(&json!({
            "type": "store", "id": round, "titolo": "same", "contenuto": format!("round {round}"),
            "numero_richiesta": 1
        }));
        let Reply::Stored(s) = conn.reply() else {
            panic!()
        };
        assert_eq!(s.file, "1_same.json");
        assert_eq!(s.existing, round == 2);
    }
    let files = stored_files(&dir);
    assert_eq!(files.len(), 1);
    assert_eq!(files[0].1["contenuto"], "round 1");
    let _server = start_server(&dir, &["--clean"]);
    assert_eq!(stored_files(&dir).len(), 0);
}

#[test]
fn status_reports_load() {
    let work = tempfile::tempdir().unwrap();
    let server = start_server(&work.path().join("s"), &["--max-active", "5"]);
    let mut conn = Raw::connect_to_server(server.addr, &work.path().join("s"));
    conn.send_json(&json!({"type": "status", "id": 42}));
    let Reply::Status(status) = conn.reply() else {
        panic!()
    };
    assert_eq!(status.id, 42);
    assert_eq!(status.max_active, 5);
    assert_eq!(status.active, 0);
    assert!(!status.overloaded);
    assert_eq!(status.files_stored, 0);
}

#[test]
fn an_overloaded_server_gets_nothing() {
    // A memory limit of 1 MB is always exceeded: the first server reports
    // itself overloaded on every probe.
    let dir = tempfile::tempdir().unwrap();
    let busy = start_server(&dir.path().join("busy"), &["--max-memory-mb", "1"]);
    let idle = start_server(&dir.path().join("idle"), &[]);
    let balancer = start_balancer(dir.path(), &[busy.addr, idle.addr], &[]);
    let mut conn = Raw::connect(balancer.addr);
    for id in 1..=6 {
        conn.store(id, &format!("doc {id}"), "abc");
    }
    for _ in 1..=6 {
        let Reply::Stored(s) = conn.reply() else {
            panic!("not stored")
        };
        assert_eq!(s.server, idle.addr.to_string());
    }
    assert_eq!(stored_files(&dir.path().join("busy")).len(), 0);
    assert_eq!(stored_files(&dir.path().join("idle")).len(), 6);
    let log = std::fs::read_to_string(dir.path().join("loadbalancer.log")).unwrap();
    assert!(
        log.contains(&format!("server {} is overloaded", busy.addr)),
        "{log}"
    );
}

#[test]
fn a_storage_error_moves_the_document_to_another_server() {
    let cluster = Cluster::start(2, &[], &[]);
    // Pull the first server's folder from under it: writing fails there.
    let broken = &cluster.server_dirs[0];
    std::fs::rename(broken, broken.with_extension("moved")).unwrap();
    std::fs::write(broken, b"not a folder").unwrap();

    let mut conn = Raw::connect(cluster.balancer.addr);
    for id in 1..=4 {
        conn.store(id, &format!("doc {id}"), "abc");
    }
    for _ in 1..=4 {
        let Reply::Stored(s) = conn.reply() else {
            panic!("not stored")
        };
        assert_eq!(s.server, cluster.servers[1].addr.to_string());
    }
    assert_eq!(stored_files(&cluster.server_dirs[1]).len(), 4);
    let log = cluster.log();
    assert!(log.contains("storage: server"), "{log}");
    assert!(log.contains("trying another server"), "{log}");
}
