//! Transfer tracking: what happened to every document the balancer took,
//! kept in a SQLite state file (`--state`) so it outlives a restart.
//!
//! The hot path never waits on the disk: `Tracker::record` puts an event on
//! a bounded channel with `try_send`, and when the channel is full the event
//! is counted as dropped instead. One writer thread owns the write
//! connection and commits whatever has arrived (up to `MAX_BATCH` events or
//! `BATCH_WINDOW`) in one transaction. It stops after committing the rest
//! once every `Tracker` clone is gone (the channel disconnects).
//!
//! Queries read through their own read-only connections (WAL lets them run
//! beside the writer); before reading, a query asks the writer to commit
//! what it holds, so a transfer already acknowledged to a client is seen.
//!
//! The file also keeps the set of storage servers (`servers` table), for
//! membership changes to survive restarts, the users of `--users`
//! (`users` table, see `users`) and the catalog of stored files and
//! documents (see `catalog`, which owns its SQL; its changes are committed
//! by the same writer). Schema 2 added the users and the user who sent
//! each transfer, schema 3 the lock of a user after too many failed
//! logins, schema 4 the catalog; a file of an older schema is brought up
//! to date when opened.

mod rows;

use super::catalog::{self, Change, Entry, Figures, Removal};
use crate::error::Error;
use crate::proto::{ErrorCode, TransferView};
use crossbeam_channel::{Receiver, Sender, TryRecvError, TrySendError};
use rusqlite::{params, Connection, OpenFlags, Row};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Events waiting for the writer, at most; past this they are dropped.
pub const CHANNEL_CAPACITY: usize = 65_536;
/// Events committed in one transaction, at most.
const MAX_BATCH: usize = 1000;
/// How long the writer gathers events after the first of a batch: long
/// enough to make transactions few under load, short enough that a crash
/// loses little.
const BATCH_WINDOW: Duration = Duration::from_millis(100);
/// While gathering, the writer takes what has arrived, then sleeps this
/// long, rather than waking for every event (thousands a second under
/// load); a flush waits at most this long to be seen.
const GATHER_PAUSE: Duration = Duration::from_millis(5);
/// `PRAGMA user_version` of the schema below.
pub const SCHEMA_VERSION: i64 = 4;
/// Records one query returns when it asks for no limit.
pub const DEFAULT_LIMIT: u32 = 100;
/// Records one query returns at most, so that the reply fits in a frame.
pub const MAX_LIMIT: u32 = crate::proto::MAX_TRANSFERS_LIMIT;
/// How long a query or a membership change waits for the writer.
const WRITER_WAIT: Duration = Duration::from_secs(5);
/// How long SQLite retries when another process (a second balancer on the
/// same file) holds the lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

const SCHEMA: &str = "
CREATE TABLE transfers (
    number      INTEGER PRIMARY KEY,
    client      TEXT NOT NULL,
    title       TEXT NOT NULL,
    size        INTEGER NOT NULL,
    servers     TEXT NOT NULL DEFAULT '[]',
    state       TEXT NOT NULL,
    server      TEXT,
    file        TEXT,
    started_ms  INTEGER NOT NULL,
    ended_ms    INTEGER,
    duration_ms INTEGER,
    last_error  TEXT
);
CREATE INDEX transfers_by_start ON transfers (started_ms);
CREATE TABLE servers (
    address  TEXT PRIMARY KEY,
    added_ms INTEGER NOT NULL,
    state    TEXT NOT NULL
);
";

/// From schema 1 to 2: who sent each transfer (`NULL` for those from
/// before, or sent without `--users`), and the users.
const MIGRATE_TO_2: &str = "
ALTER TABLE transfers ADD COLUMN user TEXT;
CREATE TABLE users (
    name       TEXT PRIMARY KEY,
    hash       TEXT NOT NULL,
    admin      INTEGER NOT NULL DEFAULT 0,
    created_ms INTEGER NOT NULL
);
";

/// From schema 2 to 3: until when a user is locked (Unix milliseconds;
/// `NULL` when not), after too many failed logins in a row.
const MIGRATE_TO_3: &str = "
ALTER TABLE users ADD COLUMN locked_until_ms INTEGER;
";

/// The upgrades, in order: `MIGRATIONS[i]` brings schema `i + 1` to `i + 2`.
const MIGRATIONS: [&str; SCHEMA_VERSION as usize - 1] =
    [MIGRATE_TO_2, MIGRATE_TO_3, catalog::MIGRATION];

/// Why the state file cannot be used.
#[derive(Debug)]
pub enum StateError {
    Sqlite(rusqlite::Error),
    /// Written by a newer balancer: its schema is unknown here.
    NewerSchema {
        found: i64,
    },
    /// A SQLite database of something else: it is not ours to change.
    Foreign,
    /// The writer could not commit a change (its message).
    Write(String),
    /// The writer thread has stopped (the balancer is shutting down).
    WriterGone,
}

impl fmt::Display for StateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StateError::Sqlite(e) => e.fmt(f),
            StateError::NewerSchema { found } => write!(
                f,
                "schema version {found} is newer than this balancer's ({SCHEMA_VERSION})"
            ),
            StateError::Foreign => {
                f.write_str("it is a SQLite database with other tables, not a balancer state file")
            }
            StateError::Write(e) => write!(f, "cannot write: {e}"),
            StateError::WriterGone => f.write_str("the state writer has stopped"),
        }
    }
}

impl std::error::Error for StateError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StateError::Sqlite(e) => Some(e),
            _ => None,
        }
    }
}

impl From<rusqlite::Error> for StateError {
    fn from(e: rusqlite::Error) -> Self {
        StateError::Sqlite(e)
    }
}

/// Where a transfer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransferState {
    /// Received, not yet handed to a server.
    Queued,
    /// On its way to a server.
    Sending,
    /// Failed on a server, waiting to be sent again.
    Retried,
    Stored,
    Failed,
    /// Given up on after it reached a server that never answered: it may
    /// be stored there (`maybe_stored`).
    Unknown,
    /// Open when the balancer stopped without finishing it (a crash or a
    /// kill); marked so when the balancer starts again. Also an upload
    /// whose client went away: its bytes so far are kept for a resume.
    Interrupted,
    /// A file its user deleted (recorded when the catalog forgot it).
    Deleted,
}

impl TransferState {
    pub const ACTIVE: [TransferState; 3] = [
        TransferState::Queued,
        TransferState::Sending,
        TransferState::Retried,
    ];

    /// Ended without being stored.
    pub const NOT_STORED: [TransferState; 3] = [
        TransferState::Failed,
        TransferState::Unknown,
        TransferState::Interrupted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TransferState::Queued => "queued",
            TransferState::Sending => "sending",
            TransferState::Retried => "retried",
            TransferState::Stored => "stored",
            TransferState::Failed => "failed",
            TransferState::Unknown => "unknown",
            TransferState::Interrupted => "interrupted",
            TransferState::Deleted => "deleted",
        }
    }

    /// Whether nothing more happens to it.
    pub fn is_ended(self) -> bool {
        !Self::ACTIVE.contains(&self)
    }

    /// The state a failure leaves: unknown when a server may hold it.
    pub fn of_failure(code: ErrorCode) -> TransferState {
        if code == ErrorCode::MaybeStored {
            TransferState::Unknown
        } else {
            TransferState::Failed
        }
    }

    fn parse(s: &str) -> Option<TransferState> {
        [
            Self::ACTIVE.as_slice(),
            &[Self::Stored, Self::Deleted],
            Self::NOT_STORED.as_slice(),
        ]
        .concat()
        .into_iter()
        .find(|state| state.as_str() == s)
    }
}

impl fmt::Display for TransferState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Something that happened to a transfer: a document (`store` jobs) or an
/// upload; `number` is the request number. `Stored` is a document's (the
/// catalog records it); an upload is stored by `Change::FileStored`.
#[derive(Debug, Clone, PartialEq)]
pub enum TrackEvent {
    Received {
        number: u64,
        client: String,
        title: String,
        size: u64,
        /// The user who sent it, with `--users`.
        user: Option<String>,
    },
    Sent {
        number: u64,
        server: String,
    },
    Retried {
        number: u64,
        server: String,
        reason: String,
    },
    Stored {
        number: u64,
        server: String,
        file: String,
    },
    Failed {
        number: u64,
        code: ErrorCode,
        reason: String,
    },
    /// An upload whose client went away before the end.
    Interrupted {
        number: u64,
        reason: String,
    },
}

/// One transfer as the state file has it.
#[derive(Debug, Clone, PartialEq)]
pub struct TransferRecord {
    pub number: u64,
    pub client: String,
    pub title: String,
    pub size: u64,
    /// Servers it was sent to, in order (a server twice if retried there).
    pub servers: Vec<String>,
    pub state: TransferState,
    /// Where it was stored.
    pub server: Option<String>,
    /// Its file name on that server.
    pub file: Option<String>,
    /// Unix milliseconds: when the balancer received it.
    pub started_ms: u64,
    pub ended_ms: Option<u64>,
    pub duration_ms: Option<u64>,
    /// The last error, of a retry or the final failure.
    pub error: Option<String>,
    /// The user who sent it, with `--users`.
    pub user: Option<String>,
}

impl From<TransferRecord> for TransferView {
    fn from(r: TransferRecord) -> Self {
        TransferView {
            number: r.number,
            client: r.client,
            title: r.title,
            size: r.size,
            servers: r.servers,
            state: r.state.as_str().to_string(),
            server: r.server,
            file: r.file,
            started_ms: r.started_ms,
            ended_ms: r.ended_ms,
            duration_ms: r.duration_ms,
            error: r.error,
            user: r.user,
        }
    }
}

/// Which transfers a query returns, newest first.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TransferFilter {
    /// Only those not finished (queued, sending, retried).
    pub active: bool,
    /// Only failed ones. With `active` too: either.
    pub failed: bool,
    /// Only those received at or after this Unix time in milliseconds.
    pub since_ms: Option<u64>,
    /// At most this many (default `DEFAULT_LIMIT`, capped at `MAX_LIMIT`).
    pub limit: Option<u32>,
    /// Only those sent by this user.
    pub user: Option<String>,
}

/// What the writer is sent.
enum Msg {
    Event {
        at_ms: u64,
        event: TrackEvent,
    },
    /// Commit everything before this, then answer.
    Flush(Sender<()>),
    /// A membership change, committed before the answer.
    Server {
        change: ServerChange,
        at_ms: u64,
        done: Sender<Result<(), String>>,
    },
    /// A catalog change, committed before the answer (if one is wanted).
    Catalog {
        change: Change,
        at_ms: u64,
        done: Option<Sender<Result<catalog::Outcome, String>>>,
    },
}

enum ServerChange {
    Save(String),
    Remove(String),
    /// It left by itself: not remembered, not kept out either.
    Leave(String),
}

/// What happened to a server of the pool, to be remembered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolChange {
    /// It joined: a restarted balancer starts with it.
    Joined,
    /// It left by itself (`deregister`).
    Left,
    /// An operator drained or removed it: it stays out, across restarts
    /// too, until an operator adds it again.
    Banned,
}

struct Shared {
    path: PathBuf,
    dropped: AtomicU64,
    /// Idle read connections: taken out for a query and put back, so the
    /// lock is never held while SQLite reads.
    readers: Mutex<Vec<Connection>>,
}

/// Records transfer events into the state file; cheap to clone. The writer
/// stops when the last clone is dropped.
#[derive(Clone)]
pub struct Tracker {
    events: Sender<Msg>,
    shared: Arc<Shared>,
}

impl fmt::Debug for Tracker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tracker")
            .field("path", &self.shared.path)
            .field("dropped", &self.dropped())
            .finish()
    }
}

/// Unix time in milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

impl Tracker {
    /// Opens (or creates) the state file and starts the writer thread. A
    /// file that is not a balancer state file is an error, never replaced.
    pub fn open(path: &Path) -> Result<(Tracker, JoinHandle<()>), Error> {
        let (tracker, messages, conn) = Self::open_unstarted(path, CHANNEL_CAPACITY)?;
        match mark_interrupted(&conn, now_ms()) {
            Ok(0) => {}
            Ok(n) => log::warn!(
                "{n} transfers were still open when the balancer last stopped (a crash or a \
                 kill): marked interrupted"
            ),
            Err(e) => log::error!("cannot mark the transfers left open as interrupted: {e}"),
        }
        let shared = tracker.shared.clone();
        let thread = crate::net::spawn_named("tracker".into(), None, move || {
            write_loop(conn, &messages, &shared);
        })?;
        log::info!("transfer tracking in {}", path.display());
        Ok((tracker, thread))
    }

    /// The tracker, the writer's end of its channel and its connection,
    /// with no writer running yet.
    fn open_unstarted(
        path: &Path,
        capacity: usize,
    ) -> Result<(Tracker, Receiver<Msg>, Connection), Error> {
        let state_error = |source: StateError| Error::State {
            path: path.to_path_buf(),
            source: Box::new(source),
        };
        let conn = open_writer(path).map_err(state_error)?;
        let reader = open_reader(path).map_err(state_error)?;
        let (tx, rx) = crossbeam_channel::bounded(capacity);
        let shared = Arc::new(Shared {
            path: path.to_path_buf(),
            dropped: AtomicU64::new(0),
            readers: Mutex::new(vec![reader]),
        });
        Ok((Tracker { events: tx, shared }, rx, conn))
    }

    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// Events not recorded: the channel was full, or their write failed.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Relaxed)
    }

    /// Records an event that happens now. Never blocks.
    pub fn record(&self, event: TrackEvent) {
        self.record_at(now_ms(), event);
    }

    /// Records an event with its own time (Unix milliseconds). Never blocks.
    pub fn record_at(&self, at_ms: u64, event: TrackEvent) {
        match self.events.try_send(Msg::Event { at_ms, event }) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                // Warned once: the counter tells how many since.
                if self.shared.dropped.fetch_add(1, Relaxed) == 0 {
                    log::warn!(
                        "transfer tracking cannot keep up: events are being dropped (the state file lags)"
                    );
                }
            }
            // Only while shutting down, when nothing is recorded any more.
            Err(TrySendError::Disconnected(_)) => {
                self.shared.dropped.fetch_add(1, Relaxed);
            }
        }
    }

    /// Transfers matching `filter`, newest first. Sees every event recorded
    /// before the call (unless dropped).
    pub fn query(&self, filter: &TransferFilter) -> Result<Vec<TransferRecord>, Error> {
        self.flush();
        self.read(|conn| query_transfers(conn, filter))
    }

    /// Remembers a storage server (membership). Waits for the commit.
    pub fn save_server(&self, addr: &str) -> Result<(), Error> {
        self.change_server(ServerChange::Save(addr.to_string()))
    }

    /// Forgets a storage server; its row stays, marked `removed`.
    pub fn remove_server(&self, addr: &str) -> Result<(), Error> {
        self.change_server(ServerChange::Remove(addr.to_string()))
    }

    /// Remembers a change of the pool, without waiting for the commit
    /// (for the dispatcher, which waits on nothing).
    pub fn note_server(&self, addr: &str, change: PoolChange) {
        let addr = addr.to_string();
        let change = match change {
            PoolChange::Joined => ServerChange::Save(addr),
            PoolChange::Left => ServerChange::Leave(addr),
            PoolChange::Banned => ServerChange::Remove(addr),
        };
        // Nobody waits for the answer.
        let (done, _) = crossbeam_channel::bounded(1);
        let msg = Msg::Server {
            change,
            at_ms: now_ms(),
            done,
        };
        if self.events.try_send(msg).is_err() {
            self.shared.dropped.fetch_add(1, Relaxed);
        }
    }

    /// The servers an operator drained or removed, which stay out until
    /// one adds them again.
    pub fn banned_servers(&self) -> Result<Vec<String>, Error> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT address FROM servers WHERE state = 'removed' ORDER BY address",
            )?;
            let rows = stmt.query_map([], |row| row.get(0))?;
            Ok(rows.collect::<Result<Vec<String>, _>>()?)
        })
    }

    /// The servers saved and not removed, oldest first.
    pub fn servers(&self) -> Result<Vec<String>, Error> {
        self.read(|conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT address FROM servers WHERE state = 'active' ORDER BY added_ms, address",
            )?;
            let rows = stmt.query_map([], |row| row.get(0))?;
            Ok(rows.collect::<Result<Vec<String>, _>>()?)
        })
    }

    /// Makes a catalog change and waits for its commit; returns the
    /// removals it leaves to carry out.
    pub fn catalog_change(&self, change: Change) -> Result<Vec<Removal>, Error> {
        self.catalog_change_within(change, WRITER_WAIT)
    }

    /// `catalog_change`, waiting up to `wait` for the commit (taking in a
    /// long listing takes longer than the usual change).
    pub fn catalog_change_within(
        &self,
        change: Change,
        wait: Duration,
    ) -> Result<Vec<Removal>, Error> {
        let error = |source: StateError| Error::State {
            path: self.shared.path.clone(),
            source: Box::new(source),
        };
        let (done_tx, done_rx) = crossbeam_channel::bounded(1);
        let msg = Msg::Catalog {
            change,
            at_ms: now_ms(),
            done: Some(done_tx),
        };
        self.events
            .send_timeout(msg, WRITER_WAIT)
            .map_err(|_| error(StateError::WriterGone))?;
        match done_rx.recv_timeout(wait) {
            Ok(Ok(removals)) => Ok(removals),
            Ok(Err(e)) => Err(error(StateError::Write(e))),
            Err(_) => Err(error(StateError::WriterGone)),
        }
    }

    /// Makes a catalog change without waiting for it (never blocks, like
    /// `record`).
    pub fn catalog_note(&self, change: Change) {
        let msg = Msg::Catalog {
            change,
            at_ms: now_ms(),
            done: None,
        };
        if self.events.try_send(msg).is_err() {
            self.shared.dropped.fetch_add(1, Relaxed);
        }
    }

    /// The file entries called `name` (`owner`'s, or everyone's).
    pub fn catalog_files(&self, owner: Option<&str>, name: &str) -> Result<Vec<Entry>, Error> {
        self.flush();
        self.read(|conn| Ok(catalog::find_files(conn, owner, name)?))
    }

    /// A page of the catalog (see `catalog::page`). `fresh` first has the
    /// writer commit what it holds.
    pub fn catalog_page(
        &self,
        owner: Option<&str>,
        kind: crate::proto::EntryKind,
        after: &catalog::Cursor,
        limit: usize,
        fresh: bool,
    ) -> Result<Vec<Entry>, Error> {
        if fresh {
            self.flush();
        }
        self.read(|conn| Ok(catalog::page(conn, owner, kind, after, limit)?))
    }

    /// The server to resume upload `upload_id` of `owner` on, if the
    /// catalog knows.
    pub fn catalog_upload_server(
        &self,
        upload_id: &str,
        owner: Option<&str>,
    ) -> Result<Option<String>, Error> {
        self.read(|conn| Ok(catalog::upload_server(conn, upload_id, owner)?))
    }

    /// Whether `file` on `server` is a copy the catalog points at (as
    /// committed now).
    pub fn catalog_is_copy(&self, server: &str, file: &str) -> Result<bool, Error> {
        self.read(|conn| Ok(catalog::is_copy(conn, server, file)?))
    }

    /// Removals not carried out yet.
    pub fn catalog_removals(&self) -> Result<Vec<Removal>, Error> {
        self.flush();
        self.read(|conn| Ok(catalog::removals(conn)?))
    }

    /// What the catalog says `server` holds; `None` if it never took that
    /// server's listing in.
    pub fn catalog_figures(&self, server: &str) -> Result<Option<Figures>, Error> {
        self.flush();
        self.read(|conn| Ok(catalog::figures(conn, server)?))
    }

    /// Waits (boundedly) until the writer has committed what was sent
    /// before; a writer that does not answer in time is read around.
    fn flush(&self) {
        let (done_tx, done_rx) = crossbeam_channel::bounded(1);
        if self
            .events
            .send_timeout(Msg::Flush(done_tx), WRITER_WAIT)
            .is_ok()
        {
            let _ = done_rx.recv_timeout(WRITER_WAIT);
        }
    }

    fn change_server(&self, change: ServerChange) -> Result<(), Error> {
        let error = |source: StateError| Error::State {
            path: self.shared.path.clone(),
            source: Box::new(source),
        };
        let (done_tx, done_rx) = crossbeam_channel::bounded(1);
        let msg = Msg::Server {
            change,
            at_ms: now_ms(),
            done: done_tx,
        };
        self.events
            .send_timeout(msg, WRITER_WAIT)
            .map_err(|_| error(StateError::WriterGone))?;
        match done_rx.recv_timeout(WRITER_WAIT) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(error(StateError::Write(e))),
            Err(_) => Err(error(StateError::WriterGone)),
        }
    }

    /// Runs `f` on an idle read connection (a new one if none is idle).
    fn read<T>(&self, f: impl FnOnce(&Connection) -> Result<T, StateError>) -> Result<T, Error> {
        let error = |source: StateError| Error::State {
            path: self.shared.path.clone(),
            source: Box::new(source),
        };
        let idle = crate::net::lock(&self.shared.readers).pop();
        let conn = match idle {
            Some(conn) => conn,
            None => open_reader(&self.shared.path).map_err(error)?,
        };
        let result = f(&conn).map_err(error);
        crate::net::lock(&self.shared.readers).push(conn);
        result
    }
}

/// Opens the state file for writing, creating or upgrading its schema;
/// also used by `balancer user ...` to manage users.
pub(crate) fn open_writer(path: &Path) -> Result<Connection, StateError> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    // The first read of the file: a file that is not SQLite fails here.
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    match version {
        SCHEMA_VERSION => {}
        found if found > SCHEMA_VERSION => return Err(StateError::NewerSchema { found }),
        _ => {
            // Looked at again inside a write transaction: another process
            // (`balancer user ...` beside a starting balancer) may be
            // upgrading it at the same time.
            conn.execute_batch("BEGIN IMMEDIATE")?;
            let upgraded = upgrade(&conn, path);
            let ended = conn.execute_batch(if upgraded.is_ok() {
                "COMMIT"
            } else {
                "ROLLBACK"
            });
            upgraded?;
            ended?;
        }
    }
    // WAL: readers never wait for the writer. NORMAL: a commit survives a
    // crash of the process, only a power cut can lose the last ones.
    let mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        log::warn!(
            "state file {}: journal mode is {mode}, not WAL; queries may wait for the writer",
            path.display()
        );
    }
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    Ok(conn)
}

/// Creates the schema in an empty file, or brings an older one up to
/// `SCHEMA_VERSION`, inside the caller's transaction.
fn upgrade(conn: &Connection, path: &Path) -> Result<(), StateError> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let tables: i64 = conn.query_row(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table'",
        [],
        |r| r.get(0),
    )?;
    let from = match version {
        0 if tables > 0 => return Err(StateError::Foreign),
        0 => {
            conn.execute_batch(SCHEMA)?;
            1
        }
        SCHEMA_VERSION => return Ok(()),
        found if found > SCHEMA_VERSION => return Err(StateError::NewerSchema { found }),
        found if found < 0 => return Err(StateError::Foreign),
        found => found,
    };
    for migration in &MIGRATIONS[from as usize - 1..] {
        conn.execute_batch(migration)?;
    }
    conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    if version > 0 {
        log::info!(
            "state file {}: upgraded from schema {version} to {SCHEMA_VERSION}",
            path.display()
        );
    }
    Ok(())
}

fn open_reader(path: &Path) -> Result<Connection, StateError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    Ok(conn)
}

/// What the writer did, for its last log line and for tests.
#[derive(Debug, Default, PartialEq)]
struct Written {
    events: u64,
    transactions: u64,
}

/// The writer thread: gathers a batch, commits it, answers flushes; ends
/// after the last batch once the channel disconnects.
fn write_loop(mut conn: Connection, messages: &Receiver<Msg>, shared: &Shared) -> Written {
    let mut written = Written::default();
    while let Ok(first) = messages.recv() {
        let deadline = Instant::now() + BATCH_WINDOW;
        let mut batch = vec![first];
        let mut disconnected = false;
        // Someone waits on a flush or a catalog change: commit now.
        while batch.len() < MAX_BATCH
            && !matches!(
                batch.last(),
                Some(Msg::Flush(_) | Msg::Catalog { done: Some(_), .. })
            )
        {
            match messages.try_recv() {
                Ok(msg) => {
                    batch.push(msg);
                    continue;
                }
                Err(TryRecvError::Disconnected) => {
                    disconnected = true;
                    break;
                }
                Err(TryRecvError::Empty) => {}
            }
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            std::thread::sleep(GATHER_PAUSE.min(deadline - now));
        }
        written.events += commit(&mut conn, batch, shared);
        written.transactions += 1;
        if disconnected {
            break;
        }
    }
    let dropped = shared.dropped.load(Relaxed);
    if dropped > 0 {
        log::warn!(
            "transfer tracking stopped: {} events recorded, {dropped} dropped (channel full or write failed)",
            written.events
        );
    } else {
        log::info!(
            "transfer tracking stopped: {} events recorded",
            written.events
        );
    }
    written
}

/// Commits one batch in one transaction and answers whoever waits on it.
/// Returns how many events were written.
fn commit(conn: &mut Connection, batch: Vec<Msg>, shared: &Shared) -> u64 {
    let mut events = 0;
    let mut flushed = Vec::new();
    let mut changed = Vec::new();
    let mut cataloged = Vec::new();
    let result = (|| -> Result<(), rusqlite::Error> {
        let tx = conn.transaction()?;
        let mut new_rows = rows::NewRows::default();
        for msg in batch {
            match msg {
                Msg::Event { at_ms, event } => {
                    if let Some(event) = new_rows.absorb(at_ms, event) {
                        apply(&tx, at_ms, &event)?;
                    }
                    events += 1;
                }
                Msg::Flush(done) => flushed.push(done),
                Msg::Server {
                    change,
                    at_ms,
                    done,
                } => {
                    apply_server(&tx, at_ms, &change)?;
                    changed.push(done);
                }
                Msg::Catalog {
                    change,
                    at_ms,
                    done,
                } => {
                    // A catalog change may touch a transfer received in
                    // this batch: its row goes in first.
                    std::mem::take(&mut new_rows).insert(&tx)?;
                    let removals = catalog::apply(&tx, at_ms, change)?;
                    if let Some(done) = done {
                        cataloged.push((done, removals));
                    }
                }
            }
        }
        new_rows.insert(&tx)?;
        tx.commit()
    })();
    let outcome = match result {
        Ok(()) => Ok(()),
        Err(e) => {
            log::warn!(
                "state file {}: cannot record {events} transfer events: {e}",
                shared.path.display()
            );
            shared.dropped.fetch_add(events, Relaxed);
            events = 0;
            Err(e.to_string())
        }
    };
    for done in changed {
        let _ = done.send(outcome.clone());
    }
    for (done, removals) in cataloged {
        let _ = done.send(outcome.clone().map(|()| removals));
    }
    for done in flushed {
        let _ = done.send(());
    }
    events
}

/// Transfers a balancer left open when it stopped without finishing them:
/// nothing will carry them on, so they end as interrupted. Events are
/// written behind the answers, so one of them may have been stored (and
/// even acknowledged) just before the stop: the record says so.
fn mark_interrupted(conn: &Connection, now_ms: u64) -> rusqlite::Result<usize> {
    conn.execute(
        "UPDATE transfers SET state = 'interrupted', ended_ms = ?1,
             duration_ms = max(0, ?1 - started_ms),
             last_error = 'the balancer stopped before recording how this transfer ended; \
                           it may have been stored'
         WHERE state IN ('queued', 'sending', 'retried')",
        params![now_ms as i64],
    )
}

fn apply(tx: &rusqlite::Transaction<'_>, at_ms: u64, event: &TrackEvent) -> rusqlite::Result<()> {
    // SQLite integers are i64; numbers are 63 bits and times fit easily.
    let at = at_ms as i64;
    match event {
        TrackEvent::Received {
            number,
            client,
            title,
            size,
            user,
        } => {
            tx.prepare_cached(
                "INSERT INTO transfers (number, client, title, size, state, started_ms, user)
                 VALUES (?1, ?2, ?3, ?4, 'queued', ?5, ?6) ON CONFLICT (number) DO NOTHING",
            )?
            .execute(params![
                *number as i64,
                client,
                title,
                *size as i64,
                at,
                user
            ])?;
        }
        TrackEvent::Sent { number, server } => {
            tx.prepare_cached(
                "UPDATE transfers SET state = 'sending', servers = json_insert(servers, '$[#]', ?2)
                 WHERE number = ?1 AND state IN ('queued', 'sending', 'retried')",
            )?
            .execute(params![*number as i64, server])?;
        }
        TrackEvent::Retried {
            number,
            server,
            reason,
        } => {
            tx.prepare_cached(
                "UPDATE transfers SET state = 'retried', last_error = ?2
                 WHERE number = ?1 AND state IN ('queued', 'sending', 'retried')",
            )?
            .execute(params![*number as i64, format!("{server}: {reason}")])?;
        }
        TrackEvent::Stored {
            number,
            server,
            file,
        } => {
            let found = tx
                .prepare_cached(
                    "UPDATE transfers SET state = 'stored', server = ?2, file = ?3, ended_ms = ?4,
                         duration_ms = max(0, ?4 - started_ms)
                     WHERE number = ?1",
                )?
                .execute(params![*number as i64, server, file, at])?;
            if found > 0 {
                catalog::document_stored(tx, *number, server, file, at_ms)?;
            }
        }
        TrackEvent::Interrupted { number, reason } => {
            tx.prepare_cached(
                "UPDATE transfers SET state = 'interrupted', last_error = ?2, ended_ms = ?3,
                     duration_ms = max(0, ?3 - started_ms)
                 WHERE number = ?1 AND state <> 'stored'",
            )?
            .execute(params![*number as i64, reason, at])?;
        }
        TrackEvent::Failed {
            number,
            code,
            reason,
        } => {
            tx.prepare_cached(
                "UPDATE transfers SET state = ?4, last_error = ?2, ended_ms = ?3,
                     duration_ms = max(0, ?3 - started_ms)
                 WHERE number = ?1 AND state <> 'stored'",
            )?
            .execute(params![
                *number as i64,
                format!("{code}: {reason}"),
                at,
                TransferState::of_failure(*code).as_str()
            ])?;
        }
    }
    Ok(())
}

fn apply_server(
    tx: &rusqlite::Transaction<'_>,
    at_ms: u64,
    change: &ServerChange,
) -> rusqlite::Result<()> {
    match change {
        // A server saved again keeps the time it was first added, unless it
        // had been removed in between.
        ServerChange::Save(addr) => tx.execute(
            "INSERT INTO servers (address, added_ms, state) VALUES (?1, ?2, 'active')
             ON CONFLICT (address) DO UPDATE SET state = 'active',
                 added_ms = CASE WHEN state <> 'active' THEN excluded.added_ms ELSE added_ms END",
            params![addr, at_ms as i64],
        )?,
        ServerChange::Remove(addr) => tx.execute(
            "INSERT INTO servers (address, added_ms, state) VALUES (?1, ?2, 'removed')
             ON CONFLICT (address) DO UPDATE SET state = 'removed'",
            params![addr, at_ms as i64],
        )?,
        ServerChange::Leave(addr) => tx.execute(
            "UPDATE servers SET state = 'left' WHERE address = ?1",
            params![addr],
        )?,
    };
    Ok(())
}

fn query_transfers(
    conn: &Connection,
    filter: &TransferFilter,
) -> Result<Vec<TransferRecord>, StateError> {
    let mut states: Vec<TransferState> = Vec::new();
    if filter.active {
        states.extend(TransferState::ACTIVE);
    }
    if filter.failed {
        states.extend(TransferState::NOT_STORED);
    }
    let state_list = states
        .iter()
        .map(|s| format!("'{}'", s.as_str()))
        .collect::<Vec<_>>()
        .join(", ");
    let mut sql = String::from(
        "SELECT number, client, title, size, servers, state, server, file, started_ms,
                ended_ms, duration_ms, last_error, user
         FROM transfers WHERE started_ms >= ?1 AND (?3 IS NULL OR user = ?3)",
    );
    if !states.is_empty() {
        sql.push_str(&format!(" AND state IN ({state_list})"));
    }
    sql.push_str(" ORDER BY started_ms DESC, number DESC LIMIT ?2");
    let limit = filter.limit.unwrap_or(DEFAULT_LIMIT).min(MAX_LIMIT);
    let since = filter.since_ms.unwrap_or(0).min(i64::MAX as u64) as i64;
    let mut stmt = conn.prepare_cached(&sql)?;
    let rows = stmt.query_map(params![since, limit, filter.user], record_from_row)?;
    Ok(rows.collect::<Result<Vec<_>, _>>()?)
}

fn record_from_row(row: &Row<'_>) -> rusqlite::Result<TransferRecord> {
    let servers: String = row.get(4)?;
    let state: String = row.get(5)?;
    let bad = |column: usize, what: String| {
        rusqlite::Error::FromSqlConversionFailure(column, rusqlite::types::Type::Text, what.into())
    };
    let opt_u64 = |i: usize| -> rusqlite::Result<Option<u64>> {
        Ok(row.get::<_, Option<i64>>(i)?.map(|v| v.max(0) as u64))
    };
    Ok(TransferRecord {
        number: row.get::<_, i64>(0)? as u64,
        client: row.get(1)?,
        title: row.get(2)?,
        size: row.get::<_, i64>(3)?.max(0) as u64,
        servers: serde_json::from_str(&servers)
            .map_err(|e| bad(4, format!("servers {servers:?}: {e}")))?,
        state: TransferState::parse(&state).ok_or_else(|| bad(5, format!("state {state:?}")))?,
        server: row.get(6)?,
        file: row.get(7)?,
        started_ms: row.get::<_, i64>(8)?.max(0) as u64,
        ended_ms: opt_u64(9)?,
        duration_ms: opt_u64(10)?,
        error: row.get(11)?,
        user: row.get(12)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn received(number: u64, title: &str) -> TrackEvent {
        TrackEvent::Received {
            number,
            client: "127.0.0.1:4000".into(),
            title: title.into(),
            size: 10 * number,
            user: number.is_multiple_of(2).then(|| "alice".to_string()),
        }
    }

    fn sent(number: u64, server: &str) -> TrackEvent {
        TrackEvent::Sent {
            number,
            server: server.into(),
        }
    }

    fn stored(number: u64, server: &str) -> TrackEvent {
        TrackEvent::Stored {
            number,
            server: server.into(),
            file: format!("doc_{number}.json"),
        }
    }

    /// A tracker on a file in a fresh folder; the folder lives as long as
    /// the guard.
    fn open_temp() -> (tempfile::TempDir, PathBuf, Tracker, JoinHandle<()>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("balancer.db");
        let (tracker, writer) = Tracker::open(&path).unwrap();
        (dir, path, tracker, writer)
    }

    fn numbers(records: &[TransferRecord]) -> Vec<u64> {
        records.iter().map(|r| r.number).collect()
    }

    /// Every kind of event, for transfers that end in each state.
    fn lives() -> Vec<(u64, TrackEvent)> {
        let retried = |number| TrackEvent::Retried {
            number,
            server: "s0".into(),
            reason: "storage: disk full".into(),
        };
        let failed = |number| TrackEvent::Failed {
            number,
            code: ErrorCode::NoServer,
            reason: "every server is down".into(),
        };
        vec![
            (1_000, received(1, "stored after a retry")),
            (1_005, sent(1, "s0")),
            (1_010, retried(1)),
            (1_011, sent(1, "s1")),
            (1_030, stored(1, "s1")),
            (1_040, failed(1)),
            (2_000, received(2, "failed")),
            (2_001, sent(2, "s1")),
            (2_500, failed(2)),
            (2_600, sent(2, "s2")),
            (3_000, received(3, "on its way")),
            (3_001, sent(3, "s0")),
            (3_002, received(3, "received twice")),
            (3_100, received(4, "retried")),
            (3_101, sent(4, "s2")),
            (3_102, retried(4)),
            (3_200, stored(99, "s0")),
        ]
    }

    #[test]
    fn a_transfer_reads_the_same_whether_its_events_share_a_batch_or_not() {
        let (_d1, _p1, together, _w1) = open_temp();
        let (_d2, _p2, apart, _w2) = open_temp();
        for (at, event) in lives() {
            together.record_at(at, event);
        }
        for (at, event) in lives() {
            apart.record_at(at, event);
            apart.flush();
        }
        let all = TransferFilter::default();
        let records = together.query(&all).unwrap();
        assert_eq!(numbers(&records), [4, 3, 2, 1]);
        assert_eq!(records, apart.query(&all).unwrap());
    }

    #[test]
    fn events_become_records() {
        let (_dir, _path, tracker, writer) = open_temp();
        tracker.record_at(1_000, received(1, "stored after a retry"));
        tracker.record_at(1_005, sent(1, "s0"));
        tracker.record_at(
            1_010,
            TrackEvent::Retried {
                number: 1,
                server: "s0".into(),
                reason: "storage: disk full".into(),
            },
        );
        tracker.record_at(1_011, sent(1, "s1"));
        tracker.record_at(1_030, stored(1, "s1"));
        tracker.record_at(2_000, received(2, "failed"));
        tracker.record_at(2_001, sent(2, "s1"));
        tracker.record_at(
            2_500,
            TrackEvent::Failed {
                number: 2,
                code: ErrorCode::NoServer,
                reason: "every server is down".into(),
            },
        );
        tracker.record_at(3_000, received(3, "on its way"));
        tracker.record_at(3_001, sent(3, "s0"));
        // Events for a number never received (its `Received` was dropped)
        // change nothing.
        tracker.record_at(3_002, stored(99, "s0"));

        let records = tracker.query(&TransferFilter::default()).unwrap();
        assert_eq!(numbers(&records), [3, 2, 1], "newest first");
        assert_eq!(
            records[2],
            TransferRecord {
                number: 1,
                client: "127.0.0.1:4000".into(),
                title: "stored after a retry".into(),
                size: 10,
                servers: vec!["s0".into(), "s1".into()],
                state: TransferState::Stored,
                server: Some("s1".into()),
                file: Some("doc_1.json".into()),
                started_ms: 1_000,
                ended_ms: Some(1_030),
                duration_ms: Some(30),
                error: Some("s0: storage: disk full".into()),
                user: None,
            }
        );
        assert_eq!(records[1].state, TransferState::Failed);
        assert_eq!(records[1].duration_ms, Some(500));
        assert_eq!(
            records[1].error.as_deref(),
            Some("no_server: every server is down")
        );
        assert_eq!(records[0].state, TransferState::Sending);
        assert_eq!((records[0].ended_ms, records[0].duration_ms), (None, None));

        let view = TransferView::from(records[0].clone());
        assert_eq!((view.state.as_str(), view.servers.len()), ("sending", 1));
        assert_eq!(tracker.dropped(), 0);
        drop(tracker);
        writer.join().unwrap();
    }

    #[test]
    fn filters_and_limits() {
        let (_dir, _path, tracker, _writer) = open_temp();
        for n in 1..=150u64 {
            tracker.record_at(n * 100, received(n, "t"));
            tracker.record_at(n * 100 + 1, sent(n, "s0"));
            match n % 3 {
                0 => tracker.record_at(n * 100 + 2, stored(n, "s0")),
                1 => tracker.record_at(
                    n * 100 + 2,
                    TrackEvent::Failed {
                        number: n,
                        code: ErrorCode::ServerFailed,
                        reason: "gone".into(),
                    },
                ),
                _ => {}
            }
        }
        let query = |filter: TransferFilter| tracker.query(&filter).unwrap();

        let all = query(TransferFilter::default());
        assert_eq!(all.len(), DEFAULT_LIMIT as usize);
        assert_eq!(all[0].number, 150);

        let active = query(TransferFilter {
            active: true,
            limit: Some(1000),
            ..Default::default()
        });
        assert_eq!(active.len(), 50);
        assert!(active.iter().all(|r| r.number % 3 == 2));

        let failed = query(TransferFilter {
            failed: true,
            limit: Some(1000),
            ..Default::default()
        });
        assert_eq!(failed.len(), 50);
        assert!(failed.iter().all(|r| r.state == TransferState::Failed));

        let either = query(TransferFilter {
            active: true,
            failed: true,
            limit: Some(1000),
            ..Default::default()
        });
        assert_eq!(either.len(), 100);

        let recent = query(TransferFilter {
            since_ms: Some(14_000),
            ..Default::default()
        });
        assert_eq!(numbers(&recent), (140..=150).rev().collect::<Vec<_>>());

        let few = query(TransferFilter {
            failed: true,
            limit: Some(2),
            ..Default::default()
        });
        assert_eq!(numbers(&few), [148, 145]);
    }

    #[test]
    fn commits_in_batches_and_counts_what_it_drops() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("balancer.db");
        let (tracker, messages, conn) = Tracker::open_unstarted(&path, 2600).unwrap();
        for n in 1..=2500 {
            tracker.record_at(n, received(n, "t"));
        }
        // The channel holds 2600: the rest is dropped, not waited for.
        for n in 2501..=2700 {
            tracker.record_at(n, received(n, "t"));
        }
        assert_eq!(tracker.dropped(), 100);
        let shared = tracker.shared.clone();
        drop(tracker);
        // Everything was there at once: batches of at most 1000, and the
        // last one is committed although the channel is disconnected.
        let written = write_loop(conn, &messages, &shared);
        assert_eq!(
            written,
            Written {
                events: 2600,
                transactions: 3
            }
        );
        let all: i64 = open_reader(&path)
            .unwrap()
            .query_row("SELECT count(*) FROM transfers", [], |r| r.get(0))
            .unwrap();
        assert_eq!(all, 2600);
    }

    #[test]
    fn history_and_servers_survive_a_restart() {
        let (dir, path, tracker, writer) = open_temp();
        tracker.record_at(1, received(7, "kept"));
        tracker.record_at(2, sent(7, "s0"));
        tracker.record_at(3, stored(7, "s0"));
        tracker.save_server("127.0.0.1:5001").unwrap();
        tracker.save_server("127.0.0.1:5002").unwrap();
        tracker.save_server("127.0.0.1:5003").unwrap();
        tracker.remove_server("127.0.0.1:5002").unwrap();
        // Recorded just before the last clone goes: committed on the way
        // out, not lost.
        tracker.record_at(4, received(8, "last"));
        drop(tracker);
        writer.join().unwrap();

        let (tracker, writer) = Tracker::open(&path).unwrap();
        let records = tracker.query(&TransferFilter::default()).unwrap();
        assert_eq!(numbers(&records), [8, 7]);
        assert_eq!(records[1].state, TransferState::Stored);
        assert_eq!(
            tracker.servers().unwrap(),
            ["127.0.0.1:5001", "127.0.0.1:5003"]
        );
        tracker.save_server("127.0.0.1:5002").unwrap();
        assert_eq!(tracker.servers().unwrap().len(), 3);
        drop(tracker);
        writer.join().unwrap();
        drop(dir);
    }

    #[test]
    fn a_state_file_of_schema_1_is_upgraded_and_keeps_its_history() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("balancer.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(&format!(
                "{SCHEMA} PRAGMA user_version = 1;
                 INSERT INTO transfers (number, client, title, size, state, started_ms)
                 VALUES (7, '127.0.0.1:1', 'old', 3, 'stored', 1000);"
            ))
            .unwrap();
        }
        let (tracker, writer) = Tracker::open(&path).unwrap();
        tracker.record_at(2000, received(8, "new"));
        let all = tracker.query(&TransferFilter::default()).unwrap();
        assert_eq!(numbers(&all), [8, 7]);
        assert_eq!(
            (all[0].user.as_deref(), all[1].user.as_deref()),
            (Some("alice"), None)
        );
        let mine = tracker
            .query(&TransferFilter {
                user: Some("alice".into()),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(numbers(&mine), [8]);
        drop(tracker);
        writer.join().unwrap();
        let version: i64 = Connection::open(&path)
            .unwrap()
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        assert!(crate::balancer::users::add(&path, "bob", "bob's pw", false).unwrap());
    }

    #[test]
    fn a_state_file_of_schema_2_keeps_its_users_and_gains_their_locks() {
        use crate::balancer::users;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("balancer.db");
        let hash = users::hash("alice's pw").unwrap();
        Connection::open(&path)
            .unwrap()
            .execute_batch(&format!(
                "{SCHEMA} {MIGRATE_TO_2} PRAGMA user_version = 2;
                 INSERT INTO users (name, hash, admin, created_ms) VALUES ('alice', '{hash}', 1, 5);"
            ))
            .unwrap();
        let listed = users::list(&path).unwrap();
        assert_eq!(
            (
                listed[0].name.as_str(),
                listed[0].admin,
                listed[0].locked_until_ms
            ),
            ("alice", true, None)
        );
        let version: i64 = Connection::open(&path)
            .unwrap()
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        let known = users::Users::new(&path);
        let account = known.lookup("alice").unwrap();
        assert!(users::Users::check("alice", account.as_ref(), "alice's pw").is_some());
        known.lock("alice", now_ms() + 1000).unwrap();
        assert!(known
            .lookup("alice")
            .unwrap()
            .unwrap()
            .locked_for(now_ms())
            .is_some());
        // Opened again: nothing more to do.
        drop(open_writer(&path).unwrap());
    }

    #[test]
    fn a_file_that_is_not_a_state_file_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();

        let garbage = dir.path().join("garbage.db");
        let bytes = b"this is not a database, it is a text file long enough to have a header";
        std::fs::write(&garbage, bytes).unwrap();
        let err = Tracker::open(&garbage).unwrap_err();
        assert!(matches!(err, Error::State { .. }), "{err:?}");
        let text = err.to_string();
        assert!(
            text.contains("garbage.db") && text.contains("not a database"),
            "{text}"
        );
        assert_eq!(std::fs::read(&garbage).unwrap(), bytes);

        // A real state file whose header got damaged.
        let damaged = dir.path().join("damaged.db");
        let (tracker, writer) = Tracker::open(&damaged).unwrap();
        tracker.record(received(1, "t"));
        drop(tracker);
        writer.join().unwrap();
        let mut bytes = std::fs::read(&damaged).unwrap();
        bytes[..16].copy_from_slice(b"NOT SQLITE HERE!");
        std::fs::write(&damaged, &bytes).unwrap();
        let _ = std::fs::remove_file(dir.path().join("damaged.db-wal"));
        let err = Tracker::open(&damaged).unwrap_err();
        assert!(err.to_string().contains("damaged.db"), "{err}");
        assert_eq!(std::fs::read(&damaged).unwrap(), bytes);

        let foreign = dir.path().join("foreign.db");
        Connection::open(&foreign)
            .unwrap()
            .execute_batch("CREATE TABLE accounts (id INTEGER);")
            .unwrap();
        let err = Tracker::open(&foreign).unwrap_err();
        assert!(
            matches!(
                &err,
                Error::State { source, .. }
                    if matches!(source.downcast_ref::<StateError>(), Some(StateError::Foreign))
            ),
            "{err:?}"
        );

        let newer = dir.path().join("newer.db");
        Connection::open(&newer)
            .unwrap()
            .execute_batch("PRAGMA user_version = 99;")
            .unwrap();
        let err = Tracker::open(&newer).unwrap_err();
        assert!(err.to_string().contains("schema version 99"), "{err}");
    }
}
