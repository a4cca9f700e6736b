//! Transfer tracking: what happened to every document the balancer took,
//! kept in the state (`--state`: a SQLite file, or a PostgreSQL database
//! several balancers share; see `store`) so it outlives a restart.
//!
//! The hot path never waits on the database: `Tracker::record` puts an
//! event on a bounded channel with `try_send`, and when the channel is full
//! the event is counted as dropped instead. One writer thread owns the
//! write connection and commits whatever has arrived (up to `MAX_BATCH`
//! events or `BATCH_WINDOW`) in one transaction (`writer`). It stops after
//! committing the rest once every `Tracker` clone is gone (the channel
//! disconnects).
//!
//! Queries read through their own connections (read-only ones on a file,
//! where WAL lets them run beside the writer); before reading, a query
//! asks the writer to commit what it holds, so a transfer already
//! acknowledged to a client is seen.
//!
//! The state also keeps the set of storage servers (`servers` table), for
//! membership changes to survive restarts and reach the other balancers,
//! the users of `--users` (`users` table, see `users`) and the catalog of
//! stored files and documents (see `catalog`, which owns its SQL; its
//! changes are committed by the same writer). The tables and their
//! versions are in `schema`.

mod rows;
pub mod schema;
mod writer;

use super::catalog::{self, Change, Entry, Figures, Removal};
use super::store::{sql_args, Db, Location, Row};
use crate::error::Error;
use crate::proto::{ErrorCode, TransferView};
use crossbeam_channel::{Sender, TrySendError};
use std::fmt;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

pub use super::store::StateError;
pub use schema::SCHEMA_VERSION;

/// Events waiting for the writer, at most; past this they are dropped.
pub const CHANNEL_CAPACITY: usize = 65_536;
/// Records one query returns when it asks for no limit.
pub const DEFAULT_LIMIT: u32 = 100;
/// Records one query returns at most, so that the reply fits in a frame.
pub const MAX_LIMIT: u32 = crate::proto::MAX_TRANSFERS_LIMIT;
/// How long a query or a membership change waits for the writer.
const WRITER_WAIT: Duration = Duration::from_secs(5);

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
    /// The balancer that took it (its address), when the state says.
    pub balancer: Option<String>,
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
            balancer: r.balancer,
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
    /// An event whose client is answered (`then`) only once it is
    /// committed: a shared history never misses an acknowledged transfer.
    Acked {
        at_ms: u64,
        event: TrackEvent,
        then: Ack,
    },
    /// Commit everything before this, then answer.
    Flush(Sender<()>),
    /// A membership change, committed before the answer.
    Server {
        change: PoolChange,
        addr: String,
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

/// What is done once an event is committed (a client's answer).
pub type Ack = Box<dyn FnOnce() + Send>;

/// What happened to a server of the pool, to be remembered (and seen by
/// the other balancers on the same state).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolChange {
    /// It joined: a restarted balancer starts with it.
    Joined,
    /// It left by itself (`deregister`).
    Left,
    /// An operator drained it: it stays out, across restarts too, until
    /// an operator adds it again.
    Drained,
    /// An operator removed it: likewise.
    Removed,
    /// It left the pool while an operator keeps it out (drained or
    /// removed already: nothing changes).
    Banned,
}

impl PoolChange {
    /// Its `state` in the `servers` table.
    pub fn state(self) -> &'static str {
        match self {
            PoolChange::Joined => "active",
            PoolChange::Left => "left",
            PoolChange::Drained => "drained",
            PoolChange::Removed | PoolChange::Banned => "removed",
        }
    }
}

/// A row of the `servers` table: a server's last change, who made it and
/// when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolRow {
    pub address: String,
    /// `active`, `left`, `drained` or `removed`.
    pub state: String,
    pub changed_ms: u64,
    /// The `Tracker::instance` of the balancer that made it.
    pub changed_by: String,
}

/// A tracker whose writer has not started: its channel's other end and
/// the writer's connection.
type Unstarted = (Tracker, crossbeam_channel::Receiver<Msg>, Box<dyn Db>);

struct Shared {
    location: Location,
    dropped: AtomicU64,
    /// Idle read connections: taken out for a query and put back, so the
    /// lock is never held while the database reads.
    readers: Mutex<Vec<Box<dyn Db>>>,
    /// This balancer's address, written with each transfer it takes.
    balancer: Option<String>,
    /// Names this process in the `servers` table: its own changes are
    /// told from the other balancers'.
    instance: String,
}

/// Records transfer events into the state; cheap to clone. The writer
/// stops when the last clone is dropped.
#[derive(Clone)]
pub struct Tracker {
    events: Sender<Msg>,
    shared: Arc<Shared>,
}

impl fmt::Debug for Tracker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tracker")
            .field("location", &self.shared.location)
            .field("dropped", &self.dropped())
            .finish()
    }
}

use crate::text::now_ms;

/// The error of the state at `location`.
pub fn state_error(location: &Location) -> impl Fn(StateError) -> Error + '_ {
    move |source: StateError| Error::State {
        store: location.to_string(),
        source: Box::new(source),
    }
}

impl Tracker {
    /// Opens (or creates) the state and starts the writer thread. A file
    /// or database that is not a balancer's state is an error, never
    /// changed.
    pub fn open(location: impl Into<Location>) -> Result<(Tracker, JoinHandle<()>), Error> {
        Self::open_as(location.into(), None)
    }

    /// `open`, for the balancer at `balancer` (named with each transfer).
    pub fn open_as(
        location: Location,
        balancer: Option<String>,
    ) -> Result<(Tracker, JoinHandle<()>), Error> {
        let (tracker, messages, mut conn) =
            Self::open_unstarted(location.clone(), balancer.clone(), CHANNEL_CAPACITY)?;
        // A file is this balancer's alone: whatever is open in it is its
        // own, whichever address it had. A shared database's open
        // transfers may be another balancer's, carried on right now.
        let own = balancer.as_deref().filter(|_| location.is_shared());
        match writer::mark_interrupted(conn.as_mut(), now_ms(), own) {
            Ok(0) => {}
            Ok(n) => log::warn!(
                "{n} transfers were still open when the balancer last stopped (a crash or a \
                 kill): marked interrupted"
            ),
            Err(e) => log::error!("cannot mark the transfers left open as interrupted: {e}"),
        }
        let shared = tracker.shared.clone();
        let thread = crate::sync::spawn_named("tracker".into(), None, move || {
            writer::write_loop(conn, &messages, &shared);
        })?;
        log::info!("transfer tracking in {location}");
        Ok((tracker, thread))
    }

    /// The tracker, the writer's end of its channel and its connection,
    /// with no writer running yet.
    fn open_unstarted(
        location: Location,
        balancer: Option<String>,
        capacity: usize,
    ) -> Result<Unstarted, Error> {
        let error = state_error(&location);
        let conn = location.open_writer(&schema::TABLES).map_err(&error)?;
        let reader = location
            .open_reader()
            .map_err(|e| error(StateError::Db(e)))?;
        let (tx, rx) = crossbeam_channel::bounded(capacity);
        let shared = Arc::new(Shared {
            location: location.clone(),
            dropped: AtomicU64::new(0),
            readers: Mutex::new(vec![reader]),
            balancer,
            instance: format!("{:016x}", rand::random::<u64>()),
        });
        Ok((Tracker { events: tx, shared }, rx, conn))
    }

    pub fn location(&self) -> &Location {
        &self.shared.location
    }

    /// How this process signs its changes of the pool.
    pub fn instance(&self) -> &str {
        &self.shared.instance
    }

    /// Events not recorded: the channel was full, or their write failed.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Relaxed)
    }

    /// Records an event that happens now. Never blocks.
    pub fn record(&self, event: TrackEvent) {
        self.record_at(now_ms(), event);
    }

    /// Records an event, then runs `then` (answering the client): with a
    /// shared state once the event is committed, so that every balancer's
    /// history holds every acknowledged transfer even if this one dies the
    /// next moment; with a state file of its own at once (a batch commits
    /// within `BATCH_WINDOW`). Never blocks; when the event cannot be
    /// queued it is dropped, as `record` does, and `then` runs at once.
    pub fn record_then(&self, event: TrackEvent, then: Ack) {
        if !self.shared.location.is_shared() {
            self.record(event);
            then();
            return;
        }
        let msg = Msg::Acked {
            at_ms: now_ms(),
            event,
            then,
        };
        match self.events.try_send(msg) {
            Ok(()) => {}
            Err(e) => {
                self.shared.dropped.fetch_add(1, Relaxed);
                if let Msg::Acked { then, .. } = e.into_inner() {
                    then();
                }
            }
        }
    }

    /// Records an event with its own time (Unix milliseconds). Never blocks.
    pub fn record_at(&self, at_ms: u64, event: TrackEvent) {
        match self.events.try_send(Msg::Event { at_ms, event }) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                // Warned once: the counter tells how many since.
                if self.shared.dropped.fetch_add(1, Relaxed) == 0 {
                    log::warn!(
                        "transfer tracking cannot keep up: events are being dropped (the state lags)"
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
        self.read(|db| query_transfers(db, filter))
    }

    /// Remembers a storage server (membership). Waits for the commit.
    pub fn save_server(&self, addr: &str) -> Result<(), Error> {
        self.change_server(PoolChange::Joined, addr)
    }

    /// Forgets a storage server; its row stays, marked `removed`.
    pub fn remove_server(&self, addr: &str) -> Result<(), Error> {
        self.change_server(PoolChange::Removed, addr)
    }

    /// Remembers a change of the pool, without waiting for the commit
    /// (for the dispatcher, which waits on nothing).
    pub fn note_server(&self, addr: &str, change: PoolChange) {
        // Nobody waits for the answer.
        let (done, _) = crossbeam_channel::bounded(1);
        let msg = Msg::Server {
            change,
            addr: addr.to_string(),
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
        self.addresses(
            "SELECT address FROM servers WHERE state IN ('removed', 'drained') ORDER BY address",
        )
    }

    /// The servers saved and not removed, oldest first.
    pub fn servers(&self) -> Result<Vec<String>, Error> {
        self.addresses(
            "SELECT address FROM servers WHERE state = 'active' ORDER BY added_ms, address",
        )
    }

    fn addresses(&self, sql: &str) -> Result<Vec<String>, Error> {
        self.read(|db| {
            let rows = db.query(sql, &[])?;
            Ok(rows.iter().map(|r| r.text(0)).collect::<Result<_, _>>()?)
        })
    }

    /// Every row of the `servers` table (as committed now), to see the
    /// changes of other balancers.
    pub fn pool_rows(&self) -> Result<Vec<PoolRow>, Error> {
        self.read(|db| {
            let rows = db.query(
                "SELECT address, state, changed_ms, changed_by FROM servers ORDER BY address",
                &[],
            )?;
            let row = |r: &Row| -> Result<PoolRow, StateError> {
                Ok(PoolRow {
                    address: r.text(0)?,
                    state: r.text(1)?,
                    changed_ms: r.u64(2)?,
                    changed_by: r.text(3)?,
                })
            };
            rows.iter().map(row).collect()
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
        let error = state_error(&self.shared.location);
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
        self.read(|db| Ok(catalog::find_files(db, owner, name)?))
    }

    /// The document entry of request number `number`, if the catalog has
    /// it.
    pub fn catalog_document(&self, number: u64) -> Result<Option<Entry>, Error> {
        self.flush();
        self.read(|db| Ok(catalog::find_document(db, number)?))
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
        self.read(|db| Ok(catalog::page(db, owner, kind, after, limit)?))
    }

    /// The server to resume upload `upload_id` of `owner` on, if the
    /// catalog knows.
    pub fn catalog_upload_server(
        &self,
        upload_id: &str,
        owner: Option<&str>,
    ) -> Result<Option<String>, Error> {
        self.read(|db| Ok(catalog::upload_server(db, upload_id, owner)?))
    }

    /// Whether `file` on `server` is a copy the catalog points at (as
    /// committed now).
    pub fn catalog_is_copy(&self, server: &str, file: &str) -> Result<bool, Error> {
        self.read(|db| Ok(catalog::is_copy(db, server, file)?))
    }

    /// Removals not carried out yet.
    pub fn catalog_removals(&self) -> Result<Vec<Removal>, Error> {
        self.flush();
        self.read(|db| Ok(catalog::removals(db)?))
    }

    /// Whether the catalog ever took `server`'s listing in. Read without
    /// waiting for the writer: that row is committed before a take-in ends.
    pub fn catalog_synced(&self, server: &str) -> Result<bool, Error> {
        self.read(|db| Ok(catalog::synced(db, server)?))
    }

    /// What the catalog says `server` holds; `None` if it never took that
    /// server's listing in.
    pub fn catalog_figures(&self, server: &str) -> Result<Option<Figures>, Error> {
        self.flush();
        self.read(|db| Ok(catalog::figures(db, server)?))
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

    fn change_server(&self, change: PoolChange, addr: &str) -> Result<(), Error> {
        let error = state_error(&self.shared.location);
        let (done_tx, done_rx) = crossbeam_channel::bounded(1);
        let msg = Msg::Server {
            change,
            addr: addr.to_string(),
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

    /// Runs `f` on an idle read connection (a new one if none is idle); a
    /// connection that broke is not kept.
    fn read<T>(&self, f: impl FnOnce(&mut dyn Db) -> Result<T, StateError>) -> Result<T, Error> {
        let location = &self.shared.location;
        let error = state_error(location);
        let idle = crate::sync::lock(&self.shared.readers).pop();
        let mut conn = match idle {
            Some(conn) => conn,
            None => location
                .open_reader()
                .map_err(|e| error(StateError::Db(e)))?,
        };
        let result = f(conn.as_mut()).map_err(error);
        if !conn.is_broken() {
            crate::sync::lock(&self.shared.readers).push(conn);
        }
        result
    }
}

fn query_transfers(
    db: &mut dyn Db,
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
                ended_ms, duration_ms, last_error, \"user\", balancer
         FROM transfers WHERE started_ms >= ?1 AND (CAST(?3 AS TEXT) IS NULL OR \"user\" = ?3)",
    );
    if !states.is_empty() {
        sql.push_str(&format!(" AND state IN ({state_list})"));
    }
    sql.push_str(" ORDER BY started_ms DESC, number DESC LIMIT ?2");
    let limit = filter.limit.unwrap_or(DEFAULT_LIMIT).min(MAX_LIMIT);
    let since = filter.since_ms.unwrap_or(0).min(i64::MAX as u64) as i64;
    let rows = db.query(&sql, sql_args![since, i64::from(limit), &filter.user])?;
    rows.iter().map(record_from_row).collect()
}

fn record_from_row(row: &Row) -> Result<TransferRecord, StateError> {
    let servers = row.text(4)?;
    let state = row.text(5)?;
    let bad = |what: String| StateError::Db(super::store::DbError::Decode(what));
    Ok(TransferRecord {
        number: row.i64(0)? as u64,
        client: row.text(1)?,
        title: row.text(2)?,
        size: row.u64(3)?,
        servers: serde_json::from_str(&servers)
            .map_err(|e| bad(format!("servers {servers:?}: {e}")))?,
        state: TransferState::parse(&state).ok_or_else(|| bad(format!("state {state:?}")))?,
        server: row.opt_text(6)?,
        file: row.opt_text(7)?,
        started_ms: row.u64(8)?,
        ended_ms: row.opt_u64(9)?,
        duration_ms: row.opt_u64(10)?,
        error: row.opt_text(11)?,
        user: row.opt_text(12)?,
        balancer: row.opt_text(13)?,
    })
}

#[cfg(test)]
mod tests {
    use super::schema::{MIGRATE_TO_2, SQLITE_V1 as SCHEMA};
    use super::writer::{write_loop, Written};
    use super::*;
    use crate::balancer::store::sqlite::open_reader;
    use rusqlite::Connection;
    use std::path::PathBuf;

    fn open_writer(path: &std::path::Path) -> Result<Box<dyn Db>, StateError> {
        Location::from(path).open_writer(&schema::TABLES)
    }

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
                balancer: None,
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
        let (tracker, messages, conn) =
            Tracker::open_unstarted(Location::from(&path), None, 2600).unwrap();
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
            .connection()
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
