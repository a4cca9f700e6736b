//! Who is on the other end of one client connection, and what it may ask:
//! a peer that proved the cluster key (a server registering, see
//! `handshake`) may register and deregister; with `--users`, a user who
//! logged in may do the rest, and admin requests need an admin user.
//!
//! The connection thread asks `Session::admit` about every request before
//! carrying it out; handshake and login messages are answered here.

use crate::auth::ClusterKey;
use crate::handshake::Gate;
use crate::proto::{ErrorCode, Reply, Request};
use std::net::SocketAddr;

/// What every connection shares about access.
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// With a key, `register` and `deregister` need the cluster handshake.
    pub cluster_key: Option<ClusterKey>,
}

/// What to do with one request.
pub enum Verdict {
    /// Carry it out.
    Proceed,
    /// Answer this instead, and go on reading.
    Answer(Reply),
    /// Answer this, then close the connection.
    Close(Reply),
}

/// One connection's standing.
pub struct Session {
    gate: Gate,
    peer: SocketAddr,
}

impl Session {
    /// `local` is the address the connection reached the balancer at (the
    /// handshake proves it).
    pub fn new(access: &Access, peer: SocketAddr, local: SocketAddr) -> Session {
        Session {
            gate: Gate::new(access.cluster_key.as_ref(), local),
            peer,
        }
    }

    /// Answers handshake messages, and refuses requests this connection
    /// may not make yet.
    pub fn admit(&mut self, request: &Request) -> Verdict {
        if let Some(answer) = self.gate.handle(request) {
            if answer.close {
                log::warn!(
                    "connection from {}: failed the cluster handshake; closing",
                    self.peer
                );
                return Verdict::Close(answer.reply);
            }
            if self.gate.proven() {
                log::info!("connection from {}: proved the cluster key", self.peer);
            }
            return Verdict::Answer(answer.reply);
        }
        match request {
            Request::Register { id, .. } | Request::Deregister { id, .. }
                if self.gate.keyed() && !self.gate.proven() =>
            {
                log::warn!(
                    "connection from {}: `{}` without the cluster handshake; refused",
                    self.peer,
                    request.kind()
                );
                Verdict::Answer(Reply::error(
                    Some(*id),
                    ErrorCode::Unauthenticated,
                    "servers must prove the cluster key (hello) before they register",
                ))
            }
            _ => Verdict::Proceed,
        }
    }
}
