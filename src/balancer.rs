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
pub mod stats;
pub mod store;
pub mod tracking;
pub mod users;
pub mod work;

use crate::error::Error;
use crate::ids;
use crate::net;
use crate::policy::PolicyKind;
use crate::proto;
use backend::BackendSettings;
use crossbeam_channel::{Receiver, Sender};
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
        let config = self.config;
        // First, so that a bad state file stops the start before any
        // thread runs.
        let addr = self.listener.local_addr()?;
        let (tracker, tracker_thread) = match &config.state {
            Some(location) => {
                let (tracker, thread) =
                    tracking::Tracker::open_as(location.clone(), Some(addr.to_string()))?;
                (Some(tracker), Some(thread))
            }
            None => (None, None),
        };
        let metrics_addr = self.metrics.as_ref().map(|l| l.local_addr()).transpose()?;
        let (node, lease) = balancer_id(&config, tracker.as_ref(), addr)?;
        log::info!(
            "balancer listening on {addr} (balancer id {node}), servers: {}",
            config
                .servers
                .iter()
                .map(|b| b.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        // Servers get their counters as they join the dispatcher's pool.
        let stats = Arc::new(stats::Stats::default());
        let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
        let mut threads = Vec::new();
        if let Some(listener) = self.metrics {
            log::info!(
                "metrics served on http://{}/metrics",
                listener.local_addr()?
            );
            threads.push(metrics::spawn(listener, stats.clone(), stop_rx.clone())?);
        }
        let (events_tx, events_rx) = crossbeam_channel::unbounded();
        let board = Arc::new(board::Board::new(config.policy, config.max_in_flight));
        let backend_settings = BackendSettings {
            connect_timeout: config.probe_timeout,
            io_timeout: config.server_timeout,
            probe_timeout: config.probe_timeout,
            max_frame: config.max_frame,
            wire: config.backend_wire,
            key: config.cluster_key.clone(),
        };
        let link_threads: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let outcomes = Arc::new(outcome::Outcomes {
            board: board.clone(),
            events: events_tx.clone(),
            stats: stats.clone(),
            tracker: tracker.clone(),
        });
        let links = Arc::new(link::Links::new(
            backend_settings.clone(),
            config.server_connections,
            outcomes,
            link_threads.clone(),
        ));
        if config.servers.is_empty() {
            log::warn!("no servers yet: waiting for servers to register (server --balancer) or `client admin add`");
        }
        let roster = monitor::Roster::default();
        // Read before the pool, so that no change after it is missed.
        let seen = tracker.as_ref().and_then(follow::baseline);
        let (addrs, banned) = pool_at_start(&config, tracker.as_ref());
        let mut servers = Vec::with_capacity(addrs.len());
        for addr in addrs {
            let (id, stats, link) = links.start(addr)?;
            servers.push(event::NewLink { id, stats, link });
        }
        let numbers = Arc::new(ids::Generator::new(ids::Source::Balancer, node));
        let (errands_tx, errands_rx) = crossbeam_channel::unbounded();
        threads.push(errands::spawn(
            errands_rx,
            events_tx.clone(),
            backend_settings.clone(),
        )?);
        let dispatcher = Dispatcher::new(
            servers,
            board.clone(),
            roster.clone(),
            numbers.clone(),
            Settings {
                max_attempts: config.max_attempts,
                queue_timeout: config.queue_timeout,
                drain_timeout: config.drain_timeout,
                forget: config.backend_wire == BackendWire::Framed,
                rise: config.rise,
                fall: config.fall,
            },
            stats.clone(),
            tracker.clone(),
            errands_tx,
        )
        .with_banned(banned);
        // The monitor runs as long as the dispatcher: it needs health news
        // while draining, and stops when this sender drops with it.
        let (alive_tx, alive_rx) = crossbeam_channel::bounded::<()>(0);
        let dispatcher_stop = stop_rx.clone();
        threads.push(net::spawn_named("dispatcher".into(), None, move || {
            let _alive = alive_tx;
            dispatcher.run(events_rx, dispatcher_stop)
        })?);
        threads.push(monitor::spawn(
            roster,
            events_tx.clone(),
            config.check_interval,
            backend_settings,
            stats.clone(),
            alive_rx,
        )?);

        let access = Arc::new(session::Access {
            cluster_key: config.cluster_key.clone(),
            users: config
                .users
                .then(|| config.state.as_ref().map(users::Users::new))
                .flatten(),
            logins: Mutex::new(logins::Schedule::new(config.logins)),
            stats: stats.clone(),
            ..session::Access::default()
        });
        if access.users.is_some() {
            threads.push(session::spawn_failure_log(access.clone(), stop_rx.clone())?);
        }
        let advertise = self.listener.local_addr().ok();
        let reach = relay::ServerReach {
            key: config.cluster_key.clone(),
            connect_timeout: config.probe_timeout,
            server_timeout: config.server_timeout,
            max_frame: config.max_frame,
        };
        if let Some(lease) = lease {
            threads.push(lease.spawn(stop_rx.clone())?);
        }
        if let (Some(tracker), Some(seen)) = (&tracker, seen) {
            let follower = follow::Follower::new(tracker, &board, &links, &events_tx, seen);
            threads.push(follower.spawn(stop_rx.clone())?);
        }
        let catalog = match &tracker {
            Some(tracker) => {
                let progress = Arc::new(catalog::sync::Progress::default());
                let syncer = catalog::sync::Syncer {
                    tracker: tracker.clone(),
                    stats: stats.clone(),
                    reach: reach.clone(),
                    progress: progress.clone(),
                    every: catalog::sync::LOOK_EVERY,
                };
                threads.push(syncer.spawn(stop_rx.clone())?);
                Some(progress)
            }
            None => None,
        };
        let repair = match &tracker {
            Some(tracker) if config.replicas.target > 1 => {
                let (now_tx, now_rx) = crossbeam_channel::unbounded();
                let repair = repair::Repair {
                    replicas: config.replicas.target,
                    settings: config.repair,
                    stats: stats.clone(),
                    tracker: tracker.clone(),
                    reach: reach.clone(),
                };
                let stop = stop_rx.clone();
                threads.push(net::spawn_named("repair".into(), None, move || {
                    repair.run(now_rx, stop)
                })?);
                Some(now_tx)
            }
            _ => None,
        };
        let keys = (config.backend_wire == BackendWire::Framed).then(|| {
            Arc::new(keys::AskServers {
                board: board.clone(),
                reach: reach.clone(),
            }) as Arc<dyn keys::KeyLookup>
        });
        let accept = Acceptor {
            listener: self.listener,
            board,
            links,
            numbers,
            events: events_tx,
            stats: stats.clone(),
            budget: flow::Budget::new(config.max_queued_bytes),
            settings: context::ConnSettings {
                idle_timeout: config.client_timeout,
                legacy_idle_timeout: config.legacy_client_timeout,
                max_frame: config.max_frame,
                frame_timeout: config.frame_timeout,
                window: config.client_window,
                max_document_size: config.max_document_size,
                replicas: config.replicas,
            },
            stop: stop_rx,
            files: Arc::new(relay::FileSettings {
                mode: config.mode,
                key: config.cluster_key.clone(),
                ticket_ttl: config.ticket_ttl,
                connect_timeout: config.probe_timeout,
                server_timeout: config.server_timeout,
                wait: config.queue_timeout,
                advertise,
                max_file_size: config.max_file_size,
                reach,
                catalog,
                replicas: config.replicas.target,
                repair,
            }),
            tracker,
            admission: net::Policy {
                max_connections: config.max_connections,
                max_per_ip: config.max_connections_per_ip,
            },
            access: access.clone(),
            keys,
        };
        threads.insert(
            0,
            net::spawn_named("accept".into(), None, move || accept.run())?,
        );
        // Last: it ends once every other thread has dropped its tracker.
        threads.extend(tracker_thread);
        Ok(Handle {
            addr,
            stopper: Stopper::new(addr, metrics_addr, stop_tx),
            threads,
            link_threads,
        })
    }

    /// Starts and waits until shut down by a `Stopper` from another thread
    /// (see `Handle::stopper`); for callers that need no handle.
    pub fn run(self) -> Result<(), Error> {
        self.start()?.join();
        Ok(())
    }
}

/// The id inside request numbers: `--balancer-id`; else, with a shared
/// state, one leased from it (with the lease to keep renewing); else
/// random.
fn balancer_id(
    config: &Config,
    tracker: Option<&tracking::Tracker>,
    addr: SocketAddr,
) -> Result<(u16, Option<lease::Lease>), Error> {
    match (config.balancer_id, tracker) {
        (Some(id), _) => Ok((id, None)),
        (None, Some(tracker)) if tracker.location().is_shared() => {
            let holder = format!("{addr} {}", tracker.instance());
            let lease = lease::Lease::take(tracker.location(), &holder)?;
            Ok((lease.node(), Some(lease)))
        }
        (None, _) => Ok((ids::random_node(), None)),
    }
}

/// The servers to start with: those configured, and those the state file
/// remembers from the last run (servers that joined since, and not left);
/// and those that stay out, configured or not, because an operator drained
/// or removed them (until one adds them again). The configured ones are
/// remembered from now on too, unless they are this process's own
/// (`remember_servers`).
fn pool_at_start(
    config: &Config,
    tracker: Option<&tracking::Tracker>,
) -> (Vec<SocketAddr>, Vec<SocketAddr>) {
    let configured: Vec<SocketAddr> = config.servers.iter().map(|b| b.addr).collect();
    let Some(tracker) = tracker else {
        return (configured, Vec::new());
    };
    let read = |what: &str, list: Result<Vec<String>, Error>| -> Vec<SocketAddr> {
        let list = list.unwrap_or_else(|e| {
            log::warn!("cannot read the {what} servers in the state file: {e}");
            Vec::new()
        });
        list.iter()
            .filter_map(|text| match net::resolve(text) {
                Ok(addr) => Some(addr),
                Err(e) => {
                    log::warn!("state file: skipping server {text}: {e}");
                    None
                }
            })
            .collect()
    };
    let banned = read("drained or removed", tracker.banned_servers());
    let saved = read("remembered", tracker.servers());
    let mut addrs = Vec::new();
    for addr in &configured {
        if banned.contains(addr) {
            log::warn!(
                "server {addr} stays out of the pool: an operator drained or removed it \
                 (`client admin add {addr}` brings it back)"
            );
        } else if !addrs.contains(addr) {
            addrs.push(*addr);
        }
    }
    let mut remembered = 0;
    for addr in saved {
        if !addrs.contains(&addr) && !banned.contains(&addr) {
            addrs.push(addr);
            remembered += 1;
        }
    }
    if remembered > 0 {
        log::info!("{remembered} servers remembered from the last run");
    }
    let configured = configured.iter().filter(|_| config.remember_servers);
    for addr in configured.filter(|a| !banned.contains(a)) {
        tracker.note_server(&addr.to_string(), tracking::PoolChange::Joined);
    }
    (addrs, banned)
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
        let sender = net::lock(&self.stop).take();
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
        std::mem::take(&mut *net::lock(&self.link_threads))
            .into_iter()
            .for_each(join);
        log::info!("balancer on {} stopped", self.addr);
    }
}

/// The accept loop and the client connections it started.
struct Acceptor {
    listener: TcpListener,
    board: Arc<board::Board>,
    links: Arc<link::Links>,
    numbers: Arc<ids::Generator>,
    events: Sender<event::Event>,
    stats: Arc<stats::Stats>,
    budget: Arc<flow::Budget>,
    settings: context::ConnSettings,
    stop: Receiver<()>,
    tracker: Option<tracking::Tracker>,
    files: Arc<relay::FileSettings>,
    admission: net::Policy,
    access: Arc<session::Access>,
    keys: Option<Arc<dyn keys::KeyLookup>>,
}

impl Acceptor {
    fn run(self) {
        let Acceptor {
            listener,
            board,
            links,
            numbers,
            events,
            stats,
            budget,
            settings,
            stop,
            tracker,
            files,
            admission,
            access,
            keys,
        } = self;
        let conn_stop = stop.clone();
        let counted = stats.clone();
        let hits = &counted.limits;
        let admission = net::Admission {
            policy: admission,
            names: net::CapNames::OPTIONS,
            counters: net::Counters {
                waited: Some(hits.counter(limits::Limit::MaxConnections)),
                evicted: Some(hits.counter(limits::Limit::ConnectionsEvicted)),
                refused: Some(hits.counter(limits::Limit::MaxConnectionsPerIp)),
            },
        };
        net::serve_connections(
            &listener,
            &stop,
            admission,
            |seq| format!("conn{seq}"),
            move |stream, peer, mark| {
                let conn = context::Conn {
                    peer,
                    keys: keys.clone(),
                    board: board.clone(),
                    links: links.clone(),
                    numbers: numbers.clone(),
                    events: events.clone(),
                    settings,
                    stats: stats.clone(),
                    budget: budget.clone(),
                    stop: conn_stop.clone(),
                    tracker: tracker.clone(),
                    files: files.clone(),
                    access: access.clone(),
                    mark,
                    open: stats::OpenConnection::new(&stats),
                };
                conn.serve(stream);
            },
        );
    }
}
