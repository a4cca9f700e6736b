//! Transfer tracking through the real binaries: a balancer with `--state`
//! in front of two servers, one killed mid-batch; `client transfers` shows
//! where every document went, and still does after a restart.

mod util;

use lbft::proto::{self, ClientRequest, ErrorCode, FrameReader, Reply, StoreRequest, TransferView};
use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::thread;
use util::*;

/// Sends `count` documents titled `doc N` on one connection, pipelined;
/// `on_ack(n)` runs at the n-th acknowledgement. Returns the
/// acknowledgements by request id, and the errors.
fn send_batch(
    addr: SocketAddr,
    count: u64,
    mut on_ack: impl FnMut(usize),
) -> (BTreeMap<u64, proto::Stored>, Vec<proto::ErrorReply>) {
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(REPLY_TIMEOUT)).unwrap();
    let mut write_half = stream.try_clone().unwrap();
    let writer = thread::spawn(move || {
        for id in 1..=count {
            let request = ClientRequest::Store(StoreRequest {
                id,
                doc: proto::Document {
                    title: format!("doc {id}"),
                    // Letters `a` make the servers work (--char-delay-ms),
                    // so that requests are still in flight at the kill.
                    content: format!("{} document {id}", "a".repeat(20)),
                },
                request_number: None,
                not_after_ms: None,
                key: None,
                resent: false,
            });
            proto::write_frame(&mut write_half, &proto::encode(&request)).unwrap();
        }
    });
    let mut stored = BTreeMap::new();
    let mut errors = Vec::new();
    let mut reader = FrameReader::new(&stream, proto::DEFAULT_MAX_FRAME);
    while stored.len() + errors.len() < count as usize {
        match reader.message::<Reply>() {
            Ok(Some(Ok(Reply::Stored(s)))) => {
                stored.insert(s.id, s);
                on_ack(stored.len());
            }
            Ok(Some(Ok(Reply::Error(e)))) => errors.push(e),
            other => panic!("unexpected answer {other:?}"),
        }
    }
    writer.join().unwrap();
    (stored, errors)
}

/// `client transfers --json` against `balancer`: one record per line.
fn transfers(balancer: SocketAddr, extra: &[&str]) -> Vec<TransferView> {
    let output = Command::new(client_bin())
        .args(["--balancer", &balancer.to_string(), "transfers", "--json"])
        .args(extra)
        .output()
        .unwrap();
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(
        output.status.success(),
        "client transfers failed: {}{stdout}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{line}: {e}")))
        .collect()
}

fn terminate(proc: &mut Proc) {
    let status = Command::new("kill")
        .args(["-TERM", &proc.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = proc.child.wait().unwrap();
    assert!(exit.success(), "balancer exited with {exit}");
}

fn start_tracked_balancer(work: &Path, servers: &[SocketAddr], state: &Path) -> Proc {
    let state = state.display().to_string();
    start_balancer(
        work,
        servers,
        &[
            "--state",
            &state,
            "--server-timeout",
            "5s",
            "--probe-timeout",
            "300ms",
            "--max-attempts",
            "5",
        ],
    )
}

#[test]
fn every_document_is_tracked_through_a_server_kill_and_a_restart() {
    let work = tempfile::tempdir().unwrap();
    let dirs = [work.path().join("s0"), work.path().join("s1")];
    let mut servers: Vec<Proc> = dirs
        .iter()
        .map(|d| start_server(d, &["--char-delay-ms", "1"]))
        .collect();
    let addrs: Vec<SocketAddr> = servers.iter().map(|s| s.addr).collect();
    let state = work.path().join("state").join("balancer.db");
    std::fs::create_dir(state.parent().unwrap()).unwrap();
    let mut balancer = start_tracked_balancer(work.path(), &addrs, &state);

    let (acks, errors) = send_batch(balancer.addr, 50, |acked| {
        if acked == 10 {
            servers[1].stop();
        }
    });
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(acks.len(), 50);

    let records = transfers(balancer.addr, &["--limit", "100"]);
    assert_eq!(records.len(), 50, "{records:?}");
    let by_number: BTreeMap<u64, &TransferView> = records.iter().map(|r| (r.number, r)).collect();
    for ack in acks.values() {
        let r = by_number
            .get(&ack.request_number)
            .unwrap_or_else(|| panic!("no record of {ack:?}"));
        assert_eq!(r.state, "stored", "{r:?}");
        assert_eq!(r.title, format!("doc {}", ack.id));
        assert_eq!(r.server.as_deref(), Some(ack.server.as_str()), "{r:?}");
        assert_eq!(r.file.as_deref(), Some(ack.file.as_str()), "{r:?}");
        assert_eq!(r.servers.last(), r.server.as_ref(), "{r:?}");
        assert!(r.duration_ms.is_some() && r.ended_ms >= Some(r.started_ms));
        // The file is where the record says, and holds this document.
        let index = addrs
            .iter()
            .position(|a| a.to_string() == ack.server)
            .unwrap();
        let bytes =
            std::fs::read(dirs[index].join(&ack.file)).unwrap_or_else(|e| panic!("{r:?}: {e}"));
        let doc: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(doc["titolo"], r.title.as_str());
    }
    let retried = records.iter().filter(|r| r.servers.len() > 1).count();
    eprintln!("{retried} of 50 documents were sent to more than one server");

    // Filters: nothing is active or failed any more.
    assert!(transfers(balancer.addr, &["--active"]).is_empty());
    assert!(transfers(balancer.addr, &["--failed"]).is_empty());
    assert_eq!(transfers(balancer.addr, &["--limit", "7"]).len(), 7);
    assert_eq!(transfers(balancer.addr, &["--since", "10m"]).len(), 50);

    let log = std::fs::read_to_string(work.path().join("loadbalancer.log")).unwrap();
    assert!(log.contains("transfer tracking in"), "{log}");

    // A clean stop, then the same state file: the history is still there.
    terminate(&mut balancer);
    let balancer = start_tracked_balancer(work.path(), &addrs, &state);
    let after = transfers(balancer.addr, &["--limit", "100"]);
    assert_eq!(after, records);
}

#[test]
fn tracking_off_is_said_plainly_and_servers_refuse_transfers() {
    let cluster = Cluster::start(1, &[], &["--no-state"]);
    let output = Command::new(client_bin())
        .args([
            "--balancer",
            &cluster.balancer.addr.to_string(),
            "transfers",
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("transfer tracking is off: this balancer runs with --no-state"),
        "{stderr}"
    );
    assert!(!cluster.dir.path().join("balancer.db").exists());

    let mut raw = Raw::connect_to_server(cluster.servers[0].addr, &cluster.server_dirs[0]);
    raw.send_json(&serde_json::json!({"type": "transfers", "id": 5, "active": true}));
    match raw.reply() {
        Reply::Error(e) => {
            assert_eq!((e.id, e.code), (Some(5), ErrorCode::BadRequest));
            assert!(e.message.contains("balancer"), "{}", e.message);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_damaged_state_file_stops_the_start_and_is_left_as_it_was() {
    let work = tempfile::tempdir().unwrap();
    let state = work.path().join("balancer.db");
    let garbage = b"definitely not an SQLite database, just some text in a file".repeat(10);
    std::fs::write(&state, &garbage).unwrap();
    let output = Command::new(balancer_bin())
        .args(["--listen", "127.0.0.1:0", "--servers", "127.0.0.1:9"])
        .current_dir(work.path())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("cannot use state file") && stderr.contains("balancer.db"),
        "{stderr}"
    );
    assert!(!String::from_utf8_lossy(&output.stdout).contains("listening on"));
    assert_eq!(std::fs::read(&state).unwrap(), garbage);
}
