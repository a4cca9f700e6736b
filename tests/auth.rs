//! Servers prove the cluster key: on every connection from the balancer
//! (links, status probes) and when they register. A process without the
//! key gets no documents and cannot join, even on a departed server's port.

mod util;

use lbft::proto::{ErrorCode, Reply};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::Command;
use util::*;

/// A fresh key file in `dir`.
fn key_file(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    lbft::auth::ClusterKey::load_or_create(&path).unwrap();
    path
}

fn contents(tag: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{tag} {i} banana")).collect()
}

fn read_log(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("loadbalancer.log")).unwrap_or_default()
}

#[test]
fn an_impostor_on_a_departed_servers_port_gets_nothing() {
    let keys = tempfile::tempdir().unwrap();
    let key = key_file(keys.path(), "cluster.key");
    let key_arg = key.display().to_string();
    let keyed = ["--cluster-key-file", key_arg.as_str()];
    let cluster = Cluster::start(2, &keyed, &keyed);
    let balancer = cluster.balancer.addr;

    let seen = send_batch(balancer, contents("before", 20), || {});
    assert!(seen.errors.is_empty(), "{:?}", seen.errors);
    assert_eq!(seen.stored.len(), 20);

    // The first server dies without leaving; a process without the key
    // takes its port.
    let mut cluster = cluster;
    let departed = cluster.servers[0].addr;
    cluster.servers[0].stop();
    let rogue_dir = cluster.dir.path().join("rogue");
    let rogue = start(
        server_bin(),
        &strings(&[
            "--listen",
            &departed.to_string(),
            "--dir",
            &rogue_dir.display().to_string(),
        ]),
        cluster.dir.path(),
    );
    assert_eq!(rogue.addr, departed);
    let refused = format!("server {departed} did not prove the cluster key");
    assert!(
        eventually(|| read_log(cluster.dir.path()).contains(&refused)),
        "no refusal in the log:\n{}",
        read_log(cluster.dir.path())
    );

    // Honest clients go on being served, by the honest server only.
    let seen = send_batch(balancer, contents("after", 40), || {});
    assert!(seen.errors.is_empty(), "{:?}", seen.errors);
    assert_eq!(seen.stored.len(), 40);
    let honest = cluster.servers[1].addr.to_string();
    assert!(
        seen.stored.values().all(|s| s.server == honest),
        "documents went to {:?}",
        seen.stored.values().map(|s| &s.server).collect::<Vec<_>>()
    );
    assert!(stored_files(&rogue_dir).is_empty());
    let view = servers(balancer);
    let impostor = view
        .iter()
        .find(|s| s.name == departed.to_string())
        .expect("still in the pool");
    assert_eq!(impostor.state, "down", "{view:?}");
}

#[test]
fn registration_needs_the_key_and_the_balancer_proves_it_back() {
    let keys = tempfile::tempdir().unwrap();
    let key = key_file(keys.path(), "cluster.key");
    let other = key_file(keys.path(), "other.key");
    let key_arg = key.display().to_string();
    let keyed = ["--cluster-key-file", key_arg.as_str()];
    let cluster = Cluster::start(1, &keyed, &keyed);
    let balancer = cluster.balancer.addr;
    let balancer_arg = balancer.to_string();

    // By hand: register without a handshake, and a handshake with a
    // made-up proof.
    let mut raw = Raw::connect(balancer);
    raw.send_json(&json!({"type": "register", "id": 1, "addr": "127.0.0.1:1"}));
    match raw.reply() {
        Reply::Error(e) => assert_eq!(e.code, ErrorCode::Unauthenticated, "{e:?}"),
        other => panic!("{other:?}"),
    }
    raw.send_json(&json!({"type": "hello", "id": 2, "nonce": "ab".repeat(32)}));
    let Reply::Hello { addr, .. } = raw.reply() else {
        panic!("no hello")
    };
    assert_eq!(addr, balancer.to_string());
    raw.send_json(&json!({"type": "hello_proof", "id": 3, "proof": "00".repeat(32)}));
    match raw.reply() {
        Reply::Error(e) => assert_eq!(e.code, ErrorCode::Unauthenticated, "{e:?}"),
        other => panic!("{other:?}"),
    }
    assert!(raw.is_closed());

    // A server without the key, and one with another key, try to join.
    let keyless_dir = cluster.dir.path().join("keyless");
    let keyless_log = cluster.dir.path().join("keyless.log");
    let keyless = start_server(
        &keyless_dir,
        &[
            "--no-cluster-key",
            "--balancer",
            &balancer_arg,
            "--log-file",
            &keyless_log.display().to_string(),
        ],
    );
    let wrong_dir = cluster.dir.path().join("wrong");
    let other_arg = other.display().to_string();
    let wrong_log = cluster.dir.path().join("wrong.log");
    let wrong = start_server(
        &wrong_dir,
        &[
            "--balancer",
            &balancer_arg,
            "--cluster-key-file",
            &other_arg,
            "--log-file",
            &wrong_log.display().to_string(),
        ],
    );
    let refused = "`register` without the cluster handshake; refused";
    assert!(eventually(|| read_log(cluster.dir.path()).contains(refused)));
    assert!(eventually(|| std::fs::read_to_string(&keyless_log)
        .unwrap_or_default()
        .contains(
            "servers must prove the cluster key (hello) before they register"
        )));
    assert!(eventually(|| std::fs::read_to_string(&wrong_log)
        .unwrap_or_default()
        .contains("the balancer did not prove the cluster key")));

    // A server with the key joins.
    let honest_dir = cluster.dir.path().join("honest");
    let honest = start_server(
        &honest_dir,
        &["--balancer", &balancer_arg, "--cluster-key-file", &key_arg],
    );
    assert!(eventually(|| servers(balancer)
        .iter()
        .any(|s| s.name == honest.addr.to_string() && s.state == "up")));
    let names: Vec<String> = servers(balancer).into_iter().map(|s| s.name).collect();
    assert!(!names.contains(&keyless.addr.to_string()), "{names:?}");
    assert!(!names.contains(&wrong.addr.to_string()), "{names:?}");
    let seen = send_batch(balancer, contents("joined", 30), || {});
    assert_eq!(seen.stored.len(), 30, "{:?}", seen.errors);
    assert!(stored_files(&keyless_dir).is_empty());
    assert!(stored_files(&wrong_dir).is_empty());
}

#[test]
fn a_keyed_server_answers_nothing_before_the_handshake() {
    let keys = tempfile::tempdir().unwrap();
    let key = key_file(keys.path(), "cluster.key");
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(
        &dir.path().join("s"),
        &["--cluster-key-file", &key.display().to_string()],
    );
    let mut raw = Raw::connect(server.addr);
    raw.store(1, "t", "banana");
    match raw.reply() {
        Reply::Error(e) => assert_eq!(e.code, ErrorCode::Unauthenticated, "{e:?}"),
        other => panic!("{other:?}"),
    }
    raw.send_json(&json!({"type": "status", "id": 2}));
    assert!(matches!(raw.reply(), Reply::Error(e) if e.code == ErrorCode::Unauthenticated));
    // `forget` and `list` likewise.
    raw.send_json(&json!({"type": "forget", "id": 3, "numbers": [1]}));
    assert!(matches!(raw.reply(), Reply::Error(e) if e.code == ErrorCode::Unauthenticated));
    raw.send_json(&json!({"type": "list", "id": 4}));
    assert!(matches!(raw.reply(), Reply::Error(e) if e.code == ErrorCode::Unauthenticated));
    assert!(stored_files(&dir.path().join("s")).is_empty());
    // The original format cannot prove anything, and keeps working as the
    // original balancer expects: its probe gets one byte.
    let mut legacy = Raw::connect(server.addr);
    legacy.send_bytes(br#"{"request_type": "richiesta_status"}"#);
    let mut byte = [9u8; 1];
    std::io::Read::read_exact(&mut legacy.stream, &mut byte).unwrap();
    assert_eq!(byte, [0]);
}

#[test]
fn a_legacy_backend_with_a_key_is_refused_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), "cluster.key");
    let key_arg = key.display().to_string();
    let out = Command::new(balancer_bin())
        .current_dir(dir.path())
        .args([
            "--listen",
            "127.0.0.1:0",
            "--backend-wire",
            "legacy",
            "--cluster-key-file",
            &key_arg,
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot authenticate servers")
            && err.contains("--allow-unauthenticated-legacy"),
        "{err}"
    );
    let allowed = start(
        balancer_bin(),
        &strings(&[
            "--listen",
            "127.0.0.1:0",
            "--backend-wire",
            "legacy",
            "--cluster-key-file",
            &key_arg,
            "--allow-unauthenticated-legacy",
        ]),
        dir.path(),
    );
    drop(allowed);
}

#[test]
fn local_servers_share_the_balancers_key() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_file(dir.path(), "cluster.key");
    let balancer = start(
        balancer_bin(),
        &strings(&[
            "--listen",
            "127.0.0.1:0",
            "--local-servers",
            "2",
            "--local-base-port",
            "0",
            "--check-interval",
            "100ms",
            "--cluster-key-file",
            &key.display().to_string(),
        ]),
        dir.path(),
    );
    let seen = send_batch(balancer.addr, contents("local", 10), || {});
    assert_eq!(seen.stored.len(), 10, "{:?}", seen.errors);
    let log = read_log(dir.path());
    assert!(!log.contains("did not prove the cluster key"), "{log}");
}

#[test]
fn files_reach_keyed_servers_relayed_or_redirected() {
    let keys = tempfile::tempdir().unwrap();
    let key = key_file(keys.path(), "cluster.key");
    let key_arg = key.display().to_string();
    for mode in ["proxy", "redirect"] {
        let cluster = Cluster::start(
            1,
            &["--cluster-key-file", &key_arg],
            &["--cluster-key-file", &key_arg, "--mode", mode],
        );
        let file = cluster.dir.path().join(format!("{mode}.bin"));
        std::fs::write(&file, vec![1u8; 300_000]).unwrap();
        let client = |args: &[&str]| {
            Command::new(client_bin())
                .args(["--balancer", &cluster.balancer.addr.to_string()])
                .args(args)
                .output()
                .unwrap()
        };
        let out = client(&["send", &file.display().to_string()]);
        assert!(out.status.success(), "{mode}: {out:?}");
        let out = client(&["list"]);
        assert!(
            String::from_utf8_lossy(&out.stdout).contains(&format!("{mode}.bin")),
            "{mode}: {out:?}"
        );
        assert!(!cluster.log().contains("did not prove the cluster key"));
    }
}
