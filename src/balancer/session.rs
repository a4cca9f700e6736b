//! Who is on the other end of one client connection, and what it may ask:
//! a peer that proved the cluster key (a server registering, see
//! `handshake`) may register and deregister; with `--users`, a user who
//! logged in may do the rest, and admin requests need an admin user;
//! without users, changing the pool (add, drain, remove) needs the key.
//!
//! The connection thread asks `Session::admit` about every request before
//! carrying it out; handshake and login messages are answered here.

use super::users::{User, Users};
use crate::auth::ClusterKey;
use crate::handshake::Gate;
use crate::proto::{ErrorCode, Reply, Request};
use crossbeam_channel::Receiver;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The one answer to wrong credentials: it never tells whether the user
/// or the password was wrong.
pub const INVALID_LOGIN: &str = "invalid user or password";

/// What every connection shares about access.
#[derive(Debug, Default)]
pub struct Access {
    /// With a key, `register` and `deregister` need the cluster handshake.
    pub cluster_key: Option<ClusterKey>,
    /// With users (`--users`), every other request needs a login first.
    pub users: Option<Users>,
    /// Failed logins by address, for the growing delay.
    pub failures: Failures,
    /// Failed logins are counted here, for the metrics.
    pub stats: Arc<super::stats::Stats>,
}

/// The delay after a wrong login: 0.5 s for the first failure from an
/// address, doubling with each failure in a row, at most 8 s; a success
/// from that address resets it.
pub fn login_delay(failures_in_a_row: u32) -> Duration {
    let doublings = failures_in_a_row.saturating_sub(1).min(4);
    Duration::from_millis(500) * (1u32 << doublings)
}

/// How long an address's failures are remembered without a new one.
const FAILURES_KEPT: Duration = Duration::from_secs(15 * 60);
/// Addresses remembered at most (a flood from many addresses must not
/// grow memory); past it, the oldest are forgotten.
const MAX_ADDRESSES: usize = 65_536;

/// Failed logins in a row, by client IP address.
#[derive(Debug, Default)]
pub struct Failures(Mutex<HashMap<IpAddr, (u32, Instant)>>);

impl Failures {
    /// Counts a failure; returns how many in a row from that address.
    fn fail(&self, ip: IpAddr) -> u32 {
        let now = Instant::now();
        let mut map = crate::net::lock(&self.0);
        if map.len() >= MAX_ADDRESSES {
            map.retain(|_, (_, at)| now.duration_since(*at) < FAILURES_KEPT);
            if map.len() >= MAX_ADDRESSES {
                map.clear();
            }
        }
        let entry = map.entry(ip).or_insert((0, now));
        if now.duration_since(entry.1) >= FAILURES_KEPT {
            entry.0 = 0;
        }
        entry.0 = entry.0.saturating_add(1);
        entry.1 = now;
        entry.0
    }

    fn succeed(&self, ip: IpAddr) {
        crate::net::lock(&self.0).remove(&ip);
    }
}

/// Refused requests by address, logged once a minute each (a rogue
/// server's heartbeat repeats every second).
fn refusals() -> &'static crate::throttle::Throttle<IpAddr> {
    static REFUSALS: std::sync::OnceLock<crate::throttle::Throttle<IpAddr>> =
        std::sync::OnceLock::new();
    REFUSALS.get_or_init(|| crate::throttle::Throttle::new(Duration::from_secs(60)))
}

/// What to do with one request.
pub enum Verdict {
    /// Carry it out.
    Proceed,
    /// Answer this instead, and go on reading.
    Answer(Reply),
    /// Answer this, then close the connection.
    Close(Reply),
}

/// One connection's standing.
pub struct Session {
    access: Arc<Access>,
    gate: Gate,
    peer: SocketAddr,
    user: Option<User>,
    /// The user's name, shared with every job of this connection.
    user_name: Option<Arc<str>>,
}

impl Session {
    /// `local` is the address the connection reached the balancer at (the
    /// handshake proves it).
    pub fn new(access: Arc<Access>, peer: SocketAddr, local: SocketAddr) -> Session {
        Session {
            gate: Gate::new(access.cluster_key.as_ref(), local),
            access,
            peer,
            user: None,
            user_name: None,
        }
    }

    /// The user logged in on this connection, if any. Requests that touch
    /// what users own filter by it: transfers now; `list` and `get` of
    /// files are to filter by it too (they need a login, but do not yet
    /// keep files apart by owner).
    pub fn user(&self) -> Option<&User> {
        self.user.as_ref()
    }

    /// The logged-in user's name, for jobs to carry into the state file.
    pub fn user_name(&self) -> Option<Arc<str>> {
        self.user_name.clone()
    }

    /// Whether users are on and this connection sees only what its user
    /// owns (a user who is not an admin).
    pub fn owner_filter(&self) -> Option<String> {
        self.access.users.as_ref()?;
        match &self.user {
            Some(u) if u.admin => None,
            Some(u) => Some(u.name.clone()),
            // Not reached: every request needs a login first.
            None => Some(String::new()),
        }
    }

    /// Answers handshake and login messages, and refuses requests this
    /// connection may not make (yet). A wrong login is answered after a
    /// delay (see `login_delay`) spent on this connection's thread only;
    /// `stop` cuts it short when the balancer shuts down.
    pub fn admit(&mut self, request: &Request, stop: &Receiver<()>) -> Verdict {
        if let Some(answer) = self.gate.handle(request) {
            if answer.close {
                log::warn!(
                    "connection from {}: failed the cluster handshake; closing",
                    self.peer
                );
                return Verdict::Close(answer.reply);
            }
            if self.gate.proven() {
                log::info!("connection from {}: proved the cluster key", self.peer);
            }
            return Verdict::Answer(answer.reply);
        }
        if let Request::Login { id, user, password } = request {
            return Verdict::Answer(self.login(*id, user, &password.0, stop));
        }
        let users_on = self.access.users.is_some();
        match request {
            Request::Register { id, .. } | Request::Deregister { id, .. }
                if self.gate.keyed() && !self.gate.proven() =>
            {
                if let Some(skipped) = refusals().check(&self.peer.ip()) {
                    log::warn!(
                        "connection from {}: `{}` without the cluster handshake; refused{}",
                        self.peer,
                        request.kind(),
                        crate::throttle::more(skipped)
                    );
                }
                Verdict::Answer(Reply::error(
                    Some(*id),
                    ErrorCode::Unauthenticated,
                    "servers must prove the cluster key (hello) before they register",
                ))
            }
            // Registration is guarded by the cluster key, not by users;
            // a server's report on a redirected upload is signed with it.
            Request::Register { .. } | Request::Deregister { .. } | Request::TransferEvent(_) => {
                Verdict::Proceed
            }
            _ if users_on && self.user.is_none() => Verdict::Answer(Reply::error(
                Some(request.id()),
                ErrorCode::Unauthenticated,
                format!(
                    "`{}` needs a login first: send `login` (client --user NAME)",
                    request.kind()
                ),
            )),
            // Without users, changing the pool is an operator's act: it
            // needs the cluster key, as joining and leaving do.
            Request::AddServer { id, .. }
            | Request::DrainServer { id, .. }
            | Request::RemoveServer { id, .. }
                if !users_on && self.gate.keyed() && !self.gate.proven() =>
            {
                if let Some(skipped) = refusals().check(&self.peer.ip()) {
                    log::warn!(
                        "connection from {}: `{}` without the cluster key; refused{}",
                        self.peer,
                        request.kind(),
                        crate::throttle::more(skipped)
                    );
                }
                Verdict::Answer(Reply::error(
                    Some(*id),
                    ErrorCode::Unauthenticated,
                    format!(
                        "`{}` changes the pool: prove the cluster key first (client \
                         --cluster-key-file, the balancer's key file), or log in as an \
                         admin on a balancer with --users",
                        request.kind()
                    ),
                ))
            }
            Request::Servers { id }
            | Request::AddServer { id, .. }
            | Request::DrainServer { id, .. }
            | Request::RemoveServer { id, .. }
                if users_on && !self.user.as_ref().is_some_and(|u| u.admin) =>
            {
                if let Some(skipped) = refusals().check(&self.peer.ip()) {
                    log::warn!(
                        "connection from {}: `{}` refused to user {}: not an admin{}",
                        self.peer,
                        request.kind(),
                        self.user.as_ref().map_or("?", |u| u.name.as_str()),
                        crate::throttle::more(skipped)
                    );
                }
                Verdict::Answer(Reply::error(
                    Some(*id),
                    ErrorCode::Forbidden,
                    format!("`{}` needs an admin user", request.kind()),
                ))
            }
            _ => Verdict::Proceed,
        }
    }

    fn login(&mut self, id: u64, name: &str, password: &str, stop: &Receiver<()>) -> Reply {
        let Some(users) = &self.access.users else {
            return Reply::error(
                Some(id),
                ErrorCode::BadRequest,
                "logins are off (start the balancer with --users)",
            );
        };
        if let Some(current) = &self.user {
            return Reply::error(
                Some(id),
                ErrorCode::BadRequest,
                format!("already logged in as {}", current.name),
            );
        }
        let ip = self.peer.ip();
        let verified = users
            .lookup(name)
            .map(|account| Users::check(name, account.as_ref(), password));
        match verified {
            Ok(Some(user)) => {
                self.access.failures.succeed(ip);
                log::info!(
                    "connection from {}: user {} logged in{}",
                    self.peer,
                    user.name,
                    if user.admin { " (admin)" } else { "" }
                );
                let reply = Reply::Welcome {
                    id,
                    user: Some(user.name.clone()),
                    admin: user.admin,
                };
                self.user_name = Some(Arc::from(user.name.as_str()));
                self.user = Some(user);
                reply
            }
            Ok(None) => {
                let in_a_row = self.access.failures.fail(ip);
                let delay = login_delay(in_a_row);
                let peer = self.peer;
                self.access.stats.limits.hit(super::limits::Limit::LoginFailed, || {
                    format!(
                        "connection from {peer}: failed login as \"{}\" ({in_a_row} in a row from {ip}; answered in {delay:?})",
                        crate::proto::truncate(name, 64)
                    )
                });
                // On this connection only; other clients go on.
                let _ = stop.recv_timeout(delay);
                Reply::error(Some(id), ErrorCode::Unauthenticated, INVALID_LOGIN)
            }
            Err(e) => {
                log::error!("connection from {}: cannot check a login: {e}", self.peer);
                Reply::error(Some(id), ErrorCode::Internal, "cannot check logins now")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn login_delay_doubles_up_to_a_cap() {
        let ms = |n| login_delay(n).as_millis();
        assert_eq!(
            (ms(1), ms(2), ms(3), ms(4), ms(5)),
            (500, 1000, 2000, 4000, 8000)
        );
        assert_eq!(ms(50), 8000);
    }

    #[test]
    fn failures_count_in_a_row_and_reset_on_success() {
        let f = Failures::default();
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        assert_eq!(f.fail(a), 1);
        assert_eq!(f.fail(a), 2);
        assert_eq!(f.fail(b), 1);
        f.succeed(a);
        assert_eq!(f.fail(a), 1);
    }
}
