//! Clients that fail over between balancers (`client --balancer A,B`),
//! and the servers' client keys that keep every document stored once.
//! Real processes; readiness and progress are read from their output.

mod util;

use lbft::proto::{Reply, StorageRequest};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use util::*;

const CLIENTS: usize = 3;
const DOCUMENTS: usize = 1000;

/// A balancer in a folder of its own, in front of `servers`, proving the
/// servers' cluster key.
fn start_balancer_in(work: &Path, name: &str, id: &str, servers: &[SocketAddr]) -> Proc {
    let dir = work.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let key = default_key(work).display().to_string();
    let state = dir.join("state.db").display().to_string();
    start_balancer(
        &dir,
        servers,
        &[
            "--balancer-id",
            id,
            "--state",
            &state,
            "--cluster-key-file",
            &key,
            "--server-timeout",
            "3s",
            "--probe-timeout",
            "300ms",
        ],
    )
}

#[test]
fn a_balancer_killed_mid_batch_loses_nothing_and_stores_nothing_twice() {
    let work = tempfile::tempdir().unwrap();
    let dirs: Vec<PathBuf> = (0..3).map(|i| work.path().join(format!("s{i}"))).collect();
    let servers: Vec<Proc> = dirs.iter().map(|d| start_server(d, &[])).collect();
    let addrs: Vec<SocketAddr> = servers.iter().map(|s| s.addr).collect();
    let mut first = start_balancer_in(work.path(), "a", "1", &addrs);
    let second = start_balancer_in(work.path(), "b", "2", &addrs);
    let list = format!("{},{}", first.addr, second.addr);

    // Killed (SIGKILL, by its pid) once a client has a tenth answered.
    let output =
        batches::send_through_a_kill(work.path(), &list, CLIENTS, DOCUMENTS, || first.stop());
    let went_on = batches::failed_over(&output);
    assert!(went_on > 0, "no client failed over: {output:?}");
    let stored = batches::assert_each_stored_once(&dirs, CLIENTS, DOCUMENTS);
    let found = second
        .log
        .text()
        .matches("already stored on server")
        .count();
    eprintln!(
        "{went_on} of {CLIENTS} clients failed over; {found} documents sent again were found \
         stored by the lookup; {stored} documents stored once each"
    );
}

fn keyed_store(id: u64, number: u64, key: &str, content: &str) -> Value {
    json!({"type": "store", "id": id, "numero_richiesta": number, "key": key,
           "titolo": "keyed", "contenuto": content})
}

fn stored(reply: Reply) -> lbft::proto::Stored {
    match reply {
        Reply::Stored(s) => s,
        other => panic!("expected stored, got {other:?}"),
    }
}

#[test]
fn a_server_stores_a_key_once_and_knows_it_after_a_restart() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("s");
    let mut server = start_server(&dir, &[]);
    let addr = server.addr;
    let key = "000000000000000a0000000000000001";
    let mut raw = Raw::connect_to_server(addr, &dir);
    raw.send_json(&keyed_store(1, 101, key, "once"));
    let first = stored(raw.reply());
    assert!(!first.existing);
    assert!(
        first.file.contains(key),
        "the key is in the name: {}",
        first.file
    );
    // The same key under another number (another balancer's): not again.
    raw.send_json(&keyed_store(2, 202, key, "once"));
    let again = stored(raw.reply());
    assert!(again.existing);
    assert_eq!(
        (again.file.as_str(), again.request_number),
        (first.file.as_str(), 101)
    );
    // A lookup finds it; an unknown key is fenced to the number given.
    let other = "000000000000000a0000000000000002";
    let lookup = json!({"type": "lookup", "id": 3, "keys": [
        {"key": key, "numero_richiesta": 303}, {"key": other, "numero_richiesta": 304}]});
    raw.send_json(&lookup);
    let Reply::Keys { held, busy, .. } = raw.reply() else {
        panic!("expected keys")
    };
    assert!(busy.is_empty());
    assert_eq!(held.len(), 1);
    assert_eq!(
        (held[0].file.as_str(), held[0].request_number),
        (first.file.as_str(), 101)
    );
    raw.send_json(&keyed_store(4, 305, other, "fenced"));
    let Reply::Error(e) = raw.reply() else {
        panic!("a fenced key stored under another number")
    };
    assert_eq!(e.code, lbft::proto::ErrorCode::Expired);
    raw.send_json(&keyed_store(5, 304, other, "fenced"));
    assert!(!stored(raw.reply()).existing);
    drop(raw);

    server.stop();
    let server = start(
        server_bin(),
        &strings(&[
            "--listen",
            &addr.to_string(),
            "--dir",
            &dir.display().to_string(),
        ]),
        work.path(),
    );
    let mut raw = Raw::connect_to_server(server.addr, &dir);
    raw.send_json(&keyed_store(6, 606, key, "once"));
    let after = stored(raw.reply());
    assert!(after.existing, "a restarted server knows its keys");
    assert_eq!(after.file, first.file);
    // Forgotten by key: moved aside, and never stored again, even after
    // another restart.
    raw.send_json(
        &serde_json::to_value(StorageRequest::Forget {
            id: 7,
            numbers: vec![],
            keys: vec![key.parse().unwrap()],
        })
        .unwrap(),
    );
    assert_eq!(raw.reply(), Reply::Forgotten { id: 7, moved: 1 });
    raw.send_json(&keyed_store(8, 808, key, "once"));
    assert!(matches!(raw.reply(), Reply::Error(_)));
    let names: Vec<String> = stored_files(&dir).into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names.len(),
        1,
        "only the fenced document is left: {names:?}"
    );
}
