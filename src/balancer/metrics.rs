//! A minimal HTTP responder for Prometheus: `GET /metrics` returns the
//! balancer's numbers in the text exposition format, and `GET /` a short
//! page that says what is here and links to them. One request per
//! connection, up to `MAX_CONCURRENT` at once, each on its own thread and
//! with `TIMEOUT` for the whole request to arrive, so silent or slow
//! scrapers cannot hold up the others: at the cap, a new connection closes
//! the oldest one whose request has not arrived yet rather than wait
//! behind it.

use super::stats::Stats;
use crate::net;
use crate::proto::Deadline;
use crossbeam_channel::Receiver;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(2);
/// Connections open at once. Past it, a new one takes the place of the
/// oldest whose request has not arrived yet; with all of them answering,
/// new ones wait in the listen backlog.
const MAX_CONCURRENT: usize = 16;
/// Longest request head read; the rest is ignored.
const MAX_HEAD: usize = 8 * 1024;

/// Serves until `stop` is disconnected (and the loop woken, see
/// `net::wake`).
pub fn spawn(
    listener: TcpListener,
    stats: Arc<Stats>,
    stop: Receiver<()>,
) -> std::io::Result<thread::JoinHandle<()>> {
    crate::sync::spawn_named("metrics".into(), None, move || {
        // Scrapers often come from one address: no cap of its own.
        let admission = net::Admission {
            policy: net::Policy {
                max_connections: MAX_CONCURRENT,
                max_per_ip: MAX_CONCURRENT,
            },
            names: net::CapNames {
                total: "metrics endpoint, at most",
                per_ip: "metrics endpoint, at most",
            },
            counters: net::Counters::default(),
        };
        net::serve_connections(
            &listener,
            &stop,
            admission,
            |seq| format!("metrics{seq}"),
            move |stream, _, mark| {
                if let Err(e) = respond(stream, &mark, &stats) {
                    log::debug!("metrics request failed: {e}");
                }
            },
        );
    })
}

fn respond(mut stream: net::Stream, mark: &net::Mark, stats: &Stats) -> std::io::Result<()> {
    net::prepare(stream.tcp(), TIMEOUT)?;
    let mut request = net::Paced::new(stream.clone(), TIMEOUT);
    request.set_deadline(Some(Instant::now() + TIMEOUT));
    let head = read_head(&mut request)?;
    mark.arrived();
    let _answering = mark.busy();
    let (status, content_type, body) = route(&head, stats);
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes())?;
    stream.flush()
}

fn read_head(stream: &mut impl Read) -> std::io::Result<String> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_HEAD {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
const PLAIN_TEXT: &str = "text/plain; charset=utf-8";
const HTML: &str = "text/html; charset=utf-8";

/// What `GET /` answers: where the numbers are, for whoever opens the
/// address in a browser.
const INDEX: &str = "<!DOCTYPE html>
<html lang=\"en\">
<head><meta charset=\"utf-8\"><title>lbft balancer metrics</title></head>
<body>
<h1>lbft balancer</h1>
<p>Metrics in the Prometheus text format: <a href=\"/metrics\">/metrics</a>.</p>
<p>Per server: work sent, bytes carried and failures by kind (document, calc,
upload, download), file transfers under way, health and probe latency.
Overall: requests received, failed and unknown, queue depth, file transfers,
connections, logins, limit hits and request latency.</p>
</body>
</html>
";

/// The status line, content type and body for a request head.
fn route(head: &str, stats: &Stats) -> (&'static str, &'static str, String) {
    let mut parts = head.lines().next().unwrap_or("").split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET", "/metrics") => ("200 OK", PROMETHEUS_TEXT, stats.render()),
        ("GET", "/") => ("200 OK", HTML, INDEX.into()),
        ("GET", _) => (
            "404 Not Found",
            PLAIN_TEXT,
            "not found: try /metrics\n".into(),
        ),
        _ => (
            "405 Method Not Allowed",
            PLAIN_TEXT,
            "only GET is served\n".into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let stats = Stats::new(["s".to_string()]);
        assert_eq!(route("GET /metrics HTTP/1.1\r\n", &stats).0, "200 OK");
        assert_eq!(route("GET /metrics?x=1 HTTP/1.0\r\n", &stats).0, "200 OK");
        let (status, content_type, body) = route("GET / HTTP/1.1\r\n", &stats);
        assert_eq!((status, content_type), ("200 OK", HTML));
        assert!(body.contains("<a href=\"/metrics\">"), "{body}");
        assert_eq!(route("GET /nope HTTP/1.1\r\n", &stats).0, "404 Not Found");
        assert_eq!(
            route("POST /metrics HTTP/1.1\r\n", &stats).0,
            "405 Method Not Allowed"
        );
        assert_eq!(route("", &stats).0, "405 Method Not Allowed");
    }
}
