//! Balancers sharing one PostgreSQL state act as one pool: an operator's
//! `add`, `drain` or `remove` on one reaches the others. Each balancer
//! writes its changes of the pool to the `servers` table, signed with its
//! `Tracker::instance` and stamped with a time; this thread reads the
//! table every `FOLLOW_EVERY` and turns every row another balancer changed
//! since the last look into the event the dispatcher would get from an
//! operator here (it does no I/O itself; a server coming in gets its link
//! started on this thread, as a request handler would).
//!
//! The dispatcher notes what it applies back to the table, but a change
//! that leaves a row as it is writes nothing (see `tracking::writer`), so
//! a change is not echoed back and forth. A server leaving by itself
//! (`left`) is not followed: it deregisters from each balancer it joined.

use super::board::Board;
use super::event::{Change, Event, NewLink};
use super::link::Links;
use super::tracking::{PoolRow, Tracker};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// How often the shared table is read: changes reach the other balancers
/// within about this long.
pub const FOLLOW_EVERY: Duration = Duration::from_millis(400);

/// The last change seen of each server: its state, when, by whom.
pub type Seen = HashMap<String, (String, u64, String)>;

/// What the follower needs to apply a change as a request would.
pub struct Follower {
    pub tracker: Tracker,
    pub board: Arc<Board>,
    pub links: Arc<Links>,
    pub events: Sender<Event>,
    pub every: Duration,
    /// The rows as they were when the pool was read at start.
    pub seen: Seen,
}

/// With a shared state, the rows of the table now, as the follower
/// remembers them; empty when they cannot be read (every row then counts
/// as new at the first look). `None` with a state of this balancer's own.
pub fn baseline(tracker: &Tracker) -> Option<Seen> {
    if !tracker.location().is_shared() {
        return None;
    }
    Some(match tracker.pool_rows() {
        Ok(rows) => rows.into_iter().map(entry).collect(),
        Err(e) => {
            log::warn!("cannot read the shared pool: {e}");
            Seen::new()
        }
    })
}

fn entry(row: PoolRow) -> (String, (String, u64, String)) {
    (row.address, (row.state, row.changed_ms, row.changed_by))
}

impl Follower {
    pub fn new(
        tracker: &Tracker,
        board: &Arc<Board>,
        links: &Arc<Links>,
        events: &Sender<Event>,
        seen: Seen,
    ) -> Follower {
        Follower {
            tracker: tracker.clone(),
            board: board.clone(),
            links: links.clone(),
            events: events.clone(),
            every: FOLLOW_EVERY,
            seen,
        }
    }

    /// Starts the thread; it ends when `stop` disconnects.
    pub fn spawn(mut self, stop: Receiver<()>) -> std::io::Result<JoinHandle<()>> {
        crate::sync::spawn_named("pool-follower".into(), Some(256 * 1024), move || {
            while let Err(RecvTimeoutError::Timeout) = stop.recv_timeout(self.every) {
                self.look();
            }
        })
    }

    /// One look at the table: applies what changed since the last.
    fn look(&mut self) {
        let rows = match self.tracker.pool_rows() {
            Ok(rows) => rows,
            Err(e) => {
                log::warn!("cannot read the shared pool: {e}");
                return;
            }
        };
        for row in rows {
            let (address, now) = entry(row);
            if self.seen.get(&address) == Some(&now) {
                continue;
            }
            if now.2 != self.tracker.instance() {
                self.apply(&address, &now.0);
            }
            self.seen.insert(address, now);
        }
    }

    fn apply(&self, address: &str, state: &str) {
        let Ok(addr) = address.parse::<SocketAddr>() else {
            log::warn!("shared pool: skipping server {address:?}: not an address");
            return;
        };
        let member = self.board.find(addr).is_some();
        let change = match state {
            "active" if member => return,
            "active" => Change::Add(addr),
            "drained" if member => Change::Drain(addr),
            "removed" if member => Change::Remove(addr),
            // Not here: it stays out, and its heartbeats are refused.
            "drained" | "removed" => {
                log::info!("server {addr} was {state} by another balancer: it stays out here too");
                let _ = self.events.send(Event::Banned(addr));
                return;
            }
            _ => return,
        };
        let link = if change.joins() && !member {
            match self.links.start(addr) {
                Ok((id, stats, link)) => Some(NewLink { id, stats, link }),
                Err(e) => {
                    log::error!("cannot start a link to {addr}: {e}");
                    return;
                }
            }
        } else {
            None
        };
        log::info!("following another balancer: {change}");
        // Nobody waits for the answer: the dispatcher logs what it did.
        let (reply, _) = crossbeam_channel::bounded(1);
        let _ = self.events.send(Event::Membership {
            change,
            id: 0,
            reply,
            link,
        });
    }
}
