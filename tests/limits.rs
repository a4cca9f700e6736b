//! Limits that hold against abuse: caps on open connections (idle ones
//! make room, busy ones make newcomers wait), and log lines a peer cannot
//! forge.

mod util;

use lbft::proto::Reply;
use std::io::{Read, Write};
use std::time::Duration;
use util::*;

/// The balancer's metric `lbft_limit_hits_total{limit="..."}`, or
/// another counter by its full name.
fn metric(metrics: std::net::SocketAddr, name: &str) -> u64 {
    let mut stream = std::net::TcpStream::connect(metrics).unwrap();
    stream.set_read_timeout(Some(REPLY_TIMEOUT)).unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    let name = if name.starts_with("lbft_") {
        format!("{name} ")
    } else {
        format!("lbft_limit_hits_total{{limit=\"{name}\"}} ")
    };
    text.lines()
        .find_map(|l| l.strip_prefix(&name))
        .unwrap_or_else(|| panic!("no {name} in {text}"))
        .parse()
        .unwrap()
}

/// True when nothing comes back on `raw` for a moment (it has not been
/// answered, nor closed).
fn unanswered_for_now(raw: &mut Raw) -> bool {
    raw.stream
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut byte = [0u8; 1];
    let early = raw.stream.read(&mut byte);
    raw.stream.set_read_timeout(Some(REPLY_TIMEOUT)).unwrap();
    matches!(&early, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
        || e.kind() == std::io::ErrorKind::TimedOut)
}

#[test]
fn past_the_cap_idle_connections_make_room_and_busy_ones_make_newcomers_wait() {
    // 40 ms a character: a document of 50 keeps its connection busy 2 s.
    let cluster = Cluster::start(
        1,
        &["--char-delay-ms", "40"],
        &[
            "--max-connections",
            "3",
            "--max-connections-per-ip",
            "3",
            "--metrics",
            "127.0.0.1:0",
        ],
    );
    let addr = cluster.balancer.addr;
    let metrics = metrics_addr(&cluster.balancer);

    // Three connections that never send a whole request: a newcomer takes
    // the place of the oldest at once.
    let mut silent: Vec<Raw> = (0..3).map(|_| Raw::connect(addr)).collect();
    let mut newcomer = Raw::connect(addr);
    newcomer.store(1, "newcomer", "x");
    assert!(matches!(newcomer.reply(), Reply::Stored(_)));
    assert!(silent[0].is_closed(), "the oldest silent one is closed");
    assert!(unanswered_for_now(&mut silent[1]), "only the oldest");
    assert!(metric(metrics, "connections_evicted") >= 1);
    drop((silent, newcomer));

    // Three connections at work (each one's request read before the next
    // one connects: until then it would be the first to make room): a
    // newcomer waits until one is done.
    let received = || metric(metrics, "lbft_requests_received_total");
    let mut busy = Vec::new();
    for i in 0..3 {
        let before = received();
        let mut raw = Raw::connect(addr);
        raw.store(i, "slow", &"b".repeat(50));
        assert!(eventually(|| received() == before + 1));
        busy.push(raw);
    }
    let mut waiting = Raw::connect(addr);
    waiting.store(9, "waited", "its turn came");
    assert!(
        unanswered_for_now(&mut waiting),
        "answered while all were at work"
    );
    for raw in &mut busy {
        assert!(matches!(raw.reply(), Reply::Stored(_)));
    }
    match waiting.reply() {
        Reply::Stored(s) => assert_eq!(s.id, 9),
        other => panic!("{other:?}"),
    }
    assert!(metric(metrics, "max_connections") >= 1);
    let log = cluster.log();
    assert!(log.contains("all at work: new ones wait"), "{log}");
    assert!(
        log.contains("closed a connection with no whole request yet"),
        "{log}"
    );
}

#[test]
fn an_address_at_its_cap_with_every_connection_at_work_is_refused() {
    let cluster = Cluster::start(
        1,
        &["--char-delay-ms", "40"],
        &[
            "--max-connections",
            "10",
            "--max-connections-per-ip",
            "2",
            "--metrics",
            "127.0.0.1:0",
        ],
    );
    let addr = cluster.balancer.addr;
    let metrics = metrics_addr(&cluster.balancer);
    let received = || metric(metrics, "lbft_requests_received_total");
    let mut busy = Vec::new();
    for i in 0..2 {
        let mut raw = Raw::connect(addr);
        raw.store(i, "slow", &"b".repeat(50));
        assert!(eventually(|| received() == i + 1));
        busy.push(raw);
    }
    let mut refused = Raw::connect(addr);
    refused.store(3, "refused", "x");
    assert!(refused.is_closed(), "a third connection from 127.0.0.1");
    // Another address is not held to 127.0.0.1's cap.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&std::net::SocketAddr::from(([127, 0, 0, 2], 0)).into())
        .unwrap();
    socket.connect(&addr.into()).unwrap();
    let mut other = Raw {
        stream: socket.into(),
    };
    other.stream.set_read_timeout(Some(REPLY_TIMEOUT)).unwrap();
    other.store(4, "other address", "x");
    assert!(matches!(other.reply(), Reply::Stored(_)));
    for raw in &mut busy {
        assert!(matches!(raw.reply(), Reply::Stored(_)));
    }
    assert!(cluster
        .log()
        .contains("(--max-connections-per-ip 2), all at work"));
    assert_eq!(metric(metrics, "max_connections_per_ip"), 1);
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
    let mut honest = Raw::connect_to_server(server.addr, &work.path().join("s"));
    honest.store(1, "honest", "served while another stalls");
    assert!(matches!(honest.reply(), Reply::Stored(_)));
    match slow.try_reply() {
        Some(Reply::Error(e)) => assert_eq!(e.code, lbft::proto::ErrorCode::Timeout),
        other => panic!("expected a timeout error, got {other:?}"),
    }
    assert!(slow.is_closed());
}

#[test]
fn a_client_that_does_not_read_its_replies_holds_up_no_one() {
    // One server with one request on the wire at a time: a link that
    // waited on a client's full socket would stop everyone.
    let cluster = Cluster::start(1, &[], &["--max-in-flight", "1"]);
    let addr = cluster.balancer.addr;
    // Small buffers: its replies back up soon, and its requests are sent
    // only as fast as the balancer reads them.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.set_send_buffer_size(4096).unwrap();
    socket.connect(&addr.into()).unwrap();
    let mut stalled: std::net::TcpStream = socket.into();
    stalled.set_read_timeout(Some(REPLY_TIMEOUT)).unwrap();
    // Replies past what the balancer's socket may buffer (4 MiB here).
    const SENT: u64 = 50_000;
    let mut requests = Vec::new();
    for id in 1..=SENT {
        let calc = serde_json::json!({"type": "calc", "id": id, "operazione": "somma"});
        lbft::proto::write_frame(&mut requests, calc.to_string().as_bytes()).unwrap();
    }
    let mut writer = stalled.try_clone().unwrap();
    let (sent_tx, sent_rx) = crossbeam_channel::bounded(1);
    std::thread::spawn(move || sent_tx.send(writer.write_all(&requests).is_ok()));

    // Its requests are all read and answered, far more replies than its
    // socket takes piling up unread (a balancer that waited for it would
    // stop reading it, and the write would not end)...
    let sent = sent_rx.recv_timeout(Duration::from_secs(60));
    assert_eq!(sent, Ok(true), "the balancer stopped reading the requests");
    // ... and others are served.
    let mut honest = Raw::connect(addr);
    for id in 1..=20 {
        honest.store(
            id,
            &format!("honest {id}"),
            "served while another does not read",
        );
        assert!(matches!(honest.reply(), Reply::Stored(_)));
    }

    // Every reply reaches it whole once it reads, none lost or cut.
    let mut ids = std::collections::BTreeSet::new();
    while (ids.len() as u64) < SENT {
        let payload = lbft::proto::read_frame(&mut stalled, lbft::proto::DEFAULT_MAX_FRAME)
            .unwrap()
            .expect("a reply for every request");
        match lbft::proto::decode::<Reply>(&payload).unwrap() {
            Reply::Calc(c) => assert!(ids.insert(c.id), "reply {} twice", c.id),
            other => panic!("expected a result, got {other:?}"),
        }
    }
    assert_eq!(
        ids.into_iter().collect::<Vec<_>>(),
        (1..=SENT).collect::<Vec<_>>()
    );
}
