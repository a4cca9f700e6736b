//! The balancer: accepts client connections, queues their documents and
//! spreads them over the storage servers.
//!
//! Threads: the accept loop (the caller's), one per client connection plus
//! its reply writer (`conn`), the dispatcher (`dispatch`), one link per
//! server (`link`), the monitor (`monitor`) and, with `--metrics`, the
//! Prometheus responder (`metrics`). They talk through crossbeam channels;
//! shutting down is dropping senders. Counters for `servers` requests and
//! metrics live in `stats`.

pub mod conn;
pub mod dispatch;
pub mod link;
pub mod metrics;
pub mod monitor;
pub mod stats;

use crate::error::Error;
use crate::policy::RoundRobin;
use crate::proto;
use dispatch::{Dispatcher, Settings};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

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
    pub backend_wire: BackendWire,
    pub check_interval: Duration,
    pub probe_timeout: Duration,
    pub queue_timeout: Duration,
    pub server_timeout: Duration,
    pub client_timeout: Duration,
    /// Idle limit for clients of the original format, which keep one
    /// connection open for a whole interactive session.
    pub legacy_client_timeout: Duration,
    pub max_attempts: u32,
    pub max_in_flight: usize,
    pub max_frame: usize,
    /// Where to serve Prometheus metrics, if anywhere.
    pub metrics: Option<SocketAddr>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 60002)),
            servers: (5001..=5003)
                .map(|p| Backend::new(SocketAddr::from(([127, 0, 0, 1], p))))
                .collect(),
            backend_wire: BackendWire::Framed,
            check_interval: Duration::from_millis(500),
            probe_timeout: Duration::from_secs(1),
            queue_timeout: Duration::from_secs(10),
            server_timeout: Duration::from_secs(30),
            client_timeout: Duration::from_secs(60),
            legacy_client_timeout: Duration::from_secs(3600),
            max_attempts: 3,
            max_in_flight: 64,
            max_frame: proto::DEFAULT_MAX_FRAME,
            metrics: None,
        }
    }
}

pub struct Balancer {
    listener: TcpListener,
    metrics: Option<TcpListener>,
    config: Config,
}

impl Balancer {
    pub fn bind(config: Config) -> Result<Balancer, Error> {
        if config.servers.is_empty() {
            return Err(Error::Config("no storage servers configured".into()));
        }
        if config.max_attempts == 0 || config.max_in_flight == 0 {
            return Err(Error::Config(
                "--max-attempts and --max-in-flight must be at least 1".into(),
            ));
        }
        let bind = |addr: SocketAddr| {
            TcpListener::bind(addr).map_err(|source| Error::Bind { addr, source })
        };
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

    /// Starts the dispatcher, links and monitor, then accepts clients until
    /// the listener fails.
    pub fn run(self) -> Result<(), Error> {
        let config = &self.config;
        let addr = self.local_addr()?;
        log::info!(
            "balancer listening on {addr}, servers: {}",
            config
                .servers
                .iter()
                .map(|b| b.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        let stats = Arc::new(stats::Stats::new(
            config.servers.iter().map(|b| b.name.clone()),
        ));
        if let Some(listener) = self.metrics {
            log::info!(
                "metrics served on http://{}/metrics",
                listener.local_addr()?
            );
            metrics::spawn(listener, stats.clone())?;
        }
        let (jobs_tx, jobs_rx) = crossbeam_channel::bounded(1024);
        let (events_tx, events_rx) = crossbeam_channel::unbounded();

        let link_settings = link::LinkSettings {
            connect_timeout: config.probe_timeout,
            io_timeout: config.server_timeout,
            max_frame: config.max_frame,
            wire: config.backend_wire,
        };
        let mut backends = Vec::new();
        for (index, backend) in config.servers.iter().enumerate() {
            let (tx, rx) = crossbeam_channel::unbounded();
            link::spawn(
                index,
                backend.name.clone(),
                backend.addr,
                rx,
                events_tx.clone(),
                link_settings,
                stats.clone(),
            )?;
            backends.push((backend.clone(), tx));
        }
        let dispatcher = Dispatcher::new(
            backends,
            Box::<RoundRobin>::default(),
            Settings {
                max_attempts: config.max_attempts,
                max_in_flight: config.max_in_flight,
            },
            stats.clone(),
        );
        thread::Builder::new()
            .name("dispatcher".into())
            .spawn(move || dispatcher.run(jobs_rx, events_rx))?;
        monitor::spawn(
            config.servers.iter().map(|b| b.addr).collect(),
            events_tx,
            monitor::MonitorSettings {
                interval: config.check_interval,
                timeout: config.probe_timeout,
                max_frame: config.max_frame,
                wire: config.backend_wire,
            },
            stats.clone(),
        )?;

        let conn_settings = conn::ConnSettings {
            idle_timeout: config.client_timeout,
            legacy_idle_timeout: config.legacy_client_timeout,
            queue_timeout: config.queue_timeout,
            max_frame: config.max_frame,
        };
        let mut conn_seq = 0u64;
        for stream in self.listener.incoming() {
            let stream = match stream {
                Ok(s) => s,
                Err(e) => {
                    log::warn!("accept failed: {e}");
                    continue;
                }
            };
            let Ok(peer) = stream.peer_addr() else {
                continue; // already gone
            };
            conn_seq += 1;
            let conn = conn::Conn {
                peer,
                jobs: jobs_tx.clone(),
                settings: conn_settings,
                stats: stats.clone(),
            };
            // Default stack size: parsing deeply nested JSON recurses.
            let spawned = thread::Builder::new()
                .name(format!("conn{conn_seq}"))
                .spawn(move || conn.serve(stream));
            if let Err(e) = spawned {
                log::error!("cannot start a thread for {peer}: {e}");
            }
        }
        Ok(())
    }
}
