//! The users of `balancer --users`: names, salted Argon2id password hashes
//! (PHC strings, the `argon2` crate's default parameters), an admin flag
//! and a lock, kept in the `users` table of the state file.
//!
//! `balancer user add|remove|unlock|list` manage them (`add`, `remove`,
//! `unlock`, `list` here); a running balancer reads the table at each
//! login, so a user added, removed or unlocked counts from the next login
//! without a restart. A lock (`locked_until_ms`, set after too many
//! failed logins, see `logins`) is kept here too, so it holds across
//! restarts and for every balancer on the file. Verifying a hash costs
//! tens of milliseconds of CPU: it runs on the connection's thread, with
//! no lock held.

use super::store::{sql_args, Db, Location, StateError};
use super::tracking::{schema, state_error};
use crate::error::Error;
use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// Longest user name; names are also shown in logs and tables.
pub const MAX_NAME: usize = 64;
/// Shortest password `add` takes, in characters.
pub const MIN_PASSWORD: usize = 8;
/// Longest password taken (hashing cost grows with it).
pub const MAX_PASSWORD: usize = 1024;
/// Idle read connections kept for logins.
const MAX_IDLE_READERS: usize = 8;

/// A user who logged in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub admin: bool,
}

/// One row of `balancer user list`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub name: String,
    pub admin: bool,
    pub created_ms: u64,
    /// Unix milliseconds: until when logins are refused, if locked.
    pub locked_until_ms: Option<u64>,
}

impl Listed {
    /// How much longer the lock lasts at `now_ms`, if locked.
    pub fn locked_for(&self, now_ms: u64) -> Option<Duration> {
        locked_for(self.locked_until_ms, now_ms)
    }
}

/// A user's row, as a login reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    hash: String,
    admin: bool,
    locked_until_ms: Option<u64>,
}

impl Account {
    /// How much longer the account is locked at `now_ms`, if it is.
    pub fn locked_for(&self, now_ms: u64) -> Option<Duration> {
        locked_for(self.locked_until_ms, now_ms)
    }
}

fn locked_for(until_ms: Option<u64>, now_ms: u64) -> Option<Duration> {
    until_ms
        .filter(|until| *until > now_ms)
        .map(|until| Duration::from_millis(until - now_ms))
}

/// Logins checked against the state.
pub struct Users {
    location: Location,
    /// Idle read connections: taken out for a lookup and put back, so the
    /// lock is never held while the database reads, and a login does not
    /// connect anew.
    readers: Mutex<Vec<Box<dyn Db>>>,
}

impl std::fmt::Debug for Users {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Users")
            .field("location", &self.location)
            .finish()
    }
}

/// A connection that writes (the schema made sure of first).
fn writer(location: &Location) -> Result<Box<dyn Db>, Error> {
    location
        .open_writer(&schema::TABLES)
        .map_err(state_error(location))
}

impl Users {
    /// Users of the state at `location` (opened and upgraded already by
    /// the tracker).
    pub fn new(location: impl Into<Location>) -> Users {
        Users {
            location: location.into(),
            readers: Mutex::new(Vec::new()),
        }
    }

    /// The row of user `name`, if there is one. Reads the password hash
    /// but checks nothing: see `check`.
    pub fn lookup(&self, name: &str) -> Result<Option<Account>, Error> {
        let error = state_error(&self.location);
        let idle = crate::sync::lock(&self.readers).pop();
        let mut conn = match idle {
            Some(conn) => conn,
            None => self
                .location
                .open_reader()
                .map_err(|e| error(StateError::Db(e)))?,
        };
        let row = conn
            .query_opt(
                "SELECT hash, admin, locked_until_ms FROM users WHERE name = ?1",
                sql_args![name],
            )
            .and_then(|row| {
                row.map(|r| {
                    Ok(Account {
                        hash: r.text(0)?,
                        admin: r.i64(1)? != 0,
                        locked_until_ms: r.opt_u64(2)?,
                    })
                })
                .transpose()
            })
            .map_err(|e| error(StateError::Db(e)));
        let mut readers = crate::sync::lock(&self.readers);
        if row.is_ok() && !conn.is_broken() && readers.len() < MAX_IDLE_READERS {
            readers.push(conn);
        }
        row
    }

    /// The user, when `account` (looked up as `name`) exists and
    /// `password` is theirs. An unknown name costs the same hash
    /// verification as a wrong password, so the time taken does not tell
    /// which it was.
    pub fn check(name: &str, account: Option<&Account>, password: &str) -> Option<User> {
        if password.len() > MAX_PASSWORD {
            return None;
        }
        let (hash, admin) = match account {
            Some(a) => (a.hash.as_str(), a.admin),
            None => (dummy_hash(), false),
        };
        let ok = PasswordHash::new(hash)
            .map(|parsed| {
                Argon2::default()
                    .verify_password(password.as_bytes(), &parsed)
                    .is_ok()
            })
            .unwrap_or(false);
        (ok && account.is_some()).then(|| User {
            name: name.to_string(),
            admin,
        })
    }

    /// Locks user `name` until `until_ms` (Unix milliseconds); nothing
    /// when there is no such user (unknown names are locked in memory
    /// only, by `logins`).
    pub fn lock(&self, name: &str, until_ms: u64) -> Result<(), Error> {
        let mut conn = writer(&self.location)?;
        conn.execute(
            "UPDATE users SET locked_until_ms = ?2 WHERE name = ?1",
            sql_args![name, until_ms as i64],
        )
        .map_err(|e| state_error(&self.location)(e.into()))?;
        Ok(())
    }
}

/// A hash of nothing anyone knows, verified against for unknown users.
fn dummy_hash() -> &'static str {
    static DUMMY: OnceLock<String> = OnceLock::new();
    DUMMY.get_or_init(|| hash(&crate::handshake::nonce()).unwrap_or_default())
}

/// A salted Argon2id PHC string for `password`.
pub fn hash(password: &str) -> Result<String, String> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| format!("cannot hash the password: {e}"))
}

/// Whether `name` can be a user name: 1 to 64 letters, digits, `-`, `_`,
/// `.` or `@`.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .chars()
            .all(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{}` is not a user name: use 1 to {MAX_NAME} letters, digits, -, _, . or @",
            crate::proto::truncate(name, 80)
        ))
    }
}

/// Whether `password` may be a new password: at least `MIN_PASSWORD`
/// characters (a short one falls to guessing despite the login delays),
/// at most `MAX_PASSWORD` bytes.
pub fn check_password(password: &str) -> Result<(), String> {
    let chars = password.chars().count();
    if chars < MIN_PASSWORD {
        return Err(format!(
            "the password is too short: it has {chars} characters, it needs at least {MIN_PASSWORD}"
        ));
    }
    if password.len() > MAX_PASSWORD {
        return Err(format!(
            "the password is too long: it has {} bytes, it may have at most {MAX_PASSWORD}",
            password.len()
        ));
    }
    Ok(())
}

/// Adds a user, or sets the password (and admin flag) of an existing one.
/// Returns whether the user is new.
pub fn add(
    at: impl Into<Location>,
    name: &str,
    password: &str,
    admin: bool,
) -> Result<bool, Error> {
    let at = &at.into();
    check_name(name).map_err(Error::Config)?;
    check_password(password).map_err(Error::Config)?;
    let hashed = hash(password).map_err(Error::Config)?;
    let mut conn = writer(at)?;
    let error = |e: super::store::DbError| state_error(at)(e.into());
    let existed = conn
        .query_opt("SELECT name FROM users WHERE name = ?1", sql_args![name])
        .map_err(error)?
        .is_some();
    conn.execute(
        "INSERT INTO users (name, hash, admin, created_ms) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (name) DO UPDATE SET hash = excluded.hash, admin = excluded.admin",
        sql_args![name, &hashed, admin, crate::text::now_ms() as i64],
    )
    .map_err(error)?;
    Ok(!existed)
}

/// Removes a user; false when there was none of that name.
pub fn remove(at: impl Into<Location>, name: &str) -> Result<bool, Error> {
    let at = &at.into();
    let n = writer(at)?
        .execute("DELETE FROM users WHERE name = ?1", sql_args![name])
        .map_err(|e| state_error(at)(e.into()))?;
    Ok(n > 0)
}

/// What `unlock` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unlocked {
    /// The user was locked; no longer.
    WasLocked,
    /// The user was not locked (or the lock had ended).
    WasNotLocked,
    NoSuchUser,
}

/// Lifts the lock of user `name`. A running balancer sees it at the next
/// login on that account, and starts its count of failures over.
pub fn unlock(at: impl Into<Location>, name: &str) -> Result<Unlocked, Error> {
    let at = &at.into();
    let mut conn = writer(at)?;
    let error = |e: super::store::DbError| state_error(at)(e.into());
    let found = conn
        .query_opt(
            "SELECT locked_until_ms FROM users WHERE name = ?1",
            sql_args![name],
        )
        .map_err(error)?;
    let Some(row) = found else {
        return Ok(Unlocked::NoSuchUser);
    };
    let until = row.opt_u64(0).map_err(error)?;
    conn.execute(
        "UPDATE users SET locked_until_ms = NULL WHERE name = ?1",
        sql_args![name],
    )
    .map_err(error)?;
    Ok(if locked_for(until, crate::text::now_ms()).is_some() {
        Unlocked::WasLocked
    } else {
        Unlocked::WasNotLocked
    })
}

/// Every user, by name.
pub fn list(at: impl Into<Location>) -> Result<Vec<Listed>, Error> {
    let at = &at.into();
    let error = |e: super::store::DbError| state_error(at)(e.into());
    let rows = writer(at)?
        .query(
            "SELECT name, admin, created_ms, locked_until_ms FROM users ORDER BY name",
            &[],
        )
        .map_err(error)?;
    let listed = |r: &super::store::Row| {
        Ok(Listed {
            name: r.text(0)?,
            admin: r.i64(1)? != 0,
            created_ms: r.u64(2)?,
            locked_until_ms: r.opt_u64(3)?,
        })
    };
    rows.iter()
        .map(listed)
        .collect::<Result<_, _>>()
        .map_err(error)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The user, when the name and password are right (locks aside).
    fn verify(users: &Users, name: &str, password: &str) -> Option<User> {
        Users::check(name, users.lookup(name).unwrap().as_ref(), password)
    }

    #[test]
    fn add_verify_list_remove() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("balancer.db");
        assert!(add(&path, "alice", "s3cret pw", false).unwrap());
        assert!(add(&path, "root", "toor toor", true).unwrap());
        let users = Users::new(&path);
        assert_eq!(
            verify(&users, "alice", "s3cret pw"),
            Some(User {
                name: "alice".into(),
                admin: false
            })
        );
        assert!(verify(&users, "root", "toor toor").unwrap().admin);
        assert_eq!(verify(&users, "alice", "wrong"), None);
        assert_eq!(verify(&users, "nobody", "s3cret pw"), None);
        // A new password replaces the old one.
        assert!(!add(&path, "alice", "other pw", false).unwrap());
        assert_eq!(verify(&users, "alice", "s3cret pw"), None);
        assert!(verify(&users, "alice", "other pw").is_some());
        let names: Vec<String> = list(&path).unwrap().into_iter().map(|u| u.name).collect();
        assert_eq!(names, ["alice", "root"]);
        assert!(remove(&path, "alice").unwrap());
        assert!(!remove(&path, "alice").unwrap());
        assert_eq!(verify(&users, "alice", "other pw"), None);
        // Stored hashes are salted PHC strings, never the password.
        let conn = rusqlite::Connection::open(&path).unwrap();
        let stored: String = conn
            .query_row("SELECT hash FROM users WHERE name = 'root'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert!(stored.starts_with("$argon2id$"), "{stored}");
        assert!(!stored.contains("toor"));
    }

    #[test]
    fn names_and_passwords_are_checked() {
        assert!(check_name("alice.b-c_d@x").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("a b").is_err());
        assert!(check_name(&"x".repeat(65)).is_err());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("balancer.db");
        assert!(add(&path, "a\nb", "long enough", false).is_err());
        assert!(add(&path, "a", "", false).is_err());
        let short = add(&path, "a", "seven c", false).unwrap_err().to_string();
        assert!(short.contains("at least 8"), "{short}");
        // Characters, not bytes: eight accented letters are enough.
        assert!(add(&path, "a", "àèìòùàèì", false).is_ok());
        assert!(add(&path, "a", &"x".repeat(MAX_PASSWORD + 1), false).is_err());
    }

    #[test]
    fn a_lock_is_kept_in_the_table_and_lifted_by_unlock() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("balancer.db");
        add(&path, "alice", "s3cret pw", false).unwrap();
        let users = Users::new(&path);
        let now = crate::text::now_ms();
        users.lock("alice", now + 60_000).unwrap();
        // Unknown names are not written anywhere.
        users.lock("nobody", now + 60_000).unwrap();
        let account = users.lookup("alice").unwrap().unwrap();
        assert_eq!(account.locked_for(now), Some(Duration::from_secs(60)));
        assert_eq!(account.locked_for(now + 60_000), None);
        let listed = list(&path).unwrap();
        assert!(listed[0].locked_for(now).is_some());
        assert_eq!(unlock(&path, "alice").unwrap(), Unlocked::WasLocked);
        assert_eq!(
            users.lookup("alice").unwrap().unwrap().locked_for(now),
            None
        );
        assert_eq!(unlock(&path, "alice").unwrap(), Unlocked::WasNotLocked);
        assert_eq!(unlock(&path, "nobody").unwrap(), Unlocked::NoSuchUser);
        assert_eq!(list(&path).unwrap().len(), 1);
    }
}
