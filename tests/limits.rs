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

#[test]
fn a_frame_that_trickles_in_is_cut_off_at_the_frame_timeout() {
    let cluster = Cluster::start(
        1,
        &[],
        &["--frame-timeout", "1s", "--client-timeout", "60s"],
    );
    let mut slow = Raw::connect(cluster.balancer.addr);
    // A 1000-byte frame of which 10 bytes come, then nothing.
    slow.send_bytes(&1000u32.to_be_bytes());
    slow.send_bytes(&[b'{'; 10]);
    let started = std::time::Instant::now();
    // Served meanwhile: an honest client.
    let mut honest = Raw::connect(cluster.balancer.addr);
    honest.store(1, "honest", "served while another stalls");
    assert!(matches!(honest.reply(), Reply::Stored(_)));
    match slow.try_reply() {
        Some(Reply::Error(e)) => {
            assert_eq!(e.code, lbft::proto::ErrorCode::Timeout, "{e:?}");
        }
        other => panic!("expected a timeout error, got {other:?}"),
    }
    assert!(slow.is_closed());
    let took = started.elapsed();
    assert!(took < Duration::from_secs(30), "cut off after {took:?}");
}

#[test]
fn silent_scrapers_do_not_hold_up_the_metrics() {
    use std::io::Write;
    let cluster = Cluster::start(1, &[], &["--metrics", "127.0.0.1:0"]);
    let metrics = metrics_addr(&cluster.balancer);
    let silent: Vec<_> = (0..10)
        .map(|_| std::net::TcpStream::connect(metrics).unwrap())
        .collect();
    let started = std::time::Instant::now();
    let mut scrape = std::net::TcpStream::connect(metrics).unwrap();
    scrape.set_read_timeout(Some(REPLY_TIMEOUT)).unwrap();
    scrape
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    scrape.read_to_string(&mut response).unwrap();
    let took = started.elapsed();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    // One at a time, ten silent connections cost 2 s each before this.
    assert!(took < Duration::from_secs(2), "scrape took {took:?}");
    drop(silent);
}

#[test]
fn a_server_cuts_off_a_trickling_frame_too() {
    let work = tempfile::tempdir().unwrap();
    let server = start_server(
        &work.path().join("s"),
        &["--frame-timeout", "1s", "--idle-timeout", "60s"],
    );
    let mut slow = Raw::connect(server.addr);
    slow.send_bytes(&1000u32.to_be_bytes());
    slow.send_bytes(&[b'{'; 10]);
    let mut honest = Raw::connect(server.addr);
    honest.store(1, "honest", "served while another stalls");
    assert!(matches!(honest.reply(), Reply::Stored(_)));
    match slow.try_reply() {
        Some(Reply::Error(e)) => assert_eq!(e.code, lbft::proto::ErrorCode::Timeout),
        other => panic!("expected a timeout error, got {other:?}"),
    }
    assert!(slow.is_closed());
}
