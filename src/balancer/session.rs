//! Who is on the other end of one client connection, and what it may ask:
//! a peer that proved the cluster key (a server registering, see
//! `handshake`) may register and deregister; with `--users`, a user who
//! logged in may do the rest, and admin requests need an admin user;
//! without users, changing the pool (add, drain, remove) needs the key.
//!
//! The connection thread asks `Session::admit` about every request before
//! carrying it out; handshake and login messages are answered here.

use super::limits::Limit;
use super::logins::{self, Admission, Failure, FailureLog, Schedule, Turn, Why};
use super::users::{User, Users};
use crate::auth::ClusterKey;
use crate::handshake::Gate;
use crate::proto::{ClientRequest, ErrorCode, PoolRequest, Reply, ToBalancer};
use crossbeam_channel::{Receiver, RecvTimeoutError};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
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
    /// Login attempts by account and by address: turns, delays, locks.
    /// Held for bookkeeping only, never while waiting or hashing.
    pub logins: Mutex<Schedule>,
    /// Failed logins on their way to the log.
    pub failure_log: Mutex<FailureLog>,
    /// Failed and refused logins are counted here, for the metrics.
    pub stats: Arc<super::stats::Stats>,
}

impl Access {
    fn schedule(&self) -> MutexGuard<'_, Schedule> {
        crate::sync::lock(&self.logins)
    }

    /// Counts a failed or refused login and logs it, folded with the
    /// others on its account (see `logins::FailureLog`).
    fn note_failure(&self, name: &str, from: IpAddr, why: Why) {
        let limit = match why {
            Why::NoSuchUser | Why::WrongPassword => Limit::LoginFailed,
            Why::Throttled => Limit::LoginThrottled,
            Why::Locked => Limit::LoginLocked,
        };
        self.stats
            .limits
            .counter(limit)
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let line = crate::sync::lock(&self.failure_log)
            .record(Failure::new(name, from, why), Instant::now());
        if let Some(line) = line {
            log::warn!("{line}");
        }
    }
}

/// Writes the failed-login lines that folding holds back (see
/// `logins::FailureLog::due`), once per `logins::LOG_INTERVAL`, and the
/// rest when `stop` disconnects.
pub fn spawn_failure_log(
    access: Arc<Access>,
    stop: Receiver<()>,
) -> std::io::Result<JoinHandle<()>> {
    crate::sync::spawn_named("login-log".into(), None, move || loop {
        let stopping = !matches!(
            stop.recv_timeout(logins::LOG_INTERVAL),
            Err(RecvTimeoutError::Timeout)
        );
        let lines = {
            let mut log = crate::sync::lock(&access.failure_log);
            if stopping {
                log.drain()
            } else {
                log.due(Instant::now())
            }
        };
        for line in lines {
            log::warn!("{line}");
        }
        if stopping {
            return;
        }
    })
}

/// Why a login was refused before its password was looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// Its turn would have come in this long.
    Throttled(Duration),
    /// The account is locked for this much longer.
    Locked(Duration),
}

/// "7 s", or "15 min" from two minutes on; rounded up, so a wait of
/// 0.2 s is "1 s", never "0 s".
fn rounded_up(d: Duration) -> String {
    let seconds = d.as_millis().div_ceil(1000) as u64;
    if seconds >= 120 {
        format!("{} min", seconds.div_ceil(60))
    } else {
        format!("{seconds} s")
    }
}

impl Refusal {
    /// The answer: the same for every name, whether it exists or not.
    fn reply(self, id: u64, name: &str) -> Reply {
        let message = match self {
            Refusal::Throttled(wait) => format!(
                "too many failed logins for this account or address; try again in {}",
                rounded_up(wait)
            ),
            Refusal::Locked(left) => format!(
                "too many failed logins: this account is locked for {} more; \
                 an admin can unlock it sooner (balancer user unlock {})",
                rounded_up(left),
                logins::account_key(name)
            ),
        };
        Reply::error(Some(id), ErrorCode::Throttled, message)
    }

    fn why(self) -> Why {
        match self {
            Refusal::Throttled(_) => Why::Throttled,
            Refusal::Locked(_) => Why::Locked,
        }
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
    Proceed(Admitted),
    /// Answer this instead, and go on reading.
    Answer(Reply),
    /// Answer this, then close the connection.
    Close(Reply),
}

/// A request past the session: a client's, or a server's about its place
/// in the pool (the handshake and logins stop at the session).
#[derive(Debug)]
pub enum Admitted {
    Client(ClientRequest),
    Pool(PoolRequest),
}

impl Admitted {
    pub fn id(&self) -> u64 {
        match self {
            Admitted::Client(r) => r.id(),
            Admitted::Pool(r) => r.id(),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Admitted::Client(r) => r.kind(),
            Admitted::Pool(r) => r.kind(),
        }
    }
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

    /// Whether the peer proved the cluster key or a user logged in.
    pub fn trusted(&self) -> bool {
        self.gate.proven() || self.user.is_some()
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
    /// connection may not make (yet). A login waits for its turn on its
    /// account and address (see `logins`) on this connection's thread
    /// only; `stop` cuts the wait short when the balancer shuts down.
    pub fn admit(&mut self, request: ToBalancer, stop: &Receiver<()>) -> Verdict {
        let admitted = match request {
            ToBalancer::Handshake(message) => {
                let answer = self.gate.handle(&message);
                if answer.close {
                    log::warn!(
                        "connection from {}: failed the cluster handshake; closing",
                        self.peer
                    );
                    return Verdict::Close(answer.reply);
                }
                if self.gate.proven() {
                    log::debug!("connection from {}: proved the cluster key", self.peer);
                }
                return Verdict::Answer(answer.reply);
            }
            ToBalancer::Login(login) => {
                return Verdict::Answer(self.login(login.id, &login.user, &login.password.0, stop))
            }
            ToBalancer::Pool(request) => Admitted::Pool(request),
            ToBalancer::Client(request) => Admitted::Client(request),
        };
        match self.refusal(&admitted) {
            Some(reply) => Verdict::Answer(reply),
            None => Verdict::Proceed(admitted),
        }
    }

    /// Why this connection may not make `request` (yet), if it may not.
    fn refusal(&self, request: &Admitted) -> Option<Reply> {
        let unproven = self.gate.keyed() && !self.gate.proven();
        match request {
            Admitted::Pool(PoolRequest::Register { .. } | PoolRequest::Deregister { .. })
                if unproven =>
            {
                Some(self.refuse(
                    request,
                    "without the cluster handshake; refused",
                    ErrorCode::Unauthenticated,
                    "servers must prove the cluster key (hello) before they register".into(),
                ))
            }
            // Registration is guarded by the cluster key, not by users;
            // a server's report on a redirected upload is signed with it.
            Admitted::Pool(_) => None,
            Admitted::Client(client) => self.client_refusal(request, client, unproven),
        }
    }

    /// Why this connection may not make a client's request (yet).
    fn client_refusal(
        &self,
        request: &Admitted,
        client: &ClientRequest,
        unproven: bool,
    ) -> Option<Reply> {
        let users_on = self.access.users.is_some();
        let admin = self.user.as_ref().is_some_and(|u| u.admin);
        if users_on && self.user.is_none() {
            return Some(Reply::error(
                Some(request.id()),
                ErrorCode::Unauthenticated,
                format!(
                    "`{}` needs a login first: send `login` (client --user NAME)",
                    request.kind()
                ),
            ));
        }
        if changes_pool(client) && !users_on && unproven {
            // Without users, changing the pool is an operator's act: it
            // needs the cluster key, as joining and leaving do.
            return Some(self.refuse(
                request,
                "without the cluster key; refused",
                ErrorCode::Unauthenticated,
                format!(
                    "`{}` changes the pool: prove the cluster key first (client \
                     --cluster-key-file, the balancer's key file), or log in as an \
                     admin on a balancer with --users",
                    request.kind()
                ),
            ));
        }
        let for_admins = changes_pool(client) || matches!(client, ClientRequest::Servers { .. });
        if for_admins && users_on && !admin {
            let name = self.user.as_ref().map_or("?", |u| u.name.as_str());
            return Some(self.refuse(
                request,
                &format!("refused to user {name}: not an admin"),
                ErrorCode::Forbidden,
                format!("`{}` needs an admin user", request.kind()),
            ));
        }
        None
    }

    /// A refusal, logged (once a minute per address) as `what` befell the
    /// request.
    fn refuse(&self, request: &Admitted, what: &str, code: ErrorCode, message: String) -> Reply {
        if let Some(skipped) = refusals().check(&self.peer.ip()) {
            log::warn!(
                "connection from {}: `{}` {what}{}",
                self.peer,
                request.kind(),
                crate::throttle::more(skipped)
            );
        }
        Reply::error(Some(request.id()), code, message)
    }

    fn login(&mut self, id: u64, name: &str, password: &str, stop: &Receiver<()>) -> Reply {
        let users = match self.may_log_in(id) {
            Ok(users) => users,
            Err(reply) => return *reply,
        };
        let access = &self.access;
        let ip = self.peer.ip();
        let refuse = |refusal: Refusal| {
            access.note_failure(name, ip, refusal.why());
            refusal.reply(id, name)
        };
        let (turn, wait) = match self.take_turn(users, name, ip) {
            Ok(turn) => turn,
            Err(refusal) => return refuse(refusal),
        };
        // On this connection only, with no lock held; other clients go on.
        if !matches!(stop.recv_timeout(wait), Err(RecvTimeoutError::Timeout)) {
            access.schedule().abandoned(turn, Instant::now());
            return Reply::error(
                Some(id),
                ErrorCode::ShuttingDown,
                "the balancer is stopping: log in again once it is back",
            );
        }
        let locked_meanwhile = access.schedule().begin(&turn, Instant::now());
        if let Some(left) = locked_meanwhile {
            access.schedule().abandoned(turn, Instant::now());
            return refuse(Refusal::Locked(left));
        }
        let account = match users.lookup(name) {
            Ok(account) => account,
            Err(e) => {
                access.schedule().abandoned(turn, Instant::now());
                log::error!("connection from {}: cannot check a login: {e}", self.peer);
                return Reply::error(Some(id), ErrorCode::Internal, "cannot check logins now");
            }
        };
        // Locked in the users table (by another balancer on the file, or
        // before a restart): from now on refused at once here too.
        let stored_lock = account
            .as_ref()
            .and_then(|a| a.locked_for(crate::text::now_ms()));
        if let Some(left) = stored_lock {
            let mut schedule = access.schedule();
            schedule.abandoned(turn, Instant::now());
            schedule.lock(name, left, Instant::now());
            drop(schedule);
            return refuse(Refusal::Locked(left));
        }
        let Some(user) = Users::check(name, account.as_ref(), password) else {
            self.failed(users, turn, name, account.is_some());
            return Reply::error(Some(id), ErrorCode::Unauthenticated, INVALID_LOGIN);
        };
        access.schedule().succeeded(turn, Instant::now());
        self.logged_in(id, user)
    }

    /// The users to check a login against, unless logins are off or one
    /// was made on this connection already.
    fn may_log_in(&self, id: u64) -> Result<&Users, Box<Reply>> {
        let Some(users) = &self.access.users else {
            return Err(Box::new(Reply::error(
                Some(id),
                ErrorCode::BadRequest,
                "logins are off (start the balancer with --users)",
            )));
        };
        if let Some(current) = &self.user {
            return Err(Box::new(Reply::error(
                Some(id),
                ErrorCode::BadRequest,
                format!("already logged in as {}", current.name),
            )));
        }
        Ok(users)
    }

    /// A login that succeeded: the connection is the user's from now on.
    fn logged_in(&mut self, id: u64, user: User) -> Reply {
        self.access
            .stats
            .logins
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
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

    /// The turn of a login as `name` from `ip`, and how long to wait for
    /// it; or why it is refused at once.
    fn take_turn(
        &self,
        users: &Users,
        name: &str,
        ip: IpAddr,
    ) -> Result<(Turn, Duration), Refusal> {
        let admission = self.access.schedule().admit(name, ip, Instant::now());
        let left = match admission {
            Admission::Turn(turn, wait) => return Ok((turn, wait)),
            Admission::Throttled(wait) => return Err(Refusal::Throttled(wait)),
            Admission::Locked(left) => left,
        };
        // Locked here. For an existing user the users table has the lock
        // too, unless an admin lifted it since (`balancer user unlock`):
        // then the count starts over. Unknown names are locked here only.
        let lifted = matches!(
            users.lookup(name),
            Ok(Some(account)) if account.locked_for(crate::text::now_ms()).is_none()
        );
        if !lifted {
            return Err(Refusal::Locked(left));
        }
        log::info!(
            "login: account \"{name}\" was unlocked in the users table; its count starts over"
        );
        let mut schedule = self.access.schedule();
        schedule.unlock(name);
        match schedule.admit(name, ip, Instant::now()) {
            Admission::Turn(turn, wait) => Ok((turn, wait)),
            Admission::Throttled(wait) => Err(Refusal::Throttled(wait)),
            Admission::Locked(left) => Err(Refusal::Locked(left)),
        }
    }

    /// A wrong name or password: counted, logged, and the account locked
    /// when that was one failure too many.
    fn failed(&self, users: &Users, turn: Turn, name: &str, known: bool) {
        let ip = self.peer.ip();
        let failed = self.access.schedule().failed(turn, Instant::now());
        if let Some(lock_for) = failed.locked_for {
            // Written for every name, so an unknown one costs the same
            // (the update finds no row).
            let until_ms = crate::text::now_ms() + lock_for.as_millis() as u64;
            if let Err(e) = users.lock(name, until_ms) {
                log::error!("login: cannot keep the lock of \"{name}\" in the users table: {e}");
            }
            log::warn!(
                "login: account \"{}\" locked for {} after {} failed logins in a row, the last from {ip}; {}",
                logins::account_key(name),
                rounded_up(lock_for),
                failed.in_a_row,
                if known {
                    format!("`balancer user unlock {name}` lifts it")
                } else {
                    "no such user: locked in memory only".to_string()
                }
            );
        }
        let why = if known {
            Why::WrongPassword
        } else {
            Why::NoSuchUser
        };
        self.access.note_failure(name, ip, why);
    }
}

/// An operator's request on the pool (its servers, their copies).
fn changes_pool(request: &ClientRequest) -> bool {
    matches!(
        request,
        ClientRequest::AddServer { .. }
            | ClientRequest::DrainServer { .. }
            | ClientRequest::RemoveServer { .. }
            | ClientRequest::Repair { .. }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_say_when_to_try_again_and_how_a_lock_is_lifted() {
        let message = |refusal: Refusal, name: &str| match refusal.reply(3, name) {
            Reply::Error(e) => {
                assert_eq!((e.id, e.code), (Some(3), ErrorCode::Throttled));
                e.message
            }
            other => panic!("{other:?}"),
        };
        let throttled = message(Refusal::Throttled(Duration::from_millis(7200)), "alice");
        assert!(throttled.ends_with("try again in 8 s"), "{throttled}");
        let locked = message(Refusal::Locked(Duration::from_secs(899)), "alice");
        assert!(
            locked.contains("locked for 15 min more")
                && locked.contains("balancer user unlock alice"),
            "{locked}"
        );
        assert_eq!(rounded_up(Duration::from_millis(200)), "1 s");
        assert_eq!(rounded_up(Duration::from_secs(119)), "119 s");
        assert_eq!(rounded_up(Duration::from_secs(121)), "3 min");
    }
}
