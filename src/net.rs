//! Sockets: connecting with timeouts, preparing accepted streams, telling
//! which wire a peer speaks from its first byte, and accept loops that stop
//! when told. TLS will plug in here.

use crate::proto::legacy;
use crossbeam_channel::{select, Receiver, Sender, TryRecvError};
use std::collections::HashMap;
use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::Duration;

/// Connections waiting to be accepted before the kernel holds back new
/// ones (capped by the system's `somaxconn`); std's `bind` asks for 128,
/// which a burst of clients overflows.
const LISTEN_BACKLOG: i32 = 4096;

/// Binds a listener (address reuse on, so a restart can take the port
/// again at once) with a deep accept queue.
pub fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

/// Opens a TCP connection with a connect timeout and read/write timeouts.
pub fn connect(
    addr: &SocketAddr,
    connect_timeout: Duration,
    io_timeout: Duration,
) -> io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(addr, connect_timeout)?;
    prepare(&stream, io_timeout)?;
    Ok(stream)
}

/// An address from text: `IP:PORT` or `HOST:PORT` (the first IPv4 address
/// the name resolves to, else the first).
pub fn resolve(s: &str) -> Result<SocketAddr, String> {
    let s = s.trim();
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let has_port = s
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
    if !has_port {
        return Err(format!(
            "`{s}` is not an address: write HOST:PORT, e.g. 127.0.0.1:60002 or localhost:60002"
        ));
    }
    use std::net::ToSocketAddrs;
    let addrs: Vec<SocketAddr> = s
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve `{s}`: {e}"))?
        .collect();
    // IPv4 first: `localhost` may list ::1 first while the programs here
    // listen on 127.0.0.1 by default.
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| format!("`{s}` resolves to no address"))
}

/// Read and write timeouts, no Nagle delay (requests are small and
/// latency-bound).
pub fn prepare(stream: &TcpStream, io_timeout: Duration) -> io::Result<()> {
    stream.set_read_timeout(Some(io_timeout))?;
    stream.set_write_timeout(Some(io_timeout))?;
    stream.set_nodelay(true)
}

/// What a peer speaks, judged by its first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    /// Length-prefixed frames (PROTOCOL.md).
    Framed,
    /// The original system's unframed JSON.
    Legacy,
    /// The peer closed without sending anything.
    Closed,
}

/// Waits for the first byte (up to the stream's read timeout) without
/// consuming it.
pub fn detect_wire(stream: &TcpStream) -> io::Result<Wire> {
    let mut first = [0u8; 1];
    Ok(match stream.peek(&mut first)? {
        0 => Wire::Closed,
        _ if legacy::is_legacy(first[0]) => Wire::Legacy,
        _ => Wire::Framed,
    })
}

/// Accepts connections and hands each to `handle` until `stop` is
/// disconnected (checked after every accept, so whoever disconnects it must
/// then wake the loop with `wake`). Accept errors (out of descriptors, a
/// connection reset before it was accepted) back off 10 ms, 20 ms, ... up
/// to 1 s instead of spinning.
pub fn accept_loop(
    listener: &TcpListener,
    stop: &Receiver<()>,
    slots: Option<&Slots>,
    at_cap_count: Option<&AtomicU64>,
    mut handle: impl FnMut(TcpStream, SocketAddr, Option<Slot>),
) {
    let mut backoff = Duration::ZERO;
    let mut errors = 0u64;
    let mut at_cap = false;
    loop {
        // A connection slot first: at --max-connections new clients wait
        // in the listen backlog instead of taking descriptors the
        // balancer needs for its servers.
        let slot = match slots {
            Some(slots) => {
                if slots.in_use() >= slots.capacity() && !at_cap {
                    log::warn!(
                        "{} connections open (--max-connections): new ones wait until one closes",
                        slots.in_use()
                    );
                }
                at_cap = slots.in_use() >= slots.capacity();
                if at_cap {
                    // Counted each time, logged once per burst (above).
                    if let Some(count) = at_cap_count {
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                }
                match slots.acquire_or_stop(stop) {
                    Some(slot) => Some(slot),
                    None => return,
                }
            }
            None => None,
        };
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
                handle(stream, peer, slot);
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
/// number of free slots. Used for connection slots (`--max-connections`)
/// and for the requests one connection may have outstanding.
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

    /// Waits for a free slot, or returns `None` once `stop` is
    /// disconnected.
    pub fn acquire_or_stop(&self, stop: &Receiver<()>) -> Option<Slot> {
        select! {
            send(self.take, ()) -> _ => Some(Slot(self.give_back.clone())),
            recv(stop) -> _ => None,
        }
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

/// Names a thread and starts it; the error says which thread could not
/// start.
pub fn spawn_named<T: Send + 'static>(
    name: String,
    stack: Option<usize>,
    f: impl FnOnce() -> T + Send + 'static,
) -> io::Result<thread::JoinHandle<T>> {
    let mut builder = thread::Builder::new().name(name.clone());
    if let Some(size) = stack {
        builder = builder.stack_size(size);
    }
    builder
        .spawn(f)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot start thread {name}: {e}")))
}

/// An accepted connection shared by the threads that read and write it:
/// one descriptor however many handles (`try_clone` would make one each).
/// `&TcpStream` reads and writes, so each handle does.
#[derive(Debug, Clone)]
pub struct Stream(Arc<TcpStream>);

impl Stream {
    pub fn new(stream: TcpStream) -> Stream {
        Stream(Arc::new(stream))
    }

    pub fn tcp(&self) -> &TcpStream {
        &self.0
    }
}

impl io::Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self.0).read(buf)
    }
}

impl io::Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self.0).write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        (&*self.0).flush()
    }
}

/// Ends a connection without a reset: first says end of stream after what
/// was written, then reads and drops what the peer sent that nobody read.
/// Closing a socket with unread input makes the kernel reset the
/// connection, and a reset can destroy the replies written last (a
/// client's final `shutting_down` answer among them).
pub fn close_gracefully(stream: &Stream) {
    use std::io::Read;
    let tcp = stream.tcp();
    let _ = tcp.shutdown(Shutdown::Write);
    if tcp.set_nonblocking(true).is_err() {
        return;
    }
    let mut buf = [0u8; 16 * 1024];
    let mut dropped = 0usize;
    // Until the queue is empty (end of stream, or nothing more for now),
    // and never more than a few frames' worth.
    while dropped < 64 * 1024 * 1024 {
        match (&*stream.0).read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => dropped += n,
        }
    }
}

/// A stream whose reads give up at a deadline, when one is set, besides
/// the usual idle timeout: a peer must send a whole frame within
/// `--frame-timeout`, not merely a byte now and then (slowloris).
pub struct Paced {
    stream: Stream,
    idle: Duration,
    deadline: Option<std::time::Instant>,
    /// The read timeout the socket has now, to set it only on change.
    current: Option<Duration>,
}

impl Paced {
    pub fn new(stream: Stream, idle: Duration) -> Paced {
        Paced {
            stream,
            idle,
            deadline: None,
            current: None,
        }
    }
}

impl crate::proto::Deadline for Paced {
    fn set_deadline(&mut self, deadline: Option<std::time::Instant>) {
        self.deadline = deadline;
    }
}

impl io::Read for Paced {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let timeout = match self.deadline {
            Some(deadline) => {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the frame did not arrive within --frame-timeout",
                    ));
                }
                left.min(self.idle)
            }
            None => self.idle,
        };
        if self.current != Some(timeout) {
            self.stream.tcp().set_read_timeout(Some(timeout))?;
            self.current = Some(timeout);
        }
        self.stream.read(buf)
    }
}

/// Accepts connections until `stop` is disconnected (see `accept_loop`),
/// serving each on its own thread named by `thread_name`. Then ends reading
/// on every open connection (a blocked read sees end of stream, replies can
/// still be written) and joins every connection thread. Returns how many
/// of them panicked.
pub fn serve_connections<F>(
    listener: &TcpListener,
    stop: &Receiver<()>,
    max_connections: usize,
    thread_name: impl Fn(u64) -> String,
    serve: F,
) -> usize
where
    F: Fn(Stream, SocketAddr) + Send + Sync + 'static,
{
    serve_connections_counting(listener, stop, max_connections, None, thread_name, serve)
}

/// `serve_connections`, counting in `at_cap` each time a connection had to
/// wait because `max_connections` were open.
pub fn serve_connections_counting<F>(
    listener: &TcpListener,
    stop: &Receiver<()>,
    max_connections: usize,
    at_cap: Option<&AtomicU64>,
    thread_name: impl Fn(u64) -> String,
    serve: F,
) -> usize
where
    F: Fn(Stream, SocketAddr) + Send + Sync + 'static,
{
    let serve = Arc::new(serve);
    let connections = Arc::new(Connections::default());
    let mut workers: Vec<JoinHandle<()>> = Vec::new();
    let mut panicked = 0;
    let mut seq = 0u64;
    let slots = Slots::new(max_connections);
    accept_loop(
        listener,
        stop,
        Some(&slots),
        at_cap,
        |stream, peer, slot| {
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
            connections.register(seq, &stream);
            let registration = Registration {
                connections: connections.clone(),
                id: seq,
                _slot: slot,
            };
            let serve = serve.clone();
            // Default stack size: parsing deeply nested JSON recurses.
            match spawn_named(thread_name(seq), None, move || {
                let _registration = registration;
                serve(stream, peer);
            }) {
                Ok(handle) => workers.push(handle),
                Err(e) => log::error!("dropping connection from {peer}: {e}"),
            }
        },
    );
    let open = connections.end_reading();
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

/// Open connections, so that a shutdown can end their reading.
#[derive(Default)]
struct Connections {
    open: Mutex<HashMap<u64, Stream>>,
}

impl Connections {
    fn register(&self, id: u64, stream: &Stream) {
        lock(&self.open).insert(id, stream.clone());
    }

    fn remove(&self, id: u64) {
        lock(&self.open).remove(&id);
    }

    /// Shuts down the read half of every open connection. Returns how many
    /// there were.
    fn end_reading(&self) -> usize {
        let open: Vec<(u64, Stream)> = lock(&self.open).drain().collect();
        for (_, stream) in &open {
            // Fails only if the peer is already gone, which ends it too.
            let _ = stream.tcp().shutdown(Shutdown::Read);
        }
        open.len()
    }
}

/// Removes a connection from the registry when its thread ends, even by
/// a panic.
struct Registration {
    connections: Arc<Connections>,
    id: u64,
    /// Its `--max-connections` slot, free again when the thread ends.
    _slot: Option<Slot>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.connections.remove(self.id);
    }
}

/// Joins the threads that have ended; returns how many panicked.
pub fn join_finished(workers: &mut Vec<JoinHandle<()>>) -> usize {
    let (done, running): (Vec<_>, Vec<_>) = std::mem::take(workers)
        .into_iter()
        .partition(|w| w.is_finished());
    *workers = running;
    done.into_iter()
        .map(JoinHandle::join)
        .filter(Result::is_err)
        .count()
}

/// Locks a mutex whose data stays valid even if a holder panicked (plain
/// counters and maps, never left half-updated).
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}
