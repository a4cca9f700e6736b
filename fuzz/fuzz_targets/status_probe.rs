//! The balancer's status probe against a server that answers anything: the
//! probe gets a report or an error, never a panic, and the report's figures
//! go through the health state machine and the `resources` policy.
#![no_main]

use lbft::health::{Health, Observation};
use lbft::policy::{resource_score, Candidate, Load, Policy, Resources};
use lbft::proto::{Connection, Reply, StorageRequest};
use libfuzzer_sys::fuzz_target;
use std::io::{self, Read, Write};

/// What the server answers is the fuzz input; what the balancer writes is
/// kept.
struct Server<'a> {
    answer: &'a [u8],
    written: Vec<u8>,
}

impl Read for Server<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.answer.read(buf)
    }
}

impl Write for Server<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.written.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|answer: &[u8]| {
    let server = Server {
        answer,
        written: Vec::new(),
    };
    let mut conn = Connection::new(server, 64 * 1024);
    let observation = match conn.call(&StorageRequest::Status { id: 1 }) {
        Ok(Reply::Status(report)) => {
            let fraction = |part: u64, whole: u64| {
                if whole == 0 {
                    0.0
                } else {
                    (part as f64 / whole as f64) as f32
                }
            };
            let load = Load {
                cpu_percent: report.cpu_percent,
                memory_fraction: fraction(report.memory_used_bytes, report.memory_total_bytes),
                disk_free_fraction: fraction(
                    report.disk_free_bytes,
                    report
                        .disk_used_bytes
                        .saturating_add(report.disk_free_bytes),
                ),
            };
            let _ = resource_score(&load, report.active as usize);
            let candidates = [
                Candidate {
                    eligible: true,
                    in_flight: 1,
                    load: Some(load),
                },
                Candidate {
                    eligible: true,
                    in_flight: 0,
                    load: Some(Load::default()),
                },
            ];
            let picked = Resources::default().pick(&candidates);
            assert!(matches!(picked, Some(0 | 1)));
            Observation::ProbeOk {
                overloaded: report.overloaded,
                can_store: report.storage_writable,
                load: Some(load),
            }
        }
        Ok(other) => Observation::ProbeFailed(format!("unexpected status reply: {other:?}")),
        Err(e) => Observation::ProbeFailed(format!("status probe failed: {e}")),
    };
    let mut health = Health::default();
    let _ = health.observe(&observation);
    assert!(!conn.get_ref().written.is_empty());
});
