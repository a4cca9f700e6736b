//! A storage server: accepts connections (from the balancer, or any client
//! speaking the protocol), stores documents in its folder and answers status
//! probes. One named thread per connection reads its requests: on a framed
//! connection it keeps reading while earlier stores commit, hands every
//! store it has read to the storage's committer (which makes the stores of
//! all connections durable together and answers each), and answers the
//! other requests itself; replies go out through the connection's
//! `outbox`, several in one write when they are ready together, so their
//! order may differ from the requests'. Uploads, downloads and the cluster
//! handshake remain conversations: they start once everything before them
//! is answered.
//!
//! Lifecycle: `Server::bind` opens the listener and the folder;
//! `Server::start` runs the accept loop, the connections and the load
//! sampler on named threads and returns a `ServerHandle`. `shutdown` stops
//! accepting and ends every connection's reading (a request being handled
//! still gets its reply); `join` waits for every thread.
//!
//! Framed stores are carried out at most once per request number (see
//! `storage::Storage::claim`); documents in the original format are always
//! stored, because the original balancer reuses numbers across runs.

pub mod files;
mod listing;
pub mod load;
mod outbox;
pub mod registrar;
mod replicate;
pub mod storage;
mod transfer;

use crate::auth::ClusterKey;
use crate::error::Error;
use crate::handshake::Gate;
use crate::ids::{self, Generator, Source};
use crate::net::{self, Wire};
use crate::proto::legacy::{LegacyError, LegacyReader, LegacyRequest};
use crate::proto::{
    self, Document, ErrorCode, FrameReader, FrameWriter, Reply, StorageRequest, ToServer,
};
use crossbeam_channel::{Receiver, Sender};
use files::FileStore;
use load::{Limits, Load};
use outbox::Outbox;
use rand::Rng;
use std::io::{self, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};
use storage::{Claim, Storage, StoreError};

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
    /// How the committer makes a batch of documents durable.
    pub sync: storage::SyncMode,
    pub max_active: u64,
    pub max_memory_mb: u64,
    /// Largest frame a client of the balancer may send; the server reads
    /// frames up to `proto::FORWARD_HEADROOM` larger, the room a forwarded
    /// request needs.
    pub max_frame: usize,
    /// A connection with no request for this long is closed.
    pub idle_timeout: Duration,
    /// Connections open at once. Past it, or past `max_connections_per_ip`
    /// from one address, a new connection takes the place of an idle one
    /// (see `net::admission`); with every one at work, new ones wait in the
    /// listen backlog.
    pub max_connections: usize,
    /// Connections open at once from one IP address.
    pub max_connections_per_ip: usize,
    /// A frame must arrive whole within this once its length has, and a
    /// connection's first whole request within this of connecting.
    pub frame_timeout: Duration,
    /// Node id (0..=511) in the request numbers this server gives documents
    /// that arrive without one; `None` picks one at random.
    pub server_id: Option<u16>,
    /// Partial uploads untouched for this long are removed.
    pub partial_ttl: Duration,
    /// Largest file an upload may announce, in bytes.
    pub max_file_size: u64,
    /// With a cluster key, every framed connection must prove it first
    /// (see `handshake`) except an upload, which needs a ticket the
    /// balancer signed instead. Connections in the original format cannot
    /// prove anything and are still served: they can only store copies
    /// that never count for a request number (`Storage::store_copy`) and
    /// read the one-byte overload flag.
    pub cluster_key: Option<ClusterKey>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 5001)),
            dir: None,
            storage_root: PathBuf::from("json_files"),
            clean: false,
            char_delay: Duration::ZERO,
            sync: storage::SyncMode::default(),
            max_active: DEFAULT_MAX_ACTIVE,
            max_memory_mb: 1024,
            max_frame: proto::DEFAULT_MAX_FRAME,
            idle_timeout: Duration::from_secs(300),
            max_connections: net::default_max_connections(),
            max_connections_per_ip: net::default_max_per_ip(net::default_max_connections()),
            frame_timeout: Duration::from_secs(30),
            server_id: None,
            partial_ttl: Duration::from_secs(24 * 3600),
            max_file_size: crate::balancer::DEFAULT_MAX_FILE_SIZE,
            cluster_key: None,
        }
    }
}

/// Documents stored at once past which a server reports itself
/// overloaded: four times a balancer's default `--max-in-flight` (256), so
/// that the traffic of a few balancers at their limit is not overload.
pub const DEFAULT_MAX_ACTIVE: u64 = 1024;

/// What every connection thread of one server shares.
struct Shared {
    addr: SocketAddr,
    storage: Storage,
    files: FileStore,
    load: Arc<Load>,
    replies: Arc<StoreReplies>,
    /// Numbers documents that arrive without one (sent straight to a server
    /// rather than through the balancer), apart from every balancer's.
    numbers: Generator,
    config: Config,
}

impl Shared {
    fn frame_limit(&self) -> usize {
        self.config.max_frame + proto::FORWARD_HEADROOM
    }
}

/// The server id in request numbers: the one chosen, or a random one.
fn node_id(chosen: Option<u16>) -> Result<u16, Error> {
    match chosen {
        Some(id) if id > ids::MAX_NODE => Err(Error::Config(format!(
            "server id {id} is out of range (0..={})",
            ids::MAX_NODE
        ))),
        Some(id) => Ok(id),
        None => Ok(ids::random_node()),
    }
}

fn chosen_or_random(chosen: Option<u16>) -> &'static str {
    if chosen.is_none() {
        " (random; set --server-id to choose it)"
    } else {
        ""
    }
}

/// A bound server, ready to start.
pub struct Server {
    listener: TcpListener,
    shared: Arc<Shared>,
}

impl Server {
    /// Binds the listener and opens the storage folder.
    pub fn bind(config: Config) -> Result<Server, Error> {
        let node = node_id(config.server_id)?;
        let listener = net::listen(config.listen).map_err(|source| Error::Bind {
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
        let committer = format!("srv{}-commit", addr.port());
        let storage = Storage::open_with(&dir, config.sync, committer).map_err(storage_err)?;
        let files = FileStore::open(&dir, config.partial_ttl).map_err(storage_err)?;
        if config.clean {
            let removed = storage.clean().map_err(storage_err)?;
            log::info!(
                "server {addr}: --clean removed {removed} files from {}",
                dir.display()
            );
        }
        log::info!(
            "server {addr}: storing into {} ({} documents already there); server id {node}{}",
            dir.display(),
            storage.count(),
            chosen_or_random(config.server_id)
        );
        let load = Arc::new(Load::new(Limits {
            max_active: config.max_active,
            max_memory_bytes: config.max_memory_mb.saturating_mul(1024 * 1024),
        }));
        let replies = Arc::new(StoreReplies {
            addr,
            load: load.clone(),
            dir: storage.dir().to_path_buf(),
        });
        Ok(Server {
            listener,
            shared: Arc::new(Shared {
                addr,
                storage,
                files,
                load,
                replies,
                numbers: Generator::new(Source::Server, node),
                config,
            }),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.shared.addr
    }

    pub fn storage_dir(&self) -> &Path {
        self.shared.storage.dir()
    }

    /// Takes a first load sample, then starts the sampler and the accept
    /// loop on their own threads.
    pub fn start(self) -> Result<ServerHandle, Error> {
        let Server { listener, shared } = self;
        let addr = shared.addr;
        let port = addr.port();
        // One channel stops everything: dropping `stop` disconnects it for
        // the sampler and the accept loop alike.
        let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
        let sampler = load::spawn_sampler(
            format!("srv{port}-load"),
            shared.load.clone(),
            shared.storage.dir().to_path_buf(),
            Duration::from_millis(500),
            stopped.clone(),
        )?;
        let dir = shared.storage.dir().to_path_buf();
        let accept = crate::sync::spawn_named(format!("srv{port}-accept"), None, move || {
            accept_connections(&listener, &stopped, &shared)
        });
        let accept = match accept {
            Ok(handle) => handle,
            Err(e) => {
                drop(stop);
                let _ = sampler.join();
                return Err(e.into());
            }
        };
        Ok(ServerHandle {
            addr,
            dir,
            stop: Mutex::new(Some(stop)),
            accept: Some(accept),
            sampler: Some(sampler),
        })
    }
}

/// A running server.
///
/// Dropping the handle shuts the server down without waiting for it; keep
/// the handle for as long as the server should run.
pub struct ServerHandle {
    addr: SocketAddr,
    dir: PathBuf,
    /// Taken (and so dropped) by the first `shutdown`.
    stop: Mutex<Option<Sender<()>>>,
    /// Returns how many connection threads panicked.
    accept: Option<JoinHandle<usize>>,
    sampler: Option<JoinHandle<()>>,
}

impl ServerHandle {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn storage_dir(&self) -> &Path {
        &self.dir
    }

    /// Stops accepting connections and ends reading on every open one:
    /// idle connections close, a request being handled still gets its
    /// reply. Returns at once; `join` waits. Idempotent.
    pub fn shutdown(&self) {
        let stop = crate::sync::lock(&self.stop).take();
        if let Some(stop) = stop {
            log::info!("server {}: shutting down", self.addr);
            drop(stop);
            // The accept loop sees the disconnected channel only once an
            // accept returns.
            net::wake(self.addr);
        }
    }

    /// Waits until every thread of the server has ended: the accept loop,
    /// each connection and the load sampler. Only returns after `shutdown`.
    pub fn join(mut self) -> Result<(), Error> {
        let mut failed = Vec::new();
        if let Some(accept) = self.accept.take() {
            match accept.join() {
                Ok(0) => {}
                Ok(n) => failed.push(format!("{n} connection threads")),
                Err(_) => failed.push("the accept thread".to_string()),
            }
        }
        if let Some(sampler) = self.sampler.take() {
            if sampler.join().is_err() {
                failed.push("the load sampler".to_string());
            }
        }
        if failed.is_empty() {
            Ok(())
        } else {
            Err(Error::Io(io::Error::other(format!(
                "server {}: {} panicked",
                self.addr,
                failed.join(" and ")
            ))))
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The accept thread: serves connections until stopped. Returns how many
/// connection threads panicked.
fn accept_connections(
    listener: &TcpListener,
    stopped: &Receiver<()>,
    shared: &Arc<Shared>,
) -> usize {
    let port = shared.addr.port();
    let shared = shared.clone();
    let admission = net::Admission {
        policy: net::Policy {
            max_connections: shared.config.max_connections,
            max_per_ip: shared.config.max_connections_per_ip,
        },
        names: net::CapNames::OPTIONS,
        counters: net::Counters::default(),
    };
    net::serve_connections(
        listener,
        stopped,
        admission,
        |seq| format!("srv{port}-conn{seq}"),
        move |stream, peer, mark| serve_connection(stream, peer, &mark, &shared),
    )
}

fn serve_connection(stream: net::Stream, peer: SocketAddr, mark: &net::Mark, shared: &Shared) {
    let addr = shared.addr;
    if let Err(e) = net::prepare(stream.tcp(), shared.config.idle_timeout) {
        log::warn!("server {addr}: cannot set up connection from {peer}: {e}");
        return;
    }
    let read_half = stream.clone();
    // Every connection owes a whole first request within --frame-timeout
    // of arriving (see `request_too_slow`).
    let first_by = Instant::now() + shared.config.frame_timeout;
    match net::detect_wire(&stream, first_by) {
        Ok(Wire::Closed | Wire::Refused) => {}
        Ok(Wire::Legacy) => serve_legacy(read_half, stream, peer, first_by, mark, shared),
        Ok(Wire::Framed) => serve_framed(read_half, stream, peer, first_by, mark, shared),
        Err(e) if e.kind() == io::ErrorKind::TimedOut => request_too_slow(peer, shared),
        Err(e) => log::debug!("server {addr}: connection from {peer} sent nothing: {e}"),
    }
}

/// A connection whose request did not arrive whole in time (its first one
/// since it connected, or a later one since it began): logged once per
/// burst, as a flood of them must not flood the log.
fn request_too_slow(peer: SocketAddr, shared: &Shared) {
    static LATE: std::sync::OnceLock<crate::throttle::Throttle<()>> = std::sync::OnceLock::new();
    let late = LATE.get_or_init(|| crate::throttle::Throttle::new(Duration::from_secs(10)));
    if let Some(skipped) = late.check(&()) {
        log::warn!(
            "server {}: connection from {peer} did not send a whole request in time (--frame-timeout {:?}); closed{}",
            shared.addr,
            shared.config.frame_timeout,
            crate::throttle::more(skipped)
        );
    }
}

/// A framed connection: its thread reads requests while earlier stores
/// commit, and every reply goes through the connection's `Outbox`.
fn serve_framed(
    read_half: net::Stream,
    write_half: net::Stream,
    peer: SocketAddr,
    first_by: Instant,
    mark: &net::Mark,
    shared: &Shared,
) {
    let name = thread::current().name().unwrap_or("srv-conn").to_string();
    // Slow stores (--char-delay-ms) are counted on threads of this scope,
    // which ends once every one of them has handed its store on.
    thread::scope(|scope| {
        let mut conn = Framed {
            shared,
            peer,
            mark,
            outbox: Outbox::new(write_half, peer, format!("{name}-w"), mark.clone()),
            stores: Vec::new(),
            slow: scope,
            name,
        };
        conn.read_requests(read_half, first_by);
        // Every store read gets its reply before the connection closes.
        conn.hand_over();
        // (Stores still being counted are among those waited for.)
        conn.outbox.wait_idle();
        conn.outbox.close();
    });
}

/// What a framed connection does after a request.
enum Then {
    Reply(Reply),
    /// Reads on: the request is answered elsewhere, or was a conversation.
    Read,
    Close,
}

impl From<transfer::Next> for Then {
    fn from(next: transfer::Next) -> Then {
        match next {
            transfer::Next::Continue => Then::Read,
            transfer::Next::Close => Then::Close,
        }
    }
}

/// A framed connection's thread.
struct Framed<'s, 'a> {
    shared: &'a Shared,
    peer: SocketAddr,
    mark: &'a net::Mark,
    outbox: Arc<Outbox>,
    /// Stores claimed since the last hand-over to the committer.
    stores: Vec<storage::Commit>,
    /// Where stores slowed by --char-delay-ms are counted, each on a
    /// thread of its own, so that one does not hold up the next.
    slow: &'s thread::Scope<'s, 'a>,
    /// The connection thread's name, for those threads' names.
    name: String,
}

impl<'s, 'a> Framed<'s, 'a> {
    /// Reads requests until the peer closes, stalls, breaks framing or
    /// fails the handshake, or the server shuts down; the first must be
    /// whole by `first_by`. Every request already read is handled before
    /// the thread waits for more: stores go to the committer together,
    /// other replies out in one write.
    fn read_requests(&mut self, read_half: net::Stream, first_by: Instant) {
        let shared = self.shared;
        let local = read_half.tcp().local_addr().unwrap_or(shared.addr);
        let mut gate = Gate::new(shared.config.cluster_key.as_ref(), local);
        // A listener that lets peers in without a certificate
        // (--tls-client-certs optional, for clients uploading with a ticket
        // in redirect mode) gives such peers nothing else.
        let uploads_only = read_half.is_tls()
            && !read_half.peer_certified()
            && net::tls::installed()
                .is_some_and(|t| t.client_certs() == net::tls::ClientCerts::Optional);
        let paced = net::Paced::new(read_half, shared.config.idle_timeout);
        let mut reader = FrameReader::new(paced, shared.frame_limit());
        let mut first = true;
        loop {
            if !self.ready_to_read(&gate, &reader) {
                return;
            }
            let message = if first {
                reader.message_by::<ToServer>(first_by)
            } else {
                reader.message_within::<ToServer>(shared.config.frame_timeout)
            };
            let was_first = std::mem::take(&mut first);
            // A whole request in: at work until it is answered (a transfer,
            // until it ends; a store, until the committer answers it).
            let _working = matches!(message, Ok(Some(_))).then(|| {
                self.mark.arrived();
                self.mark.busy()
            });
            let then = match message {
                Ok(None) => return,
                Err(e) => {
                    self.read_failed(e, was_first && Instant::now() >= first_by);
                    return;
                }
                Ok(Some(Err(bad))) => {
                    log::warn!(
                        "server {}: bad request from {}: {bad}",
                        shared.addr,
                        self.peer
                    );
                    Then::Reply(Reply::Error(bad.into()))
                }
                Ok(Some(Ok(request))) => self.admit(&mut gate, uploads_only, request, &mut reader),
            };
            match then {
                Then::Reply(reply) => {
                    self.outbox.queue(&reply);
                }
                Then::Read => {}
                Then::Close => return,
            }
        }
    }

    /// Readies the connection for the next read; false when its outbox
    /// broke.
    fn ready_to_read(&mut self, gate: &Gate, reader: &FrameReader<net::Paced>) -> bool {
        // The balancer's links and probes: closed to make room only after
        // every connection that has proved nothing.
        if gate.proven() {
            self.mark.trust();
        }
        // Before a read that may wait: what was read so far goes on.
        if !reader.frame_buffered() {
            self.hand_over();
        }
        if self.outbox.is_full() {
            self.hand_over();
            self.outbox.wait_for_room();
        }
        !self.outbox.is_broken()
    }

    /// A read that ends the connection: a first request not whole in time
    /// (`first_late`), or broken framing.
    fn read_failed(&mut self, e: proto::FrameError, first_late: bool) {
        let shared = self.shared;
        if first_late && matches!(e, proto::FrameError::Timeout { .. }) {
            request_too_slow(self.peer, shared);
            let late = Reply::error(
                None,
                ErrorCode::Timeout,
                format!(
                    "no whole request within --frame-timeout ({:?}) of connecting",
                    shared.config.frame_timeout
                ),
            );
            self.outbox.queue(&late);
            return;
        }
        log::warn!("server {}: connection from {}: {e}", shared.addr, self.peer);
        if let Some(r) = e.reply() {
            self.outbox.queue(&Reply::Error(r));
        }
    }

    /// A request past the cluster handshake's gate: the handshake's own
    /// messages, a refusal before it, or the request carried out.
    fn admit(
        &mut self,
        gate: &mut Gate,
        uploads_only: bool,
        request: ToServer,
        reader: &mut FrameReader<net::Paced>,
    ) -> Then {
        let (addr, peer) = (self.shared.addr, self.peer);
        let request = match request {
            ToServer::Handshake(message) => return self.handshake(gate, &message),
            ToServer::Storage(request) => request,
        };
        // An upload straight from a client carries a signed ticket instead
        // (checked by `transfer::receive`).
        let upload = matches!(request, StorageRequest::Upload(_));
        if (uploads_only || (gate.keyed() && !gate.proven())) && !upload {
            if let Some(skipped) = refusals().check(&peer.ip()) {
                log::warn!(
                    "server {addr}: `{}` from {peer} before the cluster handshake; refused{}",
                    request.kind(),
                    crate::throttle::more(skipped)
                );
            }
            return Then::Reply(Reply::error(
                Some(request.id()),
                ErrorCode::Unauthenticated,
                "this server takes requests only after the cluster handshake \
                 (hello, see PROTOCOL.md), or uploads with a ticket",
            ));
        }
        self.carry_out(request, reader)
    }

    /// A handshake message: answered, or the connection closed when the
    /// peer failed it.
    fn handshake(&mut self, gate: &mut Gate, message: &proto::Handshake) -> Then {
        let (addr, peer) = (self.shared.addr, self.peer);
        let answer = gate.handle(message);
        // The handshake is a conversation of its own: whatever came before
        // it is answered first.
        self.hand_over();
        self.outbox.wait_idle();
        if !answer.close {
            return Then::Reply(answer.reply);
        }
        if let Some(skipped) = refusals().check(&peer.ip()) {
            log::warn!(
                "server {addr}: connection from {peer} failed the cluster handshake: {}{}",
                error_text(&answer.reply),
                crate::throttle::more(skipped)
            );
        }
        self.outbox.queue(&answer.reply);
        Then::Close
    }

    /// Carries out an admitted request.
    fn carry_out(&mut self, request: StorageRequest, reader: &mut FrameReader<net::Paced>) -> Then {
        let (shared, peer) = (self.shared, self.peer);
        // A table: one arm per request, each handing it to its handler.
        match request {
            StorageRequest::Store(store) => {
                self.store(store);
                Then::Read
            }
            // Uploads and downloads are conversations that write to the
            // socket themselves, one at a time.
            StorageRequest::Upload(upload) => {
                let mut writer = self.conversation();
                transfer::receive(upload, reader, &mut writer, peer, shared).into()
            }
            StorageRequest::Get {
                id,
                name,
                offset,
                owner,
            } => {
                let owner = owner.as_deref();
                let mut writer = self.conversation();
                transfer::send(id, &name, offset, owner, &mut writer, peer, shared).into()
            }
            // A listing may take several frames: a conversation too, after
            // the stores before it.
            StorageRequest::List { id, owner, kind } => {
                let owner = owner.as_deref();
                let mut writer = self.conversation();
                if let Err(e) = listing::list(id, owner, kind, &mut writer, shared) {
                    log::warn!("server {}: cannot reply to {peer}: {e}", shared.addr);
                    return Then::Close;
                }
                Then::Read
            }
            StorageRequest::Delete {
                id,
                name,
                owner,
                upload_id,
            } => {
                let (owner, upload) = (owner.as_deref(), upload_id.as_deref());
                Then::Reply(transfer::delete(id, &name, owner, upload, peer, shared))
            }
            StorageRequest::Status { id } => Then::Reply(Reply::Status(status_report(id, shared))),
            StorageRequest::Calc { id, operation } => Then::Reply(compute(id, operation, shared)),
            StorageRequest::Forget { id, numbers, keys } => {
                Then::Reply(handle_forget(id, &numbers, &keys, shared))
            }
            StorageRequest::Lookup { id, keys } => {
                let found = shared.storage.lookup(&keys);
                Then::Reply(Reply::Keys {
                    id,
                    held: found.held,
                    busy: found.busy,
                })
            }
            StorageRequest::Inventory { id } => Then::Reply(listing::inventory(id, shared)),
            StorageRequest::Fetch {
                id,
                from,
                name,
                owner,
                upload_id,
            } => Then::Reply(replicate::fetch(id, &from, &name, owner, upload_id, shared)),
            StorageRequest::Chunk(chunk) => Then::Reply(out_of_upload(chunk.id)),
            StorageRequest::UploadEnd { id, .. } => Then::Reply(out_of_upload(id)),
        }
    }

    /// Hands the stores read so far to the committer, together, and writes
    /// the replies ready.
    fn hand_over(&mut self) {
        self.shared.storage.submit(std::mem::take(&mut self.stores));
        self.outbox.flush();
    }

    /// A writer for a conversation, once everything before it is answered.
    fn conversation(&mut self) -> FrameWriter<net::Stream> {
        self.hand_over();
        self.outbox.conversation()
    }

    /// A framed store: at most once per request number. Answered here when
    /// it is already stored or refused; otherwise claimed, and answered by
    /// the committer once durable.
    fn store(&mut self, store: proto::StoreRequest) {
        let shared = self.shared;
        let replies = &shared.replies;
        let active = shared.load.begin_owned();
        let id = store.id;
        let number = store
            .request_number
            .unwrap_or_else(|| shared.numbers.next());
        let claim = shared
            .storage
            .claim_keyed(number, store.not_after_ms, store.key);
        let writer = match claim {
            Ok(Claim::New(writer)) => writer,
            Ok(Claim::Existing { file }) => {
                // A key may be held under another number: the copy's own.
                let number = storage::parse_name(&file).map_or(number, |(n, _)| n);
                let a_count = shared
                    .storage
                    .stored_a_count(&file)
                    .unwrap_or_else(|| crate::text::count_a(&store.doc.content));
                log::info!(
                    "server {}: request {number} is already stored as {file}; not storing it again",
                    shared.addr
                );
                self.outbox
                    .queue(&replies.stored(id, number, file, a_count, true));
                return;
            }
            Err(e) => {
                self.outbox.queue(&replies.refused(id, number, e));
                return;
            }
        };
        let delay = shared.config.char_delay;
        let bytes = store.doc.title.len() + store.doc.content.len();
        // Counted before its `StoreDone` exists, which counts it off.
        self.outbox.store_begun(bytes);
        let mut done = StoreDone {
            outbox: self.outbox.clone(),
            replies: replies.clone(),
            id,
            number,
            a_count: 0,
            title: proto::truncate(&store.doc.title, 80),
            bytes,
            answered: false,
            _active: active,
            _busy: self.mark.busy(),
        };
        if !delay.is_zero() {
            self.count_slowly(writer, store.doc, done);
            return;
        }
        done.a_count = crate::text::count_a(&store.doc.content);
        let a_count = done.a_count;
        self.stores
            .push(writer.commit(&store.doc, a_count, Box::new(done)));
    }

    /// A store slowed by --char-delay-ms (a server that takes a while over
    /// each document, as the original did): counted on a thread of its
    /// own, then handed to the committer, while the connection reads on.
    /// Should the thread not start, its reply says so (`StoreDone` is
    /// dropped unanswered).
    fn count_slowly(&self, writer: storage::Writer<'a>, doc: proto::Document, mut done: StoreDone) {
        let (storage, delay) = (&self.shared.storage, self.shared.config.char_delay);
        let counted = thread::Builder::new()
            .name(format!("{}-count", self.name))
            .spawn_scoped(self.slow, move || {
                done.a_count = count_a_with_delay(&doc.content, delay);
                let a_count = done.a_count;
                storage.submit(vec![writer.commit(&doc, a_count, Box::new(done))]);
            });
        if let Err(e) = counted {
            log::error!("server {}: cannot start a thread: {e}", self.shared.addr);
        }
    }
}

/// A store in the committer: its reply goes to its connection's outbox.
struct StoreDone {
    outbox: Arc<Outbox>,
    replies: Arc<StoreReplies>,
    id: u64,
    number: u64,
    a_count: u64,
    /// Its title, cut for the log.
    title: String,
    /// Bytes of its document, counted by the outbox.
    bytes: usize,
    /// Set once its reply is queued.
    answered: bool,
    _active: load::Active,
    _busy: net::Busy,
}

impl storage::Done for StoreDone {
    fn done(mut self: Box<Self>, outcome: Result<String, StoreError>) -> Option<storage::Deliver> {
        let replies = &self.replies;
        let reply = match outcome {
            Ok(file) => {
                log_stored(replies.addr, self.number, &self.title, &file, self.a_count);
                replies.stored(self.id, self.number, file, self.a_count, false)
            }
            Err(e) => replies.refused(self.id, self.number, e),
        };
        let first = self.outbox.queue_store_reply(&reply, self.bytes);
        self.answered = true;
        let outbox = self.outbox.clone();
        first.then(|| Box::new(move || outbox.flush()) as storage::Deliver)
    }
}

/// A store dropped unanswered (the committer died with it) still gets a
/// reply, and stops counting: its connection waits for every store.
impl Drop for StoreDone {
    fn drop(&mut self) {
        if self.answered {
            return;
        }
        let e = StoreError::Io(io::Error::other("the storage committer stopped"));
        let reply = self.replies.refused(self.id, self.number, e);
        if self.outbox.queue_store_reply(&reply, self.bytes) {
            self.outbox.flush();
        }
    }
}

/// What a store's reply needs, on whichever thread makes it: the
/// connection's or the committer's. Not `Shared`: the last reference to
/// the storage must never be dropped on its own committer's thread.
struct StoreReplies {
    addr: SocketAddr,
    load: Arc<Load>,
    dir: PathBuf,
}

impl StoreReplies {
    fn stored(&self, id: u64, number: u64, file: String, a_count: u64, existing: bool) -> Reply {
        Reply::Stored(proto::Stored {
            id,
            server: self.addr.to_string(),
            request_number: number,
            file,
            a_count,
            existing,
            copies: Vec::new(),
            under_replicated: false,
        })
    }

    fn refused(&self, id: u64, number: u64, e: StoreError) -> Reply {
        let addr = self.addr;
        let code = match &e {
            StoreError::Expired { .. } | StoreError::Forgotten(_) => ErrorCode::Expired,
            StoreError::InProgress(_) => ErrorCode::InProgress,
            StoreError::Io(e) if storage::is_disk_full(e) => ErrorCode::DiskFull,
            StoreError::Io(_) => ErrorCode::Storage,
        };
        if code == ErrorCode::DiskFull {
            self.load.note_disk_full(&self.dir);
        }
        if matches!(code, ErrorCode::Storage | ErrorCode::DiskFull) {
            log::error!("server {addr}: cannot store request {number}: {e}");
        } else {
            // The balancer retries elsewhere or has already: routine.
            log::info!("server {addr}: refused request {number}: {e}");
        }
        Reply::error(Some(id), code, format!("server {addr}: {e}"))
    }
}

/// Peers refused for want of the cluster key, logged once a minute each.
fn refusals() -> &'static crate::throttle::Throttle<std::net::IpAddr> {
    static REFUSALS: std::sync::OnceLock<crate::throttle::Throttle<std::net::IpAddr>> =
        std::sync::OnceLock::new();
    REFUSALS.get_or_init(|| crate::throttle::Throttle::new(Duration::from_secs(60)))
}

fn error_text(reply: &Reply) -> String {
    match reply {
        Reply::Error(e) => format!("{}: {}", e.code, e.message),
        other => format!("{other:?}"),
    }
}

/// A connection from the original balancer: documents (no reply) and status
/// probes (one byte), as unframed JSON objects.
fn serve_legacy(
    read_half: net::Stream,
    mut write_half: net::Stream,
    peer: SocketAddr,
    first_by: Instant,
    mark: &net::Mark,
    shared: &Shared,
) {
    let addr = shared.addr;
    // Idle up to --idle-timeout between objects, each whole within
    // --frame-timeout once begun.
    let paced = net::Paced::new(read_half, shared.config.idle_timeout);
    let reader = LegacyReader::paced(
        BufReader::new(paced),
        shared.frame_limit(),
        shared.config.frame_timeout,
        first_by,
    );
    for request in reader {
        let _working = request.is_ok().then(|| {
            mark.arrived();
            mark.busy()
        });
        match request {
            Ok(LegacyRequest::Status) => {
                let byte = u8::from(shared.load.overloaded());
                if let Err(e) = write_half.write_all(&[byte]) {
                    log::warn!("server {addr}: cannot answer probe from {peer}: {e}");
                    return;
                }
            }
            Ok(LegacyRequest::Document {
                doc,
                request_number,
            }) => {
                // The original balancer reads no reply; the outcome is only
                // logged (by `store_legacy`).
                store_legacy(&doc, request_number, shared);
            }
            Err(LegacyError::Timeout { mid_object: true }) => {
                request_too_slow(peer, shared);
                return;
            }
            Err(e) => {
                log::warn!("server {addr}: original-format connection from {peer}: {e}");
                if !e.is_recoverable() {
                    return;
                }
            }
        }
    }
}

/// A computation on two random operands.
fn compute(id: u64, operation: proto::Operation, shared: &Shared) -> Reply {
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

/// `chunk` or `upload_end` with no upload started on the connection.
fn out_of_upload(id: u64) -> Reply {
    Reply::error(
        Some(id),
        ErrorCode::BadRequest,
        "no upload in progress on this connection (send `upload` first)",
    )
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
        process_cpu_percent: sample.process_cpu_percent,
        memory_used_bytes: sample.memory_used_bytes,
        memory_total_bytes: sample.memory_total_bytes,
        disk_used_bytes: sample.disk_used_bytes,
        disk_free_bytes: sample.disk_free_bytes,
        storage_writable: sample.storage_writable,
        net_rx_bytes: sample.net_rx_bytes,
        net_tx_bytes: sample.net_tx_bytes,
        uptime_secs: shared.load.uptime().as_secs(),
        files_stored: shared.storage.count(),
    }
}

/// A document in the original format: always stored, whatever its number.
fn store_legacy(doc: &Document, request_number: Option<u64>, shared: &Shared) {
    let _active = shared.load.begin();
    let number = request_number.unwrap_or_else(|| shared.numbers.next());
    let a_count = count_a_with_delay(&doc.content, shared.config.char_delay);
    match shared.storage.store_copy(number, doc, a_count) {
        Ok(file) => log_stored(shared.addr, number, &doc.title, &file, a_count),
        Err(e) if storage::is_disk_full(&e) => {
            shared.load.note_disk_full(shared.storage.dir());
            log::error!(
                "server {}: cannot store original-format request {number}: the disk is full ({e})",
                shared.addr
            );
        }
        Err(e) => log::error!(
            "server {}: cannot store original-format request {number}: {e}",
            shared.addr
        ),
    }
}

fn log_stored(addr: SocketAddr, number: u64, title: &str, file: &str, a_count: u64) {
    log::info!(
        "server {addr}: stored request {number} \"{}\" as {file} ({a_count} letters A)",
        proto::truncate(title, 80)
    );
}

fn handle_forget(id: u64, numbers: &[u64], keys: &[proto::ClientKey], shared: &Shared) -> Reply {
    let addr = shared.addr;
    let mut done = shared.storage.forget(numbers);
    let by_key = shared.storage.forget_keys(keys);
    done.moved.extend(by_key.moved);
    done.failed.extend(by_key.failed);
    for (number, file) in &done.moved {
        log::warn!(
            "server {addr}: request {number} is stored on another server; moved {file} to {}",
            storage::DUPLICATES_DIR
        );
    }
    if done.failed.is_empty() {
        return Reply::Forgotten {
            id,
            moved: done.moved.len() as u64,
        };
    }
    let failures: Vec<String> = done
        .failed
        .iter()
        .map(|(number, file, e)| format!("request {number} ({file}): {e}"))
        .collect();
    log::error!("server {addr}: cannot move aside {}", failures.join("; "));
    Reply::error(
        Some(id),
        ErrorCode::Storage,
        format!(
            "server {addr} moved {} files but cannot move aside {}",
            done.moved.len(),
            failures.join("; ")
        ),
    )
}

/// Counts letters A; with a delay, sleeps per character like the original
/// system did to make a server slow on purpose.
fn count_a_with_delay(content: &str, delay: Duration) -> u64 {
    if !delay.is_zero() {
        for _ in content.chars() {
            thread::sleep(delay);
        }
    }
    crate::text::count_a(content)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{Connection, StoreRequest};
    use std::io::Read;
    use std::net::TcpStream;

    fn start(dir: &Path, config: Config) -> ServerHandle {
        Server::bind(Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            dir: Some(dir.to_path_buf()),
            ..config
        })
        .unwrap()
        .start()
        .unwrap()
    }

    fn connect(addr: SocketAddr) -> Connection<net::Stream> {
        let stream = net::connect(&addr, Duration::from_secs(5), Duration::from_secs(20)).unwrap();
        Connection::new(stream, proto::DEFAULT_MAX_FRAME)
    }

    fn store(id: u64, number: Option<u64>, content: &str) -> StorageRequest {
        StorageRequest::Store(StoreRequest {
            id,
            doc: Document {
                title: "t".into(),
                content: content.into(),
            },
            request_number: number,
            not_after_ms: None,
            key: None,
            resent: false,
        })
    }

    /// A status round trip: the server has accepted the connection and its
    /// thread is running.
    fn status(conn: &mut Connection<net::Stream>) -> proto::StatusReport {
        match conn.call(&StorageRequest::Status { id: 1 }).unwrap() {
            Reply::Status(s) => s,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn shutdown_closes_idle_connections_and_joins_every_thread() {
        let dir = tempfile::tempdir().unwrap();
        let handle = start(dir.path(), Config::default());
        let addr = handle.addr();
        let mut idle = connect(addr);
        status(&mut idle);
        let mut conn = connect(addr);
        let Reply::Stored(s) = conn.call(&store(2, Some(77), "banana")).unwrap() else {
            panic!()
        };
        assert_eq!((s.file.as_str(), s.a_count), ("77_t.json", 3));

        // From another thread, through `&self`, twice.
        thread::scope(|scope| {
            scope.spawn(|| handle.shutdown());
        });
        handle.shutdown();
        handle.join().unwrap();

        let mut byte = [0u8; 1];
        assert_eq!(
            idle.get_ref().try_clone().unwrap().read(&mut byte).unwrap(),
            0
        );
        assert!(TcpStream::connect(addr).is_err(), "still accepting");
        assert!(dir.path().join("77_t.json").is_file());
    }

    #[test]
    fn a_request_being_handled_gets_its_reply_after_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        let handle = start(
            dir.path(),
            Config {
                char_delay: Duration::from_millis(20),
                ..Config::default()
            },
        );
        let mut busy = connect(handle.addr());
        status(&mut busy);
        busy.send(&store(5, Some(5), &"a".repeat(25))).unwrap();
        let mut watcher = connect(handle.addr());
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while status(&mut watcher).active == 0 {
            assert!(std::time::Instant::now() < deadline, "store never started");
        }
        handle.shutdown();
        match busy.recv::<Reply>().unwrap() {
            Reply::Stored(s) => assert_eq!((s.request_number, s.a_count), (5, 25)),
            other => panic!("{other:?}"),
        }
        handle.join().unwrap();
        assert!(dir.path().join("5_t.json").is_file());
    }

    #[test]
    fn direct_stores_are_numbered_with_the_server_id() {
        let dir = tempfile::tempdir().unwrap();
        let handle = start(
            dir.path(),
            Config {
                server_id: Some(300),
                ..Config::default()
            },
        );
        let mut conn = connect(handle.addr());
        let mut numbers = Vec::new();
        for id in 0..3 {
            let Reply::Stored(s) = conn.call(&store(id, None, "x")).unwrap() else {
                panic!()
            };
            assert!(!s.existing);
            let parts = ids::parts(s.request_number);
            assert_eq!((parts.source, parts.node), (Source::Server, 300));
            numbers.push(s.request_number);
        }
        assert!(numbers.windows(2).all(|w| w[0] < w[1]), "{numbers:?}");

        let err = Server::bind(Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            dir: Some(dir.path().to_path_buf()),
            server_id: Some(512),
            ..Config::default()
        })
        .err()
        .unwrap();
        assert!(err.to_string().contains("512"), "{err}");
    }

    #[test]
    fn repeated_expired_and_forgotten_stores_over_the_wire() {
        let dir = tempfile::tempdir().unwrap();
        let handle = start(dir.path(), Config::default());
        let mut conn = connect(handle.addr());
        let Reply::Stored(first) = conn.call(&store(1, Some(9), "aa")).unwrap() else {
            panic!()
        };
        let Reply::Stored(again) = conn.call(&store(2, Some(9), "aa")).unwrap() else {
            panic!()
        };
        assert!(again.existing && !first.existing);
        assert_eq!((again.file, again.a_count), (first.file, 2));

        let mut late = store(3, Some(10), "a");
        if let StorageRequest::Store(s) = &mut late {
            s.not_after_ms = Some(1);
        }
        let Reply::Error(e) = conn.call(&late).unwrap() else {
            panic!()
        };
        assert_eq!(e.code, ErrorCode::Expired);

        let reply = conn
            .call(&StorageRequest::Forget {
                id: 4,
                numbers: vec![9, 10],
                keys: vec![],
            })
            .unwrap();
        assert_eq!(reply, Reply::Forgotten { id: 4, moved: 1 });
        let Reply::Error(e) = conn.call(&store(5, Some(9), "aa")).unwrap() else {
            panic!()
        };
        assert_eq!(e.code, ErrorCode::Expired);
        assert!(
            e.message.contains("stored on another server"),
            "{}",
            e.message
        );
        assert_eq!(status(&mut conn).files_stored, 0);
        handle.shutdown();
        handle.join().unwrap();
    }
}
