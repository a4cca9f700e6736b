//! Limits that hold against abuse: a cap on open connections, and log
//! lines a peer cannot forge.

mod util;

use lbft::proto::Reply;
use std::io::Read;
use std::time::Duration;
use util::*;

#[test]
fn connections_past_the_cap_wait_until_one_closes() {
    let cluster = Cluster::start(1, &[], &["--max-connections", "3"]);
    let idle: Vec<Raw> = (0..3)
        .map(|_| Raw::connect(cluster.balancer.addr))
        .collect();
    // The kernel completes the handshake; the balancer does not take the
    // connection while three are open.
    let mut waiting = Raw::connect(cluster.balancer.addr);
    waiting.store(1, "waited", "its turn came");
    waiting
        .stream
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut byte = [0u8; 1];
    let early = waiting.stream.read(&mut byte);
    assert!(
        matches!(&early, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
            || e.kind() == std::io::ErrorKind::TimedOut),
        "answered while at the cap: {early:?}"
    );
    waiting
        .stream
        .set_read_timeout(Some(REPLY_TIMEOUT))
        .unwrap();
    drop(idle);
    match waiting.reply() {
        Reply::Stored(s) => assert_eq!(s.id, 1),
        other => panic!("{other:?}"),
    }
    assert!(cluster.log().contains("(--max-connections)"));
}

#[test]
fn a_title_cannot_forge_a_log_line() {
    let cluster = Cluster::start(1, &[], &[]);
    let mut raw = Raw::connect(cluster.balancer.addr);
    let forged = "[2000-01-01T00:00:00.000Z ERROR lbft::balancer] forged";
    raw.store(1, &format!("innocent\n{forged}"), "content");
    assert!(matches!(raw.reply(), Reply::Stored(_)));
    let log = cluster.log();
    assert!(log.contains("innocent\\n[2000-01-01"), "{log}");
    assert!(
        log.lines().all(|line| !line.starts_with("[2000-01-01")),
        "{log}"
    );
}
