//! The storage server binary's lifecycle and its at-most-once stores:
//! SIGTERM/SIGINT stop it cleanly (exit 0, a request being handled still
//! answered, documents on disk), a repeated request number is reported as
//! already stored, `forget` moves a copy into `.duplicates/`, an expired
//! document is refused, and a restart keeps all of it.

mod util;

use lbft::proto::{ErrorCode, Reply};
use serde_json::json;
use std::path::Path;
use std::process::{Command, ExitStatus};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};
use util::{all_files, start_server, stored_files, Proc, Raw};

/// How long a signalled server may take to exit.
const EXIT_TIMEOUT: Duration = Duration::from_secs(20);

/// Sends `signal` (`TERM`, `INT`) and waits for the process to exit; kills
/// it if it does not within `EXIT_TIMEOUT`, so a hang fails the test
/// instead of blocking it.
fn signal_and_wait(server: &mut Proc, signal: &str) -> ExitStatus {
    let pid = server.child.id().to_string();
    let sent = Command::new("kill")
        .args([&format!("-{signal}"), &pid])
        .status()
        .unwrap();
    assert!(sent.success(), "kill -{signal} {pid} failed");
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

fn store_numbered(conn: &mut Raw, id: u64, number: u64, title: &str) -> Reply {
    conn.send_json(&json!({
        "type": "store", "id": id, "titolo": title, "contenuto": "a cat",
        "numero_richiesta": number
    }));
    conn.reply()
}

fn expect_stored(reply: Reply) -> lbft::proto::Stored {
    match reply {
        Reply::Stored(s) => s,
        other => panic!("expected stored, got {other:?}"),
    }
}

fn status_active(conn: &mut Raw) -> u64 {
    conn.send_json(&json!({"type": "status", "id": 0}));
    match conn.reply() {
        Reply::Status(s) => s.active,
        other => panic!("expected status, got {other:?}"),
    }
}

fn temp_files(dir: &Path) -> Vec<String> {
    all_files(dir)
        .iter()
        .filter_map(|p| p.file_name()?.to_str().map(str::to_owned))
        .filter(|n| n.starts_with(".tmp-"))
        .collect()
}

#[test]
fn sigterm_answers_the_request_in_progress_and_exits_zero() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("store");
    let mut server = start_server(&dir, &["--char-delay-ms", "20"]);

    let mut quick = Raw::connect_to_server(server.addr, &dir);
    quick.store(1, "quick", "");
    let first = expect_stored(quick.reply());

    // Idle, but known to the server (it has answered on it).
    let mut idle = Raw::connect_to_server(server.addr, &dir);
    assert_eq!(status_active(&mut idle), 0);

    // A slow store (25 characters at 20 ms each) that is being handled
    // when the signal arrives.
    let mut slow = Raw::connect_to_server(server.addr, &dir);
    slow.store(2, "slow", &"a".repeat(25));
    let deadline = Instant::now() + util::REPLY_TIMEOUT;
    while status_active(&mut quick) == 0 {
        assert!(Instant::now() < deadline, "the slow store never started");
    }

    let status = signal_and_wait(&mut server, "TERM");
    assert!(status.success(), "server exited with {status}");
    let second = expect_stored(slow.reply());
    assert_eq!(second.a_count, 25);
    assert!(idle.is_closed(), "idle connection left open");

    let files: Vec<String> = stored_files(&dir).into_iter().map(|(n, _)| n).collect();
    assert_eq!(files.len(), 2, "{files:?}");
    assert!(files.contains(&first.file) && files.contains(&second.file));
    assert!(temp_files(&dir).is_empty());
}

#[test]
fn repeated_numbers_forget_and_deadlines() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("store");
    let mut server = start_server(&dir, &[]);
    let mut conn = Raw::connect_to_server(server.addr, &dir);

    let first = expect_stored(store_numbered(&mut conn, 1, 41, "once"));
    assert!(!first.existing);
    // The same number again, as a retry would send it (new id, same
    // number): reported, not written again.
    let again = expect_stored(store_numbered(&mut conn, 2, 41, "once"));
    assert!(again.existing, "{again:?}");
    assert_eq!((&again.file, again.a_count), (&first.file, 2));
    assert_eq!(stored_files(&dir).len(), 1);

    // Past its deadline: refused, nothing written.
    conn.send_json(&json!({
        "type": "store", "id": 3, "titolo": "late", "contenuto": "x",
        "numero_richiesta": 42, "not_after_ms": 1
    }));
    let Reply::Error(late) = conn.reply() else {
        panic!("expired store accepted")
    };
    assert_eq!((late.id, late.code), (Some(3), ErrorCode::Expired));
    assert!(late.message.contains("expired"), "{}", late.message);

    // Stored elsewhere: moved aside, and never stored here again.
    conn.send_json(&json!({"type": "forget", "id": 4, "numbers": [41, 43]}));
    assert_eq!(conn.reply(), Reply::Forgotten { id: 4, moved: 1 });
    assert!(stored_files(&dir).is_empty());
    assert!(dir.join(".duplicates").join(&first.file).is_file());
    let Reply::Error(refused) = store_numbered(&mut conn, 5, 43, "forgotten") else {
        panic!("forgotten number stored")
    };
    assert_eq!(refused.code, ErrorCode::Expired);
    assert!(
        refused
            .message
            .contains("request 43 is stored on another server"),
        "{}",
        refused.message
    );

    conn.send_json(&json!({"type": "status", "id": 6}));
    let Reply::Status(status) = conn.reply() else {
        panic!()
    };
    assert_eq!(status.files_stored, 0, ".duplicates/ must not count");
    assert_eq!(all_files(&dir).len(), 1, "{:?}", all_files(&dir));

    let status = signal_and_wait(&mut server, "TERM");
    assert!(status.success(), "server exited with {status}");
}

#[test]
fn a_restart_removes_temp_files_and_remembers_what_is_stored() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("store");
    let mut server = start_server(&dir, &[]);
    let mut conn = Raw::connect_to_server(server.addr, &dir);
    let first = expect_stored(store_numbered(&mut conn, 1, 7, "kept"));
    expect_stored(store_numbered(&mut conn, 2, 8, "forgotten"));
    conn.send_json(&json!({"type": "forget", "id": 3, "numbers": [8]}));
    assert_eq!(conn.reply(), Reply::Forgotten { id: 3, moved: 1 });
    let status = signal_and_wait(&mut server, "INT");
    assert!(status.success(), "server exited with {status}");

    // What a crash mid-store leaves behind.
    std::fs::write(dir.join(".tmp-1-0"), b"{\"titolo\": \"half").unwrap();
    let server = start_server(&dir, &[]);
    assert!(temp_files(&dir).is_empty(), "{:?}", temp_files(&dir));

    let mut conn = Raw::connect_to_server(server.addr, &dir);
    let again = expect_stored(store_numbered(&mut conn, 4, 7, "kept"));
    assert!(again.existing);
    assert_eq!(again.file, first.file);
    let Reply::Error(refused) = store_numbered(&mut conn, 5, 8, "forgotten") else {
        panic!("forgotten number stored after a restart")
    };
    assert_eq!(refused.code, ErrorCode::Expired);
    assert_eq!(stored_files(&dir).len(), 1);
}
