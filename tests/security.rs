//! Closed by default: with no security flag at all, a process that does not
//! hold the cluster key cannot poison storage, `forget`, read other users'
//! files on a server, or join, leave or change the pool.

mod util;

use lbft::proto::{ErrorCode, Reply};
use serde_json::json;
use std::io::Write;
use std::net::TcpStream;
use std::process::Command;
use util::*;

fn unauthenticated(reply: Reply, what: &str) {
    match reply {
        Reply::Error(e) => assert_eq!(e.code, ErrorCode::Unauthenticated, "{what}: {e:?}"),
        other => panic!("{what}: expected unauthenticated, got {other:?}"),
    }
}

fn stored(reply: Reply) -> lbft::proto::Stored {
    match reply {
        Reply::Stored(s) => s,
        other => panic!("expected stored, got {other:?}"),
    }
}

#[test]
fn storage_cannot_be_poisoned_or_forgotten_without_the_key() {
    let cluster = Cluster::start(2, &[], &[]);
    let mut client = Raw::connect(cluster.balancer.addr);
    client.store(1, "genuine", "the balancer stored this");
    let first = stored(client.reply());
    let at = cluster
        .servers
        .iter()
        .position(|s| s.addr.to_string() == first.server)
        .expect("stored on one of the servers");
    let server = cluster.servers[at].addr;

    // Straight to the server, without the handshake: a store under the
    // balancer's next numbers, `forget` of the stored one, listings.
    let mut attacker = Raw::connect(server);
    attacker.send_json(&json!({
        "type": "store", "id": 1, "titolo": "planted", "contenuto": "not yours",
        "numero_richiesta": first.request_number + 1
    }));
    unauthenticated(attacker.reply(), "store with a number");
    attacker.send_json(&json!({"type": "forget", "id": 2, "numbers": [first.request_number]}));
    unauthenticated(attacker.reply(), "forget");
    attacker.send_json(&json!({"type": "list", "id": 3}));
    unauthenticated(attacker.reply(), "list");
    attacker.send_json(&json!({"type": "get", "id": 4, "name": "x", "offset": 0}));
    unauthenticated(attacker.reply(), "get");

    // The original format is still served, but what it stores never takes
    // a request number: the balancer's own store of that number is stored.
    let planted = first.request_number + 7;
    let mut legacy = TcpStream::connect(server).unwrap();
    legacy
        .write_all(
            json!({"titolo": "planted", "contenuto": "not yours",
                   "request_type": "file_di_testo", "numero_richiesta": planted})
            .to_string()
            .as_bytes(),
        )
        .unwrap();
    drop(legacy);
    let dir = &cluster.server_dirs[at];
    assert!(
        eventually(|| stored_files(dir)
            .iter()
            .any(|(_, v)| v["contenuto"] == "not yours")),
        "the original-format copy was not stored"
    );
    let mut member = Raw::connect_to_server(server, dir);
    member.send_json(&json!({
        "type": "store", "id": 9, "titolo": "genuine", "contenuto": "the real one",
        "numero_richiesta": planted
    }));
    let real = stored(member.reply());
    assert!(!real.existing, "a planted copy answered for {planted}");
    let on_disk = std::fs::read_to_string(dir.join(&real.file)).unwrap();
    assert!(on_disk.contains("the real one"), "{on_disk}");

    // The first document is where it was, untouched.
    let original = std::fs::read_to_string(dir.join(&first.file)).unwrap();
    assert!(original.contains("the balancer stored this"), "{original}");
    assert!(!dir.join(".duplicates").exists());
}

#[test]
fn nobody_without_the_key_joins_leaves_or_changes_the_pool() {
    let cluster = Cluster::start(2, &[], &[]);
    let balancer = cluster.balancer.addr;
    let real = cluster.servers[0].addr.to_string();

    let mut raw = Raw::connect(balancer);
    raw.send_json(&json!({"type": "register", "id": 1, "addr": "127.0.0.1:1"}));
    unauthenticated(raw.reply(), "register");
    raw.send_json(&json!({"type": "deregister", "id": 2, "addr": real}));
    unauthenticated(raw.reply(), "deregister");
    for (id, kind) in [(3, "add_server"), (4, "drain_server"), (5, "remove_server")] {
        raw.send_json(&json!({"type": kind, "id": id, "addr": real}));
        unauthenticated(raw.reply(), kind);
    }

    // `client admin` from a folder without the key is refused with a
    // reason; from the cluster's folder it proves the key and works.
    let elsewhere = tempfile::tempdir().unwrap();
    let admin = |cwd: &std::path::Path, args: &[&str]| {
        Command::new(client_bin())
            .args(["--balancer", &balancer.to_string(), "admin"])
            .args(args)
            .current_dir(cwd)
            .output()
            .unwrap()
    };
    let out = admin(elsewhere.path(), &["remove", &real]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("cluster key"), "{said}");
    assert_eq!(servers(balancer).len(), 2);

    // A server that runs without the key cannot join either.
    let fake_dir = cluster.dir.path().join("fake");
    let fake_log = cluster.dir.path().join("fake.log");
    let fake = start_server(
        &fake_dir,
        &[
            "--no-cluster-key",
            "--balancer",
            &balancer.to_string(),
            "--log-file",
            &fake_log.display().to_string(),
        ],
    );
    assert!(eventually(|| std::fs::read_to_string(&fake_log)
        .unwrap_or_default()
        .contains("servers must prove the cluster key")));
    let names: Vec<String> = servers(balancer).into_iter().map(|s| s.name).collect();
    assert!(!names.contains(&fake.addr.to_string()), "{names:?}");

    let out = admin(cluster.dir.path(), &["drain", &real]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let view = servers(balancer);
    let drained = view
        .iter()
        .find(|s| s.name == real)
        .map(|s| s.state.clone());
    assert_ne!(drained.as_deref(), Some("up"), "{view:?}");

    // Refusals are in the log (once a minute per address), and what is
    // on is said at start.
    let log = cluster.log();
    assert!(
        log.contains("`register` without the cluster handshake; refused"),
        "{log}"
    );
    assert!(log.contains("security: no TLS"), "{log}");
    assert!(log.contains("cluster key cluster.key"), "{log}");
}

#[test]
fn running_without_a_key_is_an_explicit_choice_said_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("s.log");
    let server = start_server(
        &dir.path().join("s"),
        &["--no-cluster-key", "--log-file", &log.display().to_string()],
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("WITHOUT a cluster key (--no-cluster-key)"),
        "{text}"
    );
    assert!(
        text.contains("security: no TLS (plaintext listener and connections); NO cluster key"),
        "{text}"
    );
    // And then it is open, as said.
    let mut raw = Raw::connect(server.addr);
    raw.store(1, "open", "banana");
    stored(raw.reply());
    assert!(!dir.path().join("cluster.key").exists());

    // By default the key file appears, readable by its owner only.
    let keyed = tempfile::tempdir().unwrap();
    let _server = start_server(&keyed.path().join("s"), &[]);
    let key = default_key(keyed.path());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    assert_eq!(std::fs::read_to_string(&key).unwrap().trim().len(), 64);
}
