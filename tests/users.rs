//! `balancer --users`: logins, the one error for wrong credentials and the
//! growing wait of later tries, admin requests, and transfers seen by their
//! owner only.

mod util;

use lbft::proto::{ErrorCode, ErrorReply, Reply};
use serde_json::json;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use util::*;

/// The password each user of `cluster` has.
fn pw(user: &str) -> String {
    format!("{user}'s password")
}

/// A cluster of one server and a balancer with --users, and three users.
fn cluster() -> Cluster {
    let cluster = Cluster::start(1, &[], &["--users"]);
    let state = cluster.dir.path().join("balancer.db");
    for (name, admin) in [("alice", false), ("bob", false), ("root", true)] {
        let mut args = vec!["add", name];
        if admin {
            args.push("--admin");
        }
        let out = user_cmd(&state, &args, Some(&pw(name)));
        assert!(out.status.success(), "{out:?}");
    }
    cluster
}

fn login(raw: &mut Raw, user: &str, password: &str) -> Reply {
    raw.send_json(&json!({"type": "login", "id": 100, "user": user, "password": password}));
    raw.reply()
}

fn logged_in(cluster: &Cluster, user: &str, password: &str) -> Raw {
    let mut raw = Raw::connect(cluster.balancer.addr);
    match login(&mut raw, user, password) {
        Reply::Welcome { user: Some(u), .. } => assert_eq!(u, user),
        other => panic!("{other:?}"),
    }
    raw
}

fn error(reply: Reply) -> ErrorReply {
    match reply {
        Reply::Error(e) => e,
        other => panic!("expected an error, got {other:?}"),
    }
}

#[test]
fn wrong_credentials_get_one_error_and_later_tries_wait_without_holding_up_others() {
    let cluster = cluster();
    let mut raw = Raw::connect(cluster.balancer.addr);
    // Nothing before a login.
    raw.store(1, "t", "banana");
    let e = error(raw.reply());
    assert_eq!(e.code, ErrorCode::Unauthenticated);
    assert!(e.message.contains("login"), "{}", e.message);

    let wrong_password = error(login(&mut raw, "alice", "nope"));
    // The address failed once: its next try waits 0.5 s, whatever the name.
    let started = Instant::now();
    let unknown_user = error(login(&mut raw, "mallory", &pw("alice")));
    let waited = started.elapsed();
    assert_eq!(wrong_password.code, ErrorCode::Unauthenticated);
    assert_eq!(wrong_password.message, "invalid user or password");
    assert_eq!(
        (unknown_user.code, unknown_user.message),
        (wrong_password.code, wrong_password.message)
    );
    assert!(waited >= Duration::from_millis(400), "{waited:?}");

    // A third try waits 1 s on its own connection; a client from another
    // address is served meanwhile.
    let addr = cluster.balancer.addr;
    let slow = std::thread::spawn(move || {
        let started = Instant::now();
        let e = error(login(&mut raw, "alice", "wrong"));
        (raw, e.message, started.elapsed())
    });
    let started = Instant::now();
    let mut bob = Raw::connect_from(addr, [127, 0, 0, 2]);
    assert!(matches!(
        login(&mut bob, "bob", &pw("bob")),
        Reply::Welcome { .. }
    ));
    bob.store(1, "quick", "banana");
    assert!(matches!(bob.reply(), Reply::Stored(_)));
    let quick = started.elapsed();
    let (mut raw, message, slow_took) = slow.join().unwrap();
    assert_eq!(message, "invalid user or password");
    assert!(
        quick < slow_took && slow_took >= Duration::from_millis(800),
        "a client waited {quick:?} while a failed login took {slow_took:?}"
    );
    // Each failure is logged, an unknown name too.
    assert!(eventually(|| {
        let log = cluster.log();
        log.contains("failed login as \"alice\" from 127.0.0.1: wrong password")
            && log.contains("failed login as \"mallory\" from 127.0.0.1: no such user")
    }));

    // The original format cannot log in: refused.
    let mut legacy = Raw::connect(cluster.balancer.addr);
    legacy.send_bytes(br#"{"titolo": "t", "contenuto": "c", "request_type": "file_di_testo"}"#);
    assert!(legacy.is_closed());
    assert!(eventually(|| cluster
        .log()
        .contains("cannot log in (--users)")));

    // The right password works on the connection that failed.
    match login(&mut raw, "alice", &pw("alice")) {
        Reply::Welcome { admin, .. } => assert!(!admin),
        other => panic!("{other:?}"),
    }
    raw.store(2, "t", "banana");
    assert!(matches!(raw.reply(), Reply::Stored(_)));
}

#[test]
fn admin_requests_need_an_admin() {
    let cluster = cluster();
    let server = cluster.servers[0].addr.to_string();
    let mut alice = logged_in(&cluster, "alice", &pw("alice"));
    alice.send_json(&json!({"type": "servers", "id": 1}));
    let e = error(alice.reply());
    assert_eq!(e.code, ErrorCode::Forbidden, "{e:?}");
    assert!(e.message.contains("admin"), "{}", e.message);
    alice.send_json(&json!({"type": "drain_server", "id": 2, "addr": server}));
    assert_eq!(error(alice.reply()).code, ErrorCode::Forbidden);
    // The server was not drained: documents still go to it.
    alice.store(3, "t", "banana");
    assert!(matches!(alice.reply(), Reply::Stored(_)));

    let mut root = logged_in(&cluster, "root", &pw("root"));
    root.send_json(&json!({"type": "servers", "id": 1}));
    match root.reply() {
        Reply::Servers(list) => assert_eq!(list.servers.len(), 1),
        other => panic!("{other:?}"),
    }

    // The client binary logs in with --user and FTP_PASSWORD.
    let client = |user: &str, password: &str, args: &[&str]| {
        Command::new(client_bin())
            .args([
                "--balancer",
                &cluster.balancer.addr.to_string(),
                "--user",
                user,
            ])
            .args(args)
            .env("FTP_PASSWORD", password)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let out = client("root", &pw("root"), &["admin", "servers"]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains(&server));
    let out = client("alice", &pw("alice"), &["admin", "servers"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("needs an admin user"),
        "{out:?}"
    );
    let out = client("alice", "not it", &["transfers"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("invalid user or password"), "{err}");
}

#[test]
fn each_user_sees_only_their_own_transfers() {
    let cluster = cluster();
    let mut alice = logged_in(&cluster, "alice", &pw("alice"));
    let mut bob = logged_in(&cluster, "bob", &pw("bob"));
    for i in 0..3 {
        alice.store(i, &format!("alice {i}"), "banana");
        assert!(matches!(alice.reply(), Reply::Stored(_)));
    }
    for i in 0..2 {
        bob.store(i, &format!("bob {i}"), "banana");
        assert!(matches!(bob.reply(), Reply::Stored(_)));
    }
    let titles = |raw: &mut Raw| -> Vec<String> {
        raw.send_json(&json!({"type": "transfers", "id": 9}));
        match raw.reply() {
            Reply::Transfers(list) => list.transfers.into_iter().map(|t| t.title).collect(),
            other => panic!("{other:?}"),
        }
    };
    let mine = titles(&mut alice);
    assert_eq!(mine, ["alice 2", "alice 1", "alice 0"]);
    assert_eq!(titles(&mut bob), ["bob 1", "bob 0"]);
    let mut root = logged_in(&cluster, "root", &pw("root"));
    assert_eq!(titles(&mut root).len(), 5);

    let out = Command::new(client_bin())
        .args([
            "--balancer",
            &cluster.balancer.addr.to_string(),
            "--user",
            "bob",
            "transfers",
            "--json",
        ])
        .env("FTP_PASSWORD", pw("bob"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.lines().count(), 2, "{text}");
    assert!(
        text.contains("\"user\":\"bob\"") && !text.contains("alice"),
        "{text}"
    );

    // Users are managed while the balancer runs.
    let state = cluster.dir.path().join("balancer.db");
    let list = user_cmd(&state, &["list"], None);
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(
        text.contains("alice") && text.contains("root  (admin)"),
        "{text}"
    );
    assert!(user_cmd(&state, &["remove", "bob"], None).status.success());
    let mut raw = Raw::connect(cluster.balancer.addr);
    assert_eq!(
        error(login(&mut raw, "bob", &pw("bob"))).message,
        "invalid user or password"
    );
    assert!(!user_cmd(&state, &["remove", "bob"], None).status.success());
}

#[test]
fn files_need_a_login_too() {
    let cluster = cluster();
    let balancer = cluster.balancer.addr.to_string();
    let file = cluster.dir.path().join("photo.bin");
    std::fs::write(&file, vec![7u8; 100_000]).unwrap();
    let client = |user: Option<&str>, args: &[&str]| {
        let mut cmd = Command::new(client_bin());
        cmd.args(["--balancer", &balancer]);
        if let Some(u) = user {
            cmd.args(["--user", u]).env("FTP_PASSWORD", pw(u));
        }
        cmd.args(args).stdin(Stdio::null()).output().unwrap()
    };
    let out = client(None, &["send", &file.display().to_string()]);
    assert!(!out.status.success(), "{out:?}");
    let out = client(Some("alice"), &["send", &file.display().to_string()]);
    assert!(out.status.success(), "{out:?}");
    let out = client(Some("alice"), &["list"]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("photo.bin"),
        "{out:?}"
    );
    let out = client(None, &["list"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("login"), "{err}");
    // The upload is recorded as hers.
    let mut alice = logged_in(&cluster, "alice", &pw("alice"));
    alice.send_json(&json!({"type": "transfers", "id": 1}));
    match alice.reply() {
        Reply::Transfers(list) => {
            assert!(list
                .transfers
                .iter()
                .any(|t| t.title == "photo.bin" && t.user.as_deref() == Some("alice")));
        }
        other => panic!("{other:?}"),
    }

    // Files are kept apart: bob neither sees nor gets alice's file, and
    // his own of the same name is his; an admin sees both.
    let out = client(Some("bob"), &["list"]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("photo"),
        "{out:?}"
    );
    let copy = cluster.dir.path().join("bob-copy.bin");
    let copy_arg = copy.display().to_string();
    let out = client(Some("bob"), &["get", "photo.bin", "-o", &copy_arg]);
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no file named"),
        "{out:?}"
    );
    assert!(!copy.exists());
    assert!(!cluster.dir.path().join("bob-copy.bin.part").exists());
    std::fs::write(&file, vec![9u8; 1000]).unwrap();
    let out = client(Some("bob"), &["send", &file.display().to_string()]);
    assert!(out.status.success(), "{out:?}");
    // His is photo.bin too, by the name he sent: names are per user.
    let out = client(Some("bob"), &["get", "photo.bin", "-o", &copy_arg]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(std::fs::read(&copy).unwrap(), vec![9u8; 1000]);
    let out = client(Some("alice"), &["get", "photo.bin", "-o", &copy_arg]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(std::fs::read(&copy).unwrap(), vec![7u8; 100_000]);
    // An admin sees both, with their owners, and says whose to get one.
    let out = client(Some("root"), &["list", "--files"]);
    let listing = String::from_utf8_lossy(&out.stdout);
    let rows: Vec<&str> = listing
        .lines()
        .filter(|l| l.contains("photo.bin"))
        .collect();
    assert_eq!(rows.len(), 2, "{listing}");
    assert!(
        rows.iter().any(|r| r.contains("alice")) && rows.iter().any(|r| r.contains("bob")),
        "{listing}"
    );
    let out = client(Some("root"), &["get", "photo.bin", "-o", &copy_arg]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("several users have a file named"),
        "{out:?}"
    );
    let out = client(
        Some("root"),
        &["get", "photo.bin", "--owner", "bob", "-o", &copy_arg],
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(std::fs::read(&copy).unwrap(), vec![9u8; 1000]);
    // Bob cannot delete hers; he deletes his own; an admin deletes hers.
    let out = client(Some("bob"), &["delete", "photo.bin", "--owner", "alice"]);
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("forbidden"),
        "{out:?}"
    );
    let out = client(Some("bob"), &["delete", "photo.bin"]);
    assert!(out.status.success(), "{out:?}");
    let out = client(Some("alice"), &["get", "photo.bin", "-o", &copy_arg]);
    assert!(out.status.success(), "{out:?}");
    let out = client(Some("root"), &["delete", "photo.bin", "--owner", "alice"]);
    assert!(out.status.success(), "{out:?}");
    let out = client(Some("root"), &["list", "--files"]);
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("photo.bin"),
        "{out:?}"
    );
}

#[test]
fn a_password_needs_eight_characters() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("balancer.db");
    let out = user_cmd(&state, &["add", "carol"], Some("seven c"));
    assert!(!out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("the password is too short: it has 7 characters, it needs at least 8"),
        "{err}"
    );
    let list = user_cmd(&state, &["list"], None);
    assert!(!String::from_utf8_lossy(&list.stdout).contains("carol"));
    let out = user_cmd(&state, &["add", "carol"], Some("eight ch"));
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn the_client_reads_a_piped_password() {
    let cluster = cluster();
    let documents = sample_documents();
    let mut child = Command::new(client_bin())
        .args(["--balancer", &cluster.balancer.addr.to_string()])
        .args(["--user", "alice", "--documents"])
        .arg(documents.path())
        .args(["ftp", "1"])
        .env_remove("FTP_PASSWORD")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    std::io::Write::write_all(&mut stdin, format!("{}\n", pw("alice")).as_bytes()).unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let mut alice = logged_in(&cluster, "alice", &pw("alice"));
    alice.send_json(&json!({"type": "transfers", "id": 1}));
    match alice.reply() {
        Reply::Transfers(list) => assert_eq!(list.transfers.len(), 1, "{list:?}"),
        other => panic!("{other:?}"),
    }
    // Nothing piped in, no terminal: a clear error, no login tried.
    let out = Command::new(client_bin())
        .args(["--balancer", &cluster.balancer.addr.to_string()])
        .args(["--user", "alice", "transfers"])
        .env_remove("FTP_PASSWORD")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("give the password as its first line"),
        "{out:?}"
    );
}

#[test]
fn no_error_names_what_another_user_sent() {
    let cluster = cluster();
    // Bob starts an upload and leaves it unfinished.
    let mut bob = logged_in(&cluster, "bob", &pw("bob"));
    bob.send_json(&json!({
        "type": "upload", "id": 1, "upload_id": "shared-upload-id-1",
        "name": "bobs-secret-plan.pdf", "size": 987654
    }));
    assert!(matches!(bob.reply(), Reply::UploadReady(_)));
    drop(bob);

    // Alice, with the same upload id and other names, through every door
    // she has: upload, list, transfers and servers.
    let mut alice = logged_in(&cluster, "alice", &pw("alice"));
    let mut said = Vec::new();
    for request in [
        json!({"type": "upload", "id": 2, "upload_id": "shared-upload-id-1",
               "name": "mine.pdf", "size": 10}),
        json!({"type": "list", "id": 4}),
        json!({"type": "transfers", "id": 5}),
    ] {
        let mut raw = logged_in(&cluster, "alice", &pw("alice"));
        raw.send_json(&request);
        said.push(format!("{:?}", raw.reply()));
    }
    alice.send_json(&json!({"type": "servers", "id": 6}));
    said.push(format!("{:?}", alice.reply()));
    for text in &said {
        for secret in ["bobs-secret-plan", "987654", "bob"] {
            assert!(!text.contains(secret), "`{secret}` leaked: {text}");
        }
    }
    assert!(said[0].contains("belongs to someone else"), "{}", said[0]);
}
