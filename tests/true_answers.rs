//! Every answer is true: a server's refusal reaches the client at once, a
//! document that may be stored is never reported failed, a balancer that
//! was killed does not leave transfers open for ever, a size no server
//! would take is refused up front, and a full disk is believed the first
//! time.

mod util;

use lbft::proto::{ErrorCode, Reply};
use serde_json::json;
use std::collections::BTreeMap;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};
use util::*;

fn error(reply: Reply) -> lbft::proto::ErrorReply {
    match reply {
        Reply::Error(e) => e,
        other => panic!("expected an error, got {other:?}"),
    }
}

fn begin_upload(raw: &mut Raw, upload_id: &str, size: u64) {
    raw.send_json(&json!({
        "type": "upload", "id": 1, "upload_id": upload_id, "name": "a.bin", "size": size
    }));
    match raw.reply() {
        Reply::UploadReady(r) => assert_eq!(r.offset, 0),
        other => panic!("expected upload_ready, got {other:?}"),
    }
}

fn chunk(raw: &mut Raw, offset: u64, body: &[u8]) {
    raw.send_json(&json!({"type": "chunk", "id": 1, "offset": offset, "body_len": body.len()}));
    raw.send_frame(body);
}

#[test]
fn a_servers_refusal_of_a_chunk_reaches_the_client_at_once() {
    // A client silent for a minute would be cut off only then: the
    // refusal must not wait for that.
    let cluster = Cluster::start(1, &[], &["--client-timeout", "60s"]);
    let started = Instant::now();

    let mut wrong_offset = Raw::connect(cluster.balancer.addr);
    begin_upload(&mut wrong_offset, "offset-gap-0001", 10);
    chunk(&mut wrong_offset, 5, b"abc");
    let e = error(wrong_offset.reply());
    assert_eq!((e.code, e.id), (ErrorCode::BadOffset, Some(1)), "{e:?}");

    let mut overlapping = Raw::connect(cluster.balancer.addr);
    begin_upload(&mut overlapping, "offset-overlap-01", 10);
    chunk(&mut overlapping, 0, b"abcde");
    chunk(&mut overlapping, 3, b"xyz");
    assert_eq!(error(overlapping.reply()).code, ErrorCode::BadOffset);

    let mut past_size = Raw::connect(cluster.balancer.addr);
    begin_upload(&mut past_size, "past-the-size-01", 4);
    chunk(&mut past_size, 0, b"hello");
    assert_eq!(error(past_size.reply()).code, ErrorCode::SizeMismatch);

    let took = started.elapsed();
    assert!(took < Duration::from_secs(10), "refusals took {took:?}");
    // The connections end after the refusal (the rest of their stream is
    // out of step), and the balancer serves others.
    assert!(wrong_offset.is_closed());
    let mut fine = Raw::connect(cluster.balancer.addr);
    fine.store(1, "after", "still served");
    assert!(matches!(fine.reply(), Reply::Stored(_)));
}

#[test]
fn sizes_no_server_takes_are_refused_before_a_byte_is_sent() {
    let cluster = Cluster::start(1, &[], &["--max-file-size", "1MiB"]);
    for size in [u64::MAX, 1 << 41, (1 << 20) + 1] {
        let mut raw = Raw::connect(cluster.balancer.addr);
        raw.send_json(&json!({
            "type": "upload", "id": 7, "upload_id": "too-large-0001", "name": "x", "size": size
        }));
        let e = error(raw.reply());
        assert_eq!((e.code, e.id), (ErrorCode::TooLarge, Some(7)), "{e:?}");
        assert!(e.message.contains("--max-file-size"), "{}", e.message);
    }
    // At the limit is fine.
    let mut raw = Raw::connect(cluster.balancer.addr);
    begin_upload(&mut raw, "at-the-limit-001", 1 << 20);
}

/// Sends `n` documents of `len` letters on one connection, pipelined, and
/// runs `during` once `after` of them are acknowledged.
fn batch_with(
    balancer: std::net::SocketAddr,
    contents: Vec<String>,
    after: usize,
    during: impl FnOnce(),
) -> Seen {
    let (acks_tx, acks_rx) = crossbeam_channel::unbounded::<()>();
    let client = thread::spawn(move || {
        send_batch(balancer, contents, || {
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
fn documents_on_a_removed_server_are_never_reported_failed() {
    // One slow server, and a short queue timeout once it is gone.
    let cluster = Cluster::start(
        1,
        &["--char-delay-ms", "1"],
        &["--queue-timeout", "1s", "--max-in-flight", "8"],
    );
    let contents: Vec<String> = (0..60)
        .map(|i| format!("doc {i:03} {}", "a".repeat(150)))
        .collect();
    let server = cluster.servers[0].addr.to_string();
    let seen = batch_with(cluster.balancer.addr, contents.clone(), 3, || {
        let out = Command::new(client_bin())
            .args(["--balancer", &cluster.balancer.addr.to_string()])
            .args(["admin", "remove", &server])
            .current_dir(cluster.dir.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    });

    // The removed server finishes what it was storing; wait until it is idle.
    let mut probe = Raw::connect_to_server(cluster.servers[0].addr, &cluster.server_dirs[0]);
    let deadline = Instant::now() + REPLY_TIMEOUT;
    loop {
        probe.send_json(&json!({"type": "status", "id": 1}));
        match probe.reply() {
            Reply::Status(s) if s.active == 0 => break,
            Reply::Status(_) => assert!(Instant::now() < deadline, "the server never went idle"),
            other => panic!("{other:?}"),
        }
    }

    let mut answered: BTreeMap<u64, ErrorCode> = BTreeMap::new();
    for e in &seen.errors {
        let id = e.id.expect("every error answers a request");
        assert!(
            matches!(e.code, ErrorCode::MaybeStored | ErrorCode::NoServer),
            "{e:?}"
        );
        if e.code == ErrorCode::MaybeStored {
            assert!(e.message.contains(&server), "{}", e.message);
        } else {
            assert!(e.message.contains("the pool is empty"), "{}", e.message);
            assert!(!e.message.contains("()"), "{}", e.message);
        }
        answered.insert(id, e.code);
    }
    assert!(
        !answered.is_empty(),
        "no document was left when the only server was removed"
    );
    // Every document on disk was either acknowledged or said to be maybe
    // stored: none was reported failed while stored. (Those the removed
    // server had already stored when it was told to forget them are in
    // its `.duplicates/`, not among its documents.)
    for (_, doc) in stored_files(&cluster.server_dirs[0]) {
        let content = doc["contenuto"].as_str().unwrap();
        let id = contents.iter().position(|c| c == content).unwrap() as u64 + 1;
        let acknowledged = seen.stored.contains_key(&id);
        assert!(
            acknowledged || answered.get(&id) == Some(&ErrorCode::MaybeStored),
            "document {id} is stored but was answered {:?}",
            answered.get(&id)
        );
    }
}

#[test]
fn a_killed_balancer_leaves_no_transfer_open_after_its_restart() {
    let mut cluster = Cluster::start(2, &["--char-delay-ms", "2"], &[]);
    let contents: Vec<String> = (0..200)
        .map(|i| format!("doc {i} {}", "a".repeat(100)))
        .collect();
    let balancer = cluster.balancer.addr;
    let (acks_tx, acks_rx) = crossbeam_channel::unbounded::<()>();
    let client = thread::spawn(move || {
        send_batch(balancer, contents, || {
            let _ = acks_tx.send(());
        })
    });
    for _ in 0..10 {
        acks_rx.recv().unwrap();
    }
    signal(&cluster.balancer, "KILL");
    cluster.balancer.stop();
    client.join().unwrap();

    let addrs: Vec<_> = cluster.servers.iter().map(|s| s.addr).collect();
    let restarted = start_balancer(cluster.dir.path(), &addrs, &[]);
    let out = run_client(
        restarted.addr,
        &["transfers", "--json", "--limit", "10000"],
        cluster.dir.path(),
    );
    assert!(out.status.success(), "{out:?}");
    let states: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["state"].as_str().unwrap().to_string()
        })
        .collect();
    assert!(!states.is_empty());
    for open in ["queued", "sending", "retried"] {
        assert!(!states.iter().any(|s| s == open), "{open} left: {states:?}");
    }
    assert!(states.iter().any(|s| s == "interrupted"), "{states:?}");
    let log = std::fs::read_to_string(cluster.dir.path().join("loadbalancer.log")).unwrap();
    assert!(log.contains("marked interrupted"), "{log}");
}

#[test]
#[cfg_attr(lbft_not_root, ignore = "needs root: mounts a small tmpfs")]
fn one_full_disk_error_takes_a_server_out_for_stores() {
    let dir = tempfile::tempdir().unwrap();
    // Room for one 1.8 MiB document with more than 1 MiB left (so the
    // server's own check still says it can write), not for two.
    let disk = match SmallDisk::mount(dir.path().join("disk"), "3m") {
        Ok(d) => d,
        Err(why) => panic!("cannot mount a small tmpfs to fill up, as root: {why}"),
    };
    let key = dir.path().join("cluster.key");
    let key_arg = key.display().to_string();
    let small = start_server(&disk.path.join("s"), &["--cluster-key-file", &key_arg]);
    let roomy_dir = dir.path().join("roomy");
    let roomy = start_server(&roomy_dir, &["--cluster-key-file", &key_arg]);
    let balancer = start_balancer(
        dir.path(),
        &[small.addr, roomy.addr],
        &["--cluster-key-file", &key_arg],
    );
    let big = "a".repeat(1_800_000);
    let mut raw = Raw::connect(balancer.addr);
    for id in 1..=8 {
        raw.store(id, &format!("big {id}"), &big);
        match raw.reply() {
            Reply::Stored(_) => {}
            other => panic!("document {id}: {other:?}"),
        }
    }
    let log = std::fs::read_to_string(dir.path().join("loadbalancer.log")).unwrap();
    let full = log
        .lines()
        .filter(|l| l.contains(&small.addr.to_string()) && l.contains("disk_full"))
        .filter(|l| l.contains("trying another server"))
        .count();
    assert_eq!(full, 1, "{log}");
    assert!(
        log.contains(&format!("server {} is down (disk_full", small.addr)),
        "{log}"
    );
    drop((balancer, small, roomy));
    drop(disk);
}
