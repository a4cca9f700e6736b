//! The shared store: a PostgreSQL database (`--state
//! postgres://USER@HOST[:PORT]/DB`) that every balancer of a service
//! uses. Connections are plain TCP (`NoTls`: the database is expected on
//! the same host or a private network), with a connect timeout, TCP
//! keepalives, a user timeout that ends a connection whose peer vanished,
//! and a statement timeout, so that no balancer thread waits on the
//! database for ever.
//!
//! The password comes from the URL, else `--state-password-file`, else
//! `PGPASSWORD`; it is never part of what `Target` displays.

use super::{Cell, Db, DbError, Dialect, Row, Schema, StateError, Value};
use postgres::types::{IsNull, ToSql, Type};
use postgres::{Client, NoTls, Statement};
use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::time::Duration;

/// How long connecting (TCP and the login) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection whose peer stops acknowledging for this long is closed.
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest a statement may run (a catalog listing of millions of entries
/// takes seconds; more means the database is stuck).
const STATEMENT_TIMEOUT_MS: u32 = 120_000;
/// The usual port of PostgreSQL.
const DEFAULT_PORT: u16 = 5432;

/// Whether `--state` names a database rather than a file.
pub fn is_url(text: &str) -> bool {
    text.starts_with("postgres://") || text.starts_with("postgresql://")
}

/// A PostgreSQL database: where it is, and how to log in.
#[derive(Clone, PartialEq, Eq)]
pub struct Target {
    pub user: String,
    pub host: String,
    pub port: u16,
    pub dbname: String,
    password: Option<String>,
}

impl Target {
    /// Reads `postgres://USER[:PASSWORD]@HOST[:PORT]/DB` (user, password
    /// and name may be percent-encoded).
    pub fn parse(url: &str) -> Result<Target, LocationError> {
        let bad = |why: &str| LocationError::Url {
            url: redacted(url),
            why: why.to_string(),
        };
        let rest = url
            .split_once("://")
            .map(|(_, rest)| rest)
            .ok_or_else(|| bad("not a URL"))?;
        if rest.contains('?') {
            return Err(bad("takes no ?options; the balancer sets its own timeouts"));
        }
        let (login, place) = rest
            .rsplit_once('@')
            .ok_or_else(|| bad("say the user: postgres://USER@HOST[:PORT]/DB"))?;
        let (user, password) = match login.split_once(':') {
            Some((user, password)) => (user, Some(decode(password).map_err(|e| bad(&e))?)),
            None => (login, None),
        };
        let (address, dbname) = place
            .split_once('/')
            .ok_or_else(|| bad("say the database: postgres://USER@HOST[:PORT]/DB"))?;
        let (host, port) = split_host_port(address).map_err(|e| bad(&e))?;
        let target = Target {
            user: decode(user).map_err(|e| bad(&e))?,
            host,
            port,
            dbname: decode(dbname).map_err(|e| bad(&e))?,
            password,
        };
        if target.user.is_empty() || target.host.is_empty() || target.dbname.is_empty() {
            return Err(bad("user, host and database must not be empty"));
        }
        Ok(target)
    }

    /// With the password of the URL, else of `file` (its first line), else
    /// of `env` (`PGPASSWORD`).
    pub fn with_password(
        mut self,
        file: Option<&Path>,
        env: Option<String>,
    ) -> Result<Target, LocationError> {
        if self.password.is_none() {
            self.password = match file {
                Some(path) => Some(read_password_file(path)?),
                None => env.filter(|p| !p.is_empty()),
            };
        }
        Ok(self)
    }

    fn config(&self) -> postgres::Config {
        let mut config = postgres::Config::new();
        config
            .user(&self.user)
            .host(&self.host)
            .port(self.port)
            .dbname(&self.dbname)
            .application_name("lbft balancer")
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_user_timeout(TCP_USER_TIMEOUT)
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(30))
            .options(&format!("-c statement_timeout={STATEMENT_TIMEOUT_MS}"));
        if let Some(password) = &self.password {
            config.password(password);
        }
        config
    }

    /// A new connection.
    pub fn connect(&self) -> Result<PgDb, DbError> {
        let client = self
            .config()
            .connect(NoTls)
            .map_err(|source| DbError::Connect {
                target: self.address(),
                source,
            })?;
        Ok(PgDb {
            client,
            statements: HashMap::new(),
        })
    }

    /// A connection that writes, the schema created or brought up to date
    /// first: one balancer at a time (an advisory lock), so that two
    /// starting together do not both create it.
    pub fn open_writer(&self, schema: &Schema) -> Result<Box<dyn Db>, StateError> {
        let mut db = self.connect()?;
        super::in_transaction(&mut db, |db| {
            db.query("SELECT pg_advisory_xact_lock(7264150)", &[])?;
            (schema.upgrade)(db, &self.to_string())
        })?;
        // The writer's commits are the clients' acknowledgements (with a
        // shared state a client hears `stored` once its transfer is
        // committed): they need to be in the server, not on its disk. A
        // balancer that dies loses nothing committed; the database server
        // crashing may lose its last fraction of a second, as its
        // `wal_writer_delay` says.
        db.batch("SET synchronous_commit TO off")?;
        Ok(Box::new(db))
    }

    /// `HOST:PORT`, as errors name it.
    pub fn address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// The URL as it may be shown: without its password.
impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "postgres://{}@{}/{}",
            self.user,
            self.address(),
            self.dbname
        )
    }
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// `url` with any password replaced, for error messages.
fn redacted(url: &str) -> String {
    match (url.split_once("://"), url.rsplit_once('@')) {
        (Some((scheme, rest)), Some((_, place))) => {
            let user = rest.split(['@', ':']).next().unwrap_or_default();
            format!("{scheme}://{user}@{place}")
        }
        _ => url.to_string(),
    }
}

fn split_host_port(address: &str) -> Result<(String, u16), String> {
    let (host, port) = if let Some(rest) = address.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or("an unclosed [ in the host")?;
        (host, after.strip_prefix(':'))
    } else {
        match address.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (address, None),
        }
    };
    let port = match port {
        Some(p) => p.parse().map_err(|_| format!("{p:?} is not a port"))?,
        None => DEFAULT_PORT,
    };
    Ok((host.to_string(), port))
}

/// Undoes percent-encoding (`%40` is `@`).
fn decode(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text
                .get(i + 1..i + 3)
                .ok_or("a % not followed by two hex digits")?;
            out.push(
                u8::from_str_radix(hex, 16).map_err(|_| "a % not followed by two hex digits")?,
            );
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "percent-encoding that is not UTF-8".into())
}

fn read_password_file(path: &Path) -> Result<String, LocationError> {
    let text = std::fs::read_to_string(path).map_err(|source| LocationError::PasswordFile {
        path: path.to_path_buf(),
        source,
    })?;
    let line = text.lines().next().unwrap_or_default().to_string();
    if line.is_empty() {
        return Err(LocationError::EmptyPasswordFile(path.to_path_buf()));
    }
    Ok(line)
}

/// Why `--state` (or its password) cannot be used; never shows a
/// password.
#[derive(Debug)]
pub enum LocationError {
    /// Not a URL the balancer reads: the URL without its password, and why.
    Url {
        url: String,
        why: String,
    },
    PasswordFile {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    EmptyPasswordFile(std::path::PathBuf),
    /// `--state-password-file` with a state file, which has no password.
    PasswordForFile,
}

impl fmt::Display for LocationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LocationError::Url { url, why } => write!(f, "--state {url}: {why}"),
            LocationError::PasswordFile { path, source } => {
                write!(
                    f,
                    "cannot read --state-password-file {}: {source}",
                    path.display()
                )
            }
            LocationError::EmptyPasswordFile(path) => {
                write!(f, "--state-password-file {} is empty", path.display())
            }
            LocationError::PasswordForFile => f.write_str(
                "--state-password-file goes with --state postgres://...: a state file needs \
                 no password",
            ),
        }
    }
}

impl std::error::Error for LocationError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            LocationError::PasswordFile { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// A connection to the shared database, with its prepared statements.
pub struct PgDb {
    client: Client,
    /// By the SQL as the balancer writes it (`?N`).
    statements: HashMap<String, Statement>,
}

impl PgDb {
    fn prepare(&mut self, sql: &str) -> Result<Statement, DbError> {
        if let Some(stmt) = self.statements.get(sql) {
            return Ok(stmt.clone());
        }
        let stmt = self.client.prepare(&numbered(sql))?;
        self.statements.insert(sql.to_string(), stmt.clone());
        Ok(stmt)
    }
}

/// `?N` parameters written as PostgreSQL's `$N` (outside quotes).
fn numbered(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut quoted = false;
    for c in sql.chars() {
        match c {
            '\'' => {
                quoted = !quoted;
                out.push(c);
            }
            '?' if !quoted => out.push('$'),
            _ => out.push(c),
        }
    }
    out
}

/// A parameter as PostgreSQL takes it. Text may not hold NUL there: a
/// title or name with one is stored with U+FFFD in its place rather than
/// failing the whole batch it is in.
#[derive(Debug)]
enum Param {
    Int(Option<i64>),
    Text(Option<String>),
}

impl Param {
    fn of(value: &Value<'_>) -> Param {
        match *value {
            Value::Int(v) => Param::Int(v),
            Value::Text(t) => Param::Text(t.map(|s| s.replace('\0', "\u{FFFD}"))),
        }
    }
}

impl ToSql for Param {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            Param::Int(None) | Param::Text(None) => Ok(IsNull::Yes),
            Param::Int(Some(v)) if *ty == Type::INT4 => i32::try_from(*v)?.to_sql(ty, out),
            Param::Int(Some(v)) if *ty == Type::INT2 => i16::try_from(*v)?.to_sql(ty, out),
            Param::Int(Some(v)) if *ty == Type::BOOL => (*v != 0).to_sql(ty, out),
            Param::Int(Some(v)) => v.to_sql(ty, out),
            Param::Text(Some(s)) => s.as_str().to_sql(ty, out),
        }
    }

    fn accepts(ty: &Type) -> bool {
        <i64 as ToSql>::accepts(ty)
            || <i32 as ToSql>::accepts(ty)
            || <i16 as ToSql>::accepts(ty)
            || <bool as ToSql>::accepts(ty)
            || <&str as ToSql>::accepts(ty)
    }

    postgres::types::to_sql_checked!();
}

fn cell(row: &postgres::Row, i: usize) -> Result<Cell, DbError> {
    let ty = row.columns()[i].type_();
    let cell = if *ty == Type::INT8 {
        row.try_get::<_, Option<i64>>(i)?.map(Cell::Int)
    } else if *ty == Type::INT4 {
        row.try_get::<_, Option<i32>>(i)?
            .map(|v| Cell::Int(v.into()))
    } else if *ty == Type::INT2 {
        row.try_get::<_, Option<i16>>(i)?
            .map(|v| Cell::Int(v.into()))
    } else if *ty == Type::BOOL {
        row.try_get::<_, Option<bool>>(i)?
            .map(|v| Cell::Int(v.into()))
    } else if <&str as postgres::types::FromSql>::accepts(ty) {
        row.try_get::<_, Option<String>>(i)?.map(Cell::Text)
    } else {
        // `SELECT pg_advisory_xact_lock(...)` and the like: nothing to read.
        return Ok(Cell::Null);
    };
    Ok(cell.unwrap_or(Cell::Null))
}

impl Db for PgDb {
    fn dialect(&self) -> Dialect {
        Dialect::Postgres
    }

    fn execute(&mut self, sql: &str, args: &[Value<'_>]) -> Result<u64, DbError> {
        let stmt = self.prepare(sql)?;
        let params: Vec<Param> = args.iter().map(Param::of).collect();
        let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p as _).collect();
        Ok(self.client.execute(&stmt, &refs)?)
    }

    fn query(&mut self, sql: &str, args: &[Value<'_>]) -> Result<Vec<Row>, DbError> {
        let stmt = self.prepare(sql)?;
        let params: Vec<Param> = args.iter().map(Param::of).collect();
        let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p as _).collect();
        let rows = self.client.query(&stmt, &refs)?;
        rows.iter()
            .map(|row| {
                (0..row.len())
                    .map(|i| cell(row, i))
                    .collect::<Result<_, _>>()
                    .map(Row)
            })
            .collect()
    }

    fn batch(&mut self, sql: &str) -> Result<(), DbError> {
        Ok(self.client.batch_execute(sql)?)
    }

    fn is_broken(&self) -> bool {
        self.client.is_closed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_read_and_shown_without_their_password() {
        let t = Target::parse("postgres://ann:s%40cret@db.example:6543/lbft").unwrap();
        assert_eq!(
            (t.user.as_str(), t.host.as_str(), t.port, t.dbname.as_str()),
            ("ann", "db.example", 6543, "lbft")
        );
        assert_eq!(t.password.as_deref(), Some("s@cret"));
        assert_eq!(t.to_string(), "postgres://ann@db.example:6543/lbft");
        assert!(!format!("{t:?}").contains("cret"));
        let t = Target::parse("postgresql://bob@127.0.0.1/x").unwrap();
        assert_eq!(t.port, 5432);
        let t = t.with_password(None, Some("from env".into())).unwrap();
        assert_eq!(t.password.as_deref(), Some("from env"));
        let t = Target::parse("postgres://bob@[::1]:7/x").unwrap();
        assert_eq!(t.address(), "[::1]:7");
        for bad in [
            "postgres://host/db",
            "postgres://u@host",
            "postgres://u@host:port/db",
            "postgres://u:pw@h/db?sslmode=disable",
        ] {
            let e = Target::parse(bad).unwrap_err().to_string();
            assert!(!e.contains("pw@"), "{e}");
        }
    }

    #[test]
    fn parameters_are_numbered_outside_quotes() {
        assert_eq!(
            numbered("SELECT '?' , ?1 WHERE a = ?12"),
            "SELECT '?' , $1 WHERE a = $12"
        );
    }
}
