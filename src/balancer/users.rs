//! The users of `balancer --users`: names, salted Argon2id password hashes
//! (PHC strings, the `argon2` crate's default parameters) and an admin
//! flag, kept in the `users` table of the state file.
//!
//! `balancer user add|remove|list` manage them (`add`, `remove`, `list`
//! here); a running balancer reads the table at each login, so a user
//! added or removed takes effect at the next login without a restart.
//! Verifying a hash costs tens of milliseconds of CPU: it runs on the
//! connection's thread, with no lock held.

use super::tracking::{self, StateError};
use crate::error::Error;
use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

/// Longest user name; names are also shown in logs and tables.
pub const MAX_NAME: usize = 64;
/// Longest password taken (hashing cost grows with it).
pub const MAX_PASSWORD: usize = 1024;

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
}

/// Logins checked against the state file.
#[derive(Debug)]
pub struct Users {
    path: PathBuf,
}

fn state_error(path: &Path) -> impl Fn(StateError) -> Error + '_ {
    move |source| Error::State {
        path: path.to_path_buf(),
        source,
    }
}

impl Users {
    /// Users of the state file at `path` (opened and upgraded already by
    /// the tracker).
    pub fn new(path: &Path) -> Users {
        Users {
            path: path.to_path_buf(),
        }
    }

    /// The user, when `name` exists and `password` is theirs. An unknown
    /// name costs the same hash verification as a wrong password, so the
    /// time taken does not tell which it was.
    pub fn verify(&self, name: &str, password: &str) -> Result<Option<User>, Error> {
        let row = self.lookup(name).map_err(state_error(&self.path))?;
        if password.len() > MAX_PASSWORD {
            return Ok(None);
        }
        let (hash, admin) = match &row {
            Some((hash, admin)) => (hash.as_str(), *admin),
            None => (dummy_hash(), false),
        };
        let ok = PasswordHash::new(hash)
            .map(|parsed| {
                Argon2::default()
                    .verify_password(password.as_bytes(), &parsed)
                    .is_ok()
            })
            .unwrap_or(false);
        Ok((ok && row.is_some()).then(|| User {
            name: name.to_string(),
            admin,
        }))
    }

    fn lookup(&self, name: &str) -> Result<Option<(String, bool)>, StateError> {
        let conn = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(Duration::from_secs(5))?;
        Ok(conn
            .query_row(
                "SELECT hash, admin FROM users WHERE name = ?1",
                params![name],
                |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? != 0)),
            )
            .optional()?)
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

/// Adds a user, or sets the password (and admin flag) of an existing one.
/// Returns whether the user is new.
pub fn add(path: &Path, name: &str, password: &str, admin: bool) -> Result<bool, Error> {
    check_name(name).map_err(Error::Config)?;
    if password.is_empty() || password.len() > MAX_PASSWORD {
        return Err(Error::Config(format!(
            "the password must have 1 to {MAX_PASSWORD} bytes"
        )));
    }
    let hashed = hash(password).map_err(Error::Config)?;
    let conn = tracking::open_writer(path).map_err(state_error(path))?;
    let existed: bool = conn
        .query_row(
            "SELECT count(*) FROM users WHERE name = ?1",
            params![name],
            |r| r.get::<_, i64>(0),
        )
        .map_err(|e| state_error(path)(e.into()))?
        > 0;
    conn.execute(
        "INSERT INTO users (name, hash, admin, created_ms) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (name) DO UPDATE SET hash = excluded.hash, admin = excluded.admin",
        params![name, hashed, admin, tracking::now_ms() as i64],
    )
    .map_err(|e| state_error(path)(e.into()))?;
    Ok(!existed)
}

/// Removes a user; false when there was none of that name.
pub fn remove(path: &Path, name: &str) -> Result<bool, Error> {
    let conn = tracking::open_writer(path).map_err(state_error(path))?;
    let n = conn
        .execute("DELETE FROM users WHERE name = ?1", params![name])
        .map_err(|e| state_error(path)(e.into()))?;
    Ok(n > 0)
}

/// Every user, by name.
pub fn list(path: &Path) -> Result<Vec<Listed>, Error> {
    let conn = tracking::open_writer(path).map_err(state_error(path))?;
    let rows = (|| -> rusqlite::Result<Vec<Listed>> {
        let mut stmt = conn.prepare("SELECT name, admin, created_ms FROM users ORDER BY name")?;
        let rows = stmt.query_map([], |r| {
            Ok(Listed {
                name: r.get(0)?,
                admin: r.get::<_, i64>(1)? != 0,
                created_ms: r.get::<_, i64>(2)?.max(0) as u64,
            })
        })?;
        rows.collect()
    })();
    rows.map_err(|e| state_error(path)(e.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_verify_list_remove() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("balancer.db");
        assert!(add(&path, "alice", "s3cret", false).unwrap());
        assert!(add(&path, "root", "toor", true).unwrap());
        let users = Users::new(&path);
        assert_eq!(
            users.verify("alice", "s3cret").unwrap(),
            Some(User {
                name: "alice".into(),
                admin: false
            })
        );
        assert!(users.verify("root", "toor").unwrap().unwrap().admin);
        assert_eq!(users.verify("alice", "wrong").unwrap(), None);
        assert_eq!(users.verify("nobody", "s3cret").unwrap(), None);
        // A new password replaces the old one.
        assert!(!add(&path, "alice", "other", false).unwrap());
        assert_eq!(users.verify("alice", "s3cret").unwrap(), None);
        assert!(users.verify("alice", "other").unwrap().is_some());
        let names: Vec<String> = list(&path).unwrap().into_iter().map(|u| u.name).collect();
        assert_eq!(names, ["alice", "root"]);
        assert!(remove(&path, "alice").unwrap());
        assert!(!remove(&path, "alice").unwrap());
        assert_eq!(users.verify("alice", "other").unwrap(), None);
        // Stored hashes are salted PHC strings, never the password.
        let conn = Connection::open(&path).unwrap();
        let stored: String = conn
            .query_row("SELECT hash FROM users WHERE name = 'root'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert!(stored.starts_with("$argon2id$"), "{stored}");
        assert!(!stored.contains("toor"));
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("alice.b-c_d@x").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("a b").is_err());
        assert!(check_name(&"x".repeat(65)).is_err());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("balancer.db");
        assert!(add(&path, "a\nb", "x", false).is_err());
        assert!(add(&path, "a", "", false).is_err());
    }
}
