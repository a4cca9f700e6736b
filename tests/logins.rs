//! Failed logins with `balancer --users`: locks and `balancer user unlock`,
//! the same answers for names that exist and names that do not, and every
//! failure in the log, folded into at most a line per account per second.

mod util;

use lbft::proto::{ErrorCode, ErrorReply, Reply};
use serde_json::json;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use util::*;

const INVALID: &str = "invalid user or password";
const PASSWORD: &str = "alice's password";

/// A balancer with --users (and `extra`) in front of one server, and
/// alice.
fn cluster(extra: &[&str]) -> Cluster {
    let mut args = vec!["--users"];
    args.extend_from_slice(extra);
    let cluster = Cluster::start(1, &[], &args);
    let out = user_cmd(&state(&cluster), &["add", "alice"], Some(PASSWORD));
    assert!(out.status.success(), "{out:?}");
    cluster
}

fn state(cluster: &Cluster) -> std::path::PathBuf {
    cluster.dir.path().join("balancer.db")
}

fn login(raw: &mut Raw, user: &str, password: &str) -> Reply {
    raw.send_json(&json!({"type": "login", "id": 7, "user": user, "password": password}));
    raw.reply()
}

/// One login on a new connection from `source`.
fn login_from(addr: SocketAddr, source: [u8; 4], user: &str, password: &str) -> Reply {
    login(&mut Raw::connect_from(addr, source), user, password)
}

fn error(reply: Reply) -> ErrorReply {
    match reply {
        Reply::Error(e) => e,
        other => panic!("expected an error, got {other:?}"),
    }
}

#[test]
fn a_locked_account_refuses_the_right_password_until_an_admin_unlocks_it() {
    let cluster = cluster(&["--login-lock-after", "3"]);
    let addr = cluster.balancer.addr;
    let mut raw = Raw::connect(addr);
    for _ in 0..3 {
        assert_eq!(error(login(&mut raw, "alice", "guess")).message, INVALID);
    }
    // Locked: the right password too, from anywhere, answered at once.
    for source in [[127, 0, 0, 1], [127, 0, 0, 2]] {
        let started = Instant::now();
        let e = error(login_from(addr, source, "alice", PASSWORD));
        assert_eq!(e.code, ErrorCode::Throttled, "{e:?}");
        assert!(
            e.message.contains("locked for 15 min more")
                && e.message.contains("balancer user unlock alice"),
            "{}",
            e.message
        );
        assert!(started.elapsed() < Duration::from_secs(2));
    }
    assert!(eventually(|| {
        cluster.log().contains(
        "account \"alice\" locked for 15 min after 3 failed logins in a row, the last from 127.0.0.1"
    )
    }));
    let listed = user_cmd(&state(&cluster), &["list"], None);
    let text = String::from_utf8_lossy(&listed.stdout);
    assert!(text.contains("alice  (locked for 15 more min"), "{text}");

    // Unlocked while the balancer runs: the right password logs in, and
    // the count starts over (one more failure does not lock again).
    let out = user_cmd(&state(&cluster), &["unlock", "alice"], None);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("unlocked alice"));
    let listed = user_cmd(&state(&cluster), &["list"], None);
    assert!(!String::from_utf8_lossy(&listed.stdout).contains("locked"));
    let e = error(login_from(addr, [127, 0, 0, 2], "alice", "guess"));
    assert_eq!(e.message, INVALID);
    let mut raw = Raw::connect_from(addr, [127, 0, 0, 2]);
    assert!(matches!(
        login(&mut raw, "alice", PASSWORD),
        Reply::Welcome { .. }
    ));
    raw.store(1, "after the lock", "banana");
    assert!(matches!(raw.reply(), Reply::Stored(_)));

    // Nobody to unlock: a clear error.
    let out = user_cmd(&state(&cluster), &["unlock", "mallory"], None);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no user mallory"));
}

/// The answers to six wrong passwords sent at once on six connections
/// from `source`, then one with alice's password: codes and messages,
/// with the name and the numbers left out, sorted.
fn answers(addr: SocketAddr, source: [u8; 4], name: &str) -> Vec<(ErrorCode, String)> {
    let guesses: Vec<_> = (0..6)
        .map(|_| Raw::connect_from(addr, source))
        .collect::<Vec<_>>()
        .into_iter()
        .map(|mut raw| {
            let name = name.to_string();
            std::thread::spawn(move || error(login(&mut raw, &name, "guess")))
        })
        .collect();
    let mut answers: Vec<ErrorReply> = guesses.into_iter().map(|g| g.join().unwrap()).collect();
    answers.push(error(login_from(addr, source, name, PASSWORD)));
    let mut seen: Vec<(ErrorCode, String)> = answers
        .into_iter()
        .map(|e| {
            let message = e.message.replace(name, "NAME");
            (e.code, message.replace(|c: char| c.is_ascii_digit(), ""))
        })
        .collect();
    seen.sort_by(|a, b| (a.0.to_string(), &a.1).cmp(&(b.0.to_string(), &b.1)));
    seen
}

#[test]
fn names_that_exist_and_names_that_do_not_get_the_same_answers() {
    let cluster = cluster(&["--login-lock-after", "4"]);
    let addr = cluster.balancer.addr;
    let (existing, unknown) = std::thread::scope(|s| {
        let existing = s.spawn(|| answers(addr, [127, 0, 0, 2], "alice"));
        let unknown = s.spawn(|| answers(addr, [127, 0, 0, 3], "mallory"));
        (existing.join().unwrap(), unknown.join().unwrap())
    });
    assert_eq!(existing, unknown);
    // The turns: 0 s, 0.5 s, 1.5 s and 3.5 s; the next ones would wait
    // 7.5 s and are refused at once; the fourth failure locks.
    let codes: Vec<ErrorCode> = existing.iter().map(|a| a.0).collect();
    let invalid = codes
        .iter()
        .filter(|c| **c == ErrorCode::Unauthenticated)
        .count();
    assert_eq!((invalid, codes.len()), (4, 7), "{existing:?}");
    assert!(existing.iter().any(|(_, m)| m.contains("try again in")));
    assert!(existing.iter().any(|(_, m)| m.contains("locked")));
}

/// How many failed logins as `name` the log's lines account for.
fn logged_failures(log: &str, name: &str) -> u64 {
    let single = format!("] failed login as \"{name}\" from ");
    let folded = format!(" as \"{name}\" since the last line");
    let number_before = |text: &str, end: &str| -> u64 {
        let head = &text[..text.find(end).unwrap()];
        let start = head
            .rfind(|c: char| !c.is_ascii_digit())
            .map_or(0, |i| i + 1);
        head[start..].parse().unwrap()
    };
    log.lines()
        .map(|line| {
            if line.contains(&single) {
                let more = " more since the last line)";
                1 + if line.contains(more) {
                    number_before(line, more)
                } else {
                    0
                }
            } else if line.contains(&folded) {
                number_before(line, " more failed login")
            } else {
                0
            }
        })
        .sum()
}

#[test]
fn every_failed_login_reaches_the_log_folded_into_a_line_a_second() {
    let cluster = cluster(&[]);
    let addr = cluster.balancer.addr;
    // An unknown name, with a control character in it.
    let e = error(login_from(addr, [127, 0, 0, 5], "nobody\u{1b}[2J", "guess"));
    assert_eq!(e.message, INVALID);
    assert!(eventually(|| cluster.log().contains(
        "failed login as \"nobody\\u{1b}[2J\" from 127.0.0.5: no such user"
    )));

    // Ten connections guess alice's password for three seconds.
    let burst = Duration::from_secs(3);
    let started = Instant::now();
    let guessers: Vec<_> = (0..10)
        .map(|_| {
            std::thread::spawn(move || {
                let mut raw = Raw::connect(addr);
                let mut answers = 0u64;
                while started.elapsed() < burst {
                    let e = error(login(&mut raw, "alice", "guess"));
                    assert!(
                        e.message == INVALID || e.code == ErrorCode::Throttled,
                        "{e:?}"
                    );
                    answers += 1;
                }
                answers
            })
        })
        .collect();
    let failures: u64 = guessers.into_iter().map(|g| g.join().unwrap()).sum();
    let took = started.elapsed();
    // Every one of them is in the log, once the last folded ones are out.
    let complete = eventually(|| logged_failures(&cluster.log(), "alice") == failures);
    let log = cluster.log();
    assert!(
        complete,
        "{failures} failures, {} logged:\n{log}",
        logged_failures(&log, "alice")
    );
    let lines = log.lines().filter(|l| l.contains("as \"alice\"")).count();
    println!("{failures} failed logins in {took:?}, in {lines} lines");
    assert!(
        lines as u64 <= took.as_secs() + 3,
        "{lines} lines for {took:?}:\n{log}"
    );
}
