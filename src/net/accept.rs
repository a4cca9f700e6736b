//! Accept loops that stop when told, back off on errors, admit each
//! connection through the registry (`admission`) and serve it on a thread
//! of its own; the defaults for how many connections that may be.

use super::admission::{Admission, Counters, Mark, Registry};
use super::Stream;
use crate::sync::{join_finished, spawn_named};
use crossbeam_channel::{Receiver, Sender, TryRecvError};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Accepts connections and hands each to `handle` until `stop` is
/// disconnected (checked after every accept, so whoever disconnects it must
/// then wake the loop with `wake`). While every slot is taken by
/// connections at work it does not accept: new connections wait in the
/// listen backlog (`Registry::wait_for_room`). Accept errors (out of
/// descriptors, a connection reset before it was accepted) back off 10 ms,
/// 20 ms, ... up to 1 s instead of spinning.
fn accept_loop(
    listener: &TcpListener,
    stop: &Receiver<()>,
    registry: &Registry,
    counters: &Counters,
    mut handle: impl FnMut(TcpStream, SocketAddr),
) {
    let mut backoff = Duration::ZERO;
    let mut errors = 0u64;
    loop {
        if !registry.wait_for_room(stop, counters) {
            return;
        }
        let accepted = listener.accept();
        if matches!(stop.try_recv(), Err(TryRecvError::Disconnected)) {
            return;
        }
        match accepted {
            Ok((stream, peer)) => {
                if errors > 0 {
                    log::info!("accepting again after {errors} failed accepts");
                    errors = 0;
                }
                backoff = Duration::ZERO;
                handle(stream, peer);
            }
            Err(e) => {
                errors += 1;
                backoff = (backoff * 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
                // Once per burst: a flood of failures must not flood the log.
                if errors == 1 {
                    log::warn!("accept failed: {e}; backing off (up to 1 s) until it works again");
                }
                // A stop during the back-off is seen after the next accept.
                let _ = stop.recv_timeout(backoff);
            }
        }
    }
}

/// A counting semaphore: a bounded channel whose free capacity is the
/// number of free slots. Used for the requests one connection may have
/// outstanding.
#[derive(Debug, Clone)]
pub struct Slots {
    take: Sender<()>,
    give_back: Receiver<()>,
}

/// One slot of `Slots`, given back when dropped.
#[derive(Debug)]
pub struct Slot(Receiver<()>);

impl Slots {
    pub fn new(size: usize) -> Slots {
        let (take, give_back) = crossbeam_channel::bounded(size.max(1));
        Slots { take, give_back }
    }

    /// Waits for a free slot.
    pub fn acquire(&self) -> Slot {
        // Cannot fail: this holds the receiver too.
        let _ = self.take.send(());
        Slot(self.give_back.clone())
    }

    pub fn in_use(&self) -> usize {
        self.take.len()
    }

    pub fn capacity(&self) -> usize {
        self.take.capacity().unwrap_or(usize::MAX)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let _ = self.0.try_recv();
    }
}

/// A default for `--max-connections`: three quarters of this process's
/// open-file limit (each connection holds one descriptor), leaving the
/// rest for server links, probes, logs and the state file.
pub fn default_max_connections() -> usize {
    open_files_limit().map_or(768, |limit| (limit as usize / 4 * 3).max(16))
}

/// A default for `--max-connections-per-ip`: half of `--max-connections`.
/// One address (a flood, a runaway client) then gets at most half the
/// slots and the other half stays for everyone else, while many clients
/// behind one address (a NAT, a deployment on one host) still have room.
pub fn default_max_per_ip(max_connections: usize) -> usize {
    (max_connections / 2).max(1)
}

/// The soft limit on open files, from /proc/self/limits.
fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Wakes an accept loop blocked on `addr` so that it sees its stop channel.
pub fn wake(addr: SocketAddr) {
    let addr = match addr.ip() {
        ip if ip.is_unspecified() => {
            SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), addr.port())
        }
        _ => addr,
    };
    if let Err(e) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
        log::debug!("waking the accept loop on {addr}: {e}");
    }
}

/// Accepts connections until `stop` is disconnected (see `accept_loop`),
/// admitting each as `admission` says (see `admission`) and serving it on
/// its own thread named by `thread_name`, with the `Mark` through which
/// that thread keeps its standing up to date. Then ends reading on every
/// open connection (a blocked read sees end of stream, replies can still be
/// written) and joins every connection thread. Returns how many of them
/// panicked.
pub fn serve_connections<F>(
    listener: &TcpListener,
    stop: &Receiver<()>,
    admission: Admission<'_>,
    thread_name: impl Fn(u64) -> String,
    serve: F,
) -> usize
where
    F: Fn(Stream, SocketAddr, Mark) + Send + Sync + 'static,
{
    let serve = Arc::new(serve);
    let registry = Registry::new(admission.policy, admission.names);
    let counters = admission.counters;
    let mut workers: Vec<JoinHandle<()>> = Vec::new();
    let mut panicked = 0;
    let mut seq = 0u64;
    accept_loop(listener, stop, &registry, &counters, |stream, peer| {
        seq += 1;
        // Finished threads are joined as we go, so the list holds mostly
        // open connections; every 64th accept, so that a burst of
        // thousands does not rescan the list each time.
        if seq.is_multiple_of(64) {
            panicked += join_finished(&mut workers);
        }
        // Registered here, not in the connection thread, so that once the
        // loop has stopped every accepted connection is in the registry.
        let stream = Stream::new(stream);
        let Some(mark) = registry.admit(seq, &stream, peer, stop, &counters) else {
            return;
        };
        let registration = Registration {
            registry: registry.clone(),
            id: seq,
        };
        let serve = serve.clone();
        // Default stack size: parsing deeply nested JSON recurses.
        match spawn_named(thread_name(seq), None, move || {
            let _registration = registration;
            serve(stream, peer, mark);
        }) {
            Ok(handle) => workers.push(handle),
            Err(e) => log::error!("dropping connection from {peer}: {e}"),
        }
    });
    let open = registry.end_reading();
    if open > 0 {
        log::info!("stopped accepting; waiting for {open} connections to finish");
    }
    for worker in workers {
        if worker.join().is_err() {
            panicked += 1;
        }
    }
    if panicked > 0 {
        log::error!("{panicked} connection threads panicked");
    }
    panicked
}

/// Removes a connection from the registry when its thread ends, even by
/// a panic; its slot is free again.
struct Registration {
    registry: Arc<Registry>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.leave(self.id);
    }
}
