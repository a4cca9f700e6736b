//! Keeping the catalog in step with the servers, which are the source of
//! truth for bytes. One thread ("catalog") looks at every server that is
//! not down, at start and then every `LOOK_EVERY`:
//!
//! - it asks the server's `inventory` (files with their digest, documents)
//!   and compares it with what the catalog says the server holds;
//! - a server the catalog never took in (a new or deleted state file, a
//!   new server) has its listings taken in at once: that is the rebuild;
//! - a server whose figures differ from the catalog's, the same at two
//!   looks in a row (so not a store under way), has the listing of the
//!   part that differs (files, documents) taken in: the catalog is behind,
//!   because the balancer stopped between a server storing and the
//!   catalog recording, or tracking events were dropped under load, or
//!   another balancer or client stored on it;
//! - removals the catalog holds (older copies of replaced files, deleted
//!   files, partials left behind) are carried out on the servers that are
//!   up, and forgotten once done.
//!
//! Taking in a listing reads, on the server, every record of its files and
//! every document it holds, and sends them over in pages: it costs what
//! reading the server's folder once costs.

use super::{Change, Removal};
use crate::balancer::backend::ServerReach;
use crate::balancer::stats::Stats;
use crate::balancer::tracking::Tracker;
use crate::net;
use crate::proto::{Connection, EntryKind, ErrorCode, FileEntry, ListKind, Reply, StorageRequest};
use crossbeam_channel::{Receiver, RecvTimeoutError};
use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often the servers are looked at.
pub const LOOK_EVERY: Duration = Duration::from_secs(2);
/// How long committing a listing taken in may take (a million documents
/// take a while).
const TAKE_IN_WAIT: Duration = Duration::from_secs(600);

/// How far the first look at the servers has got, for requests that read
/// the catalog (a `list` right after a start waits for it, a little).
#[derive(Debug, Default)]
pub struct Progress {
    state: Mutex<ProgressState>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct ProgressState {
    first_look_done: bool,
    /// Servers whose listing is being taken in now.
    rebuilding: BTreeSet<String>,
}

impl Progress {
    /// Servers whose listing is being taken in now.
    pub fn rebuilding(&self) -> Vec<String> {
        crate::sync::lock(&self.state)
            .rebuilding
            .iter()
            .cloned()
            .collect()
    }

    /// Waits until the first look at the servers is over, at most `limit`.
    pub fn wait_first_look(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        let mut state = crate::sync::lock(&self.state);
        while !state.first_look_done {
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .map(|(s, _)| s)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }

    fn set(&self, change: impl FnOnce(&mut ProgressState)) {
        change(&mut crate::sync::lock(&self.state));
        self.changed.notify_all();
    }
}

/// Asks `server` for its listing of `kind` (only `owner`'s files when
/// given): every `files` frame until the last.
pub fn fetch_listing(
    conn: &mut Connection<net::Stream>,
    id: u64,
    owner: Option<String>,
    kind: ListKind,
) -> Result<Vec<FileEntry>, String> {
    let request = StorageRequest::List {
        id,
        owner,
        kind: Some(kind),
    };
    conn.send(&request).map_err(|e| e.to_string())?;
    let mut all = Vec::new();
    loop {
        match conn.recv::<Reply>() {
            Ok(Reply::Files(page)) => {
                all.extend(page.files);
                if !page.more {
                    return Ok(all);
                }
            }
            Ok(Reply::Error(e)) => return Err(format!("{}: {}", e.code, e.message)),
            Ok(other) => return Err(format!("unexpected answer {other:?}")),
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Carries out `removals` on their servers, except those in `down` (they
/// wait in the catalog for the server to come back); a removal done, or
/// found needless (the bytes are gone already), is forgotten. Returns the
/// servers done and those left for later.
pub fn carry_out(
    tracker: &Tracker,
    reach: &ServerReach,
    down: &HashMap<String, String>,
    removals: Vec<Removal>,
) -> (Vec<String>, Vec<String>) {
    let mut done = Vec::new();
    let mut later = Vec::new();
    let mut connections: HashMap<String, Connection<net::Stream>> = HashMap::new();
    for removal in removals {
        let server = removal.server.clone();
        if down.contains_key(&server) {
            later.push(server);
            continue;
        }
        // Pointed at again since (the same upload stored there once
        // more): those bytes stay.
        let wanted = match removal.file.as_deref() {
            Some(file) => tracker
                .catalog_is_copy(&server, file)
                .map_err(|e| format!("cannot read the catalog: {e}")),
            None => Ok(false),
        };
        let outcome = match wanted {
            Ok(true) => Ok(()),
            Ok(false) => remove_one(&mut connections, reach, &removal),
            Err(e) => Err(e),
        };
        match outcome {
            Ok(()) => {
                tracker.catalog_note(Change::RemovalDone(removal.id));
                done.push(server);
            }
            Err(e) => {
                log::warn!(
                    "catalog: cannot remove {} from {server} now ({e}); tried again later",
                    what(&removal)
                );
                connections.remove(&server);
                later.push(server);
            }
        }
    }
    done.dedup();
    later.dedup();
    (done, later)
}

fn what(removal: &Removal) -> String {
    match (&removal.file, &removal.upload_id) {
        (Some(file), _) => format!("{file:?}"),
        (None, Some(upload)) => format!("the partial upload {upload}"),
        (None, None) => "nothing".into(),
    }
}

fn remove_one(
    connections: &mut HashMap<String, Connection<net::Stream>>,
    reach: &ServerReach,
    removal: &Removal,
) -> Result<(), String> {
    let conn = match connections.get_mut(&removal.server) {
        Some(c) => c,
        None => {
            let addr: SocketAddr = removal
                .server
                .parse()
                .map_err(|_| format!("{:?} is not an address", removal.server))?;
            let c = reach.connect(addr).map_err(|e| e.to_string())?;
            connections.entry(removal.server.clone()).or_insert(c)
        }
    };
    let request = StorageRequest::Delete {
        id: removal.id.max(0) as u64,
        name: removal.file.clone().unwrap_or_default(),
        owner: removal.owner.clone(),
        upload_id: removal.upload_id.clone(),
    };
    match conn.call(&request) {
        Ok(Reply::Deleted(_)) => {
            log::info!("catalog: removed {} from {}", what(removal), removal.server);
            Ok(())
        }
        // Gone already, or the name now holds a newer file: nothing to do.
        Ok(Reply::Error(e)) if e.code == ErrorCode::NotFound => Ok(()),
        Ok(Reply::Error(e)) => Err(format!("{}: {}", e.code, e.message)),
        Ok(other) => Err(format!("unexpected answer {other:?}")),
        Err(e) => Err(e.to_string()),
    }
}

/// A server's figures as last seen, to tell a settled difference from a
/// store under way.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    files: (u64, String),
    documents: u64,
}

/// The catalog's side of the servers: what `run` works with.
pub struct Syncer {
    pub tracker: Tracker,
    pub stats: Arc<Stats>,
    pub reach: ServerReach,
    pub progress: Arc<Progress>,
    pub every: Duration,
}

/// What the syncer remembers between looks.
#[derive(Default)]
struct Memory {
    /// Figures at the last look, by server.
    last: HashMap<String, Seen>,
    /// Figures right before the listing last taken in: a difference that
    /// a listing did not settle is not taken in again until they change.
    settled_at: HashMap<String, Seen>,
    /// Figures the catalog was last compared at: comparing again at the
    /// same ones would find the same.
    compared: HashMap<String, Seen>,
}

impl Syncer {
    /// Starts the thread; it stops when `stop` disconnects.
    pub fn spawn(self, stop: Receiver<()>) -> std::io::Result<JoinHandle<()>> {
        crate::sync::spawn_named("catalog".into(), None, move || {
            let mut memory = Memory::default();
            self.look(&mut memory, true);
            self.progress.set(|s| s.first_look_done = true);
            loop {
                match stop.recv_timeout(self.every) {
                    Err(RecvTimeoutError::Timeout) => self.look(&mut memory, false),
                    _ => return,
                }
            }
        })
    }

    /// One look at every server that is not down.
    fn look(&self, memory: &mut Memory, first: bool) {
        let views = self.stats.views();
        let down: HashMap<String, String> = views
            .iter()
            .filter(|v| v.state == "down")
            .map(|v| (v.name.clone(), v.state.clone()))
            .collect();
        for view in &views {
            // At the first look, servers not probed yet are tried too.
            if down.contains_key(&view.name) && !first {
                continue;
            }
            if let Err(e) = self.look_at(&view.name, memory) {
                log::debug!("catalog: cannot look at {}: {e}", view.name);
            }
        }
        match self.tracker.catalog_removals() {
            Ok(removals) if !removals.is_empty() => {
                carry_out(&self.tracker, &self.reach, &down, removals);
            }
            Ok(_) => {}
            Err(e) => log::warn!("catalog: cannot read the removals: {e}"),
        }
    }

    fn look_at(&self, server: &str, memory: &mut Memory) -> Result<(), String> {
        let addr: SocketAddr = server
            .parse()
            .map_err(|_| format!("{server:?} is not an address"))?;
        let mut conn = self.reach.connect(addr).map_err(|e| e.to_string())?;
        let inventory = match conn.call(&StorageRequest::Inventory { id: 1 }) {
            Ok(Reply::Inventory(i)) => i,
            Ok(other) => return Err(format!("unexpected answer {other:?}")),
            Err(e) => return Err(e.to_string()),
        };
        let seen = Seen {
            files: (inventory.files, inventory.files_digest.clone()),
            documents: inventory.documents,
        };
        let last = memory.last.insert(server.to_string(), seen.clone());
        // Comparing costs a pass over the server's part of the catalog (and
        // the writer's pending rows): worth it only once the server's
        // figures stand still (a moving server is never taken in) and have
        // moved since the last comparison.
        let settled = last.as_ref() == Some(&seen);
        let compared = memory.compared.get(server) == Some(&seen);
        let synced = || {
            self.tracker
                .catalog_synced(server)
                .map_err(|e| e.to_string())
        };
        if (!settled || compared) && synced()? {
            return Ok(());
        }
        memory.compared.insert(server.to_string(), seen.clone());
        let figures = self
            .tracker
            .catalog_figures(server)
            .map_err(|e| e.to_string())?;
        let parts: Vec<EntryKind> = match figures {
            None => {
                log::info!(
                    "catalog: taking in the listings of {server} ({} files, {} documents): \
                     the catalog has never seen it",
                    inventory.files,
                    inventory.documents
                );
                vec![EntryKind::File, EntryKind::Document]
            }
            Some(f) => behind(server, &f, &inventory, &seen, last.as_ref(), memory),
        };
        if parts.is_empty() {
            return Ok(());
        }
        self.progress.set(|s| {
            s.rebuilding.insert(server.to_string());
        });
        let result = self.take_in(server, &mut conn, &parts);
        self.progress.set(|s| {
            s.rebuilding.remove(server);
        });
        memory.settled_at.insert(server.to_string(), seen);
        result
    }

    /// Takes in `server`'s listings of `parts`.
    fn take_in(
        &self,
        server: &str,
        conn: &mut Connection<net::Stream>,
        parts: &[EntryKind],
    ) -> Result<(), String> {
        let started = Instant::now();
        for &kind in parts {
            let list_kind = match kind {
                EntryKind::File => ListKind::Files,
                EntryKind::Document => ListKind::Documents,
            };
            let listing = fetch_listing(conn, 2, None, list_kind)?;
            let count = listing.len();
            let change = Change::Sync {
                server: server.to_string(),
                kind,
                listing,
            };
            let removals = self
                .tracker
                .catalog_change_within(change, TAKE_IN_WAIT)
                .map_err(|e| e.to_string())?;
            log::info!(
                "catalog: took in {count} {}s of {server} in {:?}",
                kind.as_str(),
                started.elapsed()
            );
            if !removals.is_empty() {
                carry_out(&self.tracker, &self.reach, &HashMap::new(), removals);
            }
        }
        Ok(())
    }
}

/// What of `server`'s listings the catalog is behind on: a part whose
/// figures differ from the catalog's, the same two looks in a row (not
/// moving any more), and not already taken in at these figures.
fn behind(
    server: &str,
    f: &super::Figures,
    inventory: &crate::proto::InventoryReport,
    seen: &Seen,
    last: Option<&Seen>,
    memory: &Memory,
) -> Vec<EntryKind> {
    let mut parts = Vec::new();
    let settled = last == Some(seen);
    let settled_at = memory.settled_at.get(server);
    let files_differ = (f.files, format!("{:016x}", f.files_digest)) != seen.files;
    if files_differ && settled && settled_at.is_none_or(|s| s.files != seen.files) {
        parts.push(EntryKind::File);
    }
    if f.documents != seen.documents
        && settled
        && settled_at.is_none_or(|s| s.documents != seen.documents)
    {
        parts.push(EntryKind::Document);
    }
    if !parts.is_empty() {
        log::info!(
            "catalog: behind on {server} (it holds {} files and {} documents, the \
             catalog says {} and {}): taking in its listing of {}",
            inventory.files,
            inventory.documents,
            f.files,
            f.documents,
            parts
                .iter()
                .map(|k| format!("{}s", k.as_str()))
                .collect::<Vec<_>>()
                .join(" and ")
        );
    }
    parts
}
