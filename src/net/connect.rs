//! Opening connections and listeners: timeouts on every socket, TLS when
//! this process has a CA to verify peers with, addresses from text.

use super::{tls, Stream};
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
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
