//! The embedded store: a SQLite file. One connection writes (WAL, so
//! readers never wait for it; `synchronous = NORMAL`, so a commit survives
//! a crash of the process and only a power cut can lose the last ones);
//! queries run on read-only connections. Another process on the same file
//! (`balancer user ...`, a second balancer) waits up to `BUSY_TIMEOUT`
//! for the lock.

use super::{Cell, Db, DbError, Dialect, Row, Schema, StateError, Value};
use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{Connection, OpenFlags};
use std::path::Path;
use std::time::Duration;

/// How long SQLite retries when another process holds the lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection to the state file.
pub struct SqliteDb {
    conn: Connection,
}

impl SqliteDb {
    pub fn new(conn: Connection) -> SqliteDb {
        // Every statement the writer runs stays prepared: each of the
        // multi-row inserts comes in several sizes (`statement_size`).
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        SqliteDb { conn }
    }

    /// The connection itself, for what only SQLite has (pragmas).
    pub fn connection(&self) -> &Connection {
        &self.conn
    }
}

impl rusqlite::ToSql for Value<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match *self {
            Value::Int(Some(v)) => ToSqlOutput::Borrowed(ValueRef::Integer(v)),
            Value::Text(Some(s)) => ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())),
            Value::Int(None) | Value::Text(None) => ToSqlOutput::Borrowed(ValueRef::Null),
        })
    }
}

fn cell(value: ValueRef<'_>) -> Cell {
    match value {
        ValueRef::Null => Cell::Null,
        ValueRef::Integer(v) => Cell::Int(v),
        // Never written by the balancer; read as the nearest integer.
        ValueRef::Real(v) => Cell::Int(v as i64),
        ValueRef::Text(t) | ValueRef::Blob(t) => Cell::Text(String::from_utf8_lossy(t).into()),
    }
}

impl Db for SqliteDb {
    fn dialect(&self) -> Dialect {
        Dialect::Sqlite
    }

    fn execute(&mut self, sql: &str, args: &[Value<'_>]) -> Result<u64, DbError> {
        let mut stmt = self.conn.prepare_cached(sql)?;
        Ok(stmt.execute(rusqlite::params_from_iter(args))? as u64)
    }

    fn query(&mut self, sql: &str, args: &[Value<'_>]) -> Result<Vec<Row>, DbError> {
        let mut stmt = self.conn.prepare_cached(sql)?;
        let columns = stmt.column_count();
        let mut rows = stmt.query(rusqlite::params_from_iter(args))?;
        let mut all = Vec::new();
        while let Some(row) = rows.next()? {
            let cells = (0..columns)
                .map(|i| row.get_ref(i).map(cell))
                .collect::<rusqlite::Result<Vec<_>>>()?;
            all.push(Row(cells));
        }
        Ok(all)
    }

    fn batch(&mut self, sql: &str) -> Result<(), DbError> {
        Ok(self.conn.execute_batch(sql)?)
    }

    fn is_broken(&self) -> bool {
        false
    }
}

/// Prepared statements a connection keeps: the writer's inserts, each in
/// every size of `statement_size`, and the queries, with room to spare.
const STATEMENT_CACHE: usize = 128;

/// Opens the file for writing, creating or upgrading its schema (in a
/// write transaction: another process may be upgrading it at the same
/// time; `PRAGMA user_version` holds the version).
pub fn open_writer(path: &Path, schema: &Schema) -> Result<Box<dyn Db>, StateError> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    let mut db = SqliteDb::new(conn);
    // The first read of the file: a file that is not SQLite fails here.
    let version: i64 = db
        .conn
        .pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version != schema.version {
        db.batch("BEGIN IMMEDIATE")?;
        let upgraded = (schema.upgrade)(&mut db, &path.display().to_string());
        let ended = db.batch(if upgraded.is_ok() {
            "COMMIT"
        } else {
            "ROLLBACK"
        });
        upgraded?;
        ended?;
    }
    let mode: String = db
        .conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        log::warn!(
            "state file {}: journal mode is {mode}, not WAL; queries may wait for the writer",
            path.display()
        );
    }
    db.conn.pragma_update(None, "synchronous", "NORMAL")?;
    Ok(Box::new(db))
}

/// Opens the file read-only, for queries.
pub fn open_reader(path: &Path) -> Result<SqliteDb, DbError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    Ok(SqliteDb::new(conn))
}
