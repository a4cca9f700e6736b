//! The tables of the state, for both stores side by side: SQLite grew
//! them schema by schema (`PRAGMA user_version` says which; a file of an
//! older schema is brought up to date when opened), PostgreSQL starts at
//! schema 5 (table `lbft_schema` says which).
//!
//! Schema 2 added the users and the user who sent each transfer, 3 the
//! lock of a user after too many failed logins, 4 the catalog (its SQL is
//! `catalog`'s), 5 the balancer that took each transfer, who changed the
//! pool last and when (so balancers sharing the state follow each other's
//! changes), drained servers told from removed ones, and the leases of
//! node ids (`nodes`).

use crate::balancer::catalog;
use crate::balancer::store::{sql_args, Db, Dialect, Schema, StateError};

/// The version of the tables below.
pub const SCHEMA_VERSION: i64 = 5;

/// What `Location::open_writer` makes sure of.
pub const TABLES: Schema = Schema {
    version: SCHEMA_VERSION,
    upgrade,
};

pub const SQLITE_V1: &str = "
CREATE TABLE transfers (
    number      INTEGER PRIMARY KEY,
    client      TEXT NOT NULL,
    title       TEXT NOT NULL,
    size        INTEGER NOT NULL,
    servers     TEXT NOT NULL DEFAULT '[]',
    state       TEXT NOT NULL,
    server      TEXT,
    file        TEXT,
    started_ms  INTEGER NOT NULL,
    ended_ms    INTEGER,
    duration_ms INTEGER,
    last_error  TEXT
);
CREATE INDEX transfers_by_start ON transfers (started_ms);
CREATE TABLE servers (
    address  TEXT PRIMARY KEY,
    added_ms INTEGER NOT NULL,
    state    TEXT NOT NULL
);
";

/// From schema 1 to 2: who sent each transfer (`NULL` for those from
/// before, or sent without `--users`), and the users.
pub const MIGRATE_TO_2: &str = "
ALTER TABLE transfers ADD COLUMN user TEXT;
CREATE TABLE users (
    name       TEXT PRIMARY KEY,
    hash       TEXT NOT NULL,
    admin      INTEGER NOT NULL DEFAULT 0,
    created_ms INTEGER NOT NULL
);
";

/// From schema 2 to 3: until when a user is locked (Unix milliseconds;
/// `NULL` when not), after too many failed logins in a row.
pub const MIGRATE_TO_3: &str = "
ALTER TABLE users ADD COLUMN locked_until_ms INTEGER;
";

/// From schema 4 to 5 (see the module comment).
pub const MIGRATE_TO_5: &str = "
ALTER TABLE transfers ADD COLUMN balancer TEXT;
ALTER TABLE servers ADD COLUMN changed_ms INTEGER NOT NULL DEFAULT 0;
ALTER TABLE servers ADD COLUMN changed_by TEXT NOT NULL DEFAULT '';
CREATE TABLE nodes (
    node     INTEGER PRIMARY KEY,
    holder   TEXT NOT NULL,
    until_ms INTEGER NOT NULL
);
";

/// The upgrades of a SQLite file, in order: `SQLITE_MIGRATIONS[i]` brings
/// schema `i + 1` to `i + 2`.
const SQLITE_MIGRATIONS: [&str; SCHEMA_VERSION as usize - 1] = [
    MIGRATE_TO_2,
    MIGRATE_TO_3,
    catalog::SQLITE_MIGRATION,
    MIGRATE_TO_5,
];

/// Schema 5 in PostgreSQL: the same tables and columns as a SQLite file of
/// schema 5 (integers are `BIGINT`; `"user"` is quoted, a keyword there).
pub const POSTGRES_V5: &str = "
CREATE TABLE lbft_schema (version BIGINT NOT NULL);
CREATE TABLE transfers (
    number      BIGINT PRIMARY KEY,
    client      TEXT NOT NULL,
    title       TEXT NOT NULL,
    size        BIGINT NOT NULL,
    servers     TEXT NOT NULL DEFAULT '[]',
    state       TEXT NOT NULL,
    server      TEXT,
    file        TEXT,
    started_ms  BIGINT NOT NULL,
    ended_ms    BIGINT,
    duration_ms BIGINT,
    last_error  TEXT,
    \"user\"    TEXT,
    balancer    TEXT
);
CREATE INDEX transfers_by_start ON transfers (started_ms);
CREATE TABLE servers (
    address    TEXT PRIMARY KEY,
    added_ms   BIGINT NOT NULL,
    state      TEXT NOT NULL,
    changed_ms BIGINT NOT NULL DEFAULT 0,
    changed_by TEXT NOT NULL DEFAULT ''
);
CREATE TABLE users (
    name            TEXT PRIMARY KEY,
    hash            TEXT NOT NULL,
    admin           BIGINT NOT NULL DEFAULT 0,
    created_ms      BIGINT NOT NULL,
    locked_until_ms BIGINT
);
CREATE TABLE nodes (
    node     BIGINT PRIMARY KEY,
    holder   TEXT NOT NULL,
    until_ms BIGINT NOT NULL
);
";

/// Tables of ours: a database that has one of them but no schema version
/// is someone else's.
const OUR_TABLES: [&str; 5] = ["transfers", "servers", "users", "entries", "nodes"];

/// Creates or upgrades the tables, in the caller's transaction.
fn upgrade(db: &mut dyn Db, name: &str) -> Result<(), StateError> {
    match db.dialect() {
        Dialect::Sqlite => upgrade_sqlite(db, name),
        Dialect::Postgres => upgrade_postgres(db, name),
    }
}

fn upgrade_sqlite(db: &mut dyn Db, name: &str) -> Result<(), StateError> {
    let version = db.query_one("PRAGMA user_version", &[])?.i64(0)?;
    let tables = db
        .query_one(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table'",
            &[],
        )?
        .i64(0)?;
    let from = match version {
        0 if tables > 0 => return Err(StateError::Foreign),
        0 => {
            db.batch(SQLITE_V1)?;
            1
        }
        SCHEMA_VERSION => return Ok(()),
        found if found > SCHEMA_VERSION => return Err(newer(found)),
        found if found < 0 => return Err(StateError::Foreign),
        found => found,
    };
    for migration in &SQLITE_MIGRATIONS[from as usize - 1..] {
        db.batch(migration)?;
    }
    db.batch(&format!("PRAGMA user_version = {SCHEMA_VERSION}"))?;
    if version > 0 {
        log::info!("state file {name}: upgraded from schema {version} to {SCHEMA_VERSION}");
    }
    Ok(())
}

fn upgrade_postgres(db: &mut dyn Db, name: &str) -> Result<(), StateError> {
    let tables: Vec<String> = db
        .query(
            "SELECT table_name::text FROM information_schema.tables
             WHERE table_schema = current_schema()",
            &[],
        )?
        .iter()
        .map(|row| row.text(0))
        .collect::<Result<_, _>>()?;
    if !tables.iter().any(|t| t == "lbft_schema") {
        if tables.iter().any(|t| OUR_TABLES.contains(&t.as_str())) {
            return Err(StateError::Foreign);
        }
        db.batch(POSTGRES_V5)?;
        db.batch(catalog::POSTGRES_SCHEMA)?;
        db.execute(
            "INSERT INTO lbft_schema (version) VALUES (?1)",
            sql_args![SCHEMA_VERSION],
        )?;
        log::info!("{name}: created the tables (schema {SCHEMA_VERSION})");
        return Ok(());
    }
    let version = db
        .query_opt("SELECT max(version) FROM lbft_schema", &[])?
        .map(|row| row.opt_i64(0))
        .transpose()?
        .flatten()
        .ok_or(StateError::Foreign)?;
    match version {
        SCHEMA_VERSION => Ok(()),
        found if found > SCHEMA_VERSION => Err(newer(found)),
        // Schema 5 is the first PostgreSQL has had.
        _ => Err(StateError::Foreign),
    }
}

fn newer(found: i64) -> StateError {
    StateError::NewerSchema {
        found,
        known: SCHEMA_VERSION,
    }
}
