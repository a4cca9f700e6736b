//! What the other stages tell the dispatcher: the messages of its inbox.
//! A document's path needs none of them while some server can take it (a
//! connection thread sends it itself, see `board`); they carry what has to
//! wait, what went wrong, and what changes the pool.

use super::link::Link;
use super::work::{Failure, Job};
use super::ServerId;
use crate::health::Observation;
use crate::proto::Reply;
use crossbeam_channel::Sender;
use std::fmt;
use std::net::SocketAddr;

/// A membership request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// An operator adds a server.
    Add(SocketAddr),
    /// A server announces itself (also its heartbeat).
    Register(SocketAddr),
    /// An operator drains a server.
    Drain(SocketAddr),
    /// A server leaves.
    Deregister(SocketAddr),
    /// An operator removes a server now.
    Remove(SocketAddr),
}

impl Change {
    pub fn addr(self) -> SocketAddr {
        match self {
            Change::Add(a)
            | Change::Register(a)
            | Change::Drain(a)
            | Change::Deregister(a)
            | Change::Remove(a) => a,
        }
    }

    /// Whether it may bring a server into the pool (and so needs a link).
    pub fn joins(self) -> bool {
        matches!(self, Change::Add(_) | Change::Register(_))
    }
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self {
            Change::Add(_) => "add_server",
            Change::Register(_) => "register",
            Change::Drain(_) => "drain_server",
            Change::Deregister(_) => "deregister",
            Change::Remove(_) => "remove_server",
        };
        write!(f, "{kind} {}", self.addr())
    }
}

/// A link started for a server that may join, with its id and counters.
#[derive(Debug)]
pub struct NewLink {
    pub id: ServerId,
    pub stats: std::sync::Arc<super::stats::ServerStats>,
    pub link: Link,
}

/// The server chosen for a file transfer.
#[derive(Debug, Clone, PartialEq)]
pub struct Picked {
    pub name: String,
    pub addr: SocketAddr,
    /// The transfer's request number.
    pub number: u64,
}

/// The dispatcher's inbox.
#[derive(Debug)]
pub enum Event {
    /// A job no server could take when it came in (or others were waiting
    /// before it): it waits in the queue.
    Submit(Box<Job>),
    /// A request on this server ended while jobs wait or the server
    /// drains: a place may be free.
    Freed(ServerId),
    /// A forward failed; the job goes back to the queue (or is given up).
    Retry {
        server: ServerId,
        job: Box<Job>,
        failure: Failure,
        /// The request may have reached the server; counts as an attempt.
        delivered: bool,
    },
    /// A job was stored on `server` after other servers may have stored it
    /// too: they are told to forget it.
    Doubt {
        server: ServerId,
        number: u64,
        /// The client's key of the document: forgotten by key too, since
        /// another balancer may have sent it there under another number.
        key: Option<crate::proto::ClientKey>,
        uncertain: Vec<ServerId>,
    },
    /// A forward was carried out on a server whose storage errors are
    /// being counted (it resets the count).
    Served(ServerId),
    /// A `forget` came back (or could not be sent); `ok` when the server
    /// carried it out.
    Forgotten {
        server: ServerId,
        numbers: Vec<u64>,
        ok: bool,
    },
    /// A `forget` of client keys came back (or could not be sent).
    KeysForgotten {
        server: ServerId,
        keys: Vec<crate::proto::ClientKey>,
        ok: bool,
    },
    /// One round of status probes, applied together so that no server gets
    /// a head start.
    Probes(Vec<(ServerId, Observation)>),
    /// A server joins or leaves; the answer goes to `reply` with `id`. A
    /// change that may bring a new server in carries its link, started by
    /// whoever asked (the dispatcher starts no threads).
    Membership {
        change: Change,
        id: u64,
        reply: Sender<Reply>,
        link: Option<NewLink>,
    },
    /// Another balancer sharing the state drained or removed a server this
    /// one does not have: it stays out here too (until an operator adds
    /// it again).
    Banned(SocketAddr),
    /// A connection needs a server for a file transfer: `prefer` when it
    /// can take work, else the policy's choice among the others not in
    /// `avoid`. The answer carries a request number for tracking.
    PickServer {
        prefer: Option<String>,
        avoid: Vec<String>,
        reply: Sender<Option<Picked>>,
    },
}
