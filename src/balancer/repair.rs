//! Repair (`--replicas` above 1): one thread that makes lost copies
//! again. A copy is lost when its server left the pool (`admin remove`)
//! or has been down longer than `--repair-after` (`admin repair`: down at
//! all). Each pass reads the catalog; every entry with fewer live copies
//! than `--replicas` (and at least one) gets a copy on a server that is up
//! and holds none: that server is asked to `fetch` it from a live one,
//! server to server, the bytes checked by SHA-256 at the receiver before
//! the copy is put in place. The catalog records the copy once the
//! receiver answered. `--repair-rate` paces the bytes copied.
//!
//! A server that comes back after its copies were made again elsewhere
//! keeps them: the entry then has one copy more than asked, which does no
//! harm and is never made again (the rule is "keep", see README).

use super::backend::ServerReach;
use super::catalog::{Change, Cursor, Entry};
use super::stats::Stats;
use super::tracking::Tracker;
use crate::proto::{EntryKind, Reply, StorageRequest};
use crossbeam_channel::{select, Receiver};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How lost copies are made again.
#[derive(Debug, Clone, Copy)]
pub struct RepairSettings {
    /// A server down this long has its copies made again elsewhere.
    pub after: Duration,
    /// Bytes per second copied at most (`None`: no limit).
    pub rate: Option<u64>,
}

impl Default for RepairSettings {
    fn default() -> Self {
        RepairSettings {
            after: Duration::from_secs(600),
            rate: None,
        }
    }
}

/// Entries read from the catalog at a time.
const PAGE: usize = 500;
/// How often the thread looks for servers down past `--repair-after`.
const LOOK_EVERY: Duration = Duration::from_secs(1);

/// What the repair thread works with.
pub struct Repair {
    pub replicas: usize,
    pub settings: RepairSettings,
    pub stats: Arc<Stats>,
    pub tracker: Tracker,
    pub reach: ServerReach,
}

/// How a pass sees the servers: live ones (up, in the pool), and whether
/// any copy is lost.
struct Servers {
    live: Vec<String>,
    lost_any: bool,
}

impl Repair {
    /// Runs until `stop` disconnects: a pass at each request on `now`
    /// (forced: servers down at all count as lost), and whenever a server
    /// has been down past `--repair-after` or left the pool.
    pub fn run(self, now: Receiver<()>, stop: Receiver<()>) {
        let mut down_since: HashMap<String, Instant> = HashMap::new();
        let mut known: Vec<String> = Vec::new();
        loop {
            let forced = select! {
                recv(now) -> msg => {
                    if msg.is_err() {
                        return;
                    }
                    true
                }
                recv(stop) -> _ => return,
                default(LOOK_EVERY) => false,
            };
            let servers = self.look(&mut down_since, &mut known, forced);
            if servers.lost_any || forced {
                self.pass(&servers, &stop);
            }
        }
    }

    /// The servers as they are now; `known` are those seen before (one
    /// gone from the pool has lost its copies).
    fn look(
        &self,
        down_since: &mut HashMap<String, Instant>,
        known: &mut Vec<String>,
        forced: bool,
    ) -> Servers {
        let views = self.stats.views();
        let now = Instant::now();
        let mut live = Vec::new();
        let mut lost_any = known.iter().any(|k| !views.iter().any(|v| &v.name == k));
        for v in &views {
            if v.state == "down" {
                let since = *down_since.entry(v.name.clone()).or_insert(now);
                lost_any |= forced || now.duration_since(since) >= self.settings.after;
            } else {
                down_since.remove(&v.name);
                if v.state == "up" {
                    live.push(v.name.clone());
                }
            }
        }
        *known = views.into_iter().map(|v| v.name).collect();
        Servers { live, lost_any }
    }

    /// One pass over the catalog; each entry short of copies gets them.
    fn pass(&self, servers: &Servers, stop: &Receiver<()>) {
        let mut short = Vec::new();
        for kind in [EntryKind::Document, EntryKind::File] {
            let mut after = Cursor::default();
            loop {
                let page = match self.tracker.catalog_page(None, kind, &after, PAGE, true) {
                    Ok(page) => page,
                    Err(e) => {
                        log::warn!("repair: cannot read the catalog: {e}");
                        return;
                    }
                };
                let Some(last) = page.last() else { break };
                after = Cursor {
                    name: last.name.clone(),
                    id: last.id,
                };
                let full = page.len() == PAGE;
                short.extend(
                    page.into_iter()
                        .filter(|e| self.live_copies(e, servers) < self.replicas),
                );
                if !full {
                    break;
                }
            }
        }
        let left = &self.stats.repair.left;
        left.store(short.len() as u64, Relaxed);
        if short.is_empty() {
            return;
        }
        log::info!(
            "repair: {} entries have fewer than {} live copies",
            short.len(),
            self.replicas
        );
        for entry in &short {
            for _ in self.live_copies(entry, servers)..self.replicas {
                if !self.copy_once(entry, servers, stop) {
                    break;
                }
            }
            left.fetch_sub(1, Relaxed);
            if stop.try_recv() != Err(crossbeam_channel::TryRecvError::Empty) {
                return;
            }
        }
    }

    fn live_copies(&self, entry: &Entry, servers: &Servers) -> usize {
        entry
            .copies
            .iter()
            .filter(|c| servers.live.contains(&c.server))
            .count()
    }

    /// Makes one more copy of `entry`; false when none can be made now.
    fn copy_once(&self, entry: &Entry, servers: &Servers, stop: &Receiver<()>) -> bool {
        let Some(source) = entry
            .copies
            .iter()
            .find(|c| servers.live.contains(&c.server))
        else {
            log::warn!("repair: no live copy of {:?} left to copy from", entry.name);
            return false;
        };
        // Spread the new copies: the entry's id picks among the servers
        // that hold none.
        let targets: Vec<&String> = servers
            .live
            .iter()
            .filter(|s| !entry.copies.iter().any(|c| &c.server == *s))
            .collect();
        if targets.is_empty() {
            return false;
        }
        let target = targets[entry.id.unsigned_abs() as usize % targets.len()];
        let request = StorageRequest::Fetch {
            id: 1,
            from: source.server.clone(),
            name: source.file.clone(),
            owner: entry.owner.clone(),
            upload_id: source.upload_id.clone(),
        };
        let (file, size) = match self.ask(target, &request) {
            Ok(Reply::Fetched { file, size, .. }) => (file, size),
            Ok(other) => {
                log::warn!("repair: {target} did not copy {:?}: {other:?}", entry.name);
                return false;
            }
            Err(e) => {
                log::warn!("repair: {target}: {e}");
                return false;
            }
        };
        let change = Change::CopyAdded {
            entry: entry.id,
            kind: entry.kind,
            server: target.clone(),
            file,
            upload_id: source.upload_id.clone(),
        };
        if let Err(e) = self.tracker.catalog_change(change) {
            log::warn!("repair: cannot record the copy on {target}: {e}");
        }
        self.stats.repair.copies.fetch_add(1, Relaxed);
        self.stats.repair.bytes.fetch_add(size, Relaxed);
        self.pace(size, stop);
        true
    }

    /// Sends `request` to server `target` and reads its answer.
    fn ask(&self, target: &str, request: &StorageRequest) -> Result<Reply, String> {
        let addr: SocketAddr = target
            .parse()
            .map_err(|_| format!("not an address: {target}"))?;
        let mut conn = self.reach.connect(addr).map_err(|e| e.to_string())?;
        conn.call(request).map_err(|e| e.to_string())
    }

    /// Waits as long as `size` bytes take at `--repair-rate` (or until
    /// shutdown).
    fn pace(&self, size: u64, stop: &Receiver<()>) {
        if let Some(rate) = self.settings.rate.filter(|r| *r > 0) {
            let wait = Duration::from_secs_f64(size as f64 / rate as f64);
            let _ = stop.recv_timeout(wait);
        }
    }
}
