//! How often logins may be tried, and how failed ones reach the log. Both
//! are pure bookkeeping: callers pass the time and do the waiting, the
//! password checks and the logging themselves.
//!
//! `Schedule` keeps, per account name and per client IP address, the
//! failures in a row and the time the next attempt may start. An attempt
//! takes the later of its account's and its address's times as its turn
//! and pushes both further, by the delay its failure would earn, so the
//! attempts on one account come one after another however many
//! connections send them. A turn further away than `Settings::max_wait` is
//! refused at once; after `Settings::lock_after` failures in a row the
//! account is locked for `Settings::lock_for`. Unknown names are kept
//! exactly like existing ones, so the answers and their timing never tell
//! which names exist.
//!
//! `FailureLog` folds failed logins into at most one line per account per
//! `LOG_INTERVAL`, with the count of those folded.

use crate::proto;
use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Failures in a row are forgotten after this long without an attempt.
const FORGET_AFTER: Duration = Duration::from_secs(15 * 60);
/// Account names remembered at most (a flood of made-up names must not
/// grow memory); past it, those that carry nothing go first, then the
/// quarter least recently tried.
const MAX_ACCOUNTS: usize = 16_384;
/// Addresses remembered at most, likewise.
const MAX_ADDRESSES: usize = 65_536;
/// At most one log line per account this often.
pub const LOG_INTERVAL: Duration = Duration::from_secs(1);
/// Accounts whose failures the log keeps apart at once; failures on
/// further accounts are counted together.
const MAX_LOGGED_ACCOUNTS: usize = 1024;

/// The delays, and when an account is locked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// After the first failure in a row; each further one doubles it.
    pub first_delay: Duration,
    /// The delay grows no further.
    pub max_delay: Duration,
    /// An attempt whose turn is further away is refused at once (it would
    /// hold its connection that long).
    pub max_wait: Duration,
    /// Failures in a row that lock an account; 0 never locks.
    pub lock_after: u32,
    /// How long a lock lasts (an admin may lift it sooner).
    pub lock_for: Duration,
}

impl Default for Settings {
    /// 0.5 s, 1 s, 2 s, 4 s, then 8 s between attempts on an account: a
    /// typing user hardly notices, while a guesser gets one try per 8 s.
    /// Ten failures in a row lock it for 15 minutes: a user mistyping
    /// does not get there, and a guesser gets at most ten guesses each
    /// quarter of an hour.
    fn default() -> Self {
        Settings {
            first_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(8),
            max_wait: Duration::from_secs(5),
            lock_after: 10,
            lock_for: Duration::from_secs(15 * 60),
        }
    }
}

impl Settings {
    /// The time between an attempt and the next after `failures` in a row.
    pub fn delay(&self, failures: u32) -> Duration {
        if failures == 0 {
            return Duration::ZERO;
        }
        let doublings = (failures - 1).min(20);
        self.first_delay
            .checked_mul(1 << doublings)
            .map_or(self.max_delay, |d| d.min(self.max_delay))
    }
}

/// The key an account name is kept under: names longer than any user
/// name can be are cut (with a `…` no user name has), so a long name
/// costs no more memory than a short one.
pub fn account_key(name: &str) -> String {
    proto::truncate(name, super::users::MAX_NAME)
}

/// One account's or one address's attempts.
#[derive(Debug, Clone)]
struct Entry {
    failures: u32,
    /// Attempts that have a turn and no outcome yet.
    pending: u32,
    /// When the next attempt may start.
    next: Instant,
    /// The last attempt or outcome.
    last: Instant,
    locked_until: Option<Instant>,
}

impl Entry {
    fn new(now: Instant) -> Entry {
        Entry {
            failures: 0,
            pending: 0,
            next: now,
            last: now,
            locked_until: None,
        }
    }

    /// A lock served, or failures long forgotten, start over.
    fn refresh(&mut self, now: Instant) {
        if self.locked_until.is_some_and(|until| now >= until) {
            self.locked_until = None;
            self.failures = 0;
        }
        if self.pending == 0
            && self.locked_until.is_none()
            && now.duration_since(self.last) >= FORGET_AFTER
        {
            self.failures = 0;
        }
    }

    fn locked(&self, now: Instant) -> Option<Duration> {
        self.locked_until
            .filter(|until| *until > now)
            .map(|until| until - now)
    }

    /// Whether it tells nothing a new entry would not.
    fn blank(&self, now: Instant) -> bool {
        self.failures == 0 && self.pending == 0 && self.locked_until.is_none() && self.next <= now
    }
}

/// Entries by key, at most `max`.
#[derive(Debug)]
struct Entries<K> {
    map: HashMap<K, Entry>,
    max: usize,
}

impl<K: Eq + Hash + Clone> Entries<K> {
    fn new(max: usize) -> Self {
        Entries {
            map: HashMap::new(),
            max,
        }
    }

    fn get(&mut self, key: &K, now: Instant) -> Option<&mut Entry> {
        let entry = self.map.get_mut(key)?;
        entry.refresh(now);
        Some(entry)
    }

    fn entry(&mut self, key: &K, now: Instant) -> &mut Entry {
        if !self.map.contains_key(key) && self.map.len() >= self.max {
            self.make_room(now);
        }
        let entry = self
            .map
            .entry(key.clone())
            .or_insert_with(|| Entry::new(now));
        entry.refresh(now);
        entry
    }

    /// Changes an entry, and drops it when it is left blank.
    fn update<T>(&mut self, key: &K, now: Instant, f: impl FnOnce(&mut Entry) -> T) -> T {
        let entry = self.entry(key, now);
        let out = f(entry);
        if entry.blank(now) {
            self.map.remove(key);
        }
        out
    }

    fn make_room(&mut self, now: Instant) {
        // First those with nothing at stake: no failure, no turn, no lock.
        self.map.retain(|_, e| {
            e.refresh(now);
            e.pending > 0 || e.failures > 0 || e.locked_until.is_some()
        });
        if self.map.len() < self.max {
            return;
        }
        let mut lasts: Vec<Instant> = self.map.values().map(|e| e.last).collect();
        let quarter = lasts.len() / 4;
        let (_, cutoff, _) = lasts.select_nth_unstable(quarter);
        let cutoff = *cutoff;
        self.map.retain(|_, e| e.last > cutoff);
    }
}

/// The answer to a login attempt before its password is looked at.
#[derive(Debug, PartialEq, Eq)]
pub enum Admission {
    /// Wait this long, then `Schedule::begin` the turn; settle it with
    /// `succeeded`, `failed` or `abandoned`.
    Turn(Turn, Duration),
    /// Its turn would come only in this long: refused.
    Throttled(Duration),
    /// The account is locked for this much longer: refused.
    Locked(Duration),
}

/// An attempt that has a turn. Settled exactly once.
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a turn is settled with succeeded, failed or abandoned"]
pub struct Turn {
    account: String,
    address: IpAddr,
}

/// What a failure did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failed {
    /// Failures in a row on the account, this one included.
    pub in_a_row: u32,
    /// Set when this failure locked the account: for how long.
    pub locked_for: Option<Duration>,
}

/// Login attempts by account name and by address.
#[derive(Debug)]
pub struct Schedule {
    settings: Settings,
    accounts: Entries<String>,
    addresses: Entries<IpAddr>,
}

impl Default for Schedule {
    fn default() -> Self {
        Schedule::new(Settings::default())
    }
}

impl Schedule {
    pub fn new(settings: Settings) -> Schedule {
        Schedule {
            settings,
            accounts: Entries::new(MAX_ACCOUNTS),
            addresses: Entries::new(MAX_ADDRESSES),
        }
    }

    /// An attempt to log in as `name` from `address`: its turn, or why it
    /// is refused at once.
    pub fn admit(&mut self, name: &str, address: IpAddr, now: Instant) -> Admission {
        let account = account_key(name);
        let (account_next, locked) = match self.accounts.get(&account, now) {
            Some(e) => (e.next, e.locked(now)),
            None => (now, None),
        };
        if let Some(left) = locked {
            return Admission::Locked(left);
        }
        let address_next = self.addresses.get(&address, now).map_or(now, |e| e.next);
        let start = now.max(account_next).max(address_next);
        let wait = start - now;
        if wait > self.settings.max_wait {
            return Admission::Throttled(wait);
        }
        // The turn after this one waits as if this one fails; a success
        // gives the time back. So attempts on one account start at least
        // `first_delay` apart, ten times what a hash takes, and do not
        // overlap; an address without failures (many users behind one
        // NAT) logs in in parallel.
        let settings = self.settings;
        let entry = self.accounts.entry(&account, now);
        entry.pending += 1;
        entry.last = now;
        entry.next = start + settings.delay(entry.failures + entry.pending);
        let entry = self.addresses.entry(&address, now);
        entry.pending += 1;
        entry.last = now;
        if entry.failures > 0 {
            entry.next = start + settings.delay(entry.failures + entry.pending);
        }
        Admission::Turn(Turn { account, address }, wait)
    }

    /// At the turn: `Some(left)` when the account was locked meanwhile
    /// (then abandon the turn and refuse).
    pub fn begin(&mut self, turn: &Turn, now: Instant) -> Option<Duration> {
        self.accounts
            .get(&turn.account, now)
            .and_then(|e| e.locked(now))
    }

    /// The password was right: the account's and the address's failures
    /// are forgotten.
    pub fn succeeded(&mut self, turn: Turn, now: Instant) {
        let reset = |e: &mut Entry| {
            e.pending = e.pending.saturating_sub(1);
            e.failures = 0;
            e.last = now;
            if e.pending == 0 {
                e.next = e.next.min(now);
            }
        };
        self.accounts.update(&turn.account, now, reset);
        self.addresses.update(&turn.address, now, reset);
    }

    /// The password (or the name) was wrong.
    pub fn failed(&mut self, turn: Turn, now: Instant) -> Failed {
        let settings = self.settings;
        let count = |e: &mut Entry| {
            e.pending = e.pending.saturating_sub(1);
            e.failures = e.failures.saturating_add(1);
            e.last = now;
            e.next = e.next.max(now + settings.delay(e.failures));
        };
        self.addresses.update(&turn.address, now, count);
        self.accounts.update(&turn.account, now, |e| {
            count(e);
            let lock = settings.lock_after > 0
                && e.failures >= settings.lock_after
                && e.locked_until.is_none();
            if lock {
                e.locked_until = Some(now + settings.lock_for);
            }
            Failed {
                in_a_row: e.failures,
                locked_for: lock.then_some(settings.lock_for),
            }
        })
    }

    /// The turn was not used (the balancer is stopping, or the account
    /// turned out to be locked): it counts neither way.
    pub fn abandoned(&mut self, turn: Turn, now: Instant) {
        let release = |e: &mut Entry| e.pending = e.pending.saturating_sub(1);
        self.accounts.update(&turn.account, now, release);
        self.addresses.update(&turn.address, now, release);
    }

    /// Whether the account is locked here, and for how long still.
    pub fn locked(&mut self, name: &str, now: Instant) -> Option<Duration> {
        self.accounts
            .get(&account_key(name), now)
            .and_then(|e| e.locked(now))
    }

    /// Locks the account until `left` from now: a lock kept elsewhere (the
    /// users table) seen here, so that the next attempts are refused at
    /// once.
    pub fn lock(&mut self, name: &str, left: Duration, now: Instant) {
        let entry = self.accounts.entry(&account_key(name), now);
        entry.locked_until = Some(now + left);
        entry.last = now;
    }

    /// Forgets the account's failures and lock (an admin lifted it).
    pub fn unlock(&mut self, name: &str) {
        self.accounts.map.remove(&account_key(name));
    }
}

/// Why a login failed, as the log tells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    NoSuchUser,
    WrongPassword,
    /// Refused at once: its turn was too far away.
    Throttled,
    /// Refused at once: the account is locked.
    Locked,
}

impl fmt::Display for Why {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Why::NoSuchUser => "no such user",
            Why::WrongPassword => "wrong password",
            Why::Throttled => "refused, too many failures",
            Why::Locked => "refused, the account is locked",
        })
    }
}

/// One failed login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The name tried, as `account_key` keeps it.
    pub account: String,
    pub from: IpAddr,
    pub why: Why,
}

impl Failure {
    pub fn new(name: &str, from: IpAddr, why: Why) -> Failure {
        Failure {
            account: account_key(name),
            from,
            why,
        }
    }
}

/// A line for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    /// A failure, and how many on its account were folded since the last
    /// line about it.
    Failed { failure: Failure, folded: u64 },
    /// Failures folded and no new one since: how many, and the last.
    Folded { count: u64, last: Failure },
    /// Failures on accounts beyond those kept apart.
    Others { count: u64 },
}

impl fmt::Display for Line {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Line::Failed { failure, folded } => {
                write!(
                    f,
                    "failed login as \"{}\" from {}: {}",
                    failure.account, failure.from, failure.why
                )?;
                if *folded > 0 {
                    write!(f, " ({folded} more since the last line)")?;
                }
                Ok(())
            }
            Line::Folded { count, last } => write!(
                f,
                "{count} more failed login{} as \"{}\" since the last line (the last from {}: {})",
                if *count == 1 { "" } else { "s" },
                last.account,
                last.from,
                last.why
            ),
            Line::Others { count } => write!(
                f,
                "{count} more failed login{} on other accounts (too many accounts at once to name each)",
                if *count == 1 { "" } else { "s" }
            ),
        }
    }
}

/// Failures not logged yet on one account.
#[derive(Debug)]
struct Folding {
    last_line: Instant,
    count: u64,
    last: Option<Failure>,
}

/// Failed logins on their way to the log: the first on an account is
/// logged at once, the next ones within `LOG_INTERVAL` are folded into the
/// next line, which `due` writes when no new failure does.
#[derive(Debug, Default)]
pub struct FailureLog {
    accounts: HashMap<String, Folding>,
    others: u64,
    others_line: Option<Instant>,
}

impl FailureLog {
    /// A failure: its line, or `None` when folded into a later one.
    pub fn record(&mut self, failure: Failure, now: Instant) -> Option<Line> {
        if let Some(folding) = self.accounts.get_mut(&failure.account) {
            if now.duration_since(folding.last_line) < LOG_INTERVAL {
                folding.count += 1;
                folding.last = Some(failure);
                return None;
            }
            let folded = std::mem::take(&mut folding.count);
            folding.last = None;
            folding.last_line = now;
            return Some(Line::Failed { failure, folded });
        }
        if self.accounts.len() >= MAX_LOGGED_ACCOUNTS {
            self.accounts
                .retain(|_, f| f.count > 0 || now.duration_since(f.last_line) < LOG_INTERVAL);
        }
        if self.accounts.len() >= MAX_LOGGED_ACCOUNTS {
            self.others += 1;
            return None;
        }
        self.accounts.insert(
            failure.account.clone(),
            Folding {
                last_line: now,
                count: 0,
                last: None,
            },
        );
        Some(Line::Failed { failure, folded: 0 })
    }

    /// Lines for failures folded at least `LOG_INTERVAL` ago that no new
    /// failure has logged; accounts quiet that long are forgotten.
    pub fn due(&mut self, now: Instant) -> Vec<Line> {
        let mut lines = Vec::new();
        self.accounts.retain(|_, folding| {
            if now.duration_since(folding.last_line) < LOG_INTERVAL {
                return true;
            }
            let Some(last) = folding.last.take() else {
                return false;
            };
            lines.push(Line::Folded {
                count: std::mem::take(&mut folding.count),
                last,
            });
            folding.last_line = now;
            true
        });
        let others_due = self
            .others_line
            .is_none_or(|at| now.duration_since(at) >= LOG_INTERVAL);
        if self.others > 0 && others_due {
            lines.push(Line::Others {
                count: std::mem::take(&mut self.others),
            });
            self.others_line = Some(now);
        }
        lines
    }

    /// Every failure still folded, now (when the balancer stops).
    pub fn drain(&mut self) -> Vec<Line> {
        let mut lines: Vec<Line> = self
            .accounts
            .drain()
            .filter_map(|(_, folding)| {
                folding.last.map(|last| Line::Folded {
                    count: folding.count,
                    last,
                })
            })
            .collect();
        if self.others > 0 {
            lines.push(Line::Others {
                count: std::mem::take(&mut self.others),
            });
        }
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOME: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));
    const AWAY: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// The turn, panicking on a refusal.
    fn turn(schedule: &mut Schedule, name: &str, from: IpAddr, now: Instant) -> (Turn, Duration) {
        match schedule.admit(name, from, now) {
            Admission::Turn(turn, wait) => (turn, wait),
            other => panic!("{name} from {from}: {other:?}"),
        }
    }

    #[test]
    fn the_delay_doubles_up_to_its_ceiling() {
        let s = Settings::default();
        let delays: Vec<u128> = (0..7).map(|n| s.delay(n).as_millis()).collect();
        assert_eq!(delays, [0, 500, 1000, 2000, 4000, 8000, 8000]);
        assert_eq!(s.delay(u32::MAX), s.max_delay);
    }

    #[test]
    fn attempts_on_one_account_take_turns_whatever_the_connection() {
        let mut schedule = Schedule::default();
        let t0 = Instant::now();
        // Four at once: each waits for the one before to have failed.
        let mut waits = Vec::new();
        let mut turns = Vec::new();
        for _ in 0..4 {
            let (turn, wait) = turn(&mut schedule, "alice", HOME, t0);
            waits.push(wait.as_millis());
            turns.push(turn);
        }
        assert_eq!(waits, [0, 500, 1500, 3500]);
        // The fifth would wait 7.5 s: refused at once.
        assert_eq!(
            schedule.admit("alice", HOME, t0),
            Admission::Throttled(ms(7500))
        );
        // From another address it is the same: the account decides.
        assert_eq!(
            schedule.admit("alice", AWAY, t0),
            Admission::Throttled(ms(7500))
        );
        // Another account from an address that has not failed yet goes on.
        let (other, wait) = turn(&mut schedule, "bob", AWAY, t0);
        assert_eq!(wait, Duration::ZERO);
        schedule.abandoned(other, t0);
        for (i, turn) in turns.into_iter().enumerate() {
            let failed = schedule.failed(turn, t0 + ms(10));
            assert_eq!(failed.in_a_row, i as u32 + 1);
            assert_eq!(failed.locked_for, None);
        }
    }

    #[test]
    fn an_address_that_failed_waits_on_any_account() {
        let mut schedule = Schedule::default();
        let t0 = Instant::now();
        let (a, _) = turn(&mut schedule, "alice", HOME, t0);
        let (b, wait) = turn(&mut schedule, "bob", HOME, t0);
        assert_eq!(wait, Duration::ZERO, "no failure yet: in parallel");
        schedule.failed(a, t0);
        schedule.failed(b, t0);
        let (c, wait) = turn(&mut schedule, "carol", HOME, t0);
        assert_eq!(wait, ms(1000), "two failures from the address");
        let (d, wait) = turn(&mut schedule, "dave", AWAY, t0);
        assert_eq!(wait, Duration::ZERO);
        schedule.succeeded(d, t0);
        schedule.abandoned(c, t0);
    }

    #[test]
    fn a_success_resets_the_account_and_the_address() {
        let mut schedule = Schedule::default();
        let t0 = Instant::now();
        let (a, _) = turn(&mut schedule, "alice", HOME, t0);
        schedule.failed(a, t0);
        let (a, wait) = turn(&mut schedule, "alice", HOME, t0);
        assert_eq!(wait, ms(500));
        let t1 = t0 + wait;
        assert_eq!(schedule.begin(&a, t1), None);
        schedule.succeeded(a, t1);
        let (a, wait) = turn(&mut schedule, "alice", HOME, t1);
        assert_eq!(wait, Duration::ZERO);
        schedule.succeeded(a, t1);
        assert!(schedule.accounts.map.is_empty() && schedule.addresses.map.is_empty());
    }

    #[test]
    fn failures_in_a_row_lock_the_account_until_the_lock_ends_or_is_lifted() {
        let settings = Settings {
            lock_after: 3,
            lock_for: Duration::from_secs(60),
            ..Settings::default()
        };
        let mut schedule = Schedule::new(settings);
        let mut now = Instant::now();
        for n in 1..=3 {
            let (t, wait) = turn(&mut schedule, "ghost", HOME, now);
            now += wait;
            let failed = schedule.failed(t, now);
            assert_eq!(failed.in_a_row, n);
            assert_eq!(
                failed.locked_for,
                (n == 3).then_some(Duration::from_secs(60))
            );
        }
        // Every attempt is refused, from anywhere, right password or not.
        now += ms(100);
        assert_eq!(
            schedule.admit("ghost", AWAY, now),
            Admission::Locked(Duration::from_secs(60) - ms(100))
        );
        assert!(schedule.locked("ghost", now).is_some());
        // A turn taken before the lock finds it at its start.
        let mut other = Schedule::new(settings);
        let (early, _) = turn(&mut other, "x", HOME, now);
        other.lock("x", Duration::from_secs(5), now);
        assert_eq!(other.begin(&early, now), Some(Duration::from_secs(5)));
        other.abandoned(early, now);
        // The lock ends by itself, and the count starts over.
        let later = now + Duration::from_secs(60);
        let (t, wait) = turn(&mut schedule, "ghost", AWAY, later);
        assert_eq!(wait, Duration::ZERO);
        assert_eq!(schedule.failed(t, later).in_a_row, 1);
        // Lifted by an admin: the next failure does not lock again.
        schedule.lock("ghost", Duration::from_secs(60), later);
        schedule.unlock("ghost");
        let (t, _) = turn(&mut schedule, "ghost", AWAY, later);
        assert_eq!(schedule.failed(t, later).locked_for, None);
    }

    #[test]
    fn failures_are_forgotten_after_a_quiet_while() {
        let mut schedule = Schedule::default();
        let t0 = Instant::now();
        let (t, _) = turn(&mut schedule, "alice", HOME, t0);
        schedule.failed(t, t0);
        let later = t0 + FORGET_AFTER;
        let (t, wait) = turn(&mut schedule, "alice", HOME, later);
        assert_eq!(wait, Duration::ZERO);
        assert_eq!(schedule.failed(t, later).in_a_row, 1);
    }

    #[test]
    fn names_and_addresses_kept_stay_bounded() {
        let mut schedule = Schedule::default();
        let t0 = Instant::now();
        for i in 0..(MAX_ACCOUNTS as u32 + 10) {
            let from = IpAddr::from(i.to_be_bytes());
            let (t, _) = turn(&mut schedule, &format!("user{i}"), from, t0);
            schedule.failed(t, t0);
        }
        assert!(schedule.accounts.map.len() <= MAX_ACCOUNTS);
        // A name longer than a user name can be costs no more.
        let long = "x".repeat(100_000);
        let (t, _) = turn(&mut schedule, &long, HOME, t0);
        assert!(schedule.accounts.map.keys().all(|k| k.len() < 300));
        schedule.abandoned(t, t0);
    }

    #[test]
    fn the_log_folds_failures_into_one_line_per_account_per_second() {
        let mut log = FailureLog::default();
        let t0 = Instant::now();
        let fail = |name: &str, why| Failure::new(name, HOME, why);
        let first = log.record(fail("alice", Why::WrongPassword), t0).unwrap();
        assert_eq!(
            first.to_string(),
            "failed login as \"alice\" from 10.0.0.1: wrong password"
        );
        for i in 1..=12 {
            assert_eq!(log.record(fail("alice", Why::Throttled), t0 + ms(i)), None);
        }
        // Another account has its own line.
        let line = log.record(fail("nobody\n", Why::NoSuchUser), t0).unwrap();
        assert!(line.to_string().contains("no such user"), "{line}");
        assert!(log.due(t0 + ms(500)).is_empty());
        // A second later, the next failure carries the count...
        let line = log
            .record(fail("alice", Why::WrongPassword), t0 + ms(1000))
            .unwrap();
        assert!(
            line.to_string()
                .ends_with("wrong password (12 more since the last line)"),
            "{line}"
        );
        // ...or, with none, `due` logs it.
        log.record(fail("alice", Why::Locked), t0 + ms(1100));
        assert!(log.due(t0 + ms(1500)).is_empty());
        let lines = log.due(t0 + ms(2000));
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert_eq!(
            lines[0].to_string(),
            "1 more failed login as \"alice\" since the last line (the last from 10.0.0.1: refused, the account is locked)"
        );
        // Quiet accounts are forgotten.
        assert!(log.due(t0 + ms(5000)).is_empty());
        assert!(log.accounts.is_empty());
        // Folded failures are not lost when the balancer stops.
        log.record(fail("bob", Why::WrongPassword), t0);
        log.record(fail("bob", Why::WrongPassword), t0);
        assert_eq!(log.drain().len(), 1);
    }

    #[test]
    fn the_log_keeps_a_bounded_number_of_accounts_apart() {
        let mut log = FailureLog::default();
        let t0 = Instant::now();
        let mut lines = 0;
        for i in 0..MAX_LOGGED_ACCOUNTS + 5 {
            let failure = Failure::new(&format!("user{i}"), HOME, Why::NoSuchUser);
            lines += usize::from(log.record(failure, t0).is_some());
        }
        assert_eq!(lines, MAX_LOGGED_ACCOUNTS);
        assert!(log.accounts.len() <= MAX_LOGGED_ACCOUNTS);
        let due = log.due(t0 + LOG_INTERVAL);
        assert_eq!(due, [Line::Others { count: 5 }]);
    }
}
