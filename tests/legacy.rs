//! The original system's wire format, spoken by our balancer and server:
//! raw sockets sending exactly the bytes the Python programs send, and a
//! Python script that plays those programs.

mod util;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use util::*;

/// What the original client sends for one document, as Python's json.dumps
/// writes it: `", "` and `": "` separators, non-ASCII as `\uXXXX`.
fn python_dumps(title: &str, content: &str, number: Option<u64>) -> String {
    let out = Command::new("python3")
        .arg("-c")
        .arg(
            "import json,sys\n\
             d={'titolo': sys.argv[1], 'contenuto': sys.argv[2], 'request_type': 'file_di_testo'}\n\
             if sys.argv[3]: d['numero_richiesta'] = int(sys.argv[3])\n\
             sys.stdout.write(json.dumps(d))",
        )
        .args([
            title,
            content,
            &number.map(|n| n.to_string()).unwrap_or_default(),
        ])
        .output()
        .expect("python3 runs");
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn python_dumps_bytes_are_what_we_expect() {
    let text = python_dumps("Città", "è \"x\"", Some(4));
    assert_eq!(
        text,
        r#"{"titolo": "Citt\u00e0", "contenuto": "\u00e8 \"x\"", "request_type": "file_di_testo", "numero_richiesta": 4}"#
    );
}

#[test]
fn server_answers_the_original_probe_with_one_byte_and_stores_documents() {
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("store");
    let server = start_server(&dir, &[]);

    let mut probe = TcpStream::connect(server.addr).unwrap();
    probe.set_read_timeout(Some(REPLY_TIMEOUT)).unwrap();
    probe
        .write_all(br#"{"request_type": "richiesta_status"}"#)
        .unwrap();
    let mut byte = [0xFFu8; 2];
    assert_eq!(probe.read(&mut byte).unwrap(), 1);
    assert_eq!(byte[0], 0x00);

    // Two documents in one write, one over 4 KiB, then a probe on the same
    // connection: its byte comes back only after both are stored.
    let long = "àèìòù a ".repeat(700);
    let mut conn = TcpStream::connect(server.addr).unwrap();
    conn.set_read_timeout(Some(REPLY_TIMEOUT)).unwrap();
    let bytes = format!(
        "{}{}{}",
        python_dumps("Città", "aaa", Some(7)),
        python_dumps("../lungo", &long, Some(8)),
        r#"{"request_type": "richiesta_status"}"#
    );
    conn.write_all(bytes.as_bytes()).unwrap();
    let mut byte = [0u8; 1];
    conn.read_exact(&mut byte).unwrap();

    let files = stored_files(&dir);
    let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["7_Città.json", "8_lungo.json"]);
    assert_eq!(files[0].1["a_count"], 3);
    assert_eq!(files[1].1["contenuto"], long.as_str());
    assert_eq!(files[1].1["titolo"], "../lungo");
}

#[test]
fn balancer_takes_documents_from_an_original_client() {
    let cluster = Cluster::start(3, &[], &[]);
    let long = "Lunghissimo à ".repeat(400);
    let docs: Vec<(String, String)> = (0..6)
        .map(|i| {
            (
                format!("Titolo {i} è"),
                if i == 2 {
                    long.clone()
                } else {
                    format!("contenuto {i} àa")
                },
            )
        })
        .collect();
    let mut stream = TcpStream::connect(cluster.balancer.addr).unwrap();
    let payload: String = docs.iter().map(|(t, c)| python_dumps(t, c, None)).collect();
    // All documents in one write: the balancer must split the stream itself.
    stream.write_all(payload.as_bytes()).unwrap();
    drop(stream);

    let total = || {
        cluster
            .server_dirs
            .iter()
            .map(|d| stored_files(d).len())
            .sum::<usize>()
    };
    assert!(eventually(|| total() == 6), "stored {} of 6", total());
    let mut counts: Vec<usize> = cluster
        .server_dirs
        .iter()
        .map(|d| stored_files(d).len())
        .collect();
    counts.sort();
    assert_eq!(counts, [2, 2, 2]);
    let mut contents: Vec<String> = cluster
        .server_dirs
        .iter()
        .flat_map(|d| stored_files(d))
        .map(|(_, v)| v["contenuto"].as_str().unwrap().to_string())
        .collect();
    contents.sort();
    let mut expected: Vec<String> = docs.into_iter().map(|(_, c)| c).collect();
    expected.sort();
    assert_eq!(contents, expected);
}

#[test]
fn broken_original_stream_is_dropped_and_the_balancer_goes_on() {
    let cluster = Cluster::start(1, &[], &[]);
    let mut bad = TcpStream::connect(cluster.balancer.addr).unwrap();
    bad.set_read_timeout(Some(REPLY_TIMEOUT)).unwrap();
    bad.write_all(b"{\"titolo\": \"x\", oops}").unwrap();
    let mut buf = [0u8; 16];
    // The balancer closes the connection: the stream cannot be resynchronised.
    assert_eq!(bad.read(&mut buf).unwrap(), 0);

    let mut good = Raw::connect(cluster.balancer.addr);
    good.store(1, "dopo", "ancora qui");
    assert!(matches!(good.reply(), lbft::proto::Reply::Stored(_)));
    assert!(cluster
        .log()
        .contains("invalid JSON in original-format stream"));
}

#[test]
fn python_plays_the_original_programs() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/legacy_peers.py");
    let out = Command::new("python3")
        .args([script, server_bin(), balancer_bin(), client_bin()])
        .output()
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(" passed, 0 failed"), "{stdout}");
}
