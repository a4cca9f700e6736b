//! The monitor: every check interval it asks each server for its status,
//! all servers in parallel, and sends what it saw to the dispatcher, which
//! owns the health state and logs the changes. It stops when the
//! dispatcher does (the `until` channel disconnects).

use super::backend::{self, BackendSettings};
use super::event::Event;
use super::stats::Stats;
use super::ServerId;
use crate::health::Observation;
use crate::proto::StatusReport;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// The servers to probe, kept by the dispatcher as they join and leave.
pub type Roster = Arc<Mutex<Vec<(ServerId, SocketAddr)>>>;

pub fn spawn(
    roster: Roster,
    events: Sender<Event>,
    interval: Duration,
    settings: BackendSettings,
    stats: Arc<Stats>,
    until: Receiver<()>,
) -> std::io::Result<thread::JoinHandle<()>> {
    crate::sync::spawn_named("monitor".into(), None, move || {
        let mut probe_id = 0u64;
        loop {
            let round_started = Instant::now();
            probe_id += 1;
            let servers = crate::sync::lock(&roster).clone();
            let results = probe_all(&servers, probe_id, &settings);
            let mut observations = Vec::with_capacity(results.len());
            for ((id, _), (observation, report, took)) in servers.iter().zip(results) {
                stats.server(*id).record_check(took, report);
                observations.push((*id, observation));
            }
            if events.send(Event::Probes(observations)).is_err() {
                return; // dispatcher gone: shutting down
            }
            let rest = interval.saturating_sub(round_started.elapsed());
            if let Err(RecvTimeoutError::Disconnected) | Ok(()) = until.recv_timeout(rest) {
                return;
            }
        }
    })
}

/// What one probe found, with the server's report and how long it took.
type ProbeResult = (Observation, Option<StatusReport>, Duration);

fn probe_all(
    servers: &[(ServerId, SocketAddr)],
    id: u64,
    settings: &BackendSettings,
) -> Vec<ProbeResult> {
    thread::scope(|scope| {
        let handles: Vec<_> = servers
            .iter()
            .map(|(_, addr)| {
                thread::Builder::new()
                    .name(format!("probe-{}", addr.port()))
                    .stack_size(128 * 1024)
                    .spawn_scoped(scope, move || {
                        let started = Instant::now();
                        let (observation, report) = backend::probe(addr, id, settings);
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
