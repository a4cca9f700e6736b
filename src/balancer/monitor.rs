//! The monitor: every check interval it asks each server for its status,
//! all servers in parallel, and sends what it saw to the dispatcher, which
//! owns the health state and logs the changes.

use super::dispatch::Event;
use super::stats::Stats;
use super::BackendWire;
use crate::health::Observation;
use crate::proto::{legacy, Connection, Reply, Request, StatusReport};
use crossbeam_channel::Sender;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy)]
pub struct MonitorSettings {
    pub interval: Duration,
    /// Connect and read timeout of one probe.
    pub timeout: Duration,
    pub max_frame: usize,
    pub wire: BackendWire,
}

pub fn spawn(
    servers: Vec<SocketAddr>,
    events: Sender<Event>,
    settings: MonitorSettings,
    stats: Arc<Stats>,
) -> std::io::Result<thread::JoinHandle<()>> {
    thread::Builder::new()
        .name("monitor".into())
        .spawn(move || {
            let mut probe_id = 0u64;
            loop {
                let round_started = Instant::now();
                probe_id += 1;
                let results = probe_all(&servers, probe_id, settings);
                let mut observations = Vec::with_capacity(results.len());
                for (server_stats, (observation, report, took)) in stats.servers.iter().zip(results)
                {
                    server_stats.record_check(took, report);
                    observations.push(observation);
                }
                if events.send(Event::Probes(observations)).is_err() {
                    return; // dispatcher gone: shutting down
                }
                if let Some(rest) = settings.interval.checked_sub(round_started.elapsed()) {
                    thread::sleep(rest);
                }
            }
        })
}

/// What one probe found, with the server's report and how long it took.
type ProbeResult = (Observation, Option<StatusReport>, Duration);

fn probe_all(servers: &[SocketAddr], id: u64, settings: MonitorSettings) -> Vec<ProbeResult> {
    thread::scope(|scope| {
        let handles: Vec<_> = servers
            .iter()
            .map(|addr| {
                thread::Builder::new()
                    .name(format!("probe-{}", addr.port()))
                    .stack_size(128 * 1024)
                    .spawn_scoped(scope, move || {
                        let started = Instant::now();
                        let (observation, report) = probe(addr, id, settings);
                        (observation, report, started.elapsed())
                    })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| match h {
                Ok(h) => h.join().unwrap_or_else(|_| {
                    (
                        Observation::ProbeFailed("probe panicked".into()),
                        None,
                        Duration::ZERO,
                    )
                }),
                Err(e) => (
                    Observation::ProbeFailed(format!("cannot start probe: {e}")),
                    None,
                    Duration::ZERO,
                ),
            })
            .collect()
    })
}

/// Asks one server for its status.
pub fn probe(
    addr: &SocketAddr,
    id: u64,
    settings: MonitorSettings,
) -> (Observation, Option<StatusReport>) {
    let stream = match crate::net::connect(addr, settings.timeout, settings.timeout) {
        Ok(s) => s,
        Err(e) => {
            return (
                Observation::ProbeFailed(format!("cannot connect: {e}")),
                None,
            )
        }
    };
    if settings.wire == BackendWire::Legacy {
        return (probe_legacy(stream), None);
    }
    let mut conn = Connection::new(stream, settings.max_frame);
    match conn.call(&Request::Status { id }) {
        Ok(Reply::Status(report)) => (
            Observation::ProbeOk {
                overloaded: report.overloaded,
            },
            Some(report),
        ),
        Ok(other) => (
            Observation::ProbeFailed(format!("unexpected status reply: {other:?}")),
            None,
        ),
        Err(e) => (
            Observation::ProbeFailed(format!("status probe failed: {e}")),
            None,
        ),
    }
}

/// The original probe: send the status request, read exactly one byte.
fn probe_legacy(mut stream: std::net::TcpStream) -> Observation {
    let mut byte = [0u8; 1];
    let result = stream
        .write_all(legacy::STATUS_PROBE)
        .and_then(|()| stream.read_exact(&mut byte));
    match (result, byte[0]) {
        (Err(e), _) => Observation::ProbeFailed(format!("status probe failed: {e}")),
        (Ok(()), 0) => Observation::ProbeOk { overloaded: false },
        (Ok(()), 1) => Observation::ProbeOk { overloaded: true },
        (Ok(()), other) => {
            Observation::ProbeFailed(format!("status byte {other:#04x} is neither 0 nor 1"))
        }
    }
}
