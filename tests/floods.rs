//! Floods that must not lock anyone out: connections that announce large
//! frames and send nothing more, thousands of idle sockets from one
//! address against a process with few descriptors, slow HTTP clients at
//! the metrics endpoint, and connections that never send a whole first
//! request.

mod util;

use lbft::proto::Reply;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use util::*;

/// Where the flooding sockets come from: another loopback address than
/// the honest clients' 127.0.0.1.
const FLOOD_FROM: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

/// How a program is started with at most 1024 open files: `prlimit` when
/// there is one, else a shell that lowers its own limit and becomes the
/// program (either way the process is the program itself, so killing it
/// kills the program).
fn with_file_limit(bin: &str, args: &[String]) -> (String, Vec<String>) {
    let has_prlimit = Command::new("prlimit")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if has_prlimit {
        let mut all = strings(&["--nofile=1024:1024", "--", bin]);
        all.extend(args.iter().cloned());
        ("prlimit".into(), all)
    } else {
        let mut all = strings(&["-c", r#"ulimit -n 1024 && exec "$0" "$@""#, bin]);
        all.extend(args.iter().cloned());
        ("sh".into(), all)
    }
}

/// Lets this process hold `wanted` descriptors, raising its soft limit up
/// to the hard one if needed.
fn allow_open_files(wanted: u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain system calls on a local struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        if limit.rlim_cur >= wanted {
            return;
        }
        assert!(
            limit.rlim_max >= wanted,
            "this test needs {wanted} open files; the hard limit is {}",
            limit.rlim_max
        );
        limit.rlim_cur = wanted;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
}

/// Opens `count` connections to `addr` from `FLOOD_FROM` and leaves them
/// silent. Connections the peer already closed are kept too: what counts
/// is that they were made.
fn idle_sockets(addr: SocketAddr, count: usize) -> Vec<TcpStream> {
    allow_open_files(count as u64 + 1024);
    let mut sockets = Vec::with_capacity(count);
    for i in 0..count {
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket.bind(&SocketAddr::new(FLOOD_FROM, 0).into()).unwrap();
        if let Err(e) = socket.connect_timeout(&addr.into(), Duration::from_secs(10)) {
            panic!("idle connection {i} of {count}: {e}");
        }
        sockets.push(socket.into());
    }
    sockets
}

/// Runs the client binary; `None` when it has not finished within `limit`
/// (it is killed and reaped then).
fn run_client_within(
    balancer: SocketAddr,
    args: &[&str],
    cwd: &Path,
    limit: Duration,
) -> Option<Output> {
    let child = Command::new(client_bin())
        .arg("--balancer")
        .arg(balancer.to_string())
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("client runs");
    let pid = child.id();
    let (tx, rx) = crossbeam_channel::bounded(1);
    let waiter = std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let output = match rx.recv_timeout(limit) {
        Ok(output) => Some(output.expect("client output")),
        Err(_) => {
            // SAFETY: a signal to our own child, not yet reaped (its
            // waiter has not returned).
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            let _ = rx.recv();
            None
        }
    };
    waiter.join().unwrap();
    output
}

/// Stores one document on a fresh connection from 127.0.0.1 and says how
/// long the answer took; panics if it is not `stored` within `limit`.
fn store_within(balancer: SocketAddr, title: &str, limit: Duration) -> Duration {
    let started = Instant::now();
    let mut raw = Raw::connect(balancer);
    raw.stream.set_read_timeout(Some(limit)).unwrap();
    raw.store(1, title, "served during a flood");
    match raw.try_reply() {
        Some(Reply::Stored(_)) => {}
        other => panic!("\"{title}\": expected `stored`, got {other:?}"),
    }
    let took = started.elapsed();
    assert!(took < limit, "\"{title}\" took {took:?}");
    took
}

/// Reads until the peer closes; how long that took. Panics if it stays
/// open for `limit`.
fn closed_within(stream: &mut TcpStream, limit: Duration) -> Duration {
    let started = Instant::now();
    stream.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 256];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return started.elapsed(),
            Ok(_) => {}
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                panic!("still open after {:?}", started.elapsed())
            }
            // A reset is a close too.
            Err(_) => return started.elapsed(),
        }
    }
}

#[test]
fn connections_announcing_large_frames_hold_no_budget() {
    let cluster = Cluster::start(1, &[], &[]);
    let balancer = cluster.balancer.addr;
    // 128 frames of 8 MiB announced: 4 GiB, sixteen times the default
    // --max-queued-bytes, none of it sent.
    let announced: Vec<Raw> = (0..128)
        .map(|_| {
            let mut raw = Raw::connect(balancer);
            raw.send_bytes(&(8u32 * 1024 * 1024).to_be_bytes());
            raw
        })
        .collect();
    // The last header has been read once a request behind it on another
    // connection is answered.
    store_within(balancer, "behind the headers", Duration::from_secs(5));

    let documents = sample_documents();
    let folder = documents.path().display().to_string();
    let started = Instant::now();
    let output = run_client_within(
        balancer,
        &["--documents", &folder, "ftp", "3"],
        cluster.dir.path(),
        Duration::from_secs(5),
    )
    .unwrap_or_else(|| panic!("the client was not served within 5 s"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("3 stored"), "{stdout}");
    assert!(started.elapsed() < Duration::from_secs(5));
    drop(announced);
}

#[test]
fn uploads_announcing_large_chunks_hold_no_budget() {
    let cluster = Cluster::start(1, &[], &["--max-queued-bytes", "64MiB"]);
    let balancer = cluster.balancer.addr;
    // 32 uploads, each announcing an 8 MiB chunk (four times the budget in
    // all) and sending only its body frame's header.
    let announced: Vec<Raw> = (0..32)
        .map(|i| {
            let mut raw = Raw::connect(balancer);
            raw.send_json(&serde_json::json!({
                "type": "upload", "id": 1, "upload_id": format!("stalled-upload-{i:04}"),
                "name": "big.bin", "size": 8 * 1024 * 1024
            }));
            match raw.reply() {
                Reply::UploadReady(r) => assert_eq!(r.offset, 0),
                other => panic!("{other:?}"),
            }
            raw.send_json(&serde_json::json!({
                "type": "chunk", "id": 1, "offset": 0, "body_len": 8 * 1024 * 1024
            }));
            raw.send_bytes(&(8u32 * 1024 * 1024).to_be_bytes());
            raw
        })
        .collect();
    // A document of 1 MiB needs room in the budget: it gets it.
    let started = Instant::now();
    let mut raw = Raw::connect(balancer);
    raw.store(1, "behind the chunks", &"a".repeat(1024 * 1024));
    match raw.reply() {
        Reply::Stored(_) => {}
        other => panic!("{other:?}"),
    }
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "took {took:?}");
    drop(announced);
}

#[test]
fn idle_sockets_from_one_address_do_not_lock_out_a_balancer() {
    let work = tempfile::tempdir().unwrap();
    let server = start_server(&work.path().join("s"), &[]);
    let mut args = strings(&[
        "--listen",
        "127.0.0.1:0",
        "--check-interval",
        "100ms",
        "--servers",
    ]);
    args.push(server.addr.to_string());
    let (program, args) = with_file_limit(balancer_bin(), &args);
    let balancer = start(&program, &args, work.path());
    store_within(balancer.addr, "before", Duration::from_secs(5));

    let idle = idle_sockets(balancer.addr, 2000);
    store_within(balancer.addr, "during", Duration::from_secs(5));
    let log = std::fs::read_to_string(work.path().join("loadbalancer.log")).unwrap();
    assert!(log.contains("--max-connections-per-ip"), "{log}");
    drop(idle);
}

#[test]
fn idle_sockets_do_not_take_a_server_down() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("s");
    let mut args = strings(&["--listen", "127.0.0.1:0", "--dir"]);
    args.push(dir.display().to_string());
    let (program, args) = with_file_limit(server_bin(), &args);
    let server = start(&program, &args, work.path());
    let balancer = start_balancer(work.path(), &[server.addr], &[]);
    let up = || servers(balancer.addr).iter().all(|s| s.state == "up");
    assert!(eventually(up), "the server never came up");

    let idle = idle_sockets(server.addr, 2000);
    // Long enough for a server whose probes fail to be taken down (two
    // failed probes of up to 1 s each): all along it stays up, its probes
    // (every 100 ms) keep getting answers, and it takes documents.
    let watch = Instant::now() + Duration::from_secs(4);
    let mut sent = 0;
    while Instant::now() < watch {
        sent += 1;
        store_within(
            balancer.addr,
            &format!("during {sent}"),
            Duration::from_secs(5),
        );
        let view = servers(balancer.addr);
        assert_eq!(view[0].state, "up", "{view:?}");
        let age = view[0].status_age_ms.unwrap_or(u64::MAX);
        assert!(age < 2000, "no probe answered for {age} ms: {view:?}");
    }
    assert!(eventually(|| stored_files(&dir).len() == sent));
    drop(idle);
}

#[test]
fn slow_scrapers_do_not_hold_up_the_metrics() {
    let cluster = Cluster::start(1, &[], &["--metrics", "127.0.0.1:0"]);
    let metrics = metrics_addr(&cluster.balancer);
    let head = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";
    let connect = move || {
        let stream = TcpStream::connect(metrics).unwrap();
        stream.set_write_timeout(Some(REPLY_TIMEOUT)).unwrap();
        stream
    };
    let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
    let (ready_tx, ready) = crossbeam_channel::bounded(1);
    // 300 clients sending a byte of their request each second; one the
    // endpoint closed comes back at once.
    let slow = std::thread::spawn(move || {
        let mut clients: Vec<(TcpStream, usize)> = (0..300).map(|_| (connect(), 0)).collect();
        let _ = ready_tx.send(());
        while let Err(crossbeam_channel::RecvTimeoutError::Timeout) =
            stopped.recv_timeout(Duration::from_secs(1))
        {
            for (stream, sent) in &mut clients {
                if stream.write_all(&head[*sent..*sent + 1]).is_err() {
                    *stream = connect();
                    *sent = 0;
                } else {
                    *sent = (*sent + 1) % head.len();
                }
            }
        }
    });
    ready.recv().unwrap();
    for round in 0..3 {
        let started = Instant::now();
        let mut scrape = TcpStream::connect(metrics).unwrap();
        scrape
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        scrape.write_all(head).unwrap();
        let mut response = String::new();
        let read = scrape.read_to_string(&mut response);
        let took = started.elapsed();
        assert!(
            read.is_ok() && response.starts_with("HTTP/1.1 200"),
            "scrape {round}: {read:?} after {took:?}: {response:?}"
        );
        assert!(
            took < Duration::from_secs(2),
            "scrape {round} took {took:?}"
        );
    }
    drop(stop);
    slow.join().unwrap();
}

#[test]
fn a_first_request_must_arrive_whole_within_the_frame_timeout() {
    let cluster = Cluster::start(1, &["--frame-timeout", "1s"], &["--frame-timeout", "1s"]);
    let limit = Duration::from_secs(5);
    for (who, addr) in [
        ("balancer", cluster.balancer.addr),
        ("server", cluster.servers[0].addr),
    ] {
        // The original format: an object begun and never ended.
        let mut legacy = TcpStream::connect(addr).unwrap();
        legacy.write_all(b"{").unwrap();
        // A framed peer that sends nothing at all.
        let mut silent = TcpStream::connect(addr).unwrap();
        let took = closed_within(&mut legacy, limit);
        assert!(took < limit, "{who}: `{{` held for {took:?}");
        let took = closed_within(&mut silent, limit);
        assert!(took < limit, "{who}: a silent peer held for {took:?}");
    }
    let log = cluster.log();
    assert!(log.contains("original-format connection from"), "{log}");
    assert!(log.contains("--frame-timeout"), "{log}");

    // Past its first document, an original client may pause between
    // documents for --legacy-client-timeout (1 h), not --frame-timeout.
    let doc = |title: &str| {
        format!(
            r#"{{"titolo": "{title}", "contenuto": "banana", "request_type": "file_di_testo"}}"#
        )
    };
    let mut legacy = TcpStream::connect(cluster.balancer.addr).unwrap();
    legacy.write_all(doc("first").as_bytes()).unwrap();
    legacy
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut byte = [0u8; 1];
    let paused = legacy.read(&mut byte);
    assert!(
        matches!(&paused, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
            || e.kind() == std::io::ErrorKind::TimedOut),
        "closed during a pause between documents: {paused:?}"
    );
    legacy.write_all(doc("second").as_bytes()).unwrap();
    let dir = &cluster.server_dirs[0];
    assert!(eventually(|| stored_files(dir).len() == 2));
}
