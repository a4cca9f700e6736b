//! The real client binary against a fake balancer run by the test itself:
//! the client never has more than its window of requests unanswered, and
//! when the connection ends early it tells requests the balancer never read
//! (`shutting_down`) from requests whose fate is unknown.

mod util;

use lbft::client::DEFAULT_WINDOW;
use lbft::proto::{self, encode, ClientRequest, ErrorCode, Reply, Stored};
use std::io::ErrorKind;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::thread::{self, JoinHandle};
use util::{client_bin, sample_documents, REPLY_TIMEOUT};

fn run_client(balancer: SocketAddr, documents: &Path, extra: &[&str]) -> Output {
    Command::new(client_bin())
        .arg("--balancer")
        .arg(balancer.to_string())
        .arg("--documents")
        .arg(documents)
        .args(["--timeout", "20s"])
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .expect("the client runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Starts a fake balancer on port 0 that serves one connection with
/// `serve`, and returns its address and the thread (joined for the result).
fn fake_balancer<T: Send + 'static>(
    serve: impl FnOnce(TcpStream) -> T + Send + 'static,
) -> (SocketAddr, JoinHandle<T>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let handle = thread::Builder::new()
        .name("fake-balancer".into())
        .spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            // Replies go out as header and payload writes: without this,
            // Nagle holds each payload until the client's delayed ack.
            stream.set_nodelay(true).unwrap();
            stream.set_read_timeout(Some(REPLY_TIMEOUT)).unwrap();
            serve(stream)
        })
        .unwrap();
    (addr, handle)
}

/// Reads one request's id. Frames are read straight from the socket, not
/// through a read-ahead buffer, so that whatever the client sent beyond is
/// still in the socket for `more_waiting` to see.
fn read_id(stream: &TcpStream) -> u64 {
    let payload = proto::read_frame(&mut &*stream, proto::DEFAULT_MAX_FRAME)
        .unwrap_or_else(|e| panic!("reading a request: {e}"))
        .expect("the client closed before sending every request");
    match proto::decode::<ClientRequest>(&payload) {
        Ok(ClientRequest::Store(s)) => s.id,
        other => panic!("expected a store request, got {other:?}"),
    }
}

/// Whether bytes of another request are already waiting, without waiting.
fn more_waiting(stream: &TcpStream) -> bool {
    stream.set_nonblocking(true).unwrap();
    let peeked = stream.peek(&mut [0u8; 1]);
    stream.set_nonblocking(false).unwrap();
    match peeked {
        Ok(n) => n > 0,
        Err(e) if e.kind() == ErrorKind::WouldBlock => false,
        Err(e) => panic!("peeking at the client's stream: {e}"),
    }
}

fn answer_stored(mut stream: &TcpStream, id: u64) {
    let reply = Reply::Stored(Stored {
        id,
        server: "fake".into(),
        request_number: id,
        file: format!("{id}_sample.json"),
        a_count: 3,
        existing: false,
        copies: Vec::new(),
        under_replicated: false,
    });
    proto::write_frame(&mut stream, &encode(&reply)).unwrap();
}

/// Closes our side gracefully and reads until the client closes its own, so
/// that no unread byte turns our close into a reset that could overtake the
/// last replies.
fn close_gracefully(stream: &TcpStream) {
    stream.shutdown(Shutdown::Write).unwrap();
    while let Ok(Some(_)) = proto::read_frame(&mut &*stream, proto::DEFAULT_MAX_FRAME) {}
}

/// What the fake balancer saw of the client's window.
#[derive(Debug)]
struct WindowSeen {
    /// Most requests read and not yet answered at once.
    max_unanswered: usize,
    /// Times a request was already waiting while the window was full.
    overruns: usize,
}

/// Holds answers back until `window` requests are unanswered (or all
/// `count` have come), then checks that the client sends nothing more
/// while it waits, and answers them all. A client keeping to its window
/// cannot have sent more: it has had every earlier answer, at most.
fn serve_window(stream: TcpStream, window: usize, count: u64) -> WindowSeen {
    let mut seen = WindowSeen {
        max_unanswered: 0,
        overruns: 0,
    };
    let mut unanswered = Vec::new();
    for received in 1..=count {
        unanswered.push(read_id(&stream));
        seen.max_unanswered = seen.max_unanswered.max(unanswered.len());
        if unanswered.len() >= window {
            if more_waiting(&stream) {
                seen.overruns += 1;
            }
        } else if received < count {
            continue;
        }
        for id in unanswered.drain(..) {
            answer_stored(&stream, id);
        }
    }
    close_gracefully(&stream);
    seen
}

fn check_window(window: usize, count: u64, extra: &[&str]) {
    let docs = sample_documents();
    let (addr, fake) = fake_balancer(move |stream| serve_window(stream, window, count));
    let mut args = extra.to_vec();
    let count_arg = count.to_string();
    args.extend(["ftp", &count_arg]);
    let out = run_client(addr, docs.path(), &args);
    let stdout = text(&out.stdout);
    let seen = fake.join().expect("the fake balancer failed");
    assert!(
        out.status.success(),
        "client failed: {stdout}{}",
        text(&out.stderr)
    );
    assert_eq!(seen.overruns, 0, "requests beyond the window: {seen:?}");
    assert_eq!(seen.max_unanswered, window, "{seen:?}");
    let summary =
        format!("{count} documents: {count} stored, 0 failed (per server: fake: {count})");
    assert!(stdout.contains(&summary), "{stdout}");
    // A long batch shows progress instead of a line per stored document.
    let ok_lines = stdout.lines().filter(|l| l.starts_with("  ok ")).count();
    assert_eq!(ok_lines, 0, "{stdout}");
}

#[test]
fn ftp_keeps_at_most_the_default_window_unanswered() {
    check_window(DEFAULT_WINDOW, 2000, &[]);
}

#[test]
fn the_window_follows_the_flag() {
    check_window(10, 95, &["--window", "10"]);
}

/// Reads `read` requests, answers the first `answer`, sends `last` if
/// given, and closes.
fn serve_then_end(stream: TcpStream, read: usize, answer: usize, last: Option<Reply>) {
    let ids: Vec<u64> = (0..read).map(|_| read_id(&stream)).collect();
    for id in &ids[..answer] {
        answer_stored(&stream, *id);
    }
    if let Some(last) = last {
        proto::write_frame(&mut &stream, &encode(&last)).unwrap();
    }
    close_gracefully(&stream);
}

#[test]
fn after_shutting_down_every_unanswered_document_is_not_sent() {
    let docs = sample_documents();
    let frame = Reply::error(
        None,
        ErrorCode::ShuttingDown,
        "the balancer is shutting down",
    );
    let (addr, fake) = fake_balancer(move |stream| serve_then_end(stream, 20, 10, Some(frame)));
    let out = run_client(addr, docs.path(), &["ftp", "2000"]);
    fake.join().expect("the fake balancer failed");
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout
            .contains("2000 documents: 10 stored, 0 failed, 1990 not sent (per server: fake: 10)"),
        "{stdout}"
    );
    // A long batch lists each request that was not stored, those never
    // sent included, each with its fate.
    let not_sent = stdout
        .lines()
        .filter(|l| {
            l.starts_with("  --    ") && l.ends_with("not sent: the balancer is shutting down")
        })
        .count();
    let (unanswered, never_sent) = early_end_counts(&stdout);
    assert_eq!(not_sent, 1990, "{stdout}");
    assert_eq!(unanswered + never_sent, 1990, "{stdout}");
}

/// The counts in "connection ended early: ...; U sent and unanswered, N
/// never sent".
fn early_end_counts(stdout: &str) -> (u64, u64) {
    let note = stdout
        .lines()
        .find_map(|l| l.strip_prefix("connection ended early: "))
        .unwrap_or_else(|| panic!("no note on the early end: {stdout}"));
    let counts = note.rsplit("; ").next().unwrap();
    let numbers: Vec<u64> = counts
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect();
    (numbers[0], numbers[1])
}

#[test]
fn after_a_plain_close_sent_documents_are_unknown() {
    let docs = sample_documents();
    let (addr, fake) = fake_balancer(|stream| serve_then_end(stream, 20, 10, None));
    let out = run_client(addr, docs.path(), &["ftp", "2000"]);
    fake.join().expect("the fake balancer failed");
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}{}", text(&out.stderr));

    let count = |marker: &str| stdout.lines().filter(|l| l.starts_with(marker)).count();
    let unknown = count("  ??    ");
    // The fake read 20 and answered 10: those 10 at least were sent.
    assert!(
        (10..=DEFAULT_WINDOW).contains(&unknown),
        "{unknown} unknown: {stdout}"
    );
    assert!(
        stdout.contains("unknown: the connection closed before an answer; it may have been stored")
    );
    let not_sent = 2000 - 10 - unknown;
    let summary = format!(
        "2000 documents: 10 stored, 0 failed, {unknown} unknown, {not_sent} not sent (per server: fake: 10)"
    );
    assert!(stdout.contains(&summary), "{stdout}");
    // Every document not stored has a line of its own: none failed.
    assert_eq!(count("  FAIL  "), 0, "{stdout}");
    assert_eq!(count("  --    "), not_sent, "{stdout}");
    assert_eq!(early_end_counts(&stdout), (unknown as u64, not_sent as u64));
    assert!(stdout.contains("connection ended early: "), "{stdout}");
}

#[test]
fn unanswered_computations_are_unknown_too() {
    let docs = sample_documents();
    let (addr, fake) = fake_balancer(|stream| {
        // Read a few requests and close without a word.
        for _ in 0..3 {
            proto::read_frame(&mut &stream, proto::DEFAULT_MAX_FRAME)
                .unwrap()
                .unwrap();
        }
        close_gracefully(&stream);
    });
    let out = run_client(addr, docs.path(), &["calc", "5"]);
    fake.join().expect("the fake balancer failed");
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("5 requests: 0 computed, "), "{stdout}");
    let unknown = stdout.lines().filter(|l| l.starts_with("  ??    ")).count();
    assert!(unknown >= 3, "the fake read 3 requests: {stdout}");
    assert!(stdout.contains(&format!(", {unknown} unknown")), "{stdout}");
}

#[test]
fn send_reports_an_unreadable_file_and_sends_the_rest() {
    let docs = sample_documents();
    let good = docs.path().join("sample.json");
    let missing = docs.path().join("missing.json");
    let (addr, fake) = fake_balancer(|stream| {
        let mut answered = 0;
        while let Ok(Some(payload)) = proto::read_frame(&mut &stream, proto::DEFAULT_MAX_FRAME) {
            let Ok(ClientRequest::Store(s)) = proto::decode::<ClientRequest>(&payload) else {
                panic!("expected a store request")
            };
            answer_stored(&stream, s.id);
            answered += 1;
        }
        answered
    });
    let out = run_client(
        addr,
        docs.path(),
        &[
            "send",
            good.to_str().unwrap(),
            missing.to_str().unwrap(),
            good.to_str().unwrap(),
        ],
    );
    assert_eq!(fake.join().expect("the fake balancer failed"), 2);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("3 documents: 2 stored, 0 failed, 1 not sent (per server: fake: 2)"),
        "{stdout}"
    );
    let fail = stdout
        .lines()
        .find(|l| l.starts_with("  --    [2/3]"))
        .unwrap_or_else(|| panic!("no line for the missing file: {stdout}"));
    assert!(
        fail.contains("not sent: cannot read") && fail.contains("missing.json"),
        "{fail}"
    );
}
