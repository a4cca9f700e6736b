//! How the balancer reaches one kind of storage server: status probes,
//! framed connections that proved the cluster key (the lanes of a link
//! carry requests on them), and the original system's wire (one
//! connection per document, no acknowledgement, a one-byte status). TLS
//! sits under the framed wire, in `net::connect`; the original format is
//! always plaintext.

use super::work::Failure;
use super::BackendWire;
use crate::auth::ClusterKey;
use crate::handshake::{self, HandshakeError};
use crate::health::Observation;
use crate::net;
use crate::policy::Load;
use crate::proto::{self, legacy, Connection, Reply, StatusReport, StorageRequest};
use crate::throttle::{self, Throttle};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::OnceLock;
use std::time::Duration;

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

/// How the balancer opens a connection of its own to a server: timeouts,
/// and the cluster key it proves first when there is one.
#[derive(Debug, Clone)]
pub struct ServerReach {
    pub key: Option<ClusterKey>,
    pub connect_timeout: Duration,
    /// How long a server may take over one exchange.
    pub server_timeout: Duration,
    pub max_frame: usize,
}

impl ServerReach {
    /// A connection to `addr` that has proved the cluster key (see
    /// `handshake`).
    pub fn connect(&self, addr: SocketAddr) -> std::io::Result<Connection<net::Stream>> {
        let stream = net::connect(&addr, self.connect_timeout, self.server_timeout)?;
        let mut conn = Connection::new(stream, self.max_frame + crate::proto::FORWARD_HEADROOM);
        if let Some(key) = &self.key {
            crate::handshake::initiate(&mut conn, key, addr, 0).map_err(|e| {
                log::warn!("server {addr} did not prove the cluster key: {e}; no file goes to it");
                std::io::Error::other(format!("server {addr} did not prove the cluster key: {e}"))
            })?;
        }
        Ok(conn)
    }
}

/// A framed connection to a server, the cluster key proven when there is
/// one (ids 0 and 1 of the handshake, below any request number). The
/// error says why not, for logs and for the jobs that waited for it.
pub fn connect_framed(addr: SocketAddr, settings: &BackendSettings) -> Result<net::Stream, String> {
    let stream = net::connect(&addr, settings.connect_timeout, settings.io_timeout)
        .map_err(|e| format!("cannot connect: {e}"))?;
    if let Some(key) = &settings.key {
        let mut conn = Connection::new(stream.clone(), settings.max_frame);
        handshake::initiate(&mut conn, key, addr, 0).map_err(|e| unproven(&addr, &e))?;
    }
    Ok(stream)
}

/// Sends a document the way the original balancer did: a new connection,
/// one `json.dumps` text, close. The original server never acknowledges,
/// so a complete write is the best evidence of success there is.
pub fn send_legacy(
    addr: SocketAddr,
    settings: &BackendSettings,
    number: u64,
    fields: &[u8],
) -> Result<Reply, (Failure, bool)> {
    let doc = proto::decode_document_fields(fields).map_err(|e| {
        (
            Failure::Link(format!("cannot re-read the document: {e}")),
            false,
        )
    })?;
    let not_sent = |e: std::io::Error, what: &str| (Failure::Link(format!("{what}: {e}")), false);
    let mut stream = net::connect_plain(&addr, settings.connect_timeout, settings.io_timeout)
        .map_err(|e| not_sent(e, "cannot connect"))?;
    let text = legacy::dumps_document(&doc, Some(number));
    stream
        .write_all(text.as_bytes())
        .and_then(|()| stream.flush())
        .map_err(|e| not_sent(e, "cannot send"))?;
    Ok(Reply::Stored(proto::Stored {
        id: number,
        server: addr.to_string(),
        request_number: number,
        file: legacy::original_file_name(number, &doc.title),
        a_count: crate::text::count_a(&doc.content),
        existing: false,
        copies: Vec::new(),
        under_replicated: false,
    }))
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
    match conn.call(&StorageRequest::Status { id }) {
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
