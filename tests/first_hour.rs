//! What a new user tries in the first hour, against the real binaries:
//! host names for addresses, a missing balancer, the prompt, long batches,
//! Ctrl-C, every server down, documents that are not right, a quiet log,
//! and documentation that matches the programs.

mod util;
use util::*;

use lbft::proto::{ErrorCode, Reply};
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output, Stdio};

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs the client with `--balancer BALANCER --documents DOCS ARGS`, feeding
/// it `input`.
fn client(balancer: &str, docs: &Path, args: &[&str], input: &str) -> Output {
    let mut child = Command::new(client_bin())
        .args(["--balancer", balancer, "--timeout", "20s", "--documents"])
        .arg(docs)
        .args(args)
        .current_dir(docs)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the client runs");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input.as_bytes()).unwrap();
    drop(stdin);
    child.wait_with_output().unwrap()
}

/// An address nobody listens on: bound, then released.
fn nobody() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

#[test]
fn host_names_are_accepted_wherever_an_address_is_taken() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(
        server_bin(),
        &strings(&["--listen", "localhost:0", "--dir", "store"]),
        dir.path(),
    );
    let servers = format!("localhost:{}", server.addr.port());
    let args = [
        "--listen",
        "localhost:0",
        "--metrics",
        "localhost:0",
        "--check-interval",
        "100ms",
        "--servers",
        &servers,
    ];
    let balancer = start(balancer_bin(), &strings(&args), dir.path());
    assert!(
        balancer
            .banner
            .iter()
            .any(|l| l.starts_with("metrics listening on ")),
        "{:?}",
        balancer.banner
    );
    let docs = sample_documents();
    let at = format!("localhost:{}", balancer.addr.port());
    let out = client(&at, docs.path(), &["ftp", "3"], "");
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.contains("3 documents: 3 stored, 0 failed"),
        "{stdout}"
    );
}

#[test]
fn an_address_without_a_port_is_refused_clearly() {
    let docs = sample_documents();
    let out = client("localhost", docs.path(), &["ftp", "1"], "");
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("HOST:PORT"), "{stderr}");
}

#[test]
fn without_a_balancer_the_client_says_how_to_start_one() {
    let docs = sample_documents();
    let out = client(&nobody().to_string(), docs.path(), &["ftp", "3"], "");
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("no balancer answers at"), "{stderr}");
    assert!(stderr.contains("--local-servers"), "{stderr}");
    let stdout = text(&out.stdout);
    assert!(!stdout.contains("sending"), "{stdout}");
}

#[test]
fn a_count_below_one_is_explained() {
    let docs = sample_documents();
    let out = client(&nobody().to_string(), docs.path(), &["ftp", "0"], "");
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("a count must be at least 1"), "{stderr}");
    assert!(!stderr.contains("18446744073709551615"), "{stderr}");
}

#[test]
fn unknown_type_lists_only_what_the_balancer_accepts() {
    let cluster = Cluster::start(1, &[], &[]);
    let mut raw = Raw::connect(cluster.balancer.addr);
    raw.send_json(&serde_json::json!({"type": "nope", "id": 7}));
    let Reply::Error(e) = raw.reply() else {
        panic!("expected an error")
    };
    assert_eq!((e.code, e.id), (ErrorCode::UnknownType, Some(7)));
    assert!(e.message.contains("store, calc, servers"), "{}", e.message);
    assert!(!e.message.contains("status"), "{}", e.message);
    assert!(!e.message.contains("forget"), "{}", e.message);
}

#[test]
fn the_prompt_takes_a_count_on_the_line_and_asks_again_for_a_bad_one() {
    let cluster = Cluster::start(2, &[], &[]);
    let docs = sample_documents();
    let input = "ftp 1\ncalc zero\n0\n3\nFTP\n2\nexit\n";
    let out = client(&cluster.balancer.addr.to_string(), docs.path(), &[], input);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(stdout.contains("documents available in "), "{stdout}");
    assert!(stdout.contains("sending 1 document to"), "{stdout}");
    assert!(
        stdout.contains("1 document: 1 stored, 0 failed"),
        "{stdout}"
    );
    assert!(stdout.contains("`zero` is not a count"), "{stdout}");
    assert!(stdout.contains("a count must be at least 1"), "{stdout}");
    assert!(
        stdout.contains("3 requests: 3 computed, 0 failed"),
        "{stdout}"
    );
    assert!(
        stdout.contains("2 documents: 2 stored, 0 failed"),
        "{stdout}"
    );
    assert!(stdout.trim_end().ends_with("bye"), "{stdout}");
}

#[test]
fn a_long_batch_prints_progress_not_a_line_per_document() {
    let cluster = Cluster::start(2, &[], &[]);
    let docs = sample_documents();
    let addr = cluster.balancer.addr.to_string();
    let out = client(&addr, docs.path(), &["ftp", "300"], "");
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.contains("300 documents: 300 stored, 0 failed"),
        "{stdout}"
    );
    let progress = stdout.lines().filter(|l| l.starts_with("  ...   ")).count();
    assert_eq!(progress, 10, "{stdout}");
    assert!(stdout.contains("  ...   300/300 (100%)"), "{stdout}");
    assert!(stdout.lines().count() < 20, "{stdout}");
}

#[test]
fn ctrl_c_prints_the_summary_so_far_and_exits_130() {
    // Slow servers, so that requests are in flight when the signal comes.
    let cluster = Cluster::start(2, &["--char-delay-ms", "5"], &[]);
    let docs = sample_documents();
    let mut child = Command::new(client_bin())
        .arg("--balancer")
        .arg(cluster.balancer.addr.to_string())
        .arg("--documents")
        .arg(docs.path())
        .args(["ftp", "100000"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(child.stdout.take().unwrap()));
    let first = lines.next().unwrap().unwrap();
    assert!(first.starts_with("sending 100000 documents"), "{first}");
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let rest: Vec<String> = lines.map(Result::unwrap).collect();
    let code = child.wait().unwrap().code();
    let rest = rest.join("\n");
    assert_eq!(code, Some(130), "{rest}");
    assert!(rest.contains("interrupted after "), "{rest}");
    assert!(rest.contains(" of 100000 documents: "), "{rest}");
    assert!(rest.contains("in flight (may still be stored)"), "{rest}");
    assert!(rest.contains("never sent"), "{rest}");
}

#[test]
fn when_every_server_is_down_the_client_says_it_is_waiting() {
    let dir = tempfile::tempdir().unwrap();
    let balancer = start_balancer(dir.path(), &[nobody()], &["--queue-timeout", "4s"]);
    let docs = sample_documents();
    let out = client(&balancer.addr.to_string(), docs.path(), &["ftp", "1"], "");
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert_eq!(
        stdout.matches("waiting: every server is down (").count(),
        1,
        "{stdout}"
    );
    assert!(stdout.contains("no_server"), "{stdout}");
}

#[test]
fn documents_given_by_the_user_are_checked_and_the_good_ones_sent() {
    let cluster = Cluster::start(1, &[], &[]);
    let docs = sample_documents();
    let dir = docs.path();
    std::fs::write(
        dir.join("bom.json"),
        b"\xEF\xBB\xBF{\"titolo\": \"bom\", \"contenuto\": \"x\"}",
    )
    .unwrap();
    // Meant as a document, with a mistake: reported, not sent (as is any
    // .json file that is not a document; `send --file` sends it as a file).
    std::fs::write(dir.join("array.json"), r#"{"titolo": 5, "contenuto": "x"}"#).unwrap();
    let big = format!(
        r#"{{"titolo": "big", "contenuto": "{}"}}"#,
        "a".repeat(2048)
    );
    std::fs::write(dir.join("big.json"), big).unwrap();
    let args = [
        "--max-frame",
        "1KiB",
        "send",
        "sample.json",
        "array.json",
        "bom.json",
        "big.json",
    ];
    let out = client(&cluster.balancer.addr.to_string(), dir, &args, "");
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let line = |n: &str| {
        stdout
            .lines()
            .find(|l| l.contains(n))
            .unwrap_or_else(|| panic!("no line for {n}: {stdout}"))
    };
    assert!(
        line("[2/4]").contains("not a document: expected an object with titolo and contenuto"),
        "{stdout}"
    );
    assert!(line("[3/4]").starts_with("  ok "), "{stdout}");
    let big = line("[4/4]");
    assert!(big.contains("too large") && big.contains("1.0K"), "{big}");
    assert!(
        stdout.contains("4 documents: 2 stored, 0 failed, 2 not sent"),
        "{stdout}"
    );
    assert!(
        stdout.contains("2 documents not sent (reasons above); the other 2 were sent"),
        "{stdout}"
    );
}

#[test]
fn ftp_leaves_out_files_that_are_not_documents_and_names_them() {
    let cluster = Cluster::start(1, &[], &[]);
    let docs = sample_documents();
    std::fs::write(docs.path().join("broken.json"), "{").unwrap();
    let out = client(
        &cluster.balancer.addr.to_string(),
        docs.path(),
        &["ftp", "2"],
        "",
    );
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(stdout.contains("leaving out 1 file of "), "{stdout}");
    assert!(stdout.contains("broken.json is not a document"), "{stdout}");
    assert!(
        stdout.contains("picking from the other 1 document"),
        "{stdout}"
    );
    assert!(
        stdout.contains("2 documents: 2 stored, 0 failed"),
        "{stdout}"
    );
}

#[test]
fn status_queries_stay_out_of_the_log() {
    let cluster = Cluster::start(1, &[], &[]);
    let docs = sample_documents();
    let addr = cluster.balancer.addr.to_string();
    for _ in 0..3 {
        let out = client(
            &addr,
            docs.path(),
            &["status", "--history", "history.log"],
            "",
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    let out = client(&addr, docs.path(), &["ftp", "1"], "");
    assert!(out.status.success(), "{}", text(&out.stdout));
    // The connection's closing line comes after the client has its reply.
    assert!(eventually(|| cluster.log().contains("closed (1 requests")));
    let log = cluster.log();
    assert_eq!(log.matches("closed (").count(), 1, "{log}");
    assert!(!log.contains("connection accepted"), "{log}");
}

#[test]
fn the_readme_and_the_help_match_the_programs() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let help = |bin: &str| {
        let out = Command::new(bin).arg("--help").output().unwrap();
        text(&out.stdout)
    };
    for (bin, name) in [(balancer_bin(), "balancer"), (server_bin(), "server")] {
        for option in help(bin)
            .split_whitespace()
            .filter(|w| w.starts_with("--") && w.len() > 2)
            .map(|w| w.trim_end_matches([',', '.', ')']))
            .filter(|w| !matches!(*w, "--help" | "--version"))
        {
            assert!(
                readme.contains(&format!("`{option}")),
                "README does not document {name} {option}"
            );
        }
    }
    let client_help = help(client_bin());
    for command in ["FTP", "CALC", "help", "exit"] {
        assert!(client_help.contains(command), "{client_help}");
    }
    // The client's options, and those of each of its commands.
    for command in [
        "",
        "ftp",
        "send",
        "list",
        "get",
        "delete",
        "calc",
        "status",
        "admin",
        "transfers",
    ] {
        let out = Command::new(client_bin())
            .args([command, "--help"].iter().filter(|a| !a.is_empty()))
            .output()
            .unwrap();
        for option in text(&out.stdout)
            .split_whitespace()
            .filter(|w| w.starts_with("--") && w.len() > 2)
            .map(|w| w.trim_end_matches(|c: char| !(c.is_ascii_alphanumeric() || c == '-')))
        {
            assert!(
                readme.contains(&format!("`{option}")),
                "README does not document client {command} {option}"
            );
        }
    }
    // Every command shown works as written from a fresh clone.
    for line in readme.lines() {
        let line = line.trim_start_matches("$ ");
        assert!(
            !line.starts_with("target/release/") && !line.starts_with("./target/"),
            "{line}"
        );
    }
}
