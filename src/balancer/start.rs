//! Starting a balancer: its state first (a bad state stops the start
//! before any thread runs), then the dispatcher with its links, monitor
//! and errands, the threads that keep the state (lease, pool follower,
//! catalog, repair), and last the accept loop, in that order. Every
//! thread started is in the `Handle`, which stops and joins them.

use super::*;
use crossbeam_channel::{Receiver, Sender};
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// What the steps of a start share: the settings, the counters, the stop
/// signal and the threads started so far.
struct Starting {
    config: Config,
    addr: SocketAddr,
    stats: Arc<stats::Stats>,
    stop: Receiver<()>,
    threads: Vec<JoinHandle<()>>,
    tracker: Option<tracking::Tracker>,
}

/// The dispatcher's side, as the accept loop and the state's threads need
/// it.
struct Core {
    board: Arc<board::Board>,
    links: Arc<link::Links>,
    link_threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
    numbers: Arc<ids::Generator>,
    events: Sender<event::Event>,
}

/// What the state's threads give the file relay.
struct Keepers {
    catalog: Option<Arc<catalog::sync::Progress>>,
    repair: Option<Sender<()>>,
}

pub(super) fn start(
    listener: TcpListener,
    metrics: Option<TcpListener>,
    config: Config,
) -> Result<Handle, Error> {
    let addr = listener.local_addr()?;
    let (tracker, tracker_thread) = open_state(&config, addr)?;
    let metrics_addr = metrics.as_ref().map(|l| l.local_addr()).transpose()?;
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
    let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
    let mut starting = Starting {
        config,
        addr,
        // Servers get their counters as they join the dispatcher's pool.
        stats: Arc::new(stats::Stats::default()),
        stop: stop_rx,
        threads: Vec::new(),
        tracker,
    };
    if let Some(listener) = metrics {
        starting.serve_metrics(listener)?;
    }
    if let Some(lease) = lease {
        let thread = lease.spawn(starting.stop.clone())?;
        starting.threads.push(thread);
    }
    // Read before the pool, so that no change after it is missed.
    let seen = starting.tracker.as_ref().and_then(follow::baseline);
    let core = starting.core(node)?;
    let keepers = starting.keepers(&core, seen)?;
    let link_threads = core.link_threads.clone();
    starting.accept(listener, core, keepers)?;
    let mut threads = starting.threads;
    // Last: it ends once every other thread has dropped its tracker.
    threads.extend(tracker_thread);
    Ok(Handle {
        addr,
        stopper: Stopper::new(addr, metrics_addr, stop_tx),
        threads,
        link_threads,
    })
}

/// The state (`--state`), opened and its writer started.
fn open_state(
    config: &Config,
    addr: SocketAddr,
) -> Result<(Option<tracking::Tracker>, Option<JoinHandle<()>>), Error> {
    match &config.state {
        Some(location) => {
            let (tracker, thread) =
                tracking::Tracker::open_as(location.clone(), Some(addr.to_string()))?;
            Ok((Some(tracker), Some(thread)))
        }
        None => Ok((None, None)),
    }
}

impl Starting {
    fn serve_metrics(&mut self, listener: TcpListener) -> Result<(), Error> {
        log::info!(
            "metrics served on http://{}/metrics",
            listener.local_addr()?
        );
        let thread = metrics::spawn(listener, self.stats.clone(), self.stop.clone())?;
        self.threads.push(thread);
        Ok(())
    }

    fn backend_settings(&self) -> BackendSettings {
        let config = &self.config;
        BackendSettings {
            connect_timeout: config.probe_timeout,
            io_timeout: config.server_timeout,
            probe_timeout: config.probe_timeout,
            max_frame: config.max_frame,
            wire: config.backend_wire,
            key: config.cluster_key.clone(),
        }
    }

    fn reach(&self) -> relay::ServerReach {
        relay::ServerReach {
            key: self.config.cluster_key.clone(),
            connect_timeout: self.config.probe_timeout,
            server_timeout: self.config.server_timeout,
            max_frame: self.config.max_frame,
        }
    }

    /// The links to the servers of the pool at start, the errands thread,
    /// the dispatcher and the monitor.
    fn core(&mut self, node: u16) -> Result<Core, Error> {
        let config = &self.config;
        let (events_tx, events_rx) = crossbeam_channel::unbounded();
        let board = Arc::new(board::Board::new(config.policy, config.max_in_flight));
        let link_threads: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let outcomes = Arc::new(outcome::Outcomes {
            board: board.clone(),
            events: events_tx.clone(),
            stats: self.stats.clone(),
            tracker: self.tracker.clone(),
        });
        let links = Arc::new(link::Links::new(
            self.backend_settings(),
            config.server_connections,
            outcomes,
            link_threads.clone(),
        ));
        if config.servers.is_empty() {
            log::warn!("no servers yet: waiting for servers to register (server --balancer) or `client admin add`");
        }
        let core = Core {
            board,
            links,
            link_threads,
            numbers: Arc::new(ids::Generator::new(ids::Source::Balancer, node)),
            events: events_tx,
        };
        self.dispatch(&core, events_rx)?;
        Ok(core)
    }

    /// The dispatcher over the pool at start, its errands and the monitor.
    fn dispatch(&mut self, core: &Core, events: Receiver<event::Event>) -> Result<(), Error> {
        let config = &self.config;
        let (addrs, banned) = pool_at_start(config, self.tracker.as_ref());
        let mut servers = Vec::with_capacity(addrs.len());
        for addr in addrs {
            let (id, stats, link) = core.links.start(addr)?;
            servers.push(event::NewLink { id, stats, link });
        }
        let (errands_tx, errands_rx) = crossbeam_channel::unbounded();
        let errands = errands::spawn(errands_rx, core.events.clone(), self.backend_settings())?;
        self.threads.push(errands);
        let roster = monitor::Roster::default();
        let dispatcher = Dispatcher::new(
            servers,
            core.board.clone(),
            roster.clone(),
            core.numbers.clone(),
            Settings {
                max_attempts: config.max_attempts,
                queue_timeout: config.queue_timeout,
                drain_timeout: config.drain_timeout,
                forget: config.backend_wire == BackendWire::Framed,
                rise: config.rise,
                fall: config.fall,
            },
            self.stats.clone(),
            self.tracker.clone(),
            errands_tx,
        )
        .with_banned(banned);
        // The monitor runs as long as the dispatcher: it needs health news
        // while draining, and stops when this sender drops with it.
        let (alive_tx, alive_rx) = crossbeam_channel::bounded::<()>(0);
        let stop = self.stop.clone();
        self.threads.push(crate::sync::spawn_named(
            "dispatcher".into(),
            None,
            move || {
                let _alive = alive_tx;
                dispatcher.run(events, stop)
            },
        )?);
        let monitor = monitor::spawn(
            roster,
            core.events.clone(),
            config.check_interval,
            self.backend_settings(),
            self.stats.clone(),
            alive_rx,
        )?;
        self.threads.push(monitor);
        Ok(())
    }

    /// The threads that keep the state: the pool follower, the catalog's
    /// syncer and repair.
    fn keepers(&mut self, core: &Core, seen: Option<follow::Seen>) -> Result<Keepers, Error> {
        let Some(tracker) = self.tracker.clone() else {
            return Ok(Keepers {
                catalog: None,
                repair: None,
            });
        };
        if let Some(seen) = seen {
            let follower =
                follow::Follower::new(&tracker, &core.board, &core.links, &core.events, seen);
            self.threads.push(follower.spawn(self.stop.clone())?);
        }
        let progress = Arc::new(catalog::sync::Progress::default());
        let syncer = catalog::sync::Syncer {
            tracker: tracker.clone(),
            stats: self.stats.clone(),
            reach: self.reach(),
            progress: progress.clone(),
            every: catalog::sync::LOOK_EVERY,
        };
        self.threads.push(syncer.spawn(self.stop.clone())?);
        let repair = self.repair(tracker)?;
        Ok(Keepers {
            catalog: Some(progress),
            repair,
        })
    }

    /// Repair, when documents have copies (`--replicas` over 1); the way
    /// to start a pass at once.
    fn repair(&mut self, tracker: tracking::Tracker) -> Result<Option<Sender<()>>, Error> {
        if self.config.replicas.target <= 1 {
            return Ok(None);
        }
        let (now_tx, now_rx) = crossbeam_channel::unbounded();
        let repair = repair::Repair {
            replicas: self.config.replicas.target,
            settings: self.config.repair,
            stats: self.stats.clone(),
            tracker,
            reach: self.reach(),
        };
        let stop = self.stop.clone();
        self.threads.push(crate::sync::spawn_named(
            "repair".into(),
            None,
            move || repair.run(now_rx, stop),
        )?);
        Ok(Some(now_tx))
    }

    /// Who may log in, and the log of failed logins.
    fn access(&mut self) -> Result<Arc<session::Access>, Error> {
        let config = &self.config;
        let access = Arc::new(session::Access {
            cluster_key: config.cluster_key.clone(),
            users: config
                .users
                .then(|| config.state.as_ref().map(users::Users::new))
                .flatten(),
            logins: Mutex::new(logins::Schedule::new(config.logins)),
            stats: self.stats.clone(),
            ..session::Access::default()
        });
        if access.users.is_some() {
            let thread = session::spawn_failure_log(access.clone(), self.stop.clone())?;
            self.threads.push(thread);
        }
        Ok(access)
    }

    /// How files are relayed.
    fn files(&self, keepers: Keepers) -> relay::FileSettings {
        let config = &self.config;
        relay::FileSettings {
            mode: config.mode,
            key: config.cluster_key.clone(),
            ticket_ttl: config.ticket_ttl,
            connect_timeout: config.probe_timeout,
            server_timeout: config.server_timeout,
            wait: config.queue_timeout,
            advertise: Some(self.addr),
            max_file_size: config.max_file_size,
            reach: self.reach(),
            catalog: keepers.catalog,
            replicas: config.replicas.target,
            repair: keepers.repair,
        }
    }

    /// The accept loop, first among the threads to stop.
    fn accept(&mut self, listener: TcpListener, core: Core, keepers: Keepers) -> Result<(), Error> {
        let access = self.access()?;
        let config = &self.config;
        let keys = (config.backend_wire == BackendWire::Framed).then(|| {
            Arc::new(keys::AskServers {
                board: core.board.clone(),
                reach: self.reach(),
            }) as Arc<dyn keys::KeyLookup>
        });
        let accept = Acceptor {
            listener,
            board: core.board,
            links: core.links,
            numbers: core.numbers,
            events: core.events,
            stats: self.stats.clone(),
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
            stop: self.stop.clone(),
            files: Arc::new(self.files(keepers)),
            tracker: self.tracker.clone(),
            admission: net::Policy {
                max_connections: config.max_connections,
                max_per_ip: config.max_connections_per_ip,
            },
            access,
            keys,
        };
        self.threads.insert(
            0,
            crate::sync::spawn_named("accept".into(), None, move || accept.run())?,
        );
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
