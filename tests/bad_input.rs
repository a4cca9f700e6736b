mod util;
use util::*;

// Bad input against the real binaries: every malformed, hostile, stalled or
// unlucky request gets the documented reply (or a clean close), and the
// balancer (or server) goes on serving the next client, proven by a store
// whose file shows up in a server folder.

use lbft::proto::{self, ErrorCode, ErrorReply, Reply, Stored};
use serde_json::{json, Value};
use std::io::ErrorKind;
use std::net::{Shutdown, SocketAddr};
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------- helpers

fn expect_error(reply: Reply) -> ErrorReply {
    match reply {
        Reply::Error(e) => e,
        other => panic!("expected an error reply, got {other:?}"),
    }
}

fn expect_stored(reply: Reply) -> Stored {
    match reply {
        Reply::Stored(s) => s,
        other => panic!("expected a stored reply, got {other:?}"),
    }
}

/// Reads one reply frame as raw JSON, to check the exact wire shape.
fn reply_json(raw: &mut Raw) -> Value {
    let payload = proto::read_frame(&mut raw.stream, proto::DEFAULT_MAX_FRAME)
        .unwrap_or_else(|e| panic!("reading a reply: {e}"))
        .expect("connection closed before a reply");
    serde_json::from_slice(&payload).unwrap_or_else(|e| panic!("reply is not JSON: {e}"))
}

/// Asserts that the peer closes the connection cleanly with nothing more to
/// say (a reply or a read timeout fails the test).
fn assert_closed(raw: &mut Raw, what: &str) {
    if let Some(reply) = raw.try_reply() {
        panic!("{what}: expected the connection to be closed, got {reply:?}");
    }
}

/// Every stored document of the cluster: (server index, file name, JSON).
fn cluster_files(c: &Cluster) -> Vec<(usize, String, Value)> {
    c.server_dirs
        .iter()
        .enumerate()
        .flat_map(|(i, d)| stored_files(d).into_iter().map(move |(n, v)| (i, n, v)))
        .collect()
}

/// The stored JSON of a `stored` reply, read from the folder of the server
/// the reply names.
fn stored_json(servers: &[(SocketAddr, &Path)], s: &Stored) -> Value {
    let (_, dir) = servers
        .iter()
        .find(|(addr, _)| addr.to_string() == s.server)
        .unwrap_or_else(|| panic!("reply names unknown server {}: {s:?}", s.server));
    stored_files(dir)
        .into_iter()
        .find(|(name, _)| *name == s.file)
        .map(|(_, v)| v)
        .unwrap_or_else(|| {
            panic!(
                "{} is not in {} (has {:?})",
                s.file,
                dir.display(),
                stored_files(dir)
            )
        })
}

fn on_disk(c: &Cluster, s: &Stored) -> Value {
    let servers: Vec<(SocketAddr, &Path)> = c
        .servers
        .iter()
        .zip(&c.server_dirs)
        .map(|(p, d)| (p.addr, d.as_path()))
        .collect();
    stored_json(&servers, s)
}

/// Stores a document on `raw` and checks the reply and the file on disk.
fn store_and_check(c: &Cluster, raw: &mut Raw, id: u64, title: &str) -> Stored {
    let content = format!("content of {title}");
    raw.store(id, title, &content);
    let s = expect_stored(raw.reply());
    assert_eq!(s.id, id, "{s:?}");
    let v = on_disk(c, &s);
    assert_eq!(v["titolo"], title, "{v}");
    assert_eq!(v["contenuto"], content.as_str(), "{v}");
    assert_eq!(v["numero_richiesta"], s.request_number, "{v}");
    s
}

/// Proves the balancer still serves: a fresh connection stores a document
/// and its file shows up in the folder of the server the reply names.
fn assert_serves(c: &Cluster, title: &str) -> Stored {
    let mut raw = Raw::connect(c.balancer.addr);
    store_and_check(c, &mut raw, 1000, title)
}

/// Titles of every stored document of the cluster, sorted.
fn stored_titles(c: &Cluster) -> Vec<String> {
    let mut titles: Vec<String> = cluster_files(c)
        .into_iter()
        .map(|(_, _, v)| v["titolo"].as_str().unwrap_or_default().to_string())
        .collect();
    titles.sort();
    titles
}

fn framed(payload: &[u8]) -> Vec<u8> {
    let mut v = (payload.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(payload);
    v
}

fn store_payload(id: u64, title: &str, content: &str) -> Vec<u8> {
    json!({"type": "store", "id": id, "titolo": title, "contenuto": content})
        .to_string()
        .into_bytes()
}

fn run_client(args: &[&str]) -> Output {
    Command::new(client_bin())
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("cannot run the client")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

// ------------------------------------------------------------------ tests

/// Case 1: a length prefix above `--max-frame` gets `frame_too_large` with a
/// null id, then the connection is closed; a frame of exactly the maximum
/// still passes.
#[test]
fn oversized_length_prefix_gets_frame_too_large_and_close() {
    let c = Cluster::start(2, &[], &["--max-frame", "1KiB"]);
    for len in [2048u32, u32::MAX] {
        let mut raw = Raw::connect(c.balancer.addr);
        raw.send_bytes(&len.to_be_bytes());
        let v = reply_json(&mut raw);
        assert_eq!(v["type"], "error", "{v}");
        assert_eq!(v["code"], "frame_too_large", "{v}");
        assert_eq!(v.get("id"), Some(&Value::Null), "id must be null: {v}");
        let e = expect_error(serde_json::from_value(v).unwrap());
        assert!(
            e.message.contains(&len.to_string()) && e.message.contains("1024"),
            "{e:?}"
        );
        assert_closed(&mut raw, &format!("after a {len}-byte length prefix"));
    }

    // The limit is exact: a store frame of exactly 1024 bytes is accepted.
    let base = store_payload(5, "at the limit", "").len();
    let payload = store_payload(5, "at the limit", &"b".repeat(1024 - base));
    assert_eq!(payload.len(), 1024);
    let mut raw = Raw::connect(c.balancer.addr);
    raw.send_frame(&payload);
    let s = expect_stored(raw.reply());
    assert_eq!(s.id, 5);
    assert_eq!(on_disk(&c, &s)["titolo"], "at the limit");

    assert_serves(&c, "after oversized frames");
    assert_eq!(
        stored_titles(&c),
        ["after oversized frames", "at the limit"]
    );
}

/// Case 1, as a real client would do it: the whole oversized frame is sent,
/// not only its header. The error reply must still reach the client.
#[test]
fn oversized_frame_sent_whole_still_gets_its_error_reply() {
    let c = Cluster::start(1, &[], &["--max-frame", "1KiB"]);
    for round in 0..20 {
        let mut raw = Raw::connect(c.balancer.addr);
        raw.send_bytes(&framed(&store_payload(1, "too big", &"x".repeat(2048))));
        let payload = proto::read_frame(&mut raw.stream, proto::DEFAULT_MAX_FRAME)
            .unwrap_or_else(|e| panic!("round {round}: error reply lost: {e}"))
            .unwrap_or_else(|| panic!("round {round}: closed without an error reply"));
        let e = expect_error(proto::decode(&payload).unwrap());
        assert_eq!((e.code, e.id), (ErrorCode::FrameTooLarge, None), "{e:?}");
    }
    assert_serves(&c, "after whole oversized frames");
    assert_eq!(stored_titles(&c), ["after whole oversized frames"]);
}

/// Case 2: a frame cut short by the client closing its write half: no
/// reply, connection closed, nothing stored, a log line, and the next
/// client is served.
#[test]
fn truncated_frame_closes_connection_and_stores_nothing() {
    let c = Cluster::start(2, &[], &[]);

    // Header announces 100 bytes; only 10 (the start of a real store) arrive.
    let mut raw = Raw::connect(c.balancer.addr);
    raw.send_bytes(&100u32.to_be_bytes());
    raw.send_bytes(&store_payload(1, "truncated", "never complete")[..10]);
    raw.stream.shutdown(Shutdown::Write).unwrap();
    assert_closed(&mut raw, "after a truncated payload");

    // Cut inside the length prefix itself.
    let mut raw = Raw::connect(c.balancer.addr);
    raw.send_bytes(&[0, 0]);
    raw.stream.shutdown(Shutdown::Write).unwrap();
    assert_closed(&mut raw, "after a truncated header");

    // The balancer logs before it closes, so the lines are there by now.
    let log = c.log();
    assert!(
        log.contains("connection closed mid-frame (14 of 104 bytes received)"),
        "log lacks the truncated payload:\n{log}"
    );
    assert!(
        log.contains("connection closed mid-frame (2 of 4 bytes received)"),
        "log lacks the truncated header:\n{log}"
    );

    assert_serves(&c, "after truncated frames");
    assert_eq!(stored_titles(&c), ["after truncated frames"]);
}

/// Sends one bad frame, expects an error reply with `code` and `id`, then
/// stores a valid document on the SAME connection and on a fresh one.
fn bad_frame_keeps_connection_open(payload: &[u8], code: ErrorCode, id: Option<u64>) -> ErrorReply {
    let c = Cluster::start(1, &[], &[]);
    let mut raw = Raw::connect(c.balancer.addr);
    raw.send_frame(payload);
    let e = expect_error(raw.reply());
    assert_eq!((e.code, e.id), (code, id), "{e:?}");
    store_and_check(&c, &mut raw, 2, "same connection");
    assert_serves(&c, "fresh connection");
    assert_eq!(stored_titles(&c), ["fresh connection", "same connection"]);
    e
}

/// Case 3.
#[test]
fn invalid_json_gets_error_and_connection_stays_open() {
    let e = bad_frame_keeps_connection_open(
        br#"{"type":"store","id":3,"titolo":"x","contenuto":"#,
        ErrorCode::InvalidJson,
        None,
    );
    assert!(e.message.contains("not valid JSON"), "{e:?}");
}

/// Case 3, valid JSON that is not an object.
#[test]
fn json_that_is_not_an_object_gets_invalid_json() {
    let e = bad_frame_keeps_connection_open(b"[1,2,3]", ErrorCode::InvalidJson, None);
    assert!(e.message.contains("not an object"), "{e:?}");
}

/// Case 3, an empty frame.
#[test]
fn zero_length_frame_gets_invalid_json() {
    bad_frame_keeps_connection_open(b"", ErrorCode::InvalidJson, None);
}

/// Case 4: an otherwise valid store whose title is not UTF-8.
#[test]
fn invalid_utf8_gets_error_and_connection_stays_open() {
    let e = bad_frame_keeps_connection_open(
        b"{\"type\":\"store\",\"id\":4,\"titolo\":\"\xff\xfe\",\"contenuto\":\"x\"}",
        ErrorCode::InvalidUtf8,
        None,
    );
    assert!(e.message.contains("UTF-8"), "{e:?}");
}

/// Case 5.
#[test]
fn unknown_type_gets_error_with_its_id_and_connection_stays_open() {
    let e = bad_frame_keeps_connection_open(
        json!({"type": "rename", "id": 9}).to_string().as_bytes(),
        ErrorCode::UnknownType,
        Some(9),
    );
    assert!(e.message.contains("`rename`"), "{e:?}");
}

/// Case 5, a known type the balancer does not answer itself.
#[test]
fn status_request_to_the_balancer_gets_bad_request() {
    let e = bad_frame_keeps_connection_open(
        json!({"type": "status", "id": 3}).to_string().as_bytes(),
        ErrorCode::BadRequest,
        Some(3),
    );
    assert!(e.message.contains("storage servers"), "{e:?}");
}

/// Case 6: a store without `titolo`, then one without `contenuto`.
#[test]
fn document_missing_a_field_gets_bad_request_and_is_not_stored() {
    let c = Cluster::start(2, &[], &[]);
    let mut raw = Raw::connect(c.balancer.addr);
    for (id, request, missing) in [
        (
            11,
            json!({"type": "store", "id": 11, "contenuto": "no title"}),
            "titolo",
        ),
        (
            12,
            json!({"type": "store", "id": 12, "titolo": "no content"}),
            "contenuto",
        ),
    ] {
        raw.send_json(&request);
        let e = expect_error(raw.reply());
        assert_eq!((e.code, e.id), (ErrorCode::BadRequest, Some(id)), "{e:?}");
        assert!(
            e.message.contains(missing),
            "should name `{missing}`: {e:?}"
        );
    }
    store_and_check(&c, &mut raw, 13, "complete document");
    assert_serves(&c, "fresh connection");
    assert_eq!(
        stored_titles(&c),
        ["complete document", "fresh connection"],
        "the incomplete documents must not be stored"
    );
}

/// A title that tries to forge a record in the balancer's log.
const FORGED_RECORD: &str = "x\n[2000-01-01T00:00:00.000Z ERROR lbft::balancer] forged record";

/// Case 7: titles that try to escape the folder, hide NULs, or are huge.
#[test]
fn hostile_titles_are_stored_inside_the_server_folder() {
    let c = Cluster::start(2, &[], &[]);
    let long_x = "x".repeat(10_000);
    let long_mixed = "Città/../".repeat(1_100); // ~11 KB, separators and accents
    let titles: Vec<String> = [
        "../../etc/x",
        "a/b",
        "nul\0byte",
        "/etc/passwd",
        "..",
        "",
        ".hidden",
        "a\\..\\..\\b",
        "line\nbreak",
        FORGED_RECORD,
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([long_x, long_mixed])
    .collect();

    let mut raw = Raw::connect(c.balancer.addr);
    for (i, title) in titles.iter().enumerate() {
        let s = store_and_check(&c, &mut raw, i as u64 + 1, title);
        let name = &s.file;
        assert!(
            !name.contains('/') && !name.contains('\\') && !name.contains('\0'),
            "{name:?} for {title:?}"
        );
        assert!(!name.contains(".."), "{name:?} for {title:?}");
        assert!(!name.starts_with('.'), "{name:?} for {title:?}");
        let title_part = name
            .strip_prefix(&format!("{}_", s.request_number))
            .and_then(|n| n.strip_suffix(".json"))
            .unwrap_or_else(|| panic!("{name:?} is not NUMBER_TITLE.json"));
        assert!(!title_part.is_empty(), "{name:?}");
        assert!(
            title_part.chars().count() <= 100,
            "unbounded file name ({} chars) for a {}-byte title",
            title_part.chars().count(),
            title.len()
        );
    }

    // Every file under the work folder is the log, the balancer's state
    // file (with its WAL), the cluster key or a stored document that is a
    // direct child of a server folder.
    let root = c.dir.path();
    let mut json_files = 0;
    for path in all_files(root) {
        let state = path.parent() == Some(root)
            && path
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("balancer.db");
        if path == root.join("loadbalancer.log") || path == default_key(root) || state {
            continue;
        }
        let parent = path.parent().unwrap();
        assert!(
            c.server_dirs.iter().any(|d| d == parent),
            "{} is outside the server folders",
            path.display()
        );
        let name = path.file_name().unwrap().to_string_lossy();
        assert!(
            name.ends_with(".json") && !name.starts_with('.'),
            "unexpected file {}",
            path.display()
        );
        json_files += 1;
    }
    assert_eq!(json_files, titles.len());
    let mut expected = titles.clone();
    expected.sort();
    assert_eq!(
        stored_titles(&c),
        expected,
        "titles must be stored unchanged"
    );

    // The balancer logs titles; a newline in one must not start a line that
    // looks like a record of its own.
    let log = c.log();
    assert!(log.contains("forged record"), "title not logged:\n{log}");
    assert!(
        !log.lines().any(|l| l.starts_with("[2000-01-01")),
        "a title forged a log record:\n{log}"
    );

    assert_serves(&c, "after hostile titles");
}

/// Case 8: a client that stops in the middle of a frame gets `timeout` and
/// is closed, while other clients are served meanwhile. An idle client (no
/// byte of a frame) is just closed.
#[test]
fn stalled_client_gets_timeout_while_others_are_served() {
    let c = Cluster::start(1, &[], &["--client-timeout", "500ms"]);
    // Wait until the server is up, so that the store below is quick.
    assert_serves(&c, "warm up");

    let mut stalled_payload = Raw::connect(c.balancer.addr);
    let mut stalled_header = Raw::connect(c.balancer.addr);
    let mut idle = Raw::connect(c.balancer.addr);
    stalled_payload.send_bytes(&200u32.to_be_bytes());
    stalled_payload.send_bytes(&store_payload(1, "stalled", "never complete")[..20]);
    stalled_header.send_bytes(&[0, 0, 1]);
    let stall_started = Instant::now();

    // Another client is served while the stallers are still connected.
    let mut other = Raw::connect(c.balancer.addr);
    store_and_check(&c, &mut other, 7, "served during a stall");
    for (what, raw) in [
        ("stalled mid-payload", &mut stalled_payload),
        ("stalled mid-header", &mut stalled_header),
    ] {
        raw.stream.set_nonblocking(true).unwrap();
        let mut byte = [0u8; 1];
        match raw.stream.peek(&mut byte) {
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            other => panic!(
                "{what}: should still be connected with nothing to read {:?} after the stall, got {other:?}",
                stall_started.elapsed()
            ),
        }
        raw.stream.set_nonblocking(false).unwrap();
    }

    for (what, raw) in [
        ("stalled mid-payload", &mut stalled_payload),
        ("stalled mid-header", &mut stalled_header),
    ] {
        let e = expect_error(raw.reply());
        assert_eq!((e.code, e.id), (ErrorCode::Timeout, None), "{what}: {e:?}");
        assert!(e.message.contains("stalled"), "{what}: {e:?}");
        assert!(
            stall_started.elapsed() >= Duration::from_millis(450),
            "{what}: timed out after only {:?}",
            stall_started.elapsed()
        );
        assert_closed(raw, what);
    }
    assert_closed(&mut idle, "idle client");

    assert_serves(&c, "after the stall");
    assert_eq!(
        stored_titles(&c),
        ["after the stall", "served during a stall", "warm up"]
    );
}

/// Case 9: clients that vanish in the middle of a frame (inside the header
/// or inside the payload) do not disturb the balancer.
#[test]
fn client_disconnecting_mid_frame_does_not_disturb_the_balancer() {
    let c = Cluster::start(2, &[], &[]);
    let full = framed(&store_payload(1, "vanished", "never complete"));
    for round in 0..10 {
        for cut in [1, 3, 4, 10, full.len() - 1] {
            let mut raw = Raw::connect(c.balancer.addr);
            raw.send_bytes(&full[..cut]);
            drop(raw);
        }
        // Interleave: a client in the middle of all this is served.
        if round % 5 == 4 {
            assert_serves(&c, &format!("served in round {round}"));
        }
    }
    assert_serves(&c, "after vanished clients");
    assert_eq!(
        stored_titles(&c),
        [
            "after vanished clients",
            "served in round 4",
            "served in round 9"
        ]
    );
}

/// Case 10: with every server down a document gets `no_server` after the
/// queue timeout, the client binary exits non-zero, and the balancer serves
/// again once a server is back.
#[test]
fn all_servers_down_gives_no_server_and_the_client_fails() {
    let mut c = Cluster::start(2, &[], &["--queue-timeout", "1s"]);
    assert_serves(&c, "before the outage");
    for s in &mut c.servers {
        s.stop();
    }

    let mut raw = Raw::connect(c.balancer.addr);
    raw.store(77, "nobody home", "content");
    let e = expect_error(raw.reply());
    assert_eq!((e.code, e.id), (ErrorCode::NoServer, Some(77)), "{e:?}");
    assert!(e.message.contains("no server available"), "{e:?}");

    let doc = c.dir.path().join("doc.json");
    std::fs::write(
        &doc,
        json!({"titolo": "via the client", "contenuto": "abc"}).to_string(),
    )
    .unwrap();
    let balancer = c.balancer.addr.to_string();
    let out = run_client(&[
        "--balancer",
        &balancer,
        "--timeout",
        "20s",
        "send",
        doc.to_str().unwrap(),
    ]);
    let stdout = text(&out.stdout);
    assert!(!out.status.success(), "client succeeded: {stdout}");
    assert!(
        stdout.contains("no_server"),
        "stdout: {stdout}\nstderr: {}",
        text(&out.stderr)
    );
    assert_eq!(stored_titles(&c), ["before the outage"]);

    // A server comes back on its old address: the balancer finds it.
    let addr = c.servers[0].addr;
    let args = strings(&[
        "--listen",
        &addr.to_string(),
        "--dir",
        c.server_dirs[0].to_str().unwrap(),
    ]);
    c.servers[0] = start(server_bin(), &args, c.dir.path());
    let mut raw = Raw::connect(c.balancer.addr);
    let mut stored = None;
    for id in 100..110 {
        raw.store(id, "after recovery", "content");
        match raw.reply() {
            Reply::Stored(s) => {
                assert_eq!(s.id, id);
                stored = Some(s);
                break;
            }
            // The balancer may not have probed the server yet.
            Reply::Error(e) if e.code == ErrorCode::NoServer => continue,
            other => panic!("unexpected reply {other:?}"),
        }
    }
    let s = stored.expect("the balancer never used the restarted server");
    assert_eq!(s.server, addr.to_string());
    assert_eq!(on_disk(&c, &s)["titolo"], "after recovery");
}

/// Case 11: the client refuses an empty documents folder (or one with no
/// `.json` file) with a clear message, and sends nothing.
#[test]
fn client_with_no_documents_fails_clearly() {
    let c = Cluster::start(1, &[], &[]);
    let balancer = c.balancer.addr.to_string();
    let empty = c.dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let no_json = c.dir.path().join("no_json");
    std::fs::create_dir_all(no_json.join("folder.json")).unwrap();
    std::fs::write(no_json.join("notes.txt"), "not a document").unwrap();

    for dir in [&empty, &no_json] {
        let out = run_client(&[
            "--balancer",
            &balancer,
            "--documents",
            dir.to_str().unwrap(),
            "ftp",
            "3",
        ]);
        let stderr = text(&out.stderr);
        assert!(
            !out.status.success(),
            "client succeeded for {}",
            dir.display()
        );
        assert!(
            stderr.contains("has no .json documents"),
            "stderr for {}: {stderr}",
            dir.display()
        );
    }
    assert!(stored_titles(&c).is_empty());

    // The same command works once a document is there.
    std::fs::write(
        no_json.join("doc.json"),
        json!({"titolo": "picked", "contenuto": "aaa"}).to_string(),
    )
    .unwrap();
    let out = run_client(&[
        "--balancer",
        &balancer,
        "--documents",
        no_json.to_str().unwrap(),
        "--timeout",
        "20s",
        "ftp",
        "3",
    ]);
    assert!(
        out.status.success(),
        "stdout: {}\nstderr: {}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert_eq!(stored_titles(&c), ["picked", "picked", "picked"]);
}

/// Case 12: straight to a storage server, no balancer.
#[test]
fn server_rejects_garbage_and_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let sdir = dir.path().join("server");
    let server = start_server(&sdir, &["--max-frame", "1KiB"]);
    let servers = [(server.addr, sdir.as_path())];

    let mut raw = Raw::connect_to_server(server.addr, &sdir);
    let garbage: [(&[u8], ErrorCode, Option<u64>); 5] = [
        (b"{not json", ErrorCode::InvalidJson, None),
        (b"\xff\xfe\xfd", ErrorCode::InvalidUtf8, None),
        (
            br#"{"type":"rename","id":9}"#,
            ErrorCode::UnknownType,
            Some(9),
        ),
        (
            br#"{"type":"store","id":10,"titolo":"t"}"#,
            ErrorCode::BadRequest,
            Some(10),
        ),
        (br#"{"id":11}"#, ErrorCode::BadRequest, Some(11)),
    ];
    for (payload, code, id) in garbage {
        raw.send_frame(payload);
        let e = expect_error(raw.reply());
        assert_eq!((e.code, e.id), (code, id), "for {:?}: {e:?}", text(payload));
    }

    // A valid store without `numero_richiesta` on the same connection.
    raw.store(12, "direct", "banana");
    let s = expect_stored(raw.reply());
    assert_eq!((s.id, s.a_count), (12, 3), "{s:?}");
    let v = stored_json(&servers, &s);
    assert_eq!(v["titolo"], "direct");
    assert_eq!(v["numero_richiesta"], s.request_number);

    // An oversized length prefix closes that connection only.
    let mut big = Raw::connect(server.addr);
    big.send_bytes(&4096u32.to_be_bytes());
    let e = expect_error(big.reply());
    assert_eq!((e.code, e.id), (ErrorCode::FrameTooLarge, None), "{e:?}");
    assert_closed(&mut big, "server after an oversized frame");

    // So does a truncated frame.
    let mut cut = Raw::connect(server.addr);
    cut.send_bytes(&framed(&store_payload(1, "cut", "x"))[..12]);
    cut.stream.shutdown(Shutdown::Write).unwrap();
    assert_closed(&mut cut, "server after a truncated frame");

    // The first connection and a fresh one still work.
    raw.store(13, "same connection", "x");
    let s = expect_stored(raw.reply());
    assert_eq!(stored_json(&servers, &s)["titolo"], "same connection");
    let mut fresh = Raw::connect_to_server(server.addr, &sdir);
    fresh.store(14, "fresh connection", "x");
    let s = expect_stored(fresh.reply());
    assert_eq!(stored_json(&servers, &s)["titolo"], "fresh connection");

    let mut titles: Vec<String> = stored_files(&sdir)
        .into_iter()
        .map(|(_, v)| v["titolo"].as_str().unwrap().to_string())
        .collect();
    titles.sort();
    assert_eq!(titles, ["direct", "fresh connection", "same connection"]);
}

// ------------------------------------------- limits at the edges

/// Frames of nested objects at serde_json's recursion limit (128 levels).
fn nested_payloads() -> Vec<(&'static str, String)> {
    vec![
        ("nested objects", "{\"a\":".repeat(200)),
        ("nested arrays", "[".repeat(200)),
        (
            "nested title",
            format!(
                "{{\"type\":\"store\",\"id\":1,\"titolo\":{}1{},\"contenuto\":\"x\"}}",
                "{\"a\":".repeat(126),
                "}".repeat(126)
            ),
        ),
    ]
}

/// Deeply nested JSON, a few hundred bytes, must get `invalid_json` (or
/// `bad_request`), never kill the process. The server survives it.
#[test]
fn deeply_nested_json_does_not_crash_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let sdir = dir.path().join("server");
    let server = start_server(&sdir, &[]);
    let mut raw = Raw::connect_to_server(server.addr, &sdir);
    for (what, payload) in nested_payloads() {
        raw.send_frame(payload.as_bytes());
        let e = expect_error(raw.reply());
        assert!(
            matches!(e.code, ErrorCode::InvalidJson | ErrorCode::BadRequest),
            "{what}: {e:?}"
        );
    }
    raw.store(2, "after nesting", "x");
    let s = expect_stored(raw.reply());
    assert_eq!(
        stored_json(&[(server.addr, sdir.as_path())], &s)["titolo"],
        "after nesting"
    );
}

/// The same frames sent to the balancer.
#[test]
fn deeply_nested_json_does_not_crash_the_balancer() {
    let c = Cluster::start(1, &[], &[]);
    for (what, payload) in nested_payloads() {
        let mut raw = Raw::connect(c.balancer.addr);
        raw.send_frame(payload.as_bytes());
        let e = expect_error(
            raw.try_reply()
                .unwrap_or_else(|| panic!("{what}: balancer closed the connection (crashed?)")),
        );
        assert!(
            matches!(e.code, ErrorCode::InvalidJson | ErrorCode::BadRequest),
            "{what}: {e:?}"
        );
        store_and_check(&c, &mut raw, 2, &format!("after {what}"));
    }
    assert_serves(&c, "after nesting");
}

/// A title of letters outside the Basic Multilingual Plane (4 bytes each in
/// UTF-8) must still get a file name the file system accepts (255 bytes).
#[test]
fn title_of_four_byte_letters_is_stored() {
    let c = Cluster::start(2, &[], &[]);
    let mut raw = Raw::connect(c.balancer.addr);
    for (id, title) in [(1, "𝐀".repeat(100)), (2, "𠀀".repeat(100))] {
        let s = store_and_check(&c, &mut raw, id, &title);
        assert!(s.file.len() <= 255, "{} bytes: {}", s.file.len(), s.file);
    }
    assert_serves(&c, "after long titles");
}

/// `balancer --local-servers 1 --max-frame 1KiB`: a store frame within the
/// limit the balancer advertises (and accepts) must be stored, not refused by
/// the balancer's own server because forwarding made the frame larger.
#[test]
fn frame_at_the_limit_is_stored_by_servers_with_the_same_limit() {
    let dir = tempfile::tempdir().unwrap();
    let storage = dir.path().join("json_files");
    let storage_arg = storage.display().to_string();
    let balancer = start_balancer(
        dir.path(),
        &["127.0.0.1:1".parse().unwrap()], // ignored with --local-servers
        &[
            "--local-servers",
            "1",
            "--local-base-port",
            "0",
            "--storage-dir",
            &storage_arg,
            "--max-frame",
            "1KiB",
        ],
    );
    let base = store_payload(5, "at the limit", "").len();
    let payload = store_payload(5, "at the limit", &"b".repeat(1024 - base));
    assert_eq!(payload.len(), 1024);
    let mut raw = Raw::connect(balancer.addr);
    raw.send_frame(&payload);
    let s = expect_stored(raw.reply());
    assert_eq!(s.id, 5);
    let files: Vec<_> = all_files(&storage)
        .into_iter()
        .filter(|p| p.file_name().unwrap().to_string_lossy() == s.file)
        .collect();
    assert_eq!(files.len(), 1, "{} not on disk", s.file);
}
