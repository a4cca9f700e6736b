//! The balancer: accepts client connections, queues their documents and
//! spreads them over the storage servers.
//!
//! Threads: the accept loop, one per client connection plus its reply
//! writer (`conn`, with `flow` control), the dispatcher (`dispatch`, which
//! also owns the pool's membership), `--max-in-flight` link workers per
//! server (`link`, each with a `backend` connection), the monitor
//! (`monitor`) and, with `--metrics`, the
//! Prometheus responder (`metrics`) and, with `--state`, the transfer
//! tracker's writer (`tracking`). They talk through crossbeam channels;
//! shutting down is dropping senders. Counters for `servers` requests and
//! metrics live in `stats`. `Balancer::start` returns a `Handle`: its
//! `Stopper` begins a drained shutdown, `join` waits for every thread.
//! With `--users`, one more thread writes the failed-login lines that
//! `logins` holds back (`session::spawn_failure_log`). With a state file,
//! the `catalog` of stored files and documents lives there too, and one
//! thread keeps it in step with the servers (`catalog::sync`).

pub mod backend;
pub mod board;
pub mod catalog;
pub mod client_out;
pub mod conn;
pub mod context;
pub mod dispatch;
pub mod errands;
pub mod event;
pub mod flow;
pub mod follow;
pub mod handlers;
pub mod intake;
pub mod keys;
pub mod lane;
pub mod lease;
pub mod limits;
pub mod link;
pub mod logins;
pub mod metrics;
pub mod monitor;
pub mod outcome;
pub mod relay;
pub mod repair;
pub mod replicas;
pub mod session;
mod start;
pub mod stats;
pub mod store;
pub mod tracking;
mod upload_copies;
pub mod users;
pub mod work;

use crate::error::Error;
use crate::ids;
use crate::net;
use crate::policy::PolicyKind;
use crate::proto;
use backend::BackendSettings;
use crossbeam_channel::Sender;
use dispatch::{Dispatcher, Settings};
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// The default `--max-file-size` of the balancer and the servers: 1 TiB,
/// larger than any file people send through such a system, small enough
/// that a declared size near 2^64 is refused before anything is reserved.
pub const DEFAULT_MAX_FILE_SIZE: u64 = 1 << 40;

/// A server's stable id inside one balancer: logs and counters follow it,
/// whatever servers come and go around it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServerId(pub u32);

/// The protocol spoken to storage servers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendWire {
    /// Framed JSON with acknowledgements (PROTOCOL.md).
    #[default]
    Framed,
    /// The original system's format: one connection per document and no
    /// acknowledgement, status by a one-byte probe.
    Legacy,
}

/// A storage server as the balancer knows it.
#[derive(Debug, Clone)]
pub struct Backend {
    /// How logs and replies name it.
    pub name: String,
    pub addr: SocketAddr,
}

impl Backend {
    pub fn new(addr: SocketAddr) -> Backend {
        Backend {
            name: addr.to_string(),
            addr,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub servers: Vec<Backend>,
    /// Whether `servers` join the pool the state file remembers. Servers
    /// started inside this process (`--local-servers`) do not: they end
    /// with it, and on free ports the next run's are others.
    pub remember_servers: bool,
    pub backend_wire: BackendWire,
    pub check_interval: Duration,
    pub probe_timeout: Duration,
    pub queue_timeout: Duration,
    pub server_timeout: Duration,
    pub client_timeout: Duration,
    /// A frame's payload must arrive within this once its header has, and
    /// a connection's first whole request within this of connecting.
    pub frame_timeout: Duration,
    /// Idle limit between documents for clients of the original format,
    /// which keep one connection open for a whole interactive session.
    pub legacy_client_timeout: Duration,
    pub max_attempts: u32,
    /// Requests on the wire to one server at once.
    pub max_in_flight: usize,
    /// Connections to each server, each carrying many requests at once.
    pub server_connections: usize,
    pub max_frame: usize,
    /// Payload bytes all connections together may have queued or in flight.
    pub max_queued_bytes: usize,
    /// Requests one client connection may have queued or in flight.
    pub client_window: usize,
    /// On shutdown, how long queued and in-flight requests may take.
    pub drain_timeout: Duration,
    /// Client connections open at once. Past it, or past
    /// `max_connections_per_ip` from one address, a new connection takes
    /// the place of an idle one (see `net::admission`); with every one at
    /// work, new ones wait in the listen backlog.
    pub max_connections: usize,
    /// Connections open at once from one IP address.
    pub max_connections_per_ip: usize,
    /// The node part of request numbers (see `ids`); random when `None`.
    pub balancer_id: Option<u16>,
    /// Where to serve Prometheus metrics, if anywhere.
    pub metrics: Option<SocketAddr>,
    /// Which server takes the next request.
    pub policy: PolicyKind,
    /// Good status probes in a row that bring a down server back.
    pub rise: u32,
    /// Failed status probes in a row that take a server down.
    pub fall: u32,
    /// The state recording every transfer (a SQLite file, or a PostgreSQL
    /// database several balancers share); `None` turns tracking off.
    pub state: Option<store::Location>,
    /// How file uploads reach servers: relayed, or redirected with a ticket.
    pub mode: relay::Mode,
    /// Signs redirect tickets (required in redirect mode); servers must
    /// prove it on every connection, and to register (see `handshake`).
    pub cluster_key: Option<crate::auth::ClusterKey>,
    /// How long a redirect ticket stays valid.
    pub ticket_ttl: Duration,
    /// With a cluster key, `BackendWire::Legacy` is refused unless this is
    /// set: the original servers cannot prove anything.
    pub allow_unauthenticated_legacy: bool,
    /// Logins (`--users`): every client request needs one; users live in
    /// the state file, so `state` must be set.
    pub users: bool,
    /// With `users`: the delays between login attempts, and when an
    /// account is locked.
    pub logins: logins::Settings,
    /// Largest document content a client may send, in bytes (`too_large`
    /// past it); `None`: whatever fits in `max_frame`.
    pub max_document_size: Option<usize>,
    /// Largest file an upload may announce, in bytes (`too_large` past it).
    pub max_file_size: u64,
    /// Copies of each document and file on distinct servers (`--replicas`,
    /// `--min-replicas`).
    pub replicas: replicas::Replicas,
    /// How the lost copies are made again (`--repair-after`,
    /// `--repair-rate`).
    pub repair: repair::RepairSettings,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 60002)),
            servers: (5001..=5003)
                .map(|p| Backend::new(SocketAddr::from(([127, 0, 0, 1], p))))
                .collect(),
            remember_servers: true,
            backend_wire: BackendWire::Framed,
            check_interval: Duration::from_millis(500),
            probe_timeout: Duration::from_secs(1),
            queue_timeout: Duration::from_secs(10),
            server_timeout: Duration::from_secs(30),
            client_timeout: Duration::from_secs(60),
            frame_timeout: Duration::from_secs(30),
            legacy_client_timeout: Duration::from_secs(3600),
            max_attempts: 3,
            max_in_flight: 256,
            server_connections: 2,
            max_frame: proto::DEFAULT_MAX_FRAME,
            max_queued_bytes: 256 * 1024 * 1024,
            client_window: 1024,
            drain_timeout: Duration::from_secs(30),
            max_connections: net::default_max_connections(),
            max_connections_per_ip: net::default_max_per_ip(net::default_max_connections()),
            balancer_id: None,
            metrics: None,
            policy: PolicyKind::RoundRobin,
            rise: crate::health::DEFAULT_RISE,
            fall: crate::health::DEFAULT_FALL,
            state: None,
            mode: relay::Mode::Proxy,
            cluster_key: None,
            ticket_ttl: Duration::from_secs(60),
            allow_unauthenticated_legacy: false,
            users: false,
            logins: logins::Settings::default(),
            max_document_size: None,
            max_file_size: DEFAULT_MAX_FILE_SIZE,
            replicas: replicas::Replicas::default(),
            repair: repair::RepairSettings::default(),
        }
    }
}

/// A bound balancer, ready to start.
pub struct Balancer {
    listener: TcpListener,
    metrics: Option<TcpListener>,
    config: Config,
}

impl Balancer {
    pub fn bind(config: Config) -> Result<Balancer, Error> {
        if config.max_attempts == 0
            || config.max_in_flight == 0
            || config.client_window == 0
            || config.rise == 0
            || config.fall == 0
        {
            return Err(Error::Config(
                "--max-attempts, --max-in-flight, --client-window, --rise and --fall must be at least 1".into(),
            ));
        }
        if config.max_queued_bytes < config.max_frame {
            return Err(Error::Config(format!(
                "--max-queued-bytes ({}) must be at least --max-frame ({})",
                config.max_queued_bytes, config.max_frame
            )));
        }
        if config.cluster_key.is_some()
            && config.backend_wire == BackendWire::Legacy
            && !config.allow_unauthenticated_legacy
        {
            return Err(Error::Config(
                "--backend-wire legacy cannot authenticate servers: the original format has no \
                 handshake, so the cluster key would protect nothing there. Add \
                 --allow-unauthenticated-legacy to drive them anyway (the key then guards \
                 registrations only)"
                    .into(),
            ));
        }
        config.replicas.check().map_err(Error::Config)?;
        if config.users && config.state.is_none() {
            return Err(Error::Config(
                "--users keeps the users in the state file: it cannot go with --no-state".into(),
            ));
        }
        if config.logins.lock_after > 0 && config.logins.lock_for.is_zero() {
            return Err(Error::Config(
                "--login-lock-for must be more than 0 (--login-lock-after 0 turns locks off)"
                    .into(),
            ));
        }
        if config.balancer_id.is_some_and(|id| id > ids::MAX_NODE) {
            return Err(Error::Config(format!(
                "--balancer-id must be between 0 and {}",
                ids::MAX_NODE
            )));
        }
        let bind =
            |addr: SocketAddr| net::listen(addr).map_err(|source| Error::Bind { addr, source });
        let listener = bind(config.listen)?;
        let metrics = config.metrics.map(bind).transpose()?;
        Ok(Balancer {
            listener,
            metrics,
            config,
        })
    }

    pub fn local_addr(&self) -> Result<SocketAddr, Error> {
        Ok(self.listener.local_addr()?)
    }

    /// Where metrics are served, when enabled.
    pub fn metrics_addr(&self) -> Result<Option<SocketAddr>, Error> {
        Ok(self.metrics.as_ref().map(|l| l.local_addr()).transpose()?)
    }

    /// Starts every thread: accept loop, dispatcher, links, monitor and
    /// metrics. Returns at once; the handle stops and joins them.
    pub fn start(self) -> Result<Handle, Error> {
        start::start(self.listener, self.metrics, self.config)
    }

    /// Starts and waits until shut down by a `Stopper` from another thread
    /// (see `Handle::stopper`); for callers that need no handle.
    pub fn run(self) -> Result<(), Error> {
        self.start()?.join();
        Ok(())
    }
}

/// Tells a running balancer to shut down; cheap to clone, for signal
/// handlers and tests.
#[derive(Clone)]
pub struct Stopper {
    addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    stop: Arc<Mutex<Option<Sender<()>>>>,
}

impl Stopper {
    fn new(addr: SocketAddr, metrics_addr: Option<SocketAddr>, stop: Sender<()>) -> Stopper {
        Stopper {
            addr,
            metrics_addr,
            stop: Arc::new(Mutex::new(Some(stop))),
        }
    }

    /// Stops accepting, finishes what was received (up to
    /// `--drain-timeout`) and lets every thread end. Idempotent.
    pub fn shutdown(&self) {
        let sender = crate::sync::lock(&self.stop).take();
        if sender.is_some() {
            log::info!("balancer on {}: shutting down", self.addr);
            drop(sender);
            net::wake(self.addr);
            if let Some(m) = self.metrics_addr {
                net::wake(m);
            }
        }
    }
}

/// A running balancer.
pub struct Handle {
    addr: SocketAddr,
    stopper: Stopper,
    threads: Vec<JoinHandle<()>>,
    /// The links' workers, started as servers join.
    link_threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Handle {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn stopper(&self) -> Stopper {
        self.stopper.clone()
    }

    pub fn shutdown(&self) {
        self.stopper.shutdown();
    }

    /// Waits for every thread of the balancer to end (after a shutdown).
    pub fn join(self) {
        let join = |thread: JoinHandle<()>| {
            let name = thread.thread().name().unwrap_or("?").to_string();
            if thread.join().is_err() {
                log::error!("balancer thread {name} panicked");
            }
        };
        self.threads.into_iter().for_each(join);
        // The dispatcher was among those: no link starts any more.
        std::mem::take(&mut *crate::sync::lock(&self.link_threads))
            .into_iter()
            .for_each(join);
        log::info!("balancer on {} stopped", self.addr);
    }
}
