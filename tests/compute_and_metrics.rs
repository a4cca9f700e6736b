//! The compute service (`calc`) and the balancer's Prometheus endpoint.

mod util;

use lbft::proto::{ErrorCode, Operation, Reply};
use serde_json::json;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use util::*;

#[test]
fn calc_results_are_right_for_every_operation_and_spread_round_robin() {
    let cluster = Cluster::start(3, &[], &[]);
    let mut conn = Raw::connect(cluster.balancer.addr);
    let ops = ["somma", "sottrazione", "moltiplicazione", "divisione"];
    let mut id = 0;
    for _ in 0..3 {
        for op in ops {
            id += 1;
            conn.send_json(&json!({"type": "calc", "id": id, "operazione": op}));
        }
    }
    let mut per_server: BTreeMap<String, usize> = BTreeMap::new();
    let mut seen_ops = BTreeMap::new();
    for _ in 0..id {
        let Reply::Calc(c) = conn.reply() else {
            panic!("expected a calc reply")
        };
        assert!((1..=50).contains(&c.a) && (1..=50).contains(&c.b), "{c:?}");
        let (a, b) = (c.a as f64, c.b as f64);
        let expected = match c.operation {
            Operation::Somma => a + b,
            Operation::Sottrazione => a - b,
            Operation::Moltiplicazione => a * b,
            Operation::Divisione => a / b,
        };
        assert_eq!(c.result, expected, "{c:?}");
        // The operation echoed is the one asked for under that id.
        assert_eq!(c.operation.to_string(), ops[(c.id as usize - 1) % 4]);
        *seen_ops.entry(c.operation.to_string()).or_insert(0) += 1;
        *per_server.entry(c.server).or_default() += 1;
    }
    assert_eq!(seen_ops.len(), 4);
    assert_eq!(per_server.values().copied().collect::<Vec<_>>(), [4, 4, 4]);

    // An unknown operation is a clear error; the connection goes on.
    conn.send_json(&json!({"type": "calc", "id": 99, "operazione": "potenza"}));
    let Reply::Error(e) = conn.reply() else {
        panic!("expected an error")
    };
    assert_eq!((e.code, e.id), (ErrorCode::BadRequest, Some(99)));
    assert!(
        e.message.contains("potenza") && e.message.contains("divisione"),
        "{}",
        e.message
    );
    conn.send_json(&json!({"type": "calc", "id": 100, "operazione": "somma"}));
    assert!(matches!(conn.reply(), Reply::Calc(c) if c.id == 100));
}

#[test]
fn client_calc_prints_correct_results() {
    let cluster = Cluster::start(2, &[], &[]);
    let out = Command::new(client_bin())
        .args([
            "--balancer",
            &cluster.balancer.addr.to_string(),
            "calc",
            "12",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    let lines: Vec<&str> = stdout
        .lines()
        .filter(|l| l.trim_start().starts_with("ok"))
        .collect();
    assert_eq!(lines.len(), 12, "{stdout}");
    for line in lines {
        // "  ok    [ 1/12] 12 + 40 = 52 (somma) computed by server ADDR"
        let expr = line.split("] ").nth(1).unwrap();
        let words: Vec<&str> = expr.split_whitespace().collect();
        let (a, sym, b, result): (f64, &str, f64, f64) = (
            words[0].parse().unwrap(),
            words[1],
            words[2].parse().unwrap(),
            words[4].parse().unwrap(),
        );
        let expected = match sym {
            "+" => a + b,
            "-" => a - b,
            "×" => a * b,
            "÷" => a / b,
            other => panic!("unknown symbol {other} in {line}"),
        };
        // Shown rounded to 2 decimals (a half may go either way: 0.625
        // shows as 0.62).
        assert!((result - expected).abs() <= 0.005 + 1e-9, "{line}");
        assert!(line.contains("computed by server 127.0.0.1:"), "{line}");
    }
    assert!(
        stdout.contains("12 requests: 12 computed, 0 failed"),
        "{stdout}"
    );
}

fn http(addr: SocketAddr, request: &str) -> (String, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(REPLY_TIMEOUT)).unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("HTTP head and body");
    (head.to_string(), body.to_string())
}

/// `name{labels} value` lines of a Prometheus text body.
fn samples(body: &str) -> BTreeMap<String, f64> {
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (key, value) = l.rsplit_once(' ').unwrap();
            (key.to_string(), value.parse().unwrap())
        })
        .collect()
}

#[test]
fn metrics_endpoint_counts_requests_bytes_and_latency() {
    let cluster = Cluster::start(3, &[], &["--metrics", "127.0.0.1:0"]);
    let metrics_addr = metrics_addr(&cluster.balancer);
    let mut conn = Raw::connect(cluster.balancer.addr);
    let mut bytes = 0;
    for id in 1..=6u64 {
        let content = format!("documento {id} {}", "a".repeat(id as usize * 10));
        bytes += content.len();
        conn.store(id, &format!("m{id}"), &content);
    }
    for _ in 0..6 {
        assert!(matches!(conn.reply(), Reply::Stored(_)));
    }

    let (head, body) = http(metrics_addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(
        head.contains("Content-Type: text/plain; version=0.0.4"),
        "{head}"
    );
    let s = samples(&body);
    let mut total_bytes = 0.0;
    for server in &cluster.servers {
        let label = format!("{{server=\"{}\"}}", server.addr);
        let documents = format!("{{server=\"{}\",kind=\"document\"}}", server.addr);
        assert_eq!(
            s[&format!("lbft_server_requests_total{documents}")],
            2.0,
            "{body}"
        );
        assert_eq!(s[&format!("lbft_server_failures_total{documents}")], 0.0);
        assert_eq!(s[&format!("lbft_server_retries_total{label}")], 0.0);
        assert_eq!(s[&format!("lbft_server_up{label}")], 1.0);
        assert_eq!(s[&format!("lbft_server_overloaded{label}")], 0.0);
        let check = s[&format!("lbft_server_check_seconds{label}")];
        assert!(check > 0.0 && check < 1.0, "check latency {check}");
        total_bytes += s[&format!("lbft_server_bytes_total{documents}")];
    }
    assert_eq!(total_bytes, bytes as f64);
    assert_eq!(s["lbft_requests_received_total"], 6.0);
    assert_eq!(s["lbft_requests_failed_total"], 0.0);
    assert_eq!(s["lbft_queue_depth"], 0.0);
    assert_eq!(s["lbft_client_connections"], 1.0);
    assert_eq!(s["lbft_request_duration_seconds_count"], 6.0);
    assert_eq!(s["lbft_request_duration_seconds_bucket{le=\"+Inf\"}"], 6.0);
    let buckets: Vec<f64> = body
        .lines()
        .filter(|l| l.starts_with("lbft_request_duration_seconds_bucket"))
        .map(|l| l.rsplit_once(' ').unwrap().1.parse().unwrap())
        .collect();
    assert!(
        buckets.windows(2).all(|w| w[0] <= w[1]),
        "cumulative: {buckets:?}"
    );

    let (head, page) = http(metrics_addr, "GET / HTTP/1.1\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(head.contains("Content-Type: text/html"), "{head}");
    assert!(page.contains("<a href=\"/metrics\">"), "{page}");
    let (head, _) = http(metrics_addr, "GET /nope HTTP/1.1\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    let (head, _) = http(metrics_addr, "POST /metrics HTTP/1.1\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 405"), "{head}");
}

#[test]
fn balancer_lists_its_servers_with_their_status() {
    let cluster = Cluster::start(2, &[], &[]);
    let mut conn = Raw::connect(cluster.balancer.addr);
    // A stored document proves a probe round has marked the servers up.
    conn.store(1, "t", "c");
    assert!(matches!(conn.reply(), Reply::Stored(_)));
    conn.send_json(&json!({"type": "servers", "id": 5}));
    let Reply::Servers(list) = conn.reply() else {
        panic!("expected the server list")
    };
    assert_eq!(list.id, 5);
    let names: Vec<String> = list.servers.iter().map(|v| v.name.clone()).collect();
    let expected: Vec<String> = cluster.servers.iter().map(|p| p.addr.to_string()).collect();
    assert_eq!(names, expected);
    for view in &list.servers {
        assert_eq!(view.state, "up");
        let status = view.status.as_ref().expect("a probe answered");
        assert!(status.memory_total_bytes >= status.memory_used_bytes);
        assert!(status.memory_used_bytes > 0);
        assert!(status.cpu_percent >= 0.0);
        assert!(status.disk_free_bytes > 0);
        assert_eq!(status.max_active, 1024);
    }
}
