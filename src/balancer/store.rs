//! Where the balancer keeps its state (`--state`): a SQLite file of its
//! own, or a PostgreSQL database that several balancers share. The rest of
//! the balancer sees one `Db` — a connection that runs SQL with `?N`
//! parameters and returns rows of integers and text — and never which of
//! the two it has. `Location` says where the state is and opens
//! connections to it.
//!
//! SQL is written once where both dialects agree (most of it); where they
//! differ, `Dialect::pick` holds both texts side by side at the place that
//! needs them. Integers are 64 bits on both sides (`BIGINT` in
//! PostgreSQL), text is UTF-8.
//!
//! - `sqlite`: the embedded file (WAL, one writer, read-only readers).
//! - `postgres`: the shared database: its URL, its password, connections
//!   with timeouts.

pub mod postgres;
pub mod sqlite;

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

/// Which SQL a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

impl Dialect {
    /// The text for this dialect, of two written side by side.
    pub fn pick<'a>(self, sqlite: &'a str, postgres: &'a str) -> &'a str {
        match self {
            Dialect::Sqlite => sqlite,
            Dialect::Postgres => postgres,
        }
    }
}

/// A parameter of a statement: an integer or a text, either maybe `NULL`
/// (typed, as PostgreSQL wants its parameters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Value<'a> {
    Int(Option<i64>),
    Text(Option<&'a str>),
}

impl From<i64> for Value<'_> {
    fn from(v: i64) -> Self {
        Value::Int(Some(v))
    }
}

impl From<Option<i64>> for Value<'_> {
    fn from(v: Option<i64>) -> Self {
        Value::Int(v)
    }
}

impl From<bool> for Value<'_> {
    fn from(v: bool) -> Self {
        Value::Int(Some(i64::from(v)))
    }
}

impl<'a> From<&'a str> for Value<'a> {
    fn from(v: &'a str) -> Self {
        Value::Text(Some(v))
    }
}

impl<'a> From<&'a String> for Value<'a> {
    fn from(v: &'a String) -> Self {
        Value::Text(Some(v))
    }
}

impl<'a> From<Option<&'a str>> for Value<'a> {
    fn from(v: Option<&'a str>) -> Self {
        Value::Text(v)
    }
}

impl<'a> From<&'a Option<String>> for Value<'a> {
    fn from(v: &'a Option<String>) -> Self {
        Value::Text(v.as_deref())
    }
}

/// The parameters of a statement, each turned into a `Value`.
macro_rules! sql_args {
    ($($value:expr),* $(,)?) => {
        &[$($crate::balancer::store::Value::from($value)),*]
    };
}
pub(crate) use sql_args;

/// One value of a row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cell {
    Null,
    Int(i64),
    Text(String),
}

/// One row of a query's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row(pub Vec<Cell>);

impl Row {
    fn cell(&self, i: usize) -> Result<&Cell, DbError> {
        self.0.get(i).ok_or(DbError::Column {
            index: i,
            wanted: "a column",
        })
    }

    pub fn opt_i64(&self, i: usize) -> Result<Option<i64>, DbError> {
        match self.cell(i)? {
            Cell::Null => Ok(None),
            Cell::Int(v) => Ok(Some(*v)),
            Cell::Text(_) => Err(DbError::Column {
                index: i,
                wanted: "an integer",
            }),
        }
    }

    pub fn i64(&self, i: usize) -> Result<i64, DbError> {
        self.opt_i64(i)?.ok_or(DbError::Column {
            index: i,
            wanted: "an integer, not NULL",
        })
    }

    /// A count, a size or a time: never below 0.
    pub fn u64(&self, i: usize) -> Result<u64, DbError> {
        Ok(self.i64(i)?.max(0) as u64)
    }

    pub fn opt_u64(&self, i: usize) -> Result<Option<u64>, DbError> {
        Ok(self.opt_i64(i)?.map(|v| v.max(0) as u64))
    }

    pub fn opt_text(&self, i: usize) -> Result<Option<String>, DbError> {
        match self.cell(i)? {
            Cell::Null => Ok(None),
            Cell::Text(s) => Ok(Some(s.clone())),
            Cell::Int(_) => Err(DbError::Column {
                index: i,
                wanted: "a text",
            }),
        }
    }

    pub fn text(&self, i: usize) -> Result<String, DbError> {
        self.opt_text(i)?.ok_or(DbError::Column {
            index: i,
            wanted: "a text, not NULL",
        })
    }
}

/// Why a statement failed.
#[derive(Debug)]
pub enum DbError {
    Sqlite(rusqlite::Error),
    Postgres(::postgres::Error),
    /// The database could not be reached (its address, never a password).
    Connect {
        target: String,
        source: ::postgres::Error,
    },
    /// A column was not what the code reads from it.
    Column {
        index: usize,
        wanted: &'static str,
    },
    /// A value read back is not one the balancer writes (its description).
    Decode(String),
}

impl fmt::Display for DbError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DbError::Sqlite(e) => e.fmt(f),
            DbError::Postgres(e) => match e.as_db_error() {
                // The server's own message says what was wrong.
                Some(db) => write!(f, "{}: {}", db.severity(), db.message()),
                None => e.fmt(f),
            },
            DbError::Connect { target, source } => {
                write!(f, "cannot connect to PostgreSQL at {target}: {source}")
            }
            DbError::Column { index, wanted } => write!(f, "column {index} is not {wanted}"),
            DbError::Decode(what) => write!(f, "unexpected value: {what}"),
        }
    }
}

impl std::error::Error for DbError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            DbError::Sqlite(e) => Some(e),
            DbError::Postgres(e) | DbError::Connect { source: e, .. } => Some(e),
            DbError::Column { .. } | DbError::Decode(_) => None,
        }
    }
}

impl From<rusqlite::Error> for DbError {
    fn from(e: rusqlite::Error) -> Self {
        DbError::Sqlite(e)
    }
}

impl From<::postgres::Error> for DbError {
    fn from(e: ::postgres::Error) -> Self {
        DbError::Postgres(e)
    }
}

/// A connection to the state: the one seam between the balancer's SQL and
/// the database under it.
pub trait Db: Send {
    fn dialect(&self) -> Dialect;

    /// Runs one statement (parameters `?1`, `?2`...); returns the rows it
    /// changed.
    fn execute(&mut self, sql: &str, args: &[Value<'_>]) -> Result<u64, DbError>;

    /// Runs one query; returns every row.
    fn query(&mut self, sql: &str, args: &[Value<'_>]) -> Result<Vec<Row>, DbError>;

    /// Runs statements without parameters, separated by `;`.
    fn batch(&mut self, sql: &str) -> Result<(), DbError>;

    /// Whether the connection is gone for good (a new one is needed).
    fn is_broken(&self) -> bool;

    /// The first row of a query, if any.
    fn query_opt(&mut self, sql: &str, args: &[Value<'_>]) -> Result<Option<Row>, DbError> {
        Ok(self.query(sql, args)?.into_iter().next())
    }

    /// The only row of a query that always has one.
    fn query_one(&mut self, sql: &str, args: &[Value<'_>]) -> Result<Row, DbError> {
        self.query_opt(sql, args)?.ok_or_else(|| {
            DbError::Decode("a query that always answers a row answered none".into())
        })
    }
}

/// Rows per `INSERT`: a few fixed sizes, so that each is prepared once.
pub fn statement_size(left: usize) -> usize {
    [128, 64, 32, 16, 8, 4, 2, 1]
        .into_iter()
        .find(|&n| n <= left)
        .unwrap_or(1)
}

/// `(?1, ?2, ...), (...)`: `rows` groups of `columns` numbered parameters.
/// Made once per shape: the writer asks for the same few with every batch.
pub fn placeholders(rows: usize, columns: usize) -> Arc<str> {
    type Made = HashMap<(usize, usize), Arc<str>>;
    static MADE: OnceLock<Mutex<Made>> = OnceLock::new();
    let made = MADE.get_or_init(Default::default);
    let mut made = crate::sync::lock(made);
    made.entry((rows, columns))
        .or_insert_with(|| make_placeholders(rows, columns).into())
        .clone()
}

fn make_placeholders(rows: usize, columns: usize) -> String {
    use std::fmt::Write;
    let mut text = String::with_capacity(rows * columns * 7);
    for r in 0..rows {
        text.push_str(if r == 0 { "(" } else { ", (" });
        for c in 1..=columns {
            let sep = if c == 1 { "" } else { ", " };
            let _ = write!(text, "{sep}?{}", r * columns + c);
        }
        text.push(')');
    }
    text
}

/// Runs `f` in a transaction: committed when it returns `Ok`, rolled back
/// otherwise.
pub fn in_transaction<T, E: From<DbError>>(
    db: &mut dyn Db,
    f: impl FnOnce(&mut dyn Db) -> Result<T, E>,
) -> Result<T, E> {
    db.batch("BEGIN")?;
    match f(db) {
        Ok(value) => {
            db.batch("COMMIT")?;
            Ok(value)
        }
        Err(e) => {
            // Failing to roll back leaves the connection broken, which its
            // owner sees and replaces.
            let _ = db.batch("ROLLBACK");
            Err(e)
        }
    }
}

/// Why the state cannot be used.
#[derive(Debug)]
pub enum StateError {
    Db(DbError),
    /// Written by a newer balancer: its schema is unknown here.
    NewerSchema {
        found: i64,
        known: i64,
    },
    /// A database of something else: it is not ours to change.
    Foreign,
    /// The writer could not commit a change (its message).
    Write(String),
    /// The writer thread has stopped (the balancer is shutting down).
    WriterGone,
}

impl fmt::Display for StateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StateError::Db(e) => e.fmt(f),
            StateError::NewerSchema { found, known } => write!(
                f,
                "schema version {found} is newer than this balancer's ({known})"
            ),
            StateError::Foreign => {
                f.write_str("it is a database with other tables, not a balancer's state")
            }
            StateError::Write(e) => write!(f, "cannot write: {e}"),
            StateError::WriterGone => f.write_str("the state writer has stopped"),
        }
    }
}

impl std::error::Error for StateError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StateError::Db(e) => Some(e),
            _ => None,
        }
    }
}

impl From<DbError> for StateError {
    fn from(e: DbError) -> Self {
        StateError::Db(e)
    }
}

impl From<rusqlite::Error> for StateError {
    fn from(e: rusqlite::Error) -> Self {
        StateError::Db(DbError::Sqlite(e))
    }
}

/// The tables a store must have, and how to get them: `upgrade` creates
/// them in an empty database or brings an older schema up to `version`,
/// inside the caller's transaction (its second argument names the store
/// for the log).
pub struct Schema {
    pub version: i64,
    pub upgrade: fn(&mut dyn Db, &str) -> Result<(), StateError>,
}

/// Where the state is kept.
#[derive(Clone, PartialEq, Eq)]
pub enum Location {
    /// A SQLite file of this balancer's (several may share one on one
    /// machine).
    File(PathBuf),
    /// A PostgreSQL database shared by every balancer of a service.
    Postgres(postgres::Target),
}

impl Location {
    /// `--state`: a `postgres://` (or `postgresql://`) URL, else a path.
    /// The password, if the URL has none, comes from `password_file`, then
    /// from `PGPASSWORD` (`env`).
    pub fn parse(
        text: &str,
        password_file: Option<&Path>,
        env: Option<String>,
    ) -> Result<Location, postgres::LocationError> {
        if postgres::is_url(text) {
            let target = postgres::Target::parse(text)?;
            Ok(Location::Postgres(
                target.with_password(password_file, env)?,
            ))
        } else if password_file.is_some() {
            Err(postgres::LocationError::PasswordForFile)
        } else {
            Ok(Location::File(PathBuf::from(text)))
        }
    }

    /// Opens a connection that writes, creating or upgrading the schema
    /// first (inside a transaction that only one process at a time gets).
    pub fn open_writer(&self, schema: &Schema) -> Result<Box<dyn Db>, StateError> {
        match self {
            Location::File(path) => sqlite::open_writer(path, schema),
            Location::Postgres(target) => target.open_writer(schema),
        }
    }

    /// Opens a connection for queries (read-only where the store allows).
    pub fn open_reader(&self) -> Result<Box<dyn Db>, DbError> {
        match self {
            Location::File(path) => Ok(Box::new(sqlite::open_reader(path)?)),
            Location::Postgres(target) => Ok(Box::new(target.connect()?)),
        }
    }

    pub fn is_shared(&self) -> bool {
        matches!(self, Location::Postgres(_))
    }

    /// How messages name it: the path, or the URL without its password.
    pub fn name(&self) -> String {
        match self {
            Location::File(path) => path.display().to_string(),
            Location::Postgres(target) => target.to_string(),
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::File(path) => write!(f, "state file {}", path.display()),
            Location::Postgres(target) => write!(f, "state database {target}"),
        }
    }
}

// Never shows a password: Debug is Display.
impl fmt::Debug for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl From<&Path> for Location {
    fn from(path: &Path) -> Self {
        Location::File(path.to_path_buf())
    }
}

impl From<&PathBuf> for Location {
    fn from(path: &PathBuf) -> Self {
        Location::File(path.clone())
    }
}

impl From<&Location> for Location {
    fn from(location: &Location) -> Self {
        location.clone()
    }
}

impl From<PathBuf> for Location {
    fn from(path: PathBuf) -> Self {
        Location::File(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_number_every_cell_row_by_row() {
        assert_eq!(&*placeholders(1, 1), "(?1)");
        assert_eq!(&*placeholders(2, 3), "(?1, ?2, ?3), (?4, ?5, ?6)");
        let many = placeholders(128, 14);
        assert_eq!(many.matches('(').count(), 128);
        assert!(many.ends_with("?1791, ?1792)"), "{many}");
        assert!(Arc::ptr_eq(&many, &placeholders(128, 14)), "made once");
    }

    #[test]
    fn statement_sizes_are_few_and_fill_the_rest() {
        assert_eq!(statement_size(1000), 128);
        assert_eq!(statement_size(100), 64);
        assert_eq!(statement_size(3), 2);
        assert_eq!(statement_size(0), 1);
    }
}
