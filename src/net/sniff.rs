//! Telling which wire an accepted peer speaks from its first byte, and
//! taking a TLS handshake where one starts.

use super::{close_gracefully, tls, Stream};
use crate::proto::legacy;
use std::io;
use std::time::{Duration, Instant};

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
