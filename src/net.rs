//! Sockets: connecting with timeouts, preparing accepted streams, telling
//! which wire a peer speaks from its first byte, and accept loops that stop
//! when told. TLS will plug in here.

use crate::proto::legacy;
use crossbeam_channel::{Receiver, TryRecvError};
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::Duration;

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
    mut handle: impl FnMut(TcpStream, SocketAddr),
) {
    let mut backoff = Duration::ZERO;
    loop {
        let accepted = listener.accept();
        if matches!(stop.try_recv(), Err(TryRecvError::Disconnected)) {
            return;
        }
        match accepted {
            Ok((stream, peer)) => {
                backoff = Duration::ZERO;
                handle(stream, peer);
            }
            Err(e) => {
                backoff = (backoff * 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
                log::warn!("accept failed: {e}; retrying in {backoff:?}");
                // A stop during the back-off is seen after the next accept.
                let _ = stop.recv_timeout(backoff);
            }
        }
    }
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
