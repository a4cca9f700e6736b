//! The balancer's resident memory under hostile or heavy clients, beside
//! the bound it is configured with (`--max-queued-bytes`).
//!
//! `cargo bench --bench memory` starts the real binaries on 127.0.0.1 and
//! measures the balancer process (VmRSS now, VmHWM peak from /proc):
//! - a. 100 connections each announce an 8 MiB frame, send 1 KiB of it and
//!   stall;
//! - b. no server is up; one connection sends 150 documents of 7 MiB;
//! - c. 4 clients send 1 MiB documents to three healthy servers (200 in all).
//!
//! Every scenario gets a fresh balancer, so peaks do not carry over.

use lbft::proto::{self, ClientRequest, FrameReader, Reply, StoreRequest};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// The balancer's default `--max-queued-bytes`, in MiB.
const BOUND_MIB: f64 = 256.0;

struct Proc {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(bin: &str, args: &[&str], cwd: &std::path::Path) -> Proc {
    let mut child = Command::new(bin)
        .args(args)
        .current_dir(cwd)
        .env("RUST_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {bin}: {e}"));
    let stdout = child.stdout.take().unwrap();
    // Owned by the guard from here on, so a panic still reaps it.
    let mut proc = Proc {
        child,
        addr: SocketAddr::from(([0, 0, 0, 0], 0)),
    };
    let mut lines = BufReader::new(stdout).lines();
    loop {
        let line = lines
            .next()
            .unwrap_or_else(|| panic!("{bin} exited before listening"))
            .unwrap();
        if let Some(rest) = line.strip_prefix("listening on ") {
            proc.addr = rest.split([',', ' ']).next().unwrap().parse().unwrap();
            // Keep draining stdout so the child never blocks on it.
            thread::spawn(move || for _ in lines {});
            return proc;
        }
    }
}

/// (current, peak) resident memory of a process, in MiB.
fn memory(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn balancer(work: &std::path::Path, servers: &[SocketAddr]) -> Proc {
    let list: Vec<String> = servers.iter().map(|a| a.to_string()).collect();
    let list = list.join(",");
    start(
        env!("CARGO_BIN_EXE_balancer"),
        &[
            "--listen",
            "127.0.0.1:0",
            "--servers",
            &list,
            "--queue-timeout",
            "60s",
            "--log-file",
            "lb.log",
        ],
        work,
    )
}

fn store_frame(id: u64, size: usize) -> Vec<u8> {
    proto::encode(&ClientRequest::Store(StoreRequest {
        id,
        doc: proto::Document {
            title: format!("doc {id}"),
            content: "a".repeat(size),
        },
        request_number: None,
        not_after_ms: None,
        key: None,
        resent: false,
    }))
}

/// Waits until the balancer's memory stops growing (or a few seconds pass).
fn settle(pid: u32) -> (f64, f64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut last = memory(pid);
    while Instant::now() < deadline {
        thread::sleep(Duration::from_millis(250));
        let now = memory(pid);
        if (now.0 - last.0).abs() < 1.0 {
            return now;
        }
        last = now;
    }
    last
}

fn main() {
    let work = tempfile::tempdir().unwrap();
    let mut rows = Vec::new();

    // a. stalled frames
    {
        let lb = balancer(work.path(), &[free_port()]);
        let conns: Vec<TcpStream> = (0..100)
            .map(|_| {
                let mut s = TcpStream::connect(lb.addr).unwrap();
                s.write_all(&(8u32 << 20).to_be_bytes()).unwrap();
                s.write_all(&[b'x'; 1024]).unwrap();
                s
            })
            .collect();
        let (rss, peak) = settle(lb.child.id());
        rows.push(("a. 100 stalled 8 MiB frames", rss, peak));
        drop(conns);
    }

    // b. 150 x 7 MiB with no server up
    {
        let lb = balancer(work.path(), &[free_port()]);
        let mut s = TcpStream::connect(lb.addr).unwrap();
        let frame = store_frame(1, 7 << 20);
        let writer = thread::spawn(move || {
            for _ in 0..150 {
                // Blocks once the balancer stops reading: that is the point.
                if proto::write_frame(&mut s, &frame).is_err() {
                    return;
                }
            }
        });
        let (rss, peak) = settle(lb.child.id());
        rows.push(("b. 150 x 7 MiB, no server up", rss, peak));
        drop(lb);
        let _ = writer.join();
    }

    // c. 4 clients x 50 documents of 1 MiB to healthy servers
    {
        let servers: Vec<Proc> = (0..3)
            .map(|i| {
                let dir = work.path().join(format!("s{i}"));
                start(
                    env!("CARGO_BIN_EXE_server"),
                    &["--listen", "127.0.0.1:0", "--dir", dir.to_str().unwrap()],
                    work.path(),
                )
            })
            .collect();
        let addrs: Vec<SocketAddr> = servers.iter().map(|s| s.addr).collect();
        let lb = balancer(work.path(), &addrs);
        let started = Instant::now();
        let clients: Vec<_> = (0..4)
            .map(|_| {
                let addr = lb.addr;
                thread::spawn(move || {
                    let stream = TcpStream::connect(addr).unwrap();
                    let mut w = stream.try_clone().unwrap();
                    let writer = thread::spawn(move || {
                        for id in 1..=50 {
                            proto::write_frame(&mut w, &store_frame(id, 1 << 20)).unwrap();
                        }
                    });
                    let mut reader = FrameReader::new(&stream, proto::DEFAULT_MAX_FRAME);
                    for _ in 0..50 {
                        match reader.message::<Reply>() {
                            Ok(Some(Ok(Reply::Stored(_)))) => {}
                            other => panic!("unexpected answer: {other:?}"),
                        }
                    }
                    writer.join().unwrap();
                })
            })
            .collect();
        for c in clients {
            c.join().unwrap();
        }
        let took = started.elapsed();
        let (rss, peak) = memory(lb.child.id());
        rows.push(("c. 4 clients x 50 x 1 MiB, stored", rss, peak));
        println!(
            "c. stored 200 MiB in {:.2} s ({:.1} MiB/s)",
            took.as_secs_f64(),
            200.0 / took.as_secs_f64()
        );
    }

    println!();
    println!(
        "{:<36} {:>10} {:>10} {:>22}",
        "scenario", "RSS MiB", "peak MiB", "bound (--max-queued)"
    );
    for (name, rss, peak) in rows {
        println!("{name:<36} {rss:>10.1} {peak:>10.1} {BOUND_MIB:>22.1}");
    }
}

/// A port nobody listens on: bound, then released.
fn free_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}
