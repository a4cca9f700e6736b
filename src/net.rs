//! Sockets: connecting with timeouts, preparing accepted streams, telling
//! which wire a peer speaks from its first byte, and accept loops that stop
//! when told and, when slots run short, close idle connections before
//! turning new ones away (`admission`). TLS plugs in here (`tls`):
//! `connect` and `detect_wire` set it up, and a `Stream` reads and writes
//! plaintext either way.

pub mod admission;
pub mod tls;

pub use admission::{Admission, Busy, CapNames, Counters, Mark, Policy};

use crate::proto::legacy;
use admission::Registry;
use crossbeam_channel::{Receiver, Sender, TryRecvError};
use std::io::{self, Read};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

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

/// Opens a connection with a connect timeout and read/write timeouts: TLS
/// when this process has a CA to verify peers with (`tls::install`), the
/// handshake done within `io_timeout`; plain TCP otherwise.
pub fn connect(
    addr: &SocketAddr,
    connect_timeout: Duration,
    io_timeout: Duration,
) -> io::Result<Stream> {
    let stream = Stream::new(connect_plain(addr, connect_timeout, io_timeout)?);
    if let Some(config) = tls::installed().and_then(|t| t.connect_config()) {
        let session = tls::Session::connect(config.clone(), addr.ip(), stream.tcp(), io_timeout)
            .map_err(|e| {
                let e = match e.kind() {
                    io::ErrorKind::UnexpectedEof => io::Error::new(
                        e.kind(),
                        format!("{e} (does the peer listen with --tls-cert?)"),
                    ),
                    _ => e,
                };
                io::Error::new(e.kind(), format!("TLS handshake with {addr} failed: {e}"))
            })?;
        stream.set_tls(session);
    }
    Ok(stream)
}

/// Opens a plain TCP connection whatever the TLS settings: for peers of
/// the original format, which has no TLS.
pub fn connect_plain(
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
    /// Not served here: a plaintext peer on a TLS port, a TLS peer on a
    /// plaintext port, or a failed handshake. Already logged (and, where
    /// the peer can read it, answered); the caller just drops it.
    Refused,
}

/// Waits for the first byte, until `by` at the latest (a connection's
/// first request is due then: `--frame-timeout` after it was accepted),
/// without consuming it. With TLS on (`tls::install` with a certificate),
/// a peer starting a handshake gets one (within the handshake timeout, and
/// by `by`) and then speaks frames inside it; any other peer is refused,
/// except one of the original format when `--allow-legacy-plaintext` says
/// so. A peer that sends nothing in time is an error of kind `TimedOut`.
pub fn detect_wire(stream: &Stream, by: Instant) -> io::Result<Wire> {
    let Some(first) = peek_first(stream, by)? else {
        return Ok(Wire::Closed);
    };
    let peer = stream
        .peer_addr()
        .map_or_else(|_| "a peer".to_string(), |a| a.to_string());
    let Some((tls, config)) = tls::installed().and_then(|t| Some((t, t.accept_config()?))) else {
        return Ok(on_plaintext_port(stream, first, &peer));
    };
    if first == tls::HANDSHAKE_RECORD {
        let left = by.saturating_duration_since(Instant::now());
        let timeout = tls
            .handshake_timeout()
            .min(left.max(Duration::from_millis(1)));
        return match tls::Session::accept(config.clone(), stream.tcp(), timeout) {
            Ok(session) => {
                stream.set_tls(session);
                Ok(Wire::Framed)
            }
            Err(e) => {
                log::warn!("connection from {peer}: TLS handshake failed: {e}");
                Ok(Wire::Refused)
            }
        };
    }
    if legacy::is_legacy(first) {
        if tls.allow_legacy_plaintext() {
            return Ok(Wire::Legacy);
        }
        log::warn!(
            "original-format connection from {peer} refused: this port requires TLS \
             (--allow-legacy-plaintext serves the original format in plaintext)"
        );
        return Ok(Wire::Refused);
    }
    log::warn!("plaintext connection from {peer} refused: this port requires TLS");
    refuse_plaintext(stream);
    Ok(Wire::Refused)
}

/// The first byte, peeked (left for the reader) by `by`; `None` when the
/// peer closed without sending anything.
fn peek_first(stream: &Stream, by: Instant) -> io::Result<Option<u8>> {
    let mut first = [0u8; 1];
    let idle = stream.tcp().read_timeout()?;
    // A zero timeout means none to the socket: wait at least a moment.
    let wait = by
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    let due_first = idle.is_none_or(|idle| wait <= idle);
    stream.tcp().set_read_timeout(Some(if due_first {
        wait
    } else {
        idle.unwrap_or(wait)
    }))?;
    let peeked = stream.tcp().peek(&mut first);
    stream.tcp().set_read_timeout(idle)?;
    match peeked {
        Ok(0) => Ok(None),
        Ok(_) => Ok(Some(first[0])),
        Err(e) if due_first && e.kind() == io::ErrorKind::WouldBlock => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "nothing arrived within --frame-timeout",
        )),
        Err(e) => Err(e),
    }
}

/// What a peer speaks on a port without TLS; one starting a TLS handshake
/// is refused.
fn on_plaintext_port(stream: &Stream, first: u8, peer: &str) -> Wire {
    if first == tls::HANDSHAKE_RECORD {
        log::warn!(
            "connection from {peer} starts a TLS handshake, but this port has no --tls-cert: closing"
        );
        // An end of stream, not a reset: the peer's handshake error then
        // says the connection was closed.
        close_gracefully(stream);
        return Wire::Refused;
    }
    if legacy::is_legacy(first) {
        Wire::Legacy
    } else {
        Wire::Framed
    }
}

/// Tells a framed plaintext peer on a TLS port why its connection ends
/// (it reads this as the reason), then closes.
fn refuse_plaintext(stream: &Stream) {
    let refusal = crate::proto::Reply::error(
        None,
        crate::proto::ErrorCode::BadRequest,
        "this port requires TLS: connect with --tls-ca (and --tls-cert/--tls-key if asked)",
    );
    let _ = crate::proto::write_frame(&mut stream.tcp(), &crate::proto::encode(&refusal));
    close_gracefully(stream);
}

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

/// A connection shared by the threads that read and write it: one
/// descriptor however many handles (`try_clone` would make one each), and,
/// over TLS, one session (`tls::Session`). `&Stream` reads and writes
/// plaintext, so each handle does.
#[derive(Clone)]
pub struct Stream(Arc<Shared>);

struct Shared {
    tcp: TcpStream,
    /// Set once, by the handshake, before the stream is shared for I/O.
    tls: std::sync::OnceLock<tls::Session>,
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream")
            .field("tcp", &self.0.tcp)
            .field("tls", &self.is_tls())
            .finish()
    }
}

impl From<TcpStream> for Stream {
    fn from(tcp: TcpStream) -> Stream {
        Stream::new(tcp)
    }
}

impl Stream {
    pub fn new(stream: TcpStream) -> Stream {
        Stream(Arc::new(Shared {
            tcp: stream,
            tls: std::sync::OnceLock::new(),
        }))
    }

    /// The socket, for timeouts and addresses. Bytes go through the
    /// `Stream` itself (they may be TLS records on the socket).
    pub fn tcp(&self) -> &TcpStream {
        &self.0.tcp
    }

    /// Sends what the socket takes now, without waiting: how many bytes of
    /// `bytes` went (0 when its buffer is full). `None` on a TLS stream,
    /// whose records cannot be cut short.
    pub fn send_now(&self, bytes: &[u8]) -> Option<io::Result<usize>> {
        if self.is_tls() {
            return None;
        }
        let socket = socket2::SockRef::from(&self.0.tcp);
        Some(
            match socket.send_with_flags(bytes, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
                other => other,
            },
        )
    }

    /// Whether the peer proved a certificate the CA signed: a TLS peer
    /// that presented one to a listener asking for it.
    pub fn peer_certified(&self) -> bool {
        self.0.tls.get().is_some_and(tls::Session::peer_certified)
    }

    /// Whether the peer has closed or reset a connection kept open for
    /// reuse, as far as can be told without waiting: it sent its end of
    /// stream (or a reset), or plaintext bytes nobody asked for. Checked
    /// before sending on a connection that sat idle, so that a request is
    /// never written to a peer already gone (where it would look as if it
    /// might have been received). Pending TLS records (a session ticket)
    /// do not count.
    pub fn peer_closed(&self) -> bool {
        let socket = socket2::SockRef::from(&self.0.tcp);
        let mut byte = [std::mem::MaybeUninit::<u8>::uninit(); 1];
        match socket.recv_with_flags(&mut byte, libc::MSG_DONTWAIT | libc::MSG_PEEK) {
            Ok(0) => true,
            Ok(_) => !self.is_tls(),
            Err(e) => e.kind() != io::ErrorKind::WouldBlock,
        }
    }

    /// Whether `other` is a handle on this same connection.
    pub fn same(&self, other: &Stream) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// Whether the connection is encrypted.
    pub fn is_tls(&self) -> bool {
        self.0.tls.get().is_some()
    }

    fn set_tls(&self, session: tls::Session) {
        if self.0.tls.set(session).is_err() {
            log::error!("a TLS session was set up twice on one connection");
        }
    }

    /// Another handle on the same connection (as `TcpStream::try_clone`).
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(self.clone())
    }

    /// As `TcpStream::shutdown`; ending the write half over TLS first says
    /// close_notify.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        if how == Shutdown::Write {
            if let Some(session) = self.0.tls.get() {
                session.close_notify(&self.0.tcp);
            }
        }
        self.0.tcp.shutdown(how)
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.tcp.local_addr()
    }

    /// Ends reading from another thread: a read blocked on the connection
    /// returns end of stream, while replies can still be written.
    pub fn end_reading(&self) {
        // Fails only if the peer is already gone, which ends reading too.
        let _ = self.0.tcp.shutdown(Shutdown::Read);
    }

    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.0.tcp.peer_addr()
    }

    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.0.tcp.set_read_timeout(timeout)
    }

    pub fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.0.tcp.set_write_timeout(timeout)
    }

    /// One read; over TLS, `Interrupted` when a socket read brought no
    /// whole record yet (see `Paced`).
    fn read_once(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self.0.tls.get() {
            Some(session) => session.read(&self.0.tcp, buf, true),
            None => (&self.0.tcp).read(buf),
        }
    }
}

impl io::Read for &Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.0.tls.get() {
            Some(session) => session.read(&self.0.tcp, buf, false),
            None => (&self.0.tcp).read(buf),
        }
    }
}

impl io::Write for &Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self.0.tls.get() {
            Some(session) => session.write(&self.0.tcp, buf),
            None => (&self.0.tcp).write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        // Records are written out as they are made; nothing is held back.
        (&self.0.tcp).flush()
    }
}

impl io::Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self).read(buf)
    }
}

impl io::Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self).write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        (&*self).flush()
    }
}

/// Ends a connection without a reset: first says end of stream after what
/// was written, then reads and drops what the peer sent that nobody read.
/// Closing a socket with unread input makes the kernel reset the
/// connection, and a reset can destroy the replies written last (a
/// client's final `shutting_down` answer among them).
pub fn close_gracefully(stream: &Stream) {
    let tcp = stream.tcp();
    let _ = stream.shutdown(Shutdown::Write);
    if tcp.set_nonblocking(true).is_err() {
        return;
    }
    let mut buf = [0u8; 16 * 1024];
    let mut dropped = 0usize;
    // Until the queue is empty (end of stream, or nothing more for now),
    // and never more than a few frames' worth.
    while dropped < 64 * 1024 * 1024 {
        match (&*tcp).read(&mut buf) {
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

impl Paced {
    /// The connection under the deadlines, for another thread to end its
    /// reading (see `Stream::end_reading`).
    pub fn stream(&self) -> &Stream {
        &self.stream
    }
}

impl crate::proto::Deadline for Paced {
    fn set_deadline(&mut self, deadline: Option<std::time::Instant>) {
        self.deadline = deadline;
    }
}

impl io::Read for Paced {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // Over TLS one call may need several socket reads (a record
        // trickling in): each is bounded by the timeout, and the deadline
        // is checked again between them.
        loop {
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
            match self.stream.read_once(buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted && self.stream.is_tls() => {}
                // The socket's timeout ran out with the deadline: say which.
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        && self
                            .deadline
                            .is_some_and(|d| d <= std::time::Instant::now()) => {}
                other => return other,
            }
        }
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
