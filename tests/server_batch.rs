//! A storage server takes the requests of a connection in batches: stores
//! pipelined on one connection, or on several at once, are each stored
//! once and answered once (replies matched by id, as their order may
//! change), with fewer syncs than stores; a peer that reads its replies
//! late gets each whole; a download waits for the stores before it; and a
//! kill -9 in the middle of a stream of stores leaves only documents that a
//! restart may answer "already stored" for.

mod util;

use lbft::proto::{self, ErrorCode, Reply};
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Command, ExitStatus};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;
use util::{all_files, start_server, stored_files, Proc, Raw};

/// How long a signalled server may take to exit.
const EXIT_TIMEOUT: Duration = Duration::from_secs(20);

/// Sends SIGTERM and waits for the process to exit; kills it if it does
/// not within `EXIT_TIMEOUT`, so that a hang fails the test instead of
/// blocking it.
fn terminate(server: &mut Proc) -> ExitStatus {
    util::signal(server, "TERM");
    let pid = server.child.id().to_string();
    let child = &mut server.child;
    thread::scope(|s| {
        let (exited, exit_seen) = mpsc::channel::<()>();
        s.spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = exit_seen.recv_timeout(EXIT_TIMEOUT) {
                let _ = Command::new("kill").args(["-KILL", &pid]).status();
            }
        });
        let status = child.wait().unwrap();
        let _ = exited.send(());
        status
    })
}

fn content(number: u64) -> String {
    format!("document {number} {}", "a".repeat((number % 97) as usize))
}

/// A `store` frame for `number`, with id `id`.
fn store_frame(id: u64, number: u64) -> Vec<u8> {
    let request = json!({
        "type": "store", "id": id, "titolo": format!("doc {number}"),
        "contenuto": content(number), "numero_richiesta": number
    });
    let mut frame = Vec::new();
    proto::write_frame(&mut frame, request.to_string().as_bytes()).unwrap();
    frame
}

fn status_frame(id: u64) -> Vec<u8> {
    let mut frame = Vec::new();
    let request = json!({"type": "status", "id": id});
    proto::write_frame(&mut frame, request.to_string().as_bytes()).unwrap();
    frame
}

/// Reads `count` replies, each with an id no other one had.
fn replies_by_id(conn: &mut Raw, count: usize) -> BTreeMap<u64, Reply> {
    let mut replies = BTreeMap::new();
    for _ in 0..count {
        let reply = conn.reply();
        let id = reply_id(&reply);
        assert!(
            replies.insert(id, reply).is_none(),
            "two replies for request {id}"
        );
    }
    replies
}

fn reply_id(reply: &Reply) -> u64 {
    match reply {
        Reply::Stored(s) => s.id,
        Reply::Status(s) => s.id,
        Reply::Error(e) => e.id.expect("an error for a request"),
        other => panic!("unexpected reply {other:?}"),
    }
}

fn expect_stored(reply: &Reply, number: u64) -> &proto::Stored {
    match reply {
        Reply::Stored(s) if s.request_number == number => s,
        other => panic!("request {number}: expected stored, got {other:?}"),
    }
}

/// `documents`, `commits` and `syncs` of the committer's last log line.
fn committer_summary(log: &Path) -> (u64, u64, u64) {
    let text = std::fs::read_to_string(log).unwrap();
    let line = text
        .lines()
        .rev()
        .find(|l| l.contains("documents made durable in"))
        .unwrap_or_else(|| panic!("no committer summary in the log:\n{text}"));
    let words: Vec<&str> = line.split_whitespace().collect();
    let before = |word: &str| -> u64 {
        let at = words.iter().position(|w| *w == word).unwrap();
        words[at - 1].parse().unwrap()
    };
    (before("documents"), before("commits"), before("syncs"))
}

#[test]
fn pipelined_stores_commit_together_and_each_is_answered_once() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("store");
    let log = work.path().join("server.log");
    let mut server = start_server(&dir, &["--log-file", &log.display().to_string()]);

    // One connection sends 300 stores with a status after every 50th, in
    // one write; four more send 100 stores each at the same time.
    let plan: Vec<u64> = vec![300, 100, 100, 100, 100];
    let stores: u64 = plan.iter().sum();
    let seen: Vec<BTreeMap<u64, Reply>> = thread::scope(|s| {
        let handles: Vec<_> = plan
            .iter()
            .enumerate()
            .map(|(c, &count)| {
                let (addr, dir) = (server.addr, &dir);
                s.spawn(move || {
                    let mut conn = Raw::connect_to_server(addr, dir);
                    let mut bytes = Vec::new();
                    let mut statuses = 0;
                    for i in 1..=count {
                        bytes.extend(store_frame(i, c as u64 * 1000 + i));
                        if c == 0 && i % 50 == 0 {
                            bytes.extend(status_frame(100_000 + i));
                            statuses += 1;
                        }
                    }
                    conn.send_bytes(&bytes);
                    replies_by_id(&mut conn, count as usize + statuses)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });

    for (c, replies) in seen.iter().enumerate() {
        for i in 1..=plan[c] {
            let number = c as u64 * 1000 + i;
            let stored = expect_stored(&replies[&i], number);
            assert!(!stored.existing, "{stored:?}");
            assert_eq!(stored.file, format!("{number}_doc_{number}.json"));
            assert_eq!(stored.a_count, number % 97);
        }
    }
    let statuses = seen[0]
        .values()
        .filter(|r| matches!(r, Reply::Status(_)))
        .count();
    assert_eq!(statuses, 6);
    let files = stored_files(&dir);
    assert_eq!(files.len() as u64, stores);
    for (name, doc) in &files {
        let number = doc["numero_richiesta"].as_u64().unwrap();
        assert_eq!(name, &format!("{number}_doc_{number}.json"));
        assert_eq!(doc["contenuto"], content(number));
    }

    // The same numbers again, pipelined: each already stored.
    let mut again = Raw::connect_to_server(server.addr, &dir);
    let bytes: Vec<u8> = (1..=300).flat_map(|i| store_frame(i, i)).collect();
    again.send_bytes(&bytes);
    for (i, reply) in replies_by_id(&mut again, 300) {
        let stored = expect_stored(&reply, i);
        assert!(stored.existing, "{stored:?}");
        assert_eq!(stored.file, format!("{i}_doc_{i}.json"));
    }
    assert_eq!(stored_files(&dir).len() as u64, stores);

    let status = terminate(&mut server);
    assert!(status.success(), "server exited with {status}");
    let (documents, commits, syncs) = committer_summary(&log);
    assert_eq!(documents, stores);
    eprintln!("{stores} stores in {commits} commits with {syncs} syncs");
    assert!(syncs < stores, "{syncs} syncs for {stores} stores");
}

#[test]
fn a_peer_that_reads_its_replies_late_gets_each_one_whole() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("store");
    let server = start_server(&dir, &[]);
    let mut conn = Raw::connect_to_server(server.addr, &dir);
    let mut write_half = Raw {
        stream: conn.stream.try_clone().unwrap(),
    };
    // Thousands of status replies (half a KiB each) pile up before the
    // peer reads any: more than the socket takes at once.
    let (half_sent, sent) = mpsc::channel();
    let writer = thread::spawn(move || {
        for half in 0..2u64 {
            let bytes: Vec<u8> = (1..=4000)
                .flat_map(|i| status_frame(half * 4000 + i))
                .collect();
            write_half.send_bytes(&bytes);
            let _ = half_sent.send(());
        }
    });
    sent.recv().unwrap();
    let replies = replies_by_id(&mut conn, 8000);
    writer.join().unwrap();
    assert_eq!(
        replies.keys().copied().collect::<Vec<_>>(),
        (1..=8000).collect::<Vec<_>>()
    );
    assert!(replies.values().all(|r| matches!(r, Reply::Status(_))));
}

#[test]
fn a_download_waits_for_the_stores_before_it() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("store");
    let server = start_server(&dir, &[]);
    let mut conn = Raw::connect_to_server(server.addr, &dir);
    let mut bytes: Vec<u8> = (1..=50).flat_map(|i| store_frame(i, i)).collect();
    let get = json!({"type": "get", "id": 999, "name": "missing.bin", "offset": 0});
    proto::write_frame(&mut bytes, get.to_string().as_bytes()).unwrap();
    conn.send_bytes(&bytes);
    let mut stored = BTreeSet::new();
    for _ in 0..50 {
        let reply = conn.reply();
        stored.insert(expect_stored(&reply, reply_id(&reply)).request_number);
    }
    assert_eq!(stored.len(), 50);
    match conn.reply() {
        Reply::Error(e) => assert_eq!((e.id, e.code), (Some(999), ErrorCode::NotFound)),
        other => panic!("expected not_found, got {other:?}"),
    }
}

#[test]
fn a_kill_9_amid_pipelined_stores_leaves_only_documents_a_restart_may_answer_for() {
    const SENT: u64 = 4000;
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("store");
    let mut server = start_server(&dir, &[]);
    let conn = Raw::connect_to_server(server.addr, &dir);
    let mut write_half = conn.stream.try_clone().unwrap();
    // Stores in writes of 40, so that they reach the committer in many
    // batches; the answers are read as they come.
    let writer = thread::spawn(move || {
        use std::io::Write;
        for chunk in (1..=SENT).collect::<Vec<_>>().chunks(40) {
            let bytes: Vec<u8> = chunk.iter().flat_map(|&n| store_frame(n, n)).collect();
            if write_half.write_all(&bytes).is_err() {
                return; // killed
            }
        }
    });
    let (acked_tx, acked_rx) = mpsc::channel::<u64>();
    let reader = thread::spawn(move || {
        let mut reader = proto::FrameReader::new(&conn.stream, proto::DEFAULT_MAX_FRAME);
        // Until the server is killed: the connection breaks.
        while let Ok(Some(Ok(reply))) = reader.message::<Reply>() {
            match reply {
                Reply::Stored(s) => acked_tx.send(s.request_number).unwrap(),
                other => panic!("unexpected reply {other:?}"),
            }
        }
    });
    let mut acked = BTreeSet::new();
    while acked.len() < 400 {
        acked.insert(acked_rx.recv().expect("the server stopped answering"));
    }
    server.stop(); // kill -9
    reader.join().unwrap();
    writer.join().unwrap();
    acked.extend(acked_rx.try_iter());
    assert!(
        (acked.len() as u64) < SENT,
        "every store answered before the kill"
    );

    // Every visible document is whole and is what was sent for its number;
    // every acknowledged one is there.
    let mut visible = BTreeMap::new();
    for (name, doc) in stored_files(&dir) {
        let number = doc["numero_richiesta"].as_u64().unwrap();
        assert_eq!(name, format!("{number}_doc_{number}.json"));
        assert_eq!(doc["contenuto"], content(number));
        visible.insert(number, name);
    }
    for number in &acked {
        assert!(
            visible.contains_key(number),
            "acknowledged {number} is gone"
        );
    }

    // After a restart, staging files are gone, and the server answers
    // "already stored" exactly for the visible documents.
    let server = start_server(&dir, &[]);
    let leftovers: Vec<_> = all_files(&dir)
        .into_iter()
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(".tmp-")
        })
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let mut conn = Raw::connect_to_server(server.addr, &dir);
    let bytes: Vec<u8> = (1..=SENT).flat_map(|n| store_frame(n, n)).collect();
    let writer = {
        let mut write_half = Raw {
            stream: conn.stream.try_clone().unwrap(),
        };
        thread::spawn(move || write_half.send_bytes(&bytes))
    };
    for (number, reply) in replies_by_id(&mut conn, SENT as usize) {
        let stored = expect_stored(&reply, number);
        match visible.get(&number) {
            Some(file) => assert!(stored.existing && &stored.file == file, "{stored:?}"),
            None => assert!(!stored.existing, "{stored:?}"),
        }
    }
    writer.join().unwrap();
    assert_eq!(stored_files(&dir).len() as u64, SENT);
}
