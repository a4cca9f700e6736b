//! TLS on every link (rustls with the ring provider), one context per
//! process.
//!
//! The binaries turn `--tls-cert`, `--tls-key` and `--tls-ca` into a `Tls`
//! and `install` it once at start, like the logger: from then on
//! `net::connect` speaks TLS wherever the process has a CA to verify peers
//! with, and `net::detect_wire` accepts TLS wherever it has a certificate
//! to present. Nothing else in the code knows about TLS.
//!
//! Peers are verified by IP address: connections are made to resolved
//! socket addresses, so the peer's certificate must carry the address as
//! an IP subject alternative name (`balancer gen-certs` writes 127.0.0.1
//! and ::1, plus the `--hosts` given).
//!
//! A `Session` is shared by the thread that reads a connection and the one
//! that writes it. Its rustls state sits behind a mutex held only while
//! bytes are fed in or taken out, never across socket I/O: the reader reads
//! the socket, then locks and feeds; the writer locks, encrypts, unlocks,
//! then writes the socket. A second mutex keeps socket writes (and so TLS
//! records) in the order they were produced.

pub mod certs;

use crate::sync::lock;
use pki_types::pem::PemObject;
use pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};
use std::io::{self, Read, Write};
use std::net::{IpAddr, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The first byte of a TLS handshake record (a ClientHello).
pub const HANDSHAKE_RECORD: u8 = 0x16;

/// Bytes read from the socket at a time.
const READ_CHUNK: usize = 16 * 1024;

/// What this process does with TLS.
#[derive(Clone)]
pub struct Tls {
    /// Present on listeners: connections that start a handshake get one.
    accept: Option<Arc<ServerConfig>>,
    /// Present when connecting: every outgoing connection is TLS.
    connect: Option<Arc<ClientConfig>>,
    /// What listeners ask of connecting peers.
    client_certs: ClientCerts,
    /// Serve original-format peers in plaintext on a TLS port.
    allow_legacy_plaintext: bool,
    /// A peer must finish its handshake within this once it has started.
    handshake_timeout: Duration,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("accept", &self.accept.is_some())
            .field("connect", &self.connect.is_some())
            .field("client_certs", &self.client_certs)
            .field("allow_legacy_plaintext", &self.allow_legacy_plaintext)
            .field("handshake_timeout", &self.handshake_timeout)
            .finish()
    }
}

/// The PEM files of one process (`--tls-cert`, `--tls-key`, `--tls-ca`,
/// `--tls-client-ca`).
#[derive(Debug, Clone, Copy, Default)]
pub struct TlsFiles<'a> {
    pub cert: Option<&'a Path>,
    pub key: Option<&'a Path>,
    /// Verifies the peers this process connects to.
    pub ca: Option<&'a Path>,
    /// Verifies the certificates of peers connecting to this process's
    /// listeners; `ca` when not given.
    pub client_ca: Option<&'a Path>,
}

/// Whether a TLS listener asks connecting peers for a certificate (as
/// HAProxy's `verify none|optional|required` on a `bind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ClientCerts {
    /// Peers present none (clients checking the listener, as with HTTPS).
    #[default]
    None,
    /// A peer may present one, and it is verified when it does.
    Optional,
    /// Every peer must present a certificate the CA signed (mutual TLS).
    Required,
}

impl std::fmt::Display for ClientCerts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ClientCerts::None => "none",
            ClientCerts::Optional => "optional",
            ClientCerts::Required => "required",
        })
    }
}

static INSTALLED: OnceLock<Tls> = OnceLock::new();

/// Makes `tls` this process's TLS context. Only the first call counts.
pub fn install(tls: Tls) {
    if INSTALLED.set(tls).is_err() {
        log::warn!("a TLS context was already installed; keeping the first one");
    }
}

/// The process's TLS context, if one was installed.
pub fn installed() -> Option<&'static Tls> {
    INSTALLED.get()
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Checks that nothing asks for what only TLS does, when no TLS file is
/// given.
fn plaintext(
    files: &TlsFiles<'_>,
    client_certs: ClientCerts,
    allow_legacy_plaintext: bool,
) -> Result<(), String> {
    if allow_legacy_plaintext {
        return Err("--allow-legacy-plaintext only makes sense with --tls-cert".into());
    }
    if files.client_ca.is_some() || client_certs != ClientCerts::None {
        return Err("client certificates are asked for by a TLS listener: \
                    --tls-client-ca and --tls-client-certs need --tls-cert and --tls-key"
            .into());
    }
    Ok(())
}

impl Tls {
    /// Reads the PEM files. A certificate with its key makes listeners
    /// serve TLS, asking peers for certificates as `client_certs` says
    /// (verified against `client_ca`, else `ca`); a CA makes connections
    /// TLS, verified against it, presenting this process's certificate when
    /// it has one. The two sides are set apart, so a balancer can take
    /// clients without certificates and still use mutual TLS with its
    /// servers. `None` when no file is given.
    pub fn load(
        files: TlsFiles<'_>,
        client_certs: ClientCerts,
        allow_legacy_plaintext: bool,
        handshake_timeout: Duration,
    ) -> Result<Option<Tls>, String> {
        let identity = match (files.cert, files.key) {
            (Some(cert), Some(key)) => Some((read_certs(cert)?, read_key(key)?)),
            (None, None) => None,
            (Some(_), None) => return Err("--tls-cert needs --tls-key".into()),
            (None, Some(_)) => return Err("--tls-key needs --tls-cert".into()),
        };
        let roots = match files.ca {
            Some(ca) => Some(Arc::new(read_roots(ca)?)),
            None => None,
        };
        if identity.is_none() && roots.is_none() {
            return plaintext(&files, client_certs, allow_legacy_plaintext).map(|()| None);
        }
        let client_roots = match (client_certs, files.client_ca) {
            (ClientCerts::None, _) => None,
            (_, Some(ca)) => Some(Arc::new(read_roots(ca)?)),
            (_, None) => Some(roots.clone().ok_or(
                "--tls-client-certs optional|required needs a CA to verify them: \
                 --tls-client-ca or --tls-ca",
            )?),
        };
        let accept = match &identity {
            Some((certs, key)) => Some(Arc::new(server_config(
                certs.clone(),
                key.clone_key(),
                client_roots.map(|r| (r, client_certs == ClientCerts::Optional)),
            )?)),
            None if client_certs != ClientCerts::None => {
                return Err("--tls-client-certs needs --tls-cert and --tls-key".into())
            }
            None => None,
        };
        let connect = match &roots {
            Some(roots) => Some(Arc::new(client_config(
                roots.clone(),
                identity.as_ref().map(|(c, k)| (c.clone(), k.clone_key())),
            )?)),
            None => None,
        };
        Ok(Some(Tls {
            accept,
            connect,
            client_certs: if identity.is_some() {
                client_certs
            } else {
                ClientCerts::None
            },
            allow_legacy_plaintext,
            handshake_timeout,
        }))
    }

    /// The TLS part of a program's start-up security line: what its
    /// listener and its own connections do.
    pub fn describe(tls: Option<&Tls>) -> String {
        let Some(tls) = tls else {
            return "no TLS (plaintext listener and connections)".into();
        };
        let listener = if tls.accepts() {
            format!("TLS listener (client certificates: {})", tls.client_certs)
        } else {
            "plaintext listener".into()
        };
        let connections = if tls.connects() {
            "TLS connections verified against --tls-ca"
        } else {
            "plaintext connections"
        };
        format!("{listener}, {connections}")
    }

    /// What listeners ask of connecting peers.
    pub fn client_certs(&self) -> ClientCerts {
        self.client_certs
    }

    /// Whether listeners serve TLS.
    pub fn accepts(&self) -> bool {
        self.accept.is_some()
    }

    /// Whether outgoing connections are TLS.
    pub fn connects(&self) -> bool {
        self.connect.is_some()
    }

    pub fn allow_legacy_plaintext(&self) -> bool {
        self.allow_legacy_plaintext
    }

    pub fn handshake_timeout(&self) -> Duration {
        self.handshake_timeout
    }

    pub(crate) fn accept_config(&self) -> Option<&Arc<ServerConfig>> {
        self.accept.as_ref()
    }

    pub(crate) fn connect_config(&self) -> Option<&Arc<ClientConfig>> {
        self.connect.as_ref()
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("cannot read certificates from {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("no certificate in {}", path.display()));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| format!("cannot read a private key from {}: {e}", path.display()))
}

fn read_roots(path: &Path) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(path)? {
        roots
            .add(cert)
            .map_err(|e| format!("{} is not a usable CA certificate: {e}", path.display()))?;
    }
    Ok(roots)
}

/// A listener's TLS settings; `client_roots` verifies peers' certificates,
/// with `true` when a peer may also present none.
fn server_config(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    client_roots: Option<(Arc<RootCertStore>, bool)>,
) -> Result<ServerConfig, String> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match client_roots {
        Some((roots, optional)) => {
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider());
            let verifier = if optional {
                verifier.allow_unauthenticated()
            } else {
                verifier
            };
            let verifier = verifier
                .build()
                .map_err(|e| format!("cannot verify client certificates: {e}"))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    builder
        .with_single_cert(certs, key)
        .map_err(|e| format!("the TLS certificate and key do not fit together: {e}"))
}

fn client_config(
    roots: Arc<RootCertStore>,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<ClientConfig, String> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    match identity {
        Some((certs, key)) => builder
            .with_client_auth_cert(certs, key)
            .map_err(|e| format!("the TLS certificate and key do not fit together: {e}")),
        None => Ok(builder.with_no_client_auth()),
    }
}

/// One TLS connection, shared by its reader and writer threads.
pub(crate) struct Session {
    state: Mutex<State>,
    /// Held while TLS bytes are taken out and written to the socket, so
    /// records reach the wire in order.
    writing: Mutex<()>,
}

struct State {
    conn: rustls::Connection,
    /// Bytes read from the socket that rustls has not taken yet.
    backlog: Vec<u8>,
    /// The socket reached end of stream; not yet told to rustls.
    eof: bool,
}

/// A TLS session failed (a bad certificate, an alert from the peer...),
/// with a hint at the usual cause; carried inside an `io::Error`.
#[derive(Debug)]
pub struct TlsError {
    error: rustls::Error,
    hint: &'static str,
}

impl std::fmt::Display for TlsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TLS: {}{}", self.error, self.hint)
    }
}

impl std::error::Error for TlsError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

/// Whether an I/O error is a failed TLS session (not a broken socket).
pub fn is_tls_failure(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<TlsError>())
}

fn tls_error(error: rustls::Error) -> io::Error {
    let hint = match &error {
        rustls::Error::InvalidCertificate(_) => {
            " (is --tls-ca the CA that signed the peer's certificate, and does the \
             certificate name this address?)"
        }
        rustls::Error::NoCertificatesPresented => {
            " (this side requires a client certificate: connect with --tls-cert and --tls-key)"
        }
        rustls::Error::AlertReceived(_) => " (the peer refused the TLS session)",
        _ => "",
    };
    io::Error::new(io::ErrorKind::InvalidData, TlsError { error, hint })
}

/// Drives a handshake to its end, each socket read and write bounded by
/// what is left of `timeout`.
fn drive_handshake(
    conn: &mut rustls::Connection,
    tcp: &TcpStream,
    timeout: Duration,
) -> io::Result<()> {
    let deadline = Instant::now() + timeout;
    let late = || {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("the TLS handshake did not finish within {timeout:?}"),
        )
    };
    let left = || {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            Err(late())
        } else {
            Ok(left)
        }
    };
    let timed_out = |e: io::Error| match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => late(),
        _ => e,
    };
    loop {
        if conn.wants_write() {
            tcp.set_write_timeout(Some(left()?))?;
            let out = take_outgoing(conn)?;
            (&*tcp).write_all(&out).map_err(timed_out)?;
        }
        if !conn.is_handshaking() {
            return Ok(());
        }
        tcp.set_read_timeout(Some(left()?))?;
        let n = conn.read_tls(&mut &*tcp).map_err(timed_out)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the peer closed the connection during the TLS handshake",
            ));
        }
        if let Err(e) = conn.process_new_packets() {
            // Tell the peer why (an alert), as far as it listens.
            if let Ok(out) = take_outgoing(conn) {
                let _ = (&*tcp).write_all(&out);
            }
            return Err(tls_error(e));
        }
    }
}

/// Takes every TLS byte waiting to be sent.
fn take_outgoing(conn: &mut rustls::Connection) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out)?;
    }
    Ok(out)
}

impl Session {
    /// Runs the handshake as the connecting side; the peer is verified as
    /// `ip`. Gives up after `timeout`.
    pub(crate) fn connect(
        config: Arc<ClientConfig>,
        ip: IpAddr,
        tcp: &TcpStream,
        timeout: Duration,
    ) -> io::Result<Session> {
        let conn =
            ClientConnection::new(config, ServerName::IpAddress(ip.into())).map_err(tls_error)?;
        Session::handshake(conn.into(), tcp, timeout)
    }

    /// Runs the handshake as the listening side; gives up after `timeout`.
    pub(crate) fn accept(
        config: Arc<ServerConfig>,
        tcp: &TcpStream,
        timeout: Duration,
    ) -> io::Result<Session> {
        let conn = ServerConnection::new(config).map_err(tls_error)?;
        Session::handshake(conn.into(), tcp, timeout)
    }

    /// Drives the handshake on this thread alone (nobody else has the
    /// connection yet), each socket read and write bounded by what is left
    /// of `timeout`; the socket's timeouts are restored afterwards.
    fn handshake(
        mut conn: rustls::Connection,
        tcp: &TcpStream,
        timeout: Duration,
    ) -> io::Result<Session> {
        let saved = (tcp.read_timeout()?, tcp.write_timeout()?);
        let result = drive_handshake(&mut conn, tcp, timeout);
        tcp.set_read_timeout(saved.0)?;
        tcp.set_write_timeout(saved.1)?;
        result?;
        Ok(Session {
            state: Mutex::new(State {
                conn,
                backlog: Vec::new(),
                eof: false,
            }),
            writing: Mutex::new(()),
        })
    }

    /// Reads plaintext. With `once`, reads the socket at most once and,
    /// if that brought no plaintext, returns `Interrupted` so that the
    /// caller can check its deadline (`Paced`) before reading on.
    ///
    /// An end of stream without the peer's close_notify reads as a plain
    /// end of stream: frames carry their own length, so a cut inside one
    /// is still caught, and a cut between two loses nothing.
    pub(crate) fn read(&self, tcp: &TcpStream, buf: &mut [u8], once: bool) -> io::Result<usize> {
        let mut socket_reads = 0;
        loop {
            let flush = {
                let mut state = lock(&self.state);
                match state.plaintext(buf) {
                    Ok(Some(n)) => return Ok(n),
                    Ok(None) => {}
                    Err(e) => {
                        drop(state);
                        // The alert that says why, if the socket takes it.
                        self.flush_if_free(tcp);
                        return Err(e);
                    }
                }
                state.conn.wants_write()
            };
            // Produced by reading (a key update, an alert): sent now unless
            // the writer is busy, in which case its next write takes them.
            if flush {
                self.flush_if_free(tcp);
            }
            if once && socket_reads == 1 {
                return Err(io::Error::new(
                    io::ErrorKind::Interrupted,
                    "TLS record not complete yet",
                ));
            }
            let mut chunk = [0u8; READ_CHUNK];
            let n = (&*tcp).read(&mut chunk)?;
            socket_reads += 1;
            let mut state = lock(&self.state);
            if n == 0 {
                state.eof = true;
            } else {
                state.backlog.extend_from_slice(&chunk[..n]);
            }
        }
    }

    /// Encrypts `buf` (or as much as rustls takes) and writes the records.
    pub(crate) fn write(&self, tcp: &TcpStream, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let _writing = lock(&self.writing);
        let (n, out) = {
            let mut state = lock(&self.state);
            let n = state.conn.writer().write(buf)?;
            (n, take_outgoing(&mut state.conn)?)
        };
        (&*tcp).write_all(&out)?;
        Ok(n)
    }

    /// Sends close_notify, unless a write is under way (a shutdown from
    /// another thread must not wait for a blocked writer).
    /// Whether the peer presented a certificate that was verified (a
    /// listener asking for client certificates; the connecting side's
    /// peer always has one).
    pub(crate) fn peer_certified(&self) -> bool {
        lock(&self.state)
            .conn
            .peer_certificates()
            .is_some_and(|certs| !certs.is_empty())
    }

    pub(crate) fn close_notify(&self, tcp: &TcpStream) {
        let Ok(_writing) = self.writing.try_lock() else {
            return;
        };
        let out = {
            let mut state = lock(&self.state);
            state.conn.send_close_notify();
            take_outgoing(&mut state.conn)
        };
        if let Ok(out) = out {
            let _ = (&*tcp).write_all(&out);
        }
    }

    /// Writes out pending TLS bytes if no writer holds the socket.
    fn flush_if_free(&self, tcp: &TcpStream) {
        let Ok(_writing) = self.writing.try_lock() else {
            return;
        };
        let out = take_outgoing(&mut lock(&self.state).conn);
        if let Ok(out) = out {
            let _ = (&*tcp).write_all(&out);
        }
    }
}

impl State {
    /// Plaintext from what has been received: `Some(n)` (0 at the end of
    /// the stream) or `None` when more must be read from the socket.
    fn plaintext(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        loop {
            self.conn.process_new_packets().map_err(tls_error)?;
            match self.conn.reader().read(buf) {
                Ok(n) => return Ok(Some(n)),
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(Some(0)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            if !self.backlog.is_empty() {
                // No plaintext is buffered now, so rustls has room.
                let taken = self.conn.read_tls(&mut &self.backlog[..])?;
                self.backlog.drain(..taken);
                if taken > 0 {
                    continue;
                }
            }
            if self.backlog.is_empty() && self.eof {
                self.eof = false;
                self.conn.read_tls(&mut io::empty())?;
                continue;
            }
            return Ok(None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::{Paced, Stream};
    use crate::proto::Deadline;
    use std::net::TcpListener;
    use std::thread;

    /// Two ends of a loopback connection after a mutual-TLS handshake.
    fn pair() -> (Stream, Stream, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        certs::generate(dir.path(), 1, &[]).unwrap();
        let load = |name: &str| {
            Tls::load(
                TlsFiles {
                    cert: Some(&dir.path().join(format!("{name}.pem"))),
                    key: Some(&dir.path().join(format!("{name}-key.pem"))),
                    ca: Some(&dir.path().join("ca.pem")),
                    client_ca: None,
                },
                ClientCerts::Required,
                false,
                Duration::from_secs(5),
            )
            .unwrap()
            .unwrap()
        };
        let (server_tls, client_tls) = (load("server1"), load("client"));
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let accepting = thread::spawn(move || {
            let (tcp, _) = listener.accept().unwrap();
            let stream = Stream::new(tcp);
            let config = server_tls.accept_config().unwrap().clone();
            let session = Session::accept(config, stream.tcp(), Duration::from_secs(5)).unwrap();
            stream.set_tls(session);
            stream
        });
        let client = Stream::new(TcpStream::connect(addr).unwrap());
        let config = client_tls.connect_config().unwrap().clone();
        let session =
            Session::connect(config, addr.ip(), client.tcp(), Duration::from_secs(5)).unwrap();
        client.set_tls(session);
        let accepted = accepting.join().unwrap();
        assert!(accepted.peer_certified() && client.peer_certified());
        (client, accepted, dir)
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    }

    #[test]
    fn both_directions_at_once_with_a_reader_and_a_writer_per_end() {
        let (a, b, _dir) = pair();
        const LEN: usize = 8 * 1024 * 1024;
        let mut threads = Vec::new();
        for (stream, seed) in [(a.clone(), 1u8), (b.clone(), 2u8)] {
            threads.push(thread::spawn(move || {
                let data = pattern(LEN, seed);
                for chunk in data.chunks(64 * 1024) {
                    (&stream).write_all(chunk).unwrap();
                }
                Vec::new()
            }));
        }
        for (stream, seed) in [(a, 2u8), (b, 1u8)] {
            threads.push(thread::spawn(move || {
                let mut got = vec![0u8; LEN];
                (&stream).read_exact(&mut got).unwrap();
                assert!(got == pattern(LEN, seed), "bytes changed on the way");
                got
            }));
        }
        for t in threads {
            t.join().unwrap();
        }
    }

    #[test]
    fn a_record_trickling_in_still_meets_the_frame_deadline() {
        let (client, server, _dir) = pair();
        // One record made by the client but written a byte at a time, each
        // byte well within the idle timeout.
        let record = {
            let session = client.tls_session().unwrap();
            let mut state = lock(&session.state);
            state.conn.writer().write_all(&[7u8; 200]).unwrap();
            take_outgoing(&mut state.conn).unwrap()
        };
        let tcp = client.tcp().try_clone().unwrap();
        let trickle = thread::spawn(move || {
            for byte in record {
                if (&tcp).write_all(&[byte]).is_err() {
                    return;
                }
                thread::sleep(Duration::from_millis(10));
            }
        });
        let mut paced = Paced::new(server, Duration::from_millis(500));
        let started = Instant::now();
        paced.set_deadline(Some(started + Duration::from_millis(300)));
        let mut buf = [0u8; 256];
        let err = paced.read(&mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
        assert!(
            started.elapsed() < Duration::from_millis(1500),
            "the deadline was kept only after {:?}",
            started.elapsed()
        );
        let _ = client.tcp().shutdown(std::net::Shutdown::Both);
        trickle.join().unwrap();
    }
}
