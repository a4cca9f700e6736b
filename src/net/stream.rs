//! `Stream`, one connection shared by the threads that read and write it
//! (plaintext over TCP or TLS), its graceful close, and `Paced`, its reads
//! bounded by a frame's deadline.

use super::tls;
use std::io::{self, Read};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

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

    /// Whether `other` is a handle on this same connection.
    pub fn same(&self, other: &Stream) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// Whether the connection is encrypted.
    pub fn is_tls(&self) -> bool {
        self.0.tls.get().is_some()
    }

    /// The TLS session, for tests that write records by hand.
    #[cfg(test)]
    pub(super) fn tls_session(&self) -> Option<&tls::Session> {
        self.0.tls.get()
    }

    pub(super) fn set_tls(&self, session: tls::Session) {
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
