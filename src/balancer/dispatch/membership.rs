//! Servers joining and leaving the pool while the dispatcher runs.
//!
//! A server joins with its own `register` (repeated as a heartbeat, so a
//! restarted balancer learns it again) or an operator's `add_server`. It
//! leaves by `deregister` (the server is stopping) or `drain_server` (an
//! operator's): it gets no new work and leaves once its requests in flight
//! are done; the answer to `deregister` waits for that, so the server can
//! stop without cutting anything. `remove_server` takes it out at once:
//! its requests in flight are cut off and retried elsewhere. An address an
//! operator drained or removed does not come back by its heartbeat, only by
//! `add_server`.

use super::{Dispatcher, Slot};
use crate::balancer::ServerId;
use crate::health::Health;
use crate::proto::{ErrorCode, Reply};
use crossbeam_channel::Sender;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;

/// A membership request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// An operator adds a server.
    Add(SocketAddr),
    /// A server announces itself (also its heartbeat).
    Register(SocketAddr),
    /// An operator drains a server.
    Drain(SocketAddr),
    /// A server leaves.
    Deregister(SocketAddr),
    /// An operator removes a server now.
    Remove(SocketAddr),
}

impl Dispatcher {
    pub(crate) fn change_membership(&mut self, change: Change, id: u64, reply: Sender<Reply>) {
        let answer = |result: Result<String, String>| {
            let reply_msg = match result {
                Ok(message) => Reply::Membership { id, message },
                Err(message) => Reply::error(Some(id), ErrorCode::BadRequest, message),
            };
            let _ = reply.send(reply_msg);
        };
        if self.drain_deadline.is_some() {
            return answer(Err("the balancer is shutting down".into()));
        }
        let member = self.find(match change {
            Change::Add(a)
            | Change::Register(a)
            | Change::Drain(a)
            | Change::Deregister(a)
            | Change::Remove(a) => a,
        });
        match (change, member) {
            (Change::Add(addr), Some(_)) => {
                answer(Err(format!("{addr} is already in the pool")));
            }
            (Change::Add(addr), None) => {
                self.banned.remove(&addr);
                answer(self.join(addr, "added by an operator"));
            }
            (Change::Register(addr), None) if self.banned.contains(&addr) => {
                answer(Err(format!(
                    "{addr} was taken out of the pool by an operator; it comes back with `client admin add {addr}`"
                )));
            }
            (Change::Register(addr), None) => answer(self.join(addr, "registered")),
            (Change::Register(addr), Some(id)) => {
                let draining = self.slots.get(&id).is_some_and(|s| s.draining.is_some());
                answer(Ok(if draining {
                    format!("{addr} is draining")
                } else {
                    format!("{addr} is in the pool")
                }));
            }
            (Change::Drain(addr) | Change::Remove(addr) | Change::Deregister(addr), None) => {
                if matches!(change, Change::Deregister(_)) {
                    // Leaving anyway: nothing to wait for.
                    answer(Ok(format!("{addr} is not in the pool")));
                } else {
                    answer(Err(format!("{addr} is not in the pool")));
                }
            }
            (Change::Drain(addr), Some(server)) => {
                self.banned.insert(addr);
                let in_flight = self.slots.get(&server).map_or(0, |s| s.in_flight);
                answer(Ok(format!(
                    "{addr} is draining: {in_flight} requests in flight; it leaves when they are done"
                )));
                self.drain_slot(server, None, "drained by an operator");
            }
            (Change::Deregister(_), Some(server)) => {
                // Answered once the server has nothing in flight.
                self.drain_slot(server, Some((id, reply)), "deregistered");
            }
            (Change::Remove(addr), Some(server)) => {
                self.banned.insert(addr);
                let in_flight = self.slots.get(&server).map_or(0, |s| s.in_flight);
                self.remove_slot(server, "removed by an operator");
                answer(Ok(format!(
                    "{addr} removed: {in_flight} requests in flight go to other servers"
                )));
            }
        }
    }

    fn find(&self, addr: SocketAddr) -> Option<ServerId> {
        self.slots
            .iter()
            .find(|(_, s)| s.addr == addr)
            .map(|(id, _)| *id)
    }

    fn join(&mut self, addr: SocketAddr, why: &str) -> Result<String, String> {
        match self.add_slot(addr) {
            Ok(id) => {
                log::info!(
                    "server {addr} joined the pool ({why}) as server id {}",
                    id.0
                );
                if let Some(tracker) = &self.tracker {
                    if let Err(e) = tracker.save_server(&addr.to_string()) {
                        log::warn!("cannot remember server {addr} in the state file: {e}");
                    }
                }
                Ok(format!(
                    "{addr} joined the pool; it takes work once a status check answers"
                ))
            }
            Err(e) => {
                log::error!("server {addr} cannot join: {e}");
                Err(format!("cannot add {addr}: {e}"))
            }
        }
    }

    /// A new slot with its link; up once a probe answers.
    pub(super) fn add_slot(&mut self, addr: SocketAddr) -> std::io::Result<ServerId> {
        let id = ServerId(self.next_server);
        let name = addr.to_string();
        self.stats.add(id, name.clone());
        let link = match self.links.spawn(id, addr) {
            Ok(link) => link,
            Err(e) => {
                self.stats.remove(id);
                return Err(e);
            }
        };
        self.next_server += 1;
        let slot = Slot {
            name,
            addr,
            health: Health::new(self.settings.rise, self.settings.fall),
            draining: None,
            load: None,
            in_flight: 0,
            link,
            forget: BTreeSet::new(),
            forget_in_flight: false,
        };
        self.slots.insert(id, slot);
        crate::net::lock(&self.roster).push((id, addr));
        Ok(id)
    }

    fn drain_slot(&mut self, server: ServerId, waiter: Option<(u64, Sender<Reply>)>, why: &str) {
        let Some(slot) = self.slots.get_mut(&server) else {
            return;
        };
        let waiters = slot.draining.get_or_insert_with(Vec::new);
        waiters.extend(waiter);
        log::info!(
            "server {} is draining ({why}): {} requests in flight",
            slot.name,
            slot.in_flight
        );
        self.stats.server(server).draining.store(true, Relaxed);
        self.reclaim_unsent(server);
        if self.slots.get(&server).is_some_and(|s| s.in_flight == 0) {
            self.remove_slot(server, why);
        }
        self.update_outage();
    }

    /// Takes a server out: what its link had not sent goes back to the
    /// queue, what is on the wire is cut off and comes back as retries.
    pub(super) fn remove_slot(&mut self, server: ServerId, why: &str) {
        self.reclaim_unsent(server);
        let Some(slot) = self.slots.remove(&server) else {
            return;
        };
        slot.link.abort();
        self.former.insert(server, slot.name.clone());
        crate::net::lock(&self.roster).retain(|(id, _)| *id != server);
        self.stats.remove(server);
        if !slot.forget.is_empty() {
            log::warn!(
                "server {} left with {} duplicate copies it was not told to set aside",
                slot.name,
                slot.forget.len()
            );
        }
        log::info!("server {} left the pool ({why})", slot.name);
        if let Some(tracker) = &self.tracker {
            if let Err(e) = tracker.remove_server(&slot.addr.to_string()) {
                log::warn!("cannot forget server {} in the state file: {e}", slot.name);
            }
        }
        for (id, reply) in slot.draining.into_iter().flatten() {
            let _ = reply.send(Reply::Membership {
                id,
                message: format!("{} left the pool", slot.name),
            });
        }
        self.update_outage();
    }
}
