//! What the system shows about itself, against real processes: metrics for
//! file transfers and their failures, the client's output in a pipe and at
//! its prompt, the same words for a missing balancer in every command, and
//! no files left where nobody asked for them.

mod util;

use lbft::proto::Reply;
use serde_json::json;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;
use util::{
    balancer_bin, client_bin, metrics_addr, run_client, sample_documents, signal, start, strings,
    Cluster, Raw, REPLY_TIMEOUT,
};

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The samples of a scrape of `GET /metrics`, `name{labels}` to value.
fn scrape(addr: SocketAddr) -> BTreeMap<String, f64> {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(REPLY_TIMEOUT)).unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (_, body) = response.split_once("\r\n\r\n").expect("HTTP head and body");
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (key, value) = l.rsplit_once(' ').unwrap();
            (key.to_string(), value.parse().unwrap())
        })
        .collect()
}

/// `name{server="ADDR",kind="KIND"}` of a scrape (0 when absent).
fn per_server(s: &BTreeMap<String, f64>, name: &str, server: SocketAddr, kind: &str) -> f64 {
    let key = format!("{name}{{server=\"{server}\",kind=\"{kind}\"}}");
    s.get(&key).copied().unwrap_or(0.0)
}

/// The sum over every server of `name{...,kind="KIND"}`.
fn all_servers(s: &BTreeMap<String, f64>, name: &str, kind: &str) -> f64 {
    let end = format!(",kind=\"{kind}\"}}");
    s.iter()
        .filter(|(k, _)| k.starts_with(&format!("{name}{{")) && k.ends_with(&end))
        .map(|(_, v)| v)
        .sum()
}

fn upload_request(id: u64, upload_id: &str, size: u64) -> serde_json::Value {
    json!({"type": "upload", "id": id, "upload_id": upload_id, "name": "f.bin", "size": size})
}

fn chunk(raw: &mut Raw, id: u64, offset: u64, body: &[u8]) {
    raw.send_json(&json!({"type": "chunk", "id": id, "offset": offset, "body_len": body.len()}));
    raw.send_frame(body);
}

/// The server an `upload_ready` names, as one of the cluster's.
fn ready_server(reply: Reply, cluster: &Cluster) -> usize {
    let Reply::UploadReady(ready) = reply else {
        panic!("expected upload_ready, got {reply:?}")
    };
    cluster
        .servers
        .iter()
        .position(|s| s.addr.to_string() == ready.server)
        .unwrap_or_else(|| panic!("{} is not one of the cluster's", ready.server))
}

#[test]
fn metrics_count_file_bytes_both_ways_and_a_killed_uploads_failure() {
    let mut cluster = Cluster::start(2, &[], &["--metrics", "127.0.0.1:0"]);
    let metrics = metrics_addr(&cluster.balancer);
    let size: u64 = 3 * 1024 * 1024 + 5;
    let data: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();

    // A whole upload through the balancer.
    let mut raw = Raw::connect(cluster.balancer.addr);
    raw.send_json(&upload_request(1, "metrics-upload-1", size));
    let stored_on = ready_server(raw.reply(), &cluster);
    for (i, piece) in data.chunks(1024 * 1024).enumerate() {
        chunk(&mut raw, 1, i as u64 * 1024 * 1024, piece);
    }
    let sha = hex(&Sha256::digest(&data));
    raw.send_json(&json!({"type": "upload_end", "id": 2, "sha256": sha}));
    assert!(matches!(raw.reply(), Reply::FileStored(_)));

    // And back: a download, then one more request on the same connection,
    // answered once the download is over and counted.
    raw.send_json(&json!({"type": "get", "id": 3, "name": "f.bin", "offset": 0}));
    let Reply::File(header) = raw.reply() else {
        panic!("expected the file header")
    };
    assert_eq!(header.size, size);
    let mut got = 0;
    while got < size {
        let Reply::Chunk(c) = raw.reply() else {
            panic!("expected a chunk")
        };
        let body = lbft::proto::read_frame(&mut raw.stream, 2 << 20)
            .unwrap()
            .unwrap();
        assert_eq!(body.len() as u64, c.body_len);
        got += c.body_len;
    }
    raw.send_json(&json!({"type": "servers", "id": 4}));
    assert!(matches!(raw.reply(), Reply::Servers(_)));

    let s = scrape(metrics);
    let server = cluster.servers[stored_on].addr;
    let name = |n: &str, kind: &str| per_server(&s, n, server, kind);
    assert_eq!(name("lbft_server_requests_total", "upload"), 1.0, "{s:?}");
    assert_eq!(name("lbft_server_bytes_total", "upload"), size as f64);
    assert_eq!(name("lbft_server_requests_total", "download"), 1.0);
    assert_eq!(name("lbft_server_bytes_total", "download"), size as f64);
    assert_eq!(all_servers(&s, "lbft_server_failures_total", "upload"), 0.0);
    assert_eq!(
        all_servers(&s, "lbft_server_transfers_active", "upload"),
        0.0
    );
    assert_eq!(
        all_servers(&s, "lbft_server_transfers_active", "download"),
        0.0
    );
    assert_eq!(
        s["lbft_file_transfers_total{kind=\"upload\",result=\"done\"}"],
        1.0
    );
    assert_eq!(
        s["lbft_file_transfers_total{kind=\"download\",result=\"done\"}"],
        1.0
    );
    // The scrape's own connection is not a client's; the upload's is.
    assert_eq!(s["lbft_client_connections"], 1.0, "{s:?}");
    assert_eq!(s["lbft_registration_connections"], 0.0);
    drop(raw);

    // An upload whose server is killed in the middle: a failure of that
    // server's, and of the transfer.
    let mut raw = Raw::connect(cluster.balancer.addr);
    let big: u64 = 64 * 1024 * 1024;
    raw.send_json(&upload_request(1, "metrics-upload-2", big));
    let victim = ready_server(raw.reply(), &cluster);
    let piece = vec![7u8; 1024 * 1024];
    chunk(&mut raw, 1, 0, &piece);
    cluster.servers[victim].stop();
    // Chunks go on until the balancer says the server failed, or stops
    // reading and closes.
    let mut offset = piece.len() as u64;
    let mut answer = None;
    // Once the balancer has answered it reads no more; a write that finds
    // the socket's buffers full for a while ends the sending too.
    raw.stream
        .set_write_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    while offset < big {
        let header = json!({"type": "chunk", "id": 1, "offset": offset, "body_len": piece.len()});
        let frame = |payload: &[u8]| {
            let mut bytes = (payload.len() as u32).to_be_bytes().to_vec();
            bytes.extend_from_slice(payload);
            bytes
        };
        let mut bytes = frame(header.to_string().as_bytes());
        bytes.extend(frame(&piece));
        if raw.stream.write_all(&bytes).is_err() {
            break;
        }
        offset += piece.len() as u64;
    }
    if offset >= big {
        raw.send_json(&json!({"type": "upload_end", "id": 2, "sha256": "00"}));
    }
    // The balancer says so and closes; the close may come as a reset that
    // takes the answer with it. Either way the failure is counted by then.
    raw.stream.set_read_timeout(Some(REPLY_TIMEOUT)).unwrap();
    while let Ok(Some(payload)) = lbft::proto::read_frame(&mut raw.stream, 1 << 20) {
        if let Ok(Reply::Error(e)) = lbft::proto::decode::<Reply>(&payload) {
            answer = Some(e);
            break;
        }
    }
    if let Some(answer) = answer {
        assert_eq!(
            answer.code,
            lbft::proto::ErrorCode::ServerFailed,
            "{answer:?}"
        );
        assert!(!answer.message.contains("send again"), "{}", answer.message);
    }
    let s = scrape(metrics);
    let killed = cluster.servers[victim].addr;
    assert_eq!(
        per_server(&s, "lbft_server_failures_total", killed, "upload"),
        1.0,
        "{s:?}"
    );
    assert_eq!(
        s["lbft_file_transfers_total{kind=\"upload\",result=\"failed\"}"],
        1.0
    );
    assert_eq!(
        all_servers(&s, "lbft_server_transfers_active", "upload"),
        0.0
    );

    // The page at / points to the metrics.
    let mut stream = TcpStream::connect(metrics).unwrap();
    stream.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let mut page = String::new();
    stream.read_to_string(&mut page).unwrap();
    assert!(page.starts_with("HTTP/1.1 200 OK"), "{page}");
    assert!(page.contains("href=\"/metrics\""), "{page}");
}

#[test]
fn transfers_into_a_pipe_closed_early_ends_quietly() {
    let cluster = Cluster::start(1, &[], &[]);
    let docs = sample_documents();
    let addr = cluster.balancer.addr.to_string();
    let docs_dir = docs.path().display().to_string();
    let sent = run_client(
        cluster.balancer.addr,
        &["--documents", &docs_dir, "ftp", "400"],
        docs.path(),
    );
    assert!(sent.status.success(), "{}", text(&sent.stdout));
    // 400 lines of JSON are more than a pipe holds: the client is still
    // writing when `head` has its line and goes.
    let script = format!(
        "set -o pipefail; '{}' --balancer {addr} transfers --json --limit 1000 | head -1",
        client_bin()
    );
    let out = Command::new("bash").args(["-c", &script]).output().unwrap();
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status,
        text(&out.stderr)
    );
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(stdout.starts_with('{'), "{stdout}");
    assert_eq!(text(&out.stderr), "", "nothing said about the pipe");

    // A limit past what the balancer answers is refused, with the maximum.
    let out = run_client(
        cluster.balancer.addr,
        &["transfers", "--limit", "20000"],
        docs.path(),
    );
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("at most 10000"),
        "{}",
        text(&out.stderr)
    );
}

/// The client's prompt fed `input` on its standard input.
fn prompt(balancer: SocketAddr, docs: &Path, input: &str) -> Output {
    let mut child = Command::new(client_bin())
        .args(["--balancer", &balancer.to_string()])
        .arg("--documents")
        .arg(docs)
        .current_dir(docs)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn a_question_for_a_count_never_holds_the_user() {
    let cluster = Cluster::start(1, &[], &[]);
    let docs = sample_documents();
    let addr = cluster.balancer.addr;

    // `exit` answers the question by leaving.
    let out = prompt(addr, docs.path(), "FTP abc\nexit\n");
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("`abc` is not a count"), "{stdout}");
    assert!(stdout.trim_end().ends_with("bye"), "{stdout}");
    assert!(!stdout.contains("sending"), "{stdout}");

    // Another command starts: `ftp 0` says why not and asks its count,
    // `CALC 2` runs.
    let out = prompt(addr, docs.path(), "FTP abc\nftp 0\nCALC 2\nexit\n");
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("a count must be at least 1"), "{stdout}");
    assert!(
        stdout.contains("2 requests: 2 computed, 0 failed"),
        "{stdout}"
    );
    assert!(stdout.trim_end().ends_with("bye"), "{stdout}");

    // The end of input (Ctrl-D) leaves too.
    let out = prompt(addr, docs.path(), "FTP abc\n");
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.trim_end().ends_with("bye"), "{stdout}");
}

#[test]
fn a_missing_balancer_reads_the_same_in_every_command() {
    // A port nobody listens on: bound, then released.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let docs = sample_documents();
    let file = docs.path().join("plain.bin");
    std::fs::write(&file, b"not a document").unwrap();
    let file = file.display().to_string();
    let docs_dir = docs.path().display().to_string();
    let words = format!("no balancer answers at {addr} (Connection refused");
    for command in [
        vec!["list"],
        vec!["--documents", &docs_dir, "ftp", "1"],
        vec!["calc", "1"],
        vec!["status"],
        vec!["transfers"],
        vec!["get", "x.bin"],
        vec!["send", &file],
        vec!["admin", "servers"],
    ] {
        let out = run_client(addr, &command, docs.path());
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "{command:?}");
        assert!(stderr.contains(&words), "{command:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{command:?}: {stderr}");
    }
}

#[test]
fn status_leaves_the_folder_it_runs_in_as_it_was() {
    let cluster = Cluster::start(1, &[], &[]);
    let fresh = tempfile::tempdir().unwrap();
    let out = run_client(cluster.balancer.addr, &["status"], fresh.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("SERVER"),
        "{}",
        text(&out.stdout)
    );
    let left: Vec<_> = std::fs::read_dir(fresh.path()).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
}

/// A balancer with two in-process servers on free ports in `work`, and
/// those servers' addresses.
fn local_balancer(work: &Path) -> (util::Proc, Vec<String>) {
    let args = strings(&[
        "--listen",
        "127.0.0.1:0",
        "--check-interval",
        "100ms",
        "--local-servers",
        "2",
        "--local-base-port",
        "0",
    ]);
    let balancer = start(balancer_bin(), &args, work);
    let locals = balancer
        .banner
        .iter()
        .filter_map(|l| l.strip_prefix("storage server listening on "))
        .map(|l| l.split(',').next().unwrap().to_string())
        .collect();
    (balancer, locals)
}

#[test]
fn local_servers_on_free_ports_are_not_remembered_across_a_restart() {
    let work = tempfile::tempdir().unwrap();
    let (mut first, first_locals) = local_balancer(work.path());
    assert_eq!(first_locals.len(), 2, "{:?}", first.banner);
    signal(&first, "TERM");
    assert!(first.child.wait().unwrap().success());
    first.stop();

    let (second, second_locals) = local_balancer(work.path());
    let listed: Vec<String> = util::servers(second.addr)
        .into_iter()
        .map(|v| v.name)
        .collect();
    assert_eq!(listed, second_locals, "the first run had {first_locals:?}");
}

#[test]
fn the_example_dashboard_imports_and_shows_only_series_the_balancer_serves() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/grafana-dashboard.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).expect("valid JSON");
    assert_eq!(dashboard["__inputs"][0]["pluginId"], "prometheus");
    let served = lbft::balancer::stats::Stats::new(["s".to_string()]).render();
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10);
    for panel in panels {
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{}", panel["title"]);
        for target in targets {
            let expr = target["expr"].as_str().expect("an expression");
            let names = expr
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|word| word.starts_with("lbft_"));
            for name in names {
                assert!(
                    served.contains(&format!("\n{name}{{"))
                        || served.contains(&format!("\n{name} ")),
                    "{}: {name} is not served",
                    panel["title"]
                );
            }
        }
    }
}

#[test]
fn heartbeats_are_counted_apart_from_clients_and_logged_only_when_they_change_the_pool() {
    let cluster = Cluster::start(1, &[], &["--metrics", "127.0.0.1:0"]);
    // Started in the cluster's folder: it shares the cluster's key.
    let joining = util::start_server(&cluster.dir.path().join("joining"), &[]);
    // Register and repeat it as a server's heartbeats do, on one
    // connection that proved the cluster key.
    let key = util::default_key(cluster.dir.path());
    let mut beats = Raw::connect_proven(cluster.balancer.addr, &key);
    for id in 1..=5 {
        beats.send_json(&json!({"type": "register", "id": id, "addr": joining.addr.to_string()}));
        match beats.reply() {
            Reply::Membership { message, .. } => assert!(message.contains("pool"), "{message}"),
            other => panic!("expected the membership answer, got {other:?}"),
        }
    }
    let s = scrape(metrics_addr(&cluster.balancer));
    assert_eq!(s["lbft_registration_connections"], 1.0, "{s:?}");
    assert_eq!(s["lbft_client_connections"], 0.0, "{s:?}");

    let log = cluster.log();
    assert_eq!(log.matches("joined the pool").count(), 1, "{log}");
    assert!(!log.contains(" register "), "{log}");
}
