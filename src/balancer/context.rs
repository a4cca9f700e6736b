//! What a client connection's thread works with: its peer, its settings,
//! and its ways to the rest of the balancer (the board it picks servers
//! on, the dispatcher's inbox, the byte budget, the state file...). The
//! connection's loop (`conn`, `intake`) and the handlers of each request
//! kind (`handlers`, `relay`) all take it.

use super::board::Board;
use super::event::Event;
use super::flow::Budget;
use super::link::Links;
use super::session::Access;
use super::stats::Stats;
use super::tracking::Tracker;
use crate::auth::ClusterKey;
use crate::ids::Generator;
use crate::net;
use crossbeam_channel::{Receiver, Sender, TryRecvError};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// How clients reach servers for file uploads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Through the balancer, which relays every chunk.
    #[default]
    Proxy,
    /// Straight to a server the balancer names, with a signed ticket.
    Redirect,
}

#[derive(Debug, Clone)]
pub struct FileSettings {
    pub mode: Mode,
    /// Signs tickets (redirect mode, and proxy-mode uploads to servers that
    /// hold the key).
    pub key: Option<ClusterKey>,
    pub ticket_ttl: Duration,
    pub connect_timeout: Duration,
    /// How long a server may take over one exchange.
    pub server_timeout: Duration,
    /// How long an upload waits for a server to be able to take it.
    pub wait: Duration,
    /// Where servers report redirected uploads (this balancer's address).
    pub advertise: Option<SocketAddr>,
    /// Largest file an upload may announce (`--max-file-size`).
    pub max_file_size: u64,
    /// How servers are reached for files (shared with the catalog's sync).
    pub reach: super::backend::ServerReach,
    /// How far the catalog's first look at the servers has got (with a
    /// state file).
    pub catalog: Option<Arc<super::catalog::sync::Progress>>,
    /// `--replicas`: copies each entry should have (`list` flags fewer).
    pub replicas: usize,
    /// Starts a repair pass now (with `--replicas` above 1 and a state).
    pub repair: Option<Sender<()>>,
}

#[derive(Debug, Clone, Copy)]
pub struct ConnSettings {
    /// A client silent for this long (or stalled mid-frame) is disconnected
    /// once its pending replies are sent.
    pub idle_timeout: Duration,
    /// The same for clients of the original format.
    pub legacy_idle_timeout: Duration,
    pub max_frame: usize,
    /// A frame's payload must arrive within this, once its header has; and
    /// a connection's first whole request within this of connecting.
    pub frame_timeout: Duration,
    /// Requests one connection may have queued or in flight.
    pub window: usize,
    /// Largest document content one request may carry, in bytes.
    pub max_document_size: Option<usize>,
    /// Copies of each document (`--replicas`, `--min-replicas`).
    pub replicas: super::replicas::Replicas,
}

/// What a connection thread works with.
pub struct Conn {
    pub peer: SocketAddr,
    /// Where documents sent again may already be stored; `None` with
    /// servers of the original format, which know no keys.
    pub keys: Option<Arc<dyn super::keys::KeyLookup>>,
    pub settings: ConnSettings,
    /// Where servers are picked for this connection's requests.
    pub board: Arc<Board>,
    /// The dispatcher's inbox: requests that must wait, membership, picks
    /// for files.
    pub events: Sender<Event>,
    /// Starts the link of a server that joins through this connection.
    pub links: Arc<Links>,
    /// Request numbers, shared with the dispatcher.
    pub numbers: Arc<Generator>,
    pub stats: Arc<Stats>,
    pub budget: Arc<Budget>,
    /// Disconnected when the balancer shuts down.
    pub stop: Receiver<()>,
    /// Answers `transfers`; `None` when tracking is off.
    pub tracker: Option<Tracker>,
    /// How file uploads reach servers.
    pub files: Arc<FileSettings>,
    /// Who may ask what (cluster key, users).
    pub access: Arc<Access>,
    /// This connection's standing, for admission: whether it has sent a
    /// whole request, has work outstanding, is trusted.
    pub mark: net::Mark,
    /// Counts it open, as a client's or a server's.
    pub open: super::stats::OpenConnection,
}

impl Conn {
    pub fn shutting_down(&self) -> bool {
        matches!(self.stop.try_recv(), Err(TryRecvError::Disconnected))
    }
}
