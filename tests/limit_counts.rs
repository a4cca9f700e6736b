//! Every limit a client runs into is counted in the metrics
//! (`lbft_limit_hits_total{limit="..."}`) and logged once per burst (failed
//! logins once per burst on each account).

mod util;

use lbft::proto::{ErrorCode, Reply};
use serde_json::json;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use util::*;

fn scrape(metrics: SocketAddr) -> String {
    let mut stream = TcpStream::connect(metrics).unwrap();
    stream.set_read_timeout(Some(REPLY_TIMEOUT)).unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}

fn hits(metrics: SocketAddr, limit: &str) -> u64 {
    let text = scrape(metrics);
    let prefix = format!("lbft_limit_hits_total{{limit=\"{limit}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {prefix} in {text}"))
        .parse()
        .unwrap()
}

fn error(reply: Option<Reply>) -> lbft::proto::ErrorReply {
    match reply {
        Some(Reply::Error(e)) => e,
        other => panic!("expected an error, got {other:?}"),
    }
}

#[test]
fn every_limit_hit_is_counted() {
    // A slow server (1 ms a character) keeps documents in flight.
    let cluster = Cluster::start(
        1,
        &["--char-delay-ms", "1"],
        &[
            "--metrics",
            "127.0.0.1:0",
            "--max-frame",
            "1KiB",
            "--max-queued-bytes",
            "1KiB",
            "--client-window",
            "4",
            "--max-document-size",
            "700",
            "--frame-timeout",
            "1s",
            "--max-connections",
            "6",
        ],
    );
    let metrics = metrics_addr(&cluster.balancer);
    let balancer = cluster.balancer.addr;
    for limit in [
        "max_frame",
        "client_window",
        "max_queued_bytes",
        "max_connections",
        "connections_evicted",
        "max_connections_per_ip",
        "frame_timeout",
        "login_failed",
        "login_throttled",
        "login_locked",
        "max_document_size",
    ] {
        assert_eq!(hits(metrics, limit), 0, "{limit}");
    }

    // A document over --max-document-size: `too_large`, connection open.
    let mut raw = Raw::connect(balancer);
    raw.store(1, "big", &"x".repeat(800));
    let e = error(raw.try_reply());
    assert_eq!(e.code, ErrorCode::TooLarge, "{e:?}");
    assert!(e.message.contains("--max-document-size"), "{}", e.message);
    assert_eq!(hits(metrics, "max_document_size"), 1);

    // Documents of 600 bytes: the second waits for the byte budget.
    let slow = "a".repeat(600);
    raw.store_at_once(&[(2, "slow", &slow), (3, "slow", &slow)]);
    for _ in 2..=3 {
        assert!(matches!(raw.reply(), Reply::Stored(_)));
    }
    assert!(hits(metrics, "max_queued_bytes") >= 1);
    // Small ones: the fifth waits for the window of 4.
    let small = "a".repeat(100);
    let docs: Vec<(u64, &str, &str)> = (4..=9).map(|id| (id, "small", small.as_str())).collect();
    raw.store_at_once(&docs);
    for _ in 4..=9 {
        assert!(matches!(raw.reply(), Reply::Stored(_)));
    }
    assert!(hits(metrics, "client_window") >= 1);

    // A frame over --max-frame: `frame_too_large`, closed.
    let mut raw = Raw::connect(balancer);
    raw.send_bytes(&2000u32.to_be_bytes());
    assert_eq!(error(raw.try_reply()).code, ErrorCode::FrameTooLarge);
    assert_eq!(hits(metrics, "max_frame"), 1);

    // A frame that stalls: `timeout` after --frame-timeout, closed.
    let mut raw = Raw::connect(balancer);
    raw.send_bytes(&100u32.to_be_bytes());
    raw.send_bytes(b"{\"type\"");
    assert_eq!(error(raw.try_reply()).code, ErrorCode::Timeout);
    assert_eq!(hits(metrics, "frame_timeout"), 1);

    // Six silent connections from one address, past its
    // --max-connections-per-ip (3, half of 6): the oldest make room.
    let idle: Vec<Raw> = (0..6).map(|_| Raw::connect(balancer)).collect();
    assert!(eventually(|| hits(metrics, "connections_evicted") >= 1));
    drop(idle);

    let log = cluster.log();
    for limit in ["max_document_size", "max_frame", "frame_timeout"] {
        assert_eq!(
            log.matches(&format!("limit {limit} reached")).count(),
            1,
            "{limit}: {log}"
        );
    }
}

#[test]
fn failed_logins_are_counted() {
    let cluster = Cluster::start(1, &[], &["--users", "--metrics", "127.0.0.1:0"]);
    let metrics = metrics_addr(&cluster.balancer);
    let mut raw = Raw::connect(cluster.balancer.addr);
    for id in 1..=2 {
        raw.send_json(&json!({"type": "login", "id": id, "user": "nobody", "password": "x"}));
        assert_eq!(error(raw.try_reply()).code, ErrorCode::Unauthenticated);
    }
    assert_eq!(hits(metrics, "login_failed"), 2);
    assert_eq!(hits(metrics, "login_throttled"), 0);
    // Logged by account: the first at once, the second folded into a
    // line of its own a second later.
    let first = "failed login as \"nobody\" from 127.0.0.1: no such user";
    let folded = "1 more failed login as \"nobody\" since the last line";
    assert!(
        eventually(|| cluster.log().contains(folded)),
        "{}",
        cluster.log()
    );
    assert_eq!(cluster.log().matches(first).count(), 1);
}
