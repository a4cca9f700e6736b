//! The seam between the balancer and one kind of storage server: a
//! `Backend` carries out requests and answers status probes over one wire.
//! `Framed` speaks our protocol (acknowledged, persistent connection);
//! `Legacy` speaks the original system's (one connection per document, no
//! acknowledgement, a one-byte status). TLS sits under `Framed`, in
//! `net::connect`; the original format is always plaintext.

use super::dispatch::Work;
use super::BackendWire;
use crate::auth::ClusterKey;
use crate::handshake::{self, HandshakeError};
use crate::health::Observation;
use crate::net;
use crate::policy::Load;
use crate::proto::{self, legacy, CallError, Connection, Reply, Request, StatusReport};
use crate::throttle::{self, Throttle};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Debug, Clone)]
pub struct BackendSettings {
    pub connect_timeout: Duration,
    /// How long a server may take to answer one request.
    pub io_timeout: Duration,
    /// Connect and read timeout of a status probe.
    pub probe_timeout: Duration,
    pub max_frame: usize,
    pub wire: BackendWire,
    /// With a key, every connection starts with the cluster handshake: a
    /// server that cannot prove the key gets nothing.
    pub key: Option<ClusterKey>,
}

/// Why a forward failed on the connection itself.
#[derive(Debug)]
pub struct LinkError {
    pub reason: String,
    /// The request was written, so the server may have carried it out.
    pub delivered: bool,
}

/// One connection's worth of talking to a server.
pub trait Backend: Send {
    /// Carries out one request and returns the server's reply. `number` is
    /// the request number (and the id on this connection).
    fn forward(&mut self, number: u64, work: &Work) -> Result<Reply, LinkError>;
}

/// Asks a server for its status, on a fresh connection.
pub fn probe(
    addr: &SocketAddr,
    id: u64,
    settings: &BackendSettings,
) -> (Observation, Option<StatusReport>) {
    let t = settings.probe_timeout;
    let cannot_connect = |e: std::io::Error| {
        (
            Observation::ProbeFailed(format!("cannot connect: {e}")),
            None,
        )
    };
    match settings.wire {
        BackendWire::Framed => match net::connect(addr, t, t) {
            Ok(stream) => {
                let mut conn = Connection::new(stream, settings.max_frame);
                if let Some(key) = &settings.key {
                    if let Err(e) = handshake::initiate(&mut conn, key, *addr, id) {
                        return (Observation::ProbeFailed(unproven(addr, &e)), None);
                    }
                }
                probe_framed(conn, id)
            }
            Err(e) => cannot_connect(e),
        },
        BackendWire::Legacy => match net::connect_plain(addr, t, t) {
            Ok(stream) => (probe_legacy(stream), None),
            Err(e) => cannot_connect(e),
        },
    }
}

/// Open connections of one server's link, so that they can be cut off at
/// once (shutting down past `--drain-timeout`).
#[derive(Debug, Default)]
pub struct Connections(Mutex<HashMap<usize, net::Stream>>);

impl Connections {
    fn set(&self, slot: usize, stream: Option<net::Stream>) {
        let mut map = crate::net::lock(&self.0);
        match stream {
            Some(s) => map.insert(slot, s),
            None => map.remove(&slot),
        };
    }

    /// Shuts every open connection down; blocked reads and writes fail.
    pub fn cut_all(&self) {
        for stream in crate::net::lock(&self.0).values() {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }
}

/// A backend for one worker of a link.
pub fn open(
    addr: SocketAddr,
    settings: &BackendSettings,
    connections: Arc<Connections>,
    slot: usize,
) -> Box<dyn Backend> {
    match settings.wire {
        BackendWire::Framed => Box::new(Framed {
            addr,
            settings: settings.clone(),
            conn: None,
            connections,
            slot,
        }),
        BackendWire::Legacy => Box::new(Legacy {
            addr,
            settings: settings.clone(),
        }),
    }
}

/// Unix time in milliseconds.
fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

struct Framed {
    addr: SocketAddr,
    settings: BackendSettings,
    conn: Option<Connection<net::Stream>>,
    connections: Arc<Connections>,
    slot: usize,
}

impl Backend for Framed {
    /// A reused connection that turns out dead (the server closed it while
    /// idle, or restarted) is replaced once before giving up.
    fn forward(&mut self, number: u64, work: &Work) -> Result<Reply, LinkError> {
        let payload = match work {
            // A server must not store it past half the time the balancer
            // waits for its answer: after that the balancer may retry it
            // elsewhere, and a late copy would be a duplicate.
            Work::Store(doc) => proto::encode_forward(
                number,
                number,
                Some(unix_ms() + self.settings.io_timeout.as_millis() as u64 / 2),
                &doc.fields,
            ),
            Work::Calc(operation) => proto::encode(&Request::Calc {
                id: number,
                operation: *operation,
            }),
            Work::Forget(numbers) => proto::encode(&Request::Forget {
                id: number,
                numbers: numbers.clone(),
            }),
        };
        let reused = self.conn.is_some();
        let reply = match self.exchange(&payload) {
            Err((first, cause)) if reused && !cause_is_timeout(&cause) => {
                log::debug!(
                    "link to {}: stale connection ({cause}), reconnecting",
                    self.addr
                );
                self.exchange(&payload).map_err(|(mut e, _)| {
                    // The first try may have reached the server even if the
                    // second could not connect.
                    e.delivered |= first.delivered;
                    e
                })
            }
            other => other.map_err(|e| e.0),
        }?;
        if let Reply::Error(e) = &reply {
            if e.code == proto::ErrorCode::Unauthenticated {
                self.close();
                return Err(LinkError {
                    reason: format!(
                        "the server wants the cluster handshake (start the balancer with --cluster-key-file): {}",
                        e.message
                    ),
                    delivered: false,
                });
            }
        }
        if reply.id().is_some_and(|id| id != number) {
            self.close();
            return Err(LinkError {
                reason: format!("reply for id {:?} while waiting for {number}", reply.id()),
                delivered: true,
            });
        }
        Ok(reply)
    }
}

fn cause_is_timeout(cause: &CallError) -> bool {
    matches!(cause, CallError::Frame(proto::FrameError::Timeout { .. }))
}

impl Framed {
    fn close(&mut self) {
        self.conn = None;
        self.connections.set(self.slot, None);
    }

    fn connect(&mut self) -> Result<Connection<net::Stream>, LinkError> {
        let s = &self.settings;
        let stream =
            net::connect(&self.addr, s.connect_timeout, s.io_timeout).map_err(|e| LinkError {
                reason: format!("cannot connect: {e}"),
                delivered: false,
            })?;
        self.connections.set(self.slot, stream.try_clone().ok());
        // Replies are small; requests may be forwarded with headroom.
        let mut conn = Connection::new(stream, s.max_frame + proto::FORWARD_HEADROOM);
        if let Some(key) = &s.key {
            // Ids of the handshake: 0 and 1, below any request number.
            if let Err(e) = handshake::initiate(&mut conn, key, self.addr, 0) {
                self.connections.set(self.slot, None);
                return Err(LinkError {
                    reason: unproven(&self.addr, &e),
                    delivered: false,
                });
            }
        }
        Ok(conn)
    }

    fn exchange(&mut self, payload: &[u8]) -> Result<Reply, (LinkError, CallError)> {
        let mut conn = match self.conn.take() {
            Some(c) if !c.get_ref().peer_closed() => c,
            // Gone while idle (a restart, a kill): a fresh connection, so
            // that nothing is written to a peer that can no longer read it.
            Some(_) => {
                self.close();
                self.connect().map_err(|e| (e, CallError::Closed))?
            }
            None => self.connect().map_err(|e| (e, CallError::Closed))?,
        };
        if let Err(e) = conn.send_payload(payload) {
            self.close();
            let err = LinkError {
                reason: format!("cannot send: {e}"),
                delivered: false,
            };
            return Err((err, e.into()));
        }
        match conn.recv::<Reply>() {
            Ok(reply) => {
                self.conn = Some(conn);
                Ok(reply)
            }
            Err(e) => {
                self.close();
                // A reset means the request was never read: a server that
                // read it and then died would have closed with an end of
                // stream (its receive queue empty), not a reset.
                let reset = matches!(&e, CallError::Frame(proto::FrameError::Io(io))
                    if io.kind() == std::io::ErrorKind::ConnectionReset);
                let err = LinkError {
                    reason: format!("no reply: {e}"),
                    delivered: !reset,
                };
                Err((err, e))
            }
        }
    }
}

/// Why a server is refused after a failed handshake; an impostor gets a
/// line of its own in the log.
fn unproven(addr: &SocketAddr, e: &HandshakeError) -> String {
    static LOGGED: OnceLock<Throttle<SocketAddr>> = OnceLock::new();
    if e.is_connection() {
        return format!("cluster handshake: {e}");
    }
    let reason = format!("did not prove the cluster key: {e}; it gets no documents");
    // Every probe and every link connection tries: one line per minute.
    let logged = LOGGED.get_or_init(|| Throttle::new(Duration::from_secs(60)));
    if let Some(skipped) = logged.check(addr) {
        log::warn!("server {addr} {reason}{}", throttle::more(skipped));
    }
    reason
}

fn probe_framed(mut conn: Connection<net::Stream>, id: u64) -> (Observation, Option<StatusReport>) {
    match conn.call(&Request::Status { id }) {
        Ok(Reply::Status(report)) => (
            Observation::ProbeOk {
                overloaded: report.overloaded,
                can_store: report.storage_writable,
                load: Some(load_of(&report)),
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

/// The figures of a status report the `resources` policy weighs. A
/// report without memory or disk totals (unknown to the server) counts as
/// plenty free rather than as full.
fn load_of(report: &StatusReport) -> Load {
    let fraction = |part: u64, whole: u64| {
        if whole == 0 {
            None
        } else {
            Some((part as f64 / whole as f64) as f32)
        }
    };
    let disk_total = report
        .disk_used_bytes
        .saturating_add(report.disk_free_bytes);
    Load {
        cpu_percent: report.cpu_percent,
        memory_fraction: fraction(report.memory_used_bytes, report.memory_total_bytes)
            .unwrap_or(0.0),
        disk_free_fraction: fraction(report.disk_free_bytes, disk_total).unwrap_or(1.0),
    }
}

struct Legacy {
    addr: SocketAddr,
    settings: BackendSettings,
}

impl Backend for Legacy {
    /// Sends a document the way the original balancer did: a new connection,
    /// one `json.dumps` text, close. The original server never acknowledges,
    /// so a complete write is the best evidence of success there is.
    fn forward(&mut self, number: u64, work: &Work) -> Result<Reply, LinkError> {
        let fields = match work {
            Work::Store(doc) => &doc.fields,
            Work::Calc(_) | Work::Forget(_) => {
                return Ok(Reply::error(
                    Some(number),
                    proto::ErrorCode::BadRequest,
                    "servers of the original format only store documents",
                ))
            }
        };
        let doc = proto::decode_document_fields(fields).map_err(|e| LinkError {
            reason: format!("cannot re-read the document: {e}"),
            delivered: false,
        })?;
        let s = &self.settings;
        let mut stream =
            net::connect_plain(&self.addr, s.connect_timeout, s.io_timeout).map_err(|e| {
                LinkError {
                    reason: format!("cannot connect: {e}"),
                    delivered: false,
                }
            })?;
        let text = legacy::dumps_document(&doc, Some(number));
        stream
            .write_all(text.as_bytes())
            .and_then(|()| stream.flush())
            .map_err(|e| LinkError {
                reason: format!("cannot send: {e}"),
                delivered: false,
            })?;
        Ok(Reply::Stored(proto::Stored {
            id: number,
            server: self.addr.to_string(),
            request_number: number,
            file: legacy::original_file_name(number, &doc.title),
            a_count: crate::text::count_a(&doc.content),
            existing: false,
        }))
    }
}

/// The original probe: send the status request, read exactly one byte.
fn probe_legacy(mut stream: TcpStream) -> Observation {
    let mut byte = [0u8; 1];
    let result = stream
        .write_all(legacy::STATUS_PROBE)
        .and_then(|()| stream.read_exact(&mut byte));
    match (result, byte[0]) {
        (Err(e), _) => Observation::ProbeFailed(format!("status probe failed: {e}")),
        (Ok(()), 0) => Observation::probe_ok(false),
        (Ok(()), 1) => Observation::probe_ok(true),
        (Ok(()), other) => {
            Observation::ProbeFailed(format!("status byte {other:#04x} is neither 0 nor 1"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_figures_from_a_report() {
        let report = StatusReport {
            cpu_percent: 42.0,
            memory_used_bytes: 1,
            memory_total_bytes: 4,
            disk_used_bytes: 3,
            disk_free_bytes: 1,
            ..StatusReport::default()
        };
        let load = load_of(&report);
        assert_eq!(load.cpu_percent, 42.0);
        assert_eq!(load.memory_fraction, 0.25);
        assert_eq!(load.disk_free_fraction, 0.25);
        // Totals the server could not read are not taken for a full disk.
        let load = load_of(&StatusReport::default());
        assert_eq!((load.memory_fraction, load.disk_free_fraction), (0.0, 1.0));
    }
}
