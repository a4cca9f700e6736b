//! Servers joining and leaving the pool while the dispatcher runs.
//!
//! A server joins with its own `register` (repeated as a heartbeat, so a
//! restarted balancer learns it again) or an operator's `add_server`; the
//! thread that received either started its link. It leaves by
//! `deregister` (the server is stopping) or `drain_server` (an
//! operator's): it gets no new work and leaves once its requests in flight
//! are done; the answer to `deregister` waits for that, so the server can
//! stop without cutting anything. `remove_server` takes it out at once:
//! its requests in flight are cut off, and go elsewhere once it has
//! forgotten them (see `Dispatcher::settle_leaving`), so that none ends up
//! stored twice. An address an operator drained or removed does not come
//! back by its heartbeat, only by `add_server`, also after a restart (the
//! state file remembers it).

use super::{Dispatcher, Leaving, Slot};
use crate::balancer::board::Gate;
use crate::balancer::event::{Change, NewLink};
use crate::balancer::ServerId;
use crate::health::Health;
use crate::proto::{ErrorCode, Reply};
use crossbeam_channel::Sender;
use std::collections::BTreeSet;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

impl Dispatcher {
    pub(super) fn change_membership(
        &mut self,
        change: Change,
        id: u64,
        reply: Sender<Reply>,
        link: Option<NewLink>,
    ) {
        let answer = |result: Result<String, String>| {
            let _ = reply.send(membership_reply(id, result));
        };
        if self.drain_deadline.is_some() {
            return answer(Err("the balancer is shutting down".into()));
        }
        let member = self.member(change.addr());
        // A table: one arm per change, by whether the address is a member
        // (and, to join, whether its link started).
        match (change, member, link) {
            (Change::Add(addr), Some(_), _) => {
                answer(Err(format!("{addr} is already in the pool")));
            }
            (Change::Register(addr), None, _) if self.banned.contains(&addr) => {
                answer(Err(format!(
                    "{addr} was taken out of the pool by an operator; it comes back with `client admin add {addr}`"
                )));
            }
            (Change::Add(addr) | Change::Register(addr), None, Some(new)) => {
                self.join(matches!(change, Change::Add(_)), addr, new);
                answer(Ok(format!(
                    "{addr} joined the pool; it takes work once a status check answers"
                )));
            }
            // Its link could not be started (out of threads): it says why.
            (Change::Add(addr) | Change::Register(addr), None, None) => {
                answer(Err(format!("cannot add {addr} now; try again")));
            }
            (Change::Register(addr), Some(server), _) => {
                let draining = self.slots[&server].draining.is_some();
                answer(Ok(if draining {
                    format!("{addr} is draining")
                } else {
                    format!("{addr} is in the pool")
                }));
            }
            // Leaving anyway: nothing to wait for.
            (Change::Deregister(addr), None, _) => answer(Ok(format!("{addr} is not in the pool"))),
            (Change::Drain(addr) | Change::Remove(addr), None, _) => {
                answer(Err(format!("{addr} is not in the pool")))
            }
            (Change::Drain(addr), Some(server), _) => {
                self.ban(addr);
                let in_flight = self.slots[&server].gate.in_flight();
                answer(Ok(format!(
                    "{addr} is draining: {in_flight} requests in flight; it leaves when they are done"
                )));
                self.drain_slot(server, None, "drained by an operator");
            }
            (Change::Deregister(_), Some(server), _) => {
                // Answered once the server has nothing in flight.
                self.drain_slot(server, Some((id, reply)), "deregistered");
            }
            (Change::Remove(addr), Some(server), _) => {
                self.ban(addr);
                let in_flight = self.slots[&server].gate.in_flight();
                self.remove_slot(server, "removed by an operator");
                answer(Ok(format!(
                    "{addr} removed: its {in_flight} requests in flight go to other servers once it has forgotten them"
                )));
            }
        }
    }

    /// The member at `addr`, if one is.
    fn member(&self, addr: std::net::SocketAddr) -> Option<ServerId> {
        self.slots
            .iter()
            .find(|(_, s)| s.gate.addr == addr)
            .map(|(id, _)| *id)
    }

    /// A server joins the pool: `added` by an operator (which lifts a
    /// ban), or registered by itself.
    fn join(&mut self, added: bool, addr: std::net::SocketAddr, new: NewLink) {
        if added {
            self.banned.remove(&addr);
            self.board.set_banned(self.banned.iter().copied().collect());
        }
        let why = if added {
            "added by an operator"
        } else {
            "registered"
        };
        log::info!(
            "server {addr} joined the pool ({why}) as server id {}",
            new.id.0
        );
        self.add_slot(new);
        if let Some(tracker) = &self.tracker {
            tracker.note_server(
                &addr.to_string(),
                crate::balancer::tracking::PoolChange::Joined,
            );
        }
    }

    /// An address that stays out until an operator adds it again, also
    /// after a restart.
    pub(super) fn ban(&mut self, addr: std::net::SocketAddr) {
        self.banned.insert(addr);
        self.board.set_banned(self.banned.iter().copied().collect());
    }

    /// A new slot behind the link started for it; up once a probe answers.
    pub(super) fn add_slot(&mut self, new: NewLink) {
        let NewLink { id, stats, link } = new;
        let addr: std::net::SocketAddr = match stats.name.parse() {
            Ok(a) => a,
            Err(_) => return,
        };
        self.stats.insert(id, stats.clone());
        let gate = Arc::new(Gate::new(id, addr, stats, link));
        self.slots.insert(
            id,
            Slot {
                gate,
                health: Health::new(self.settings.rise, self.settings.fall),
                draining: None,
                forget: BTreeSet::new(),
                forget_in_flight: false,
                forget_keys: Default::default(),
                forget_keys_in_flight: false,
            },
        );
        crate::sync::lock(&self.roster).push((id, addr));
        self.changed = true;
    }

    fn drain_slot(&mut self, server: ServerId, waiter: Option<(u64, Sender<Reply>)>, why: &str) {
        let Some(slot) = self.slots.get_mut(&server) else {
            return;
        };
        let waiters = slot.draining.get_or_insert_with(Vec::new);
        waiters.extend(waiter);
        slot.gate.set_accepting(false);
        slot.gate.set_watched(true);
        slot.gate.stats.draining.store(true, Relaxed);
        log::info!(
            "server {} is draining ({why}): {} requests in flight",
            slot.gate.name(),
            slot.gate.in_flight()
        );
        self.update_outage();
        self.finish_draining();
    }

    /// Drained servers with nothing in flight any more leave.
    pub(super) fn finish_draining(&mut self) {
        let done: Vec<ServerId> = self
            .slots
            .iter()
            .filter(|(_, s)| s.draining.is_some() && s.gate.in_flight() == 0)
            .map(|(id, _)| *id)
            .collect();
        for server in done {
            let Some(slot) = self.take_slot(server) else {
                continue;
            };
            log::info!("server {} left the pool (drained)", slot.gate.name());
            self.former.insert(server, slot.gate.name().to_string());
            for (id, reply) in slot.draining.into_iter().flatten() {
                let _ = reply.send(Reply::Membership {
                    id,
                    message: format!("{} left the pool", slot.gate.name()),
                });
            }
        }
    }

    /// Takes a server out now: what is on the wire to it is cut off and
    /// held until it has forgotten it.
    fn remove_slot(&mut self, server: ServerId, why: &str) {
        let Some(slot) = self.take_slot(server) else {
            return;
        };
        log::info!("server {} left the pool ({why})", slot.gate.name());
        for (id, reply) in slot.draining.into_iter().flatten() {
            let _ = reply.send(Reply::Membership {
                id,
                message: format!("{} left the pool", slot.gate.name()),
            });
        }
        slot.gate.link.close();
        self.leaving.insert(
            server,
            Leaving {
                gate: slot.gate,
                held: Vec::new(),
                asked: BTreeSet::new(),
                unreachable: false,
                release_at: None,
            },
        );
    }

    /// Takes a slot out of the pool: nothing new goes to it, the monitor
    /// stops probing it, the state file forgets it.
    fn take_slot(&mut self, server: ServerId) -> Option<Slot> {
        let slot = self.slots.remove(&server)?;
        slot.gate.set_accepting(false);
        crate::sync::lock(&self.roster).retain(|(id, _)| *id != server);
        self.stats.remove(server);
        self.changed = true;
        if !slot.forget.is_empty() {
            log::warn!(
                "server {} left with {} duplicate copies it was not told to set aside",
                slot.gate.name(),
                slot.forget.len()
            );
        }
        if let Some(tracker) = &self.tracker {
            let change = if self.banned.contains(&slot.gate.addr) {
                crate::balancer::tracking::PoolChange::Banned
            } else {
                crate::balancer::tracking::PoolChange::Left
            };
            tracker.note_server(&slot.gate.addr.to_string(), change);
        }
        self.update_outage();
        Some(slot)
    }
}

/// The answer to a change of membership.
fn membership_reply(id: u64, result: Result<String, String>) -> Reply {
    match result {
        Ok(message) => Reply::Membership { id, message },
        Err(message) => Reply::error(Some(id), ErrorCode::BadRequest, message),
    }
}
