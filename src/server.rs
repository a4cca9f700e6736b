//! A storage server: accepts connections (from the balancer, or any client
//! speaking the protocol), stores documents in its folder and answers status
//! probes. One named thread per connection; requests on a connection are
//! handled in order.

pub mod load;
pub mod storage;

use crate::error::Error;
use crate::proto::legacy::{self, LegacyReader, LegacyRequest};
use crate::proto::{self, ErrorCode, FrameReader, FrameWriter, Reply, Request, StoreRequest};
use crossbeam_channel::Sender;
use load::{Limits, Load};
use rand::Rng;
use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;
use storage::Storage;

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    /// Storage folder; `None` means `<storage_root>/<port>`.
    pub dir: Option<PathBuf>,
    pub storage_root: PathBuf,
    /// Remove previously stored documents at start.
    pub clean: bool,
    /// Sleep per character of content while counting, to simulate load.
    pub char_delay: Duration,
    pub max_active: u64,
    pub max_memory_mb: u64,
    /// Largest frame a client of the balancer may send; the server reads
    /// frames up to `proto::FORWARD_HEADROOM` larger, the room a forwarded
    /// request needs.
    pub max_frame: usize,
    /// A connection with no request for this long is closed.
    pub idle_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 5001)),
            dir: None,
            storage_root: PathBuf::from("json_files"),
            clean: false,
            char_delay: Duration::ZERO,
            max_active: 16,
            max_memory_mb: 1024,
            max_frame: proto::DEFAULT_MAX_FRAME,
            idle_timeout: Duration::from_secs(300),
        }
    }
}

/// What every connection thread of one server shares.
struct Shared {
    addr: SocketAddr,
    storage: Storage,
    load: Arc<Load>,
    files_stored: AtomicU64,
    /// Numbers documents that arrive without one (sent straight to a server
    /// rather than through the balancer).
    local_numbers: AtomicU64,
    config: Config,
}

impl Shared {
    fn frame_limit(&self) -> usize {
        self.config.max_frame + proto::FORWARD_HEADROOM
    }
}

/// A bound server, ready to run.
pub struct Server {
    listener: TcpListener,
    shared: Arc<Shared>,
    // Dropping this stops the load sampler.
    _stop_sampler: Sender<()>,
}

impl Server {
    /// Binds the listener, opens the storage folder and starts the sampler.
    pub fn bind(config: Config) -> Result<Server, Error> {
        let listener = TcpListener::bind(config.listen).map_err(|source| Error::Bind {
            addr: config.listen,
            source,
        })?;
        let addr = listener.local_addr()?;
        let dir = config
            .dir
            .clone()
            .unwrap_or_else(|| config.storage_root.join(addr.port().to_string()));
        let storage_err = |source| Error::Storage {
            dir: dir.clone(),
            source,
        };
        let storage = Storage::open(&dir).map_err(storage_err)?;
        if config.clean {
            let removed = storage.clean().map_err(storage_err)?;
            log::info!(
                "server {addr}: --clean removed {removed} files from {}",
                dir.display()
            );
        }
        let files_stored = storage.count().map_err(storage_err)?;
        let load = Arc::new(Load::new(Limits {
            max_active: config.max_active,
            max_memory_bytes: config.max_memory_mb.saturating_mul(1024 * 1024),
        }));
        let (stop, stopped) = crossbeam_channel::bounded(0);
        load::spawn_sampler(
            load.clone(),
            dir.clone(),
            Duration::from_millis(500),
            stopped,
        )?;
        log::info!(
            "server {addr}: storing into {} ({files_stored} documents already there)",
            dir.display()
        );
        Ok(Server {
            listener,
            shared: Arc::new(Shared {
                addr,
                storage,
                load,
                files_stored: AtomicU64::new(files_stored),
                local_numbers: AtomicU64::new(0),
                config,
            }),
            _stop_sampler: stop,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.shared.addr
    }

    pub fn storage_dir(&self) -> &Path {
        self.shared.storage.dir()
    }

    /// Accepts connections until the listener fails.
    pub fn run(self) -> Result<(), Error> {
        let mut conn_seq = 0u64;
        for stream in self.listener.incoming() {
            let stream = match stream {
                Ok(s) => s,
                Err(e) => {
                    // Out of descriptors or a connection reset before accept:
                    // the listener itself is fine, keep going.
                    log::warn!("server {}: accept failed: {e}", self.shared.addr);
                    continue;
                }
            };
            conn_seq += 1;
            let shared = self.shared.clone();
            let name = format!("srv{}-conn{conn_seq}", self.shared.addr.port());
            if let Err(e) = thread::Builder::new()
                .name(name)
                // Default stack size: parsing deeply nested JSON recurses.
                .spawn(move || serve_connection(stream, &shared))
            {
                log::error!(
                    "server {}: cannot spawn connection thread: {e}",
                    self.shared.addr
                );
            }
        }
        Ok(())
    }

    /// Runs the accept loop on its own named thread.
    pub fn spawn(self) -> Result<thread::JoinHandle<()>, Error> {
        let name = format!("srv{}-accept", self.shared.addr.port());
        Ok(thread::Builder::new().name(name).spawn(move || {
            if let Err(e) = self.run() {
                log::error!("server stopped: {e}");
            }
        })?)
    }
}

fn serve_connection(stream: TcpStream, shared: &Shared) {
    let peer = stream
        .peer_addr()
        .map_or_else(|_| "unknown peer".to_string(), |a| a.to_string());
    let setup = stream
        .set_read_timeout(Some(shared.config.idle_timeout))
        .and_then(|()| stream.set_write_timeout(Some(shared.config.idle_timeout)))
        .and_then(|()| stream.set_nodelay(true))
        .and_then(|()| stream.try_clone());
    let read_half = match setup {
        Ok(s) => s,
        Err(e) => {
            log::warn!(
                "server {}: cannot set up connection from {peer}: {e}",
                shared.addr
            );
            return;
        }
    };
    let mut first = [0u8; 1];
    match stream.peek(&mut first) {
        Ok(0) => return,
        Ok(_) if legacy::is_legacy(first[0]) => {
            return serve_legacy(read_half, stream, &peer, shared)
        }
        Ok(_) => {}
        Err(e) => {
            log::info!(
                "server {}: connection from {peer} sent nothing: {e}",
                shared.addr
            );
            return;
        }
    }
    let mut reader = FrameReader::new(read_half, shared.frame_limit());
    let mut writer = FrameWriter::new(stream);
    loop {
        let reply = match reader.message::<Request>() {
            Ok(None) => break,
            Err(e) => {
                log::warn!("server {}: connection from {peer}: {e}", shared.addr);
                if let Some(r) = e.reply() {
                    let _ = writer.message(&Reply::Error(r));
                }
                break;
            }
            Ok(Some(Err(bad))) => {
                log::warn!("server {}: bad request from {peer}: {bad}", shared.addr);
                Reply::Error(bad.into())
            }
            Ok(Some(Ok(request))) => handle(request, shared),
        };
        if let Err(e) = writer.message(&reply) {
            log::warn!("server {}: cannot reply to {peer}: {e}", shared.addr);
            break;
        }
    }
}

/// A connection from the original balancer: documents (no reply) and status
/// probes (one byte), as unframed JSON objects.
fn serve_legacy(read_half: TcpStream, mut write_half: TcpStream, peer: &str, shared: &Shared) {
    let reader = LegacyReader::new(BufReader::new(read_half), shared.frame_limit());
    for request in reader {
        match request {
            Ok(LegacyRequest::Status) => {
                let byte = u8::from(shared.load.overloaded());
                if let Err(e) = write_half.write_all(&[byte]) {
                    log::warn!(
                        "server {}: cannot answer probe from {peer}: {e}",
                        shared.addr
                    );
                    return;
                }
            }
            Ok(LegacyRequest::Document {
                doc,
                request_number,
            }) => {
                // The original balancer reads no reply; the outcome is logged.
                let store = StoreRequest {
                    id: 0,
                    doc,
                    request_number,
                    not_after_ms: None,
                };
                handle_store(store, shared);
            }
            Err(e) => {
                log::warn!(
                    "server {}: original-format connection from {peer}: {e}",
                    shared.addr
                );
                if !e.is_recoverable() {
                    return;
                }
            }
        }
    }
}

fn handle(request: Request, shared: &Shared) -> Reply {
    match request {
        Request::Store(store) => handle_store(store, shared),
        Request::Status { id } => Reply::Status(status_report(id, shared)),
        Request::Calc { id, operation } => {
            let _active = shared.load.begin();
            let mut rng = rand::thread_rng();
            let (a, b) = (rng.gen_range(1..=50), rng.gen_range(1..=50));
            Reply::Calc(proto::Computed {
                id,
                server: shared.addr.to_string(),
                a,
                b,
                operation,
                result: operation.apply(a, b),
            })
        }
        Request::Forget { id, .. } => Reply::error(
            Some(id),
            ErrorCode::BadRequest,
            "`forget` is not supported yet",
        ),
        Request::Servers { id } => Reply::error(
            Some(id),
            ErrorCode::BadRequest,
            "`servers` is answered by the balancer, not by storage servers",
        ),
    }
}

fn status_report(id: u64, shared: &Shared) -> proto::StatusReport {
    let sample = shared.load.sample();
    proto::StatusReport {
        id,
        overloaded: shared.load.overloaded(),
        active: shared.load.active(),
        max_active: shared.load.limits.max_active,
        memory_bytes: sample.memory_bytes,
        max_memory_bytes: shared.load.limits.max_memory_bytes,
        cpu_percent: sample.cpu_percent,
        memory_used_bytes: sample.memory_used_bytes,
        memory_total_bytes: sample.memory_total_bytes,
        disk_used_bytes: sample.disk_used_bytes,
        disk_free_bytes: sample.disk_free_bytes,
        net_rx_bytes: sample.net_rx_bytes,
        net_tx_bytes: sample.net_tx_bytes,
        uptime_secs: shared.load.uptime().as_secs(),
        files_stored: shared.files_stored.load(Ordering::Relaxed),
    }
}

fn handle_store(store: StoreRequest, shared: &Shared) -> Reply {
    let _active = shared.load.begin();
    let number = store
        .request_number
        .unwrap_or_else(|| shared.local_numbers.fetch_add(1, Ordering::Relaxed) + 1);
    let a_count = count_a_with_delay(&store.doc.content, shared.config.char_delay);
    match shared.storage.store(number, &store.doc, a_count) {
        Ok(file) => {
            shared.files_stored.fetch_add(1, Ordering::Relaxed);
            log::info!(
                "server {}: stored request {number} \"{}\" as {file} ({a_count} letters A)",
                shared.addr,
                proto::truncate(&store.doc.title, 80)
            );
            Reply::Stored(proto::Stored {
                id: store.id,
                server: shared.addr.to_string(),
                request_number: number,
                file,
                a_count,
                existing: false,
            })
        }
        Err(e) => {
            log::error!("server {}: cannot store request {number}: {e}", shared.addr);
            Reply::error(
                Some(store.id),
                ErrorCode::Storage,
                format!("server {} cannot store the document: {e}", shared.addr),
            )
        }
    }
}

/// Counts letters A; with a delay, sleeps per character like the original
/// system did to make a server slow on purpose.
fn count_a_with_delay(content: &str, delay: Duration) -> u64 {
    if !delay.is_zero() {
        for _ in content.chars() {
            thread::sleep(delay);
        }
    }
    storage::count_a(content)
}
