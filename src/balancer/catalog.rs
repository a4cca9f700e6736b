//! The catalog: every file and document the servers hold, by the name its
//! user gave it, with its owner, size, checksum and the copies that hold
//! it (server and name in the server's folder). It lives in the state file
//! beside the transfers, and this module is the only place that knows its
//! SQL: the tracker's writer thread runs `apply` for changes, and queries
//! run on read connections.
//!
//! - A file is recorded when a server confirms it stored the bytes (the
//!   relay's `file_stored`, a redirected upload's signed `transfer_event`);
//!   a document when the tracker records it stored. A file name is one
//!   entry per owner: a newer file of that name takes the entry, and the
//!   copies of the older one become `removals`, in the same transaction.
//!   Only once that is committed are they removed from their servers, so a
//!   crash in between leaves the old bytes (listed nowhere, removed once
//!   the removal is retried), never neither.
//! - `partials` remembers which server holds the bytes of an upload under
//!   way, so that running the same `send` again resumes there.
//! - Servers are the source of truth for bytes: `sync` replaces what the
//!   catalog says of one server with that server's own listing (see
//!   `catalog::sync` for when).

pub mod sync;

use crate::proto::{EntryKind, FileEntry};
use rusqlite::{params, Connection, OptionalExtension, Transaction};
use std::collections::{HashMap, HashSet};

/// Schema 4: the catalog (see the module comment).
pub const MIGRATION: &str = "
CREATE TABLE entries (
    id        INTEGER PRIMARY KEY,
    kind      TEXT NOT NULL,
    owner     TEXT NOT NULL DEFAULT '',
    name      TEXT NOT NULL,
    size      INTEGER NOT NULL,
    sha256    TEXT,
    number    INTEGER,
    stored_ms INTEGER NOT NULL
);
CREATE UNIQUE INDEX entries_by_name ON entries (owner, name) WHERE kind = 'file';
CREATE INDEX entries_files_listed ON entries (name, id) WHERE kind = 'file';
CREATE UNIQUE INDEX entries_by_number ON entries (number) WHERE kind = 'document';
CREATE TABLE copies (
    server    TEXT NOT NULL,
    file      TEXT NOT NULL,
    entry     INTEGER NOT NULL,
    kind      TEXT NOT NULL,
    upload_id TEXT,
    PRIMARY KEY (server, file)
) WITHOUT ROWID;
CREATE INDEX copies_by_entry ON copies (entry);
CREATE INDEX copies_by_upload ON copies (upload_id) WHERE upload_id IS NOT NULL;
CREATE TABLE removals (
    id        INTEGER PRIMARY KEY,
    server    TEXT NOT NULL,
    file      TEXT,
    upload_id TEXT,
    owner     TEXT NOT NULL DEFAULT '',
    since_ms  INTEGER NOT NULL
);
CREATE INDEX removals_by_copy ON removals (server, file);
CREATE TABLE partials (
    upload_id  TEXT NOT NULL,
    server     TEXT NOT NULL,
    owner      TEXT NOT NULL DEFAULT '',
    name       TEXT NOT NULL,
    size       INTEGER NOT NULL,
    touched_ms INTEGER NOT NULL,
    PRIMARY KEY (upload_id, server)
);
CREATE TABLE catalog_servers (
    server    TEXT PRIMARY KEY,
    synced_ms INTEGER NOT NULL
);
";

/// How long the catalog remembers where an upload's partial bytes are:
/// past this nobody is expected to resume it (servers sweep theirs after
/// `--partial-ttl`, 24 h by default).
pub const PARTIAL_MEMORY_MS: u64 = 7 * 24 * 3600 * 1000;

/// `None` (no users) is stored as the empty owner.
fn owner_key(owner: Option<&str>) -> &str {
    owner.unwrap_or("")
}

fn owner_of(stored: String) -> Option<String> {
    (!stored.is_empty()).then_some(stored)
}

/// A file a server confirmed it stored.
#[derive(Debug, Clone, PartialEq)]
pub struct FileRecord {
    pub owner: Option<String>,
    /// The name its user sent.
    pub name: String,
    pub size: u64,
    pub sha256: String,
    pub upload_id: String,
    pub server: String,
    /// Its name in the server's folder.
    pub file: String,
    pub stored_ms: u64,
}

/// One copy of an entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copy {
    pub server: String,
    pub file: String,
    pub upload_id: Option<String>,
}

/// A file or document as the catalog has it.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub id: i64,
    pub kind: EntryKind,
    pub owner: Option<String>,
    /// A file: the name its user sent. A document: its title.
    pub name: String,
    pub size: u64,
    pub sha256: Option<String>,
    /// A document's request number.
    pub number: Option<u64>,
    pub stored_ms: u64,
    pub copies: Vec<Copy>,
}

impl Entry {
    /// As a listing shows it, from `copy` (one of its copies).
    pub fn listed(&self, copy: &Copy, available: bool) -> FileEntry {
        FileEntry {
            owner: self.owner.clone(),
            kind: self.kind,
            number: self.number,
            file: if copy.file == self.name {
                String::new()
            } else {
                copy.file.clone()
            },
            available,
            ..FileEntry::file(
                &self.name,
                self.size,
                self.sha256.as_deref().unwrap_or_default(),
                &copy.server,
                self.stored_ms,
            )
        }
    }
}

/// Bytes a server is to remove: a copy nobody's entry points at any more
/// (`file`, written by `upload_id`), or with no file, the partial upload
/// `upload_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removal {
    pub id: i64,
    pub server: String,
    pub file: Option<String>,
    pub upload_id: Option<String>,
    pub owner: Option<String>,
}

/// A transfer that a catalog change records in `transfers` too.
#[derive(Debug, Clone, PartialEq)]
pub struct Recorded {
    pub number: u64,
    pub client: String,
    pub user: Option<String>,
}

/// A change to the catalog, made by the tracker's writer in its own
/// transaction.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// A server stored a file: it takes the entry of its name (and the
    /// transfer `number`, if any, is stored).
    FileStored {
        number: Option<u64>,
        record: FileRecord,
    },
    /// An upload's bytes are going to `server`.
    UploadStarted {
        upload_id: String,
        server: String,
        owner: Option<String>,
        name: String,
        size: u64,
    },
    /// A user deleted an entry: its copies become removals, and the delete
    /// is recorded as a transfer.
    Delete { entry: i64, transfer: Recorded },
    /// A removal was carried out (or found needless).
    RemovalDone(i64),
    /// What `server` holds of `kind`, from its own listing: the catalog's
    /// copies on it become exactly these.
    Sync {
        server: String,
        kind: EntryKind,
        listing: Vec<FileEntry>,
    },
}

/// What a change leaves to do: removals to carry out now.
pub type Outcome = Vec<Removal>;

/// Carries out `change` in the writer's transaction.
pub fn apply(tx: &Transaction<'_>, at_ms: u64, change: Change) -> rusqlite::Result<Outcome> {
    match change {
        Change::FileStored { number, record } => file_stored(tx, at_ms, number, &record),
        Change::UploadStarted {
            upload_id,
            server,
            owner,
            name,
            size,
        } => {
            tx.prepare_cached(
                "INSERT INTO partials (upload_id, server, owner, name, size, touched_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (upload_id, server) DO UPDATE SET touched_ms = excluded.touched_ms",
            )?
            .execute(params![
                upload_id,
                server,
                owner_key(owner.as_deref()),
                name,
                size as i64,
                at_ms as i64
            ])?;
            // Nobody resumes these any more.
            tx.prepare_cached("DELETE FROM partials WHERE touched_ms < ?1")?
                .execute(params![at_ms.saturating_sub(PARTIAL_MEMORY_MS) as i64])?;
            Ok(Vec::new())
        }
        Change::Delete { entry, transfer } => delete(tx, at_ms, entry, &transfer),
        Change::RemovalDone(id) => {
            tx.prepare_cached("DELETE FROM removals WHERE id = ?1")?
                .execute(params![id])?;
            Ok(Vec::new())
        }
        Change::Sync {
            server,
            kind,
            listing,
        } => sync_server(tx, at_ms, &server, kind, listing),
    }
}

fn add_removal(
    tx: &Transaction<'_>,
    at_ms: u64,
    server: &str,
    file: Option<&str>,
    upload_id: Option<&str>,
    owner: &str,
) -> rusqlite::Result<Removal> {
    tx.prepare_cached(
        "INSERT INTO removals (server, file, upload_id, owner, since_ms)
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![server, file, upload_id, owner, at_ms as i64])?;
    Ok(Removal {
        id: tx.last_insert_rowid(),
        server: server.to_string(),
        file: file.map(str::to_owned),
        upload_id: upload_id.map(str::to_owned),
        owner: owner_of(owner.to_string()),
    })
}

/// Drops copy `file` of `server` (whatever entry it was of), and that
/// entry once it has no copy left: its bytes are gone.
fn drop_copy(tx: &Transaction<'_>, server: &str, file: &str) -> rusqlite::Result<()> {
    let entry: Option<i64> = tx
        .prepare_cached("DELETE FROM copies WHERE server = ?1 AND file = ?2 RETURNING entry")?
        .query_row(params![server, file], |r| r.get(0))
        .optional()?;
    if let Some(entry) = entry {
        tx.prepare_cached(
            "DELETE FROM entries WHERE id = ?1
                 AND NOT EXISTS (SELECT 1 FROM copies WHERE entry = ?1)",
        )?
        .execute(params![entry])?;
    }
    Ok(())
}

fn add_copy(
    tx: &Transaction<'_>,
    entry: i64,
    kind: EntryKind,
    server: &str,
    file: &str,
    upload_id: Option<&str>,
) -> rusqlite::Result<()> {
    // The name on that server was another entry's: those bytes are gone
    // (a new file can take a name only once the old one was removed).
    let other: Option<i64> = tx
        .prepare_cached("SELECT entry FROM copies WHERE server = ?1 AND file = ?2")?
        .query_row(params![server, file], |r| r.get(0))
        .optional()?;
    if other.is_some_and(|e| e != entry) {
        drop_copy(tx, server, file)?;
    }
    tx.prepare_cached(
        "INSERT INTO copies (entry, kind, server, file, upload_id) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (server, file) DO UPDATE SET upload_id = excluded.upload_id",
    )?
    .execute(params![entry, kind.as_str(), server, file, upload_id])?;
    // Wanted again (the same upload stored there once more): not removed.
    // (Documents are never removed.)
    if kind == EntryKind::File {
        tx.prepare_cached("DELETE FROM removals WHERE server = ?1 AND file = ?2")?
            .execute(params![server, file])?;
    }
    Ok(())
}

/// Whether `file` on `server` is a copy the catalog points at.
pub fn is_copy(conn: &Connection, server: &str, file: &str) -> rusqlite::Result<bool> {
    conn.prepare_cached("SELECT 1 FROM copies WHERE server = ?1 AND file = ?2")?
        .query_row(params![server, file], |_| Ok(()))
        .optional()
        .map(|found| found.is_some())
}

/// The copies of `entry`.
fn copies_of(conn: &Connection, entry: i64) -> rusqlite::Result<Vec<Copy>> {
    let mut stmt = conn.prepare_cached(
        "SELECT server, file, upload_id FROM copies WHERE entry = ?1 ORDER BY server",
    )?;
    let rows = stmt.query_map(params![entry], |r| {
        Ok(Copy {
            server: r.get(0)?,
            file: r.get(1)?,
            upload_id: r.get(2)?,
        })
    })?;
    rows.collect()
}

/// The file entry `name` of `owner`: its id and time.
fn file_entry(
    tx: &Transaction<'_>,
    owner: &str,
    name: &str,
) -> rusqlite::Result<Option<(i64, u64)>> {
    tx.prepare_cached(
        "SELECT id, stored_ms FROM entries WHERE kind = 'file' AND owner = ?1 AND name = ?2",
    )?
    .query_row(params![owner, name], |r| {
        Ok((r.get(0)?, r.get::<_, i64>(1)?.max(0) as u64))
    })
    .optional()
}

fn file_stored(
    tx: &Transaction<'_>,
    at_ms: u64,
    number: Option<u64>,
    rec: &FileRecord,
) -> rusqlite::Result<Outcome> {
    let owner = owner_key(rec.owner.as_deref());
    let mut removals = Vec::new();
    let entry = match file_entry(tx, owner, &rec.name)? {
        Some((id, _)) => {
            for old in copies_of(tx, id)? {
                if old.server == rec.server && old.file == rec.file {
                    continue;
                }
                // The older file's bytes go once this commits.
                tx.prepare_cached("DELETE FROM copies WHERE server = ?1 AND file = ?2")?
                    .execute(params![old.server, old.file])?;
                removals.push(add_removal(
                    tx,
                    at_ms,
                    &old.server,
                    Some(&old.file),
                    old.upload_id.as_deref(),
                    owner,
                )?);
            }
            tx.prepare_cached(
                "UPDATE entries SET size = ?2, sha256 = ?3, stored_ms = ?4 WHERE id = ?1",
            )?
            .execute(params![
                id,
                rec.size as i64,
                rec.sha256,
                rec.stored_ms as i64
            ])?;
            id
        }
        None => {
            tx.prepare_cached(
                "INSERT INTO entries (kind, owner, name, size, sha256, stored_ms)
                 VALUES ('file', ?1, ?2, ?3, ?4, ?5)",
            )?
            .execute(params![
                owner,
                rec.name,
                rec.size as i64,
                rec.sha256,
                rec.stored_ms as i64
            ])?;
            tx.last_insert_rowid()
        }
    };
    add_copy(
        tx,
        entry,
        EntryKind::File,
        &rec.server,
        &rec.file,
        Some(&rec.upload_id),
    )?;
    // The bytes of this upload left on other servers (it moved on when one
    // went down) are nobody's now.
    let strays: Vec<String> = {
        let mut stmt =
            tx.prepare_cached("DELETE FROM partials WHERE upload_id = ?1 RETURNING server")?;
        let rows = stmt.query_map(params![rec.upload_id], |r| r.get(0))?;
        rows.collect::<rusqlite::Result<_>>()?
    };
    for server in strays.iter().filter(|s| **s != rec.server) {
        removals.push(add_removal(
            tx,
            at_ms,
            server,
            None,
            Some(&rec.upload_id),
            owner,
        )?);
    }
    if let Some(number) = number {
        tx.prepare_cached(
            "UPDATE transfers SET state = 'stored', server = ?2, file = ?3, ended_ms = ?4,
                 duration_ms = max(0, ?4 - started_ms)
             WHERE number = ?1",
        )?
        .execute(params![number as i64, rec.server, rec.file, at_ms as i64])?;
    }
    Ok(removals)
}

fn delete(
    tx: &Transaction<'_>,
    at_ms: u64,
    entry: i64,
    transfer: &Recorded,
) -> rusqlite::Result<Outcome> {
    let found = tx
        .prepare_cached("SELECT owner, name, size FROM entries WHERE id = ?1")?
        .query_row(params![entry], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })
        .optional()?;
    let Some((owner, name, size)) = found else {
        return Ok(Vec::new());
    };
    let copies = copies_of(tx, entry)?;
    let mut removals = Vec::new();
    for c in &copies {
        removals.push(add_removal(
            tx,
            at_ms,
            &c.server,
            Some(&c.file),
            c.upload_id.as_deref(),
            &owner,
        )?);
    }
    tx.prepare_cached("DELETE FROM copies WHERE entry = ?1")?
        .execute(params![entry])?;
    tx.prepare_cached("DELETE FROM entries WHERE id = ?1")?
        .execute(params![entry])?;
    let servers: Vec<&str> = copies.iter().map(|c| c.server.as_str()).collect();
    tx.prepare_cached(
        "INSERT INTO transfers (number, client, title, size, servers, state, server, file,
             started_ms, ended_ms, duration_ms, user)
         VALUES (?1, ?2, ?3, ?4, ?5, 'deleted', ?6, ?7, ?8, ?8, 0, ?9)
         ON CONFLICT (number) DO NOTHING",
    )?
    .execute(params![
        transfer.number as i64,
        transfer.client,
        name,
        size,
        serde_json::to_string(&servers).unwrap_or_else(|_| "[]".into()),
        copies.first().map(|c| c.server.as_str()),
        copies.first().map(|c| c.file.as_str()),
        at_ms as i64,
        transfer.user
    ])?;
    Ok(removals)
}

/// A document the tracker recorded stored: an entry for its request number
/// (its title, size and user come from its transfer row), with a copy on
/// `server` as `file`. Nothing when the transfer is not in the file (its
/// `received` event was dropped): the next sync finds the document.
pub fn document_stored(
    tx: &Transaction<'_>,
    number: u64,
    server: &str,
    file: &str,
    at_ms: u64,
) -> rusqlite::Result<()> {
    let transfer = tx
        .prepare_cached("SELECT coalesce(user, ''), title, size FROM transfers WHERE number = ?1")?
        .query_row(params![number as i64], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })
        .optional()?;
    if let Some((owner, title, size)) = transfer {
        let doc = NewDocument {
            number,
            owner: &owner,
            title: &title,
            size: size.max(0) as u64,
            server,
            file,
            at_ms,
        };
        new_document(tx, &doc)?;
    }
    Ok(())
}

/// A stored document, as the tracker knows it.
pub struct NewDocument<'a> {
    pub number: u64,
    /// Its user, or "" (no users).
    pub owner: &'a str,
    pub title: &'a str,
    pub size: u64,
    pub server: &'a str,
    pub file: &'a str,
    pub at_ms: u64,
}

/// Records a stored document (the hot path: a statement for its entry and
/// one for its copy, as a document is stored once, by number).
pub fn new_document(tx: &Transaction<'_>, doc: &NewDocument<'_>) -> rusqlite::Result<()> {
    let inserted: Option<i64> = tx
        .prepare_cached(
            "INSERT INTO entries (kind, owner, name, size, number, stored_ms)
             VALUES ('document', ?1, ?2, ?3, ?4, ?5)
             ON CONFLICT DO NOTHING RETURNING id",
        )?
        .query_row(
            params![
                doc.owner,
                doc.title,
                doc.size as i64,
                doc.number as i64,
                doc.at_ms as i64
            ],
            |r| r.get(0),
        )
        .optional()?;
    let entry = match inserted {
        Some(id) => id,
        None => tx
            .prepare_cached("SELECT id FROM entries WHERE kind = 'document' AND number = ?1")?
            .query_row(params![doc.number as i64], |r| r.get(0))?,
    };
    // A document's file name holds its number: the name is its own.
    tx.prepare_cached(
        "INSERT INTO copies (entry, kind, server, file) VALUES (?1, 'document', ?2, ?3)
         ON CONFLICT (server, file) DO UPDATE SET entry = excluded.entry",
    )?
    .execute(params![entry, doc.server, doc.file])?;
    Ok(())
}

/// What `sync_server` reads of a listing entry.
fn listed_owner(entry: &FileEntry) -> &str {
    owner_key(entry.owner.as_deref())
}

fn sync_server(
    tx: &Transaction<'_>,
    at_ms: u64,
    server: &str,
    kind: EntryKind,
    listing: Vec<FileEntry>,
) -> rusqlite::Result<Outcome> {
    // What the catalog says the server holds.
    let current: HashMap<String, (i64, Option<String>)> = {
        let mut stmt = tx.prepare_cached(
            "SELECT file, entry, upload_id FROM copies WHERE server = ?1 AND kind = ?2",
        )?;
        let rows = stmt.query_map(params![server, kind.as_str()], |r| {
            Ok((r.get::<_, String>(0)?, (r.get(1)?, r.get(2)?)))
        })?;
        rows.collect::<rusqlite::Result<_>>()?
    };
    // Bytes already doomed stay doomed: a listing taken before their
    // removal does not bring them back.
    let doomed: HashSet<(String, Option<String>)> = {
        let mut stmt = tx.prepare_cached(
            "SELECT file, upload_id FROM removals WHERE server = ?1 AND file IS NOT NULL",
        )?;
        let rows = stmt.query_map(params![server], |r| Ok((r.get(0)?, r.get(1)?)))?;
        rows.collect::<rusqlite::Result<_>>()?
    };
    let listing: Vec<FileEntry> = listing
        .into_iter()
        .filter(|e| e.kind == kind)
        .filter(|e| !doomed.contains(&(e.server_file().to_string(), e.upload_id.clone())))
        .collect();
    let listed: HashMap<&str, &FileEntry> = listing.iter().map(|e| (e.server_file(), e)).collect();
    for (file, (_, upload_id)) in &current {
        let still = listed
            .get(file.as_str())
            .is_some_and(|e| kind == EntryKind::Document || e.upload_id == *upload_id);
        if !still {
            drop_copy(tx, server, file)?;
        }
    }
    let mut removals = Vec::new();
    for item in &listing {
        let file = item.server_file();
        if current
            .get(file)
            .is_some_and(|(_, u)| kind == EntryKind::Document || *u == item.upload_id)
        {
            continue;
        }
        match kind {
            EntryKind::File => {
                let owner = listed_owner(item);
                match file_entry(tx, owner, &item.name)? {
                    None => {
                        tx.prepare_cached(
                            "INSERT INTO entries (kind, owner, name, size, sha256, stored_ms)
                             VALUES ('file', ?1, ?2, ?3, ?4, ?5)",
                        )?
                        .execute(params![
                            owner,
                            item.name,
                            item.size as i64,
                            item.sha256,
                            item.stored_ms as i64
                        ])?;
                        let id = tx.last_insert_rowid();
                        add_copy(tx, id, kind, server, file, item.upload_id.as_deref())?;
                    }
                    Some((id, stored_ms)) if item.stored_ms >= stored_ms => {
                        // Newest wins: the entry's other copies (an older
                        // file of that name) are removed.
                        let same_upload = |c: &Copy| c.upload_id == item.upload_id;
                        for old in copies_of(tx, id)? {
                            if same_upload(&old) {
                                continue;
                            }
                            tx.prepare_cached(
                                "DELETE FROM copies WHERE server = ?1 AND file = ?2",
                            )?
                            .execute(params![old.server, old.file])?;
                            removals.push(add_removal(
                                tx,
                                at_ms,
                                &old.server,
                                Some(&old.file),
                                old.upload_id.as_deref(),
                                owner,
                            )?);
                        }
                        tx.prepare_cached(
                            "UPDATE entries SET size = ?2, sha256 = ?3, stored_ms = ?4 WHERE id = ?1",
                        )?
                        .execute(params![
                            id,
                            item.size as i64,
                            item.sha256,
                            item.stored_ms as i64
                        ])?;
                        add_copy(tx, id, kind, server, file, item.upload_id.as_deref())?;
                    }
                    Some(_) => {
                        // An older file of a name a newer one holds: left
                        // over from a replacement cut short.
                        removals.push(add_removal(
                            tx,
                            at_ms,
                            server,
                            Some(file),
                            item.upload_id.as_deref(),
                            owner,
                        )?);
                    }
                }
            }
            EntryKind::Document => {
                let existing: Option<i64> = match item.number {
                    Some(n) => tx
                        .prepare_cached(
                            "SELECT id FROM entries WHERE kind = 'document' AND number = ?1",
                        )?
                        .query_row(params![n as i64], |r| r.get(0))
                        .optional()?,
                    None => None,
                };
                let id = match existing {
                    Some(id) => id,
                    None => {
                        // Servers do not know whose a document is: its
                        // transfer may still say.
                        let owner: String = match item.number {
                            Some(n) => tx
                                .prepare_cached(
                                    "SELECT coalesce(user, '') FROM transfers WHERE number = ?1",
                                )?
                                .query_row(params![n as i64], |r| r.get(0))
                                .optional()?
                                .unwrap_or_default(),
                            None => String::new(),
                        };
                        tx.prepare_cached(
                            "INSERT INTO entries (kind, owner, name, size, number, stored_ms)
                             VALUES ('document', ?1, ?2, ?3, ?4, ?5)",
                        )?
                        .execute(params![
                            owner,
                            item.name,
                            item.size as i64,
                            item.number.map(|n| n as i64),
                            item.stored_ms as i64
                        ])?;
                        tx.last_insert_rowid()
                    }
                };
                add_copy(tx, id, kind, server, file, None)?;
            }
        }
    }
    tx.prepare_cached(
        "INSERT INTO catalog_servers (server, synced_ms) VALUES (?1, ?2)
         ON CONFLICT (server) DO UPDATE SET synced_ms = excluded.synced_ms",
    )?
    .execute(params![server, at_ms as i64])?;
    Ok(removals)
}

fn entry_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Entry> {
    let kind: String = r.get(1)?;
    Ok(Entry {
        id: r.get(0)?,
        kind: if kind == "document" {
            EntryKind::Document
        } else {
            EntryKind::File
        },
        owner: owner_of(r.get(2)?),
        name: r.get(3)?,
        size: r.get::<_, i64>(4)?.max(0) as u64,
        sha256: r.get(5)?,
        number: r.get::<_, Option<i64>>(6)?.map(|n| n as u64),
        stored_ms: r.get::<_, i64>(7)?.max(0) as u64,
        copies: Vec::new(),
    })
}

const ENTRY_COLUMNS: &str = "id, kind, owner, name, size, sha256, number, stored_ms";

/// The file entries called `name`: `owner`'s only, or every owner's
/// (an admin's view) when `None`.
pub fn find_files(
    conn: &Connection,
    owner: Option<&str>,
    name: &str,
) -> rusqlite::Result<Vec<Entry>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {ENTRY_COLUMNS} FROM entries
         WHERE kind = 'file' AND name = ?2 AND (?1 IS NULL OR owner = ?1) ORDER BY owner"
    ))?;
    let rows = stmt.query_map(params![owner, name], entry_from_row)?;
    let mut entries = rows.collect::<rusqlite::Result<Vec<_>>>()?;
    for e in &mut entries {
        e.copies = copies_of(conn, e.id)?;
    }
    Ok(entries)
}

/// Where a listing page starts: files after this name and id, documents
/// after this id.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Cursor {
    pub name: String,
    pub id: i64,
}

/// Up to `limit` entries of `kind` after `after` (files by name, documents
/// in the order the catalog got them): `owner`'s only, or everyone's when
/// `None`.
pub fn page(
    conn: &Connection,
    owner: Option<&str>,
    kind: EntryKind,
    after: &Cursor,
    limit: usize,
) -> rusqlite::Result<Vec<Entry>> {
    let sql = match kind {
        EntryKind::File => format!(
            "SELECT {ENTRY_COLUMNS} FROM entries
             WHERE kind = 'file' AND (?1 IS NULL OR owner = ?1) AND (name, id) > (?2, ?3)
             ORDER BY name, id LIMIT ?4"
        ),
        EntryKind::Document => format!(
            "SELECT {ENTRY_COLUMNS} FROM entries
             WHERE kind = 'document' AND (?1 IS NULL OR owner = ?1) AND ?2 IS NOT NULL
                 AND id > ?3
             ORDER BY id LIMIT ?4"
        ),
    };
    let mut stmt = conn.prepare_cached(&sql)?;
    let rows = stmt.query_map(
        params![owner, after.name, after.id, limit as i64],
        entry_from_row,
    )?;
    let mut entries = rows.collect::<rusqlite::Result<Vec<_>>>()?;
    for e in &mut entries {
        e.copies = copies_of(conn, e.id)?;
    }
    Ok(entries)
}

/// The server to resume upload `upload_id` of `owner` on: one holding its
/// partial bytes (most recently written first), or one holding it
/// complete.
pub fn upload_server(
    conn: &Connection,
    upload_id: &str,
    owner: Option<&str>,
) -> rusqlite::Result<Option<String>> {
    let owner = owner_key(owner);
    let partial: Option<String> = conn
        .prepare_cached(
            "SELECT server FROM partials WHERE upload_id = ?1 AND owner = ?2
             ORDER BY touched_ms DESC LIMIT 1",
        )?
        .query_row(params![upload_id, owner], |r| r.get(0))
        .optional()?;
    if partial.is_some() {
        return Ok(partial);
    }
    conn.prepare_cached(
        "SELECT c.server FROM copies c JOIN entries e ON e.id = c.entry
         WHERE c.upload_id = ?1 AND e.owner = ?2 LIMIT 1",
    )?
    .query_row(params![upload_id, owner], |r| r.get(0))
    .optional()
}

/// Every removal not carried out yet, oldest first.
pub fn removals(conn: &Connection) -> rusqlite::Result<Vec<Removal>> {
    let mut stmt =
        conn.prepare_cached("SELECT id, server, file, upload_id, owner FROM removals ORDER BY id")?;
    let rows = stmt.query_map([], |r| {
        Ok(Removal {
            id: r.get(0)?,
            server: r.get(1)?,
            file: r.get(2)?,
            upload_id: r.get(3)?,
            owner: owner_of(r.get(4)?),
        })
    })?;
    rows.collect()
}

/// What the catalog says `server` holds, in the terms of its
/// `inventory`: files, their digest, documents.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Figures {
    pub files: u64,
    pub files_digest: u64,
    pub documents: u64,
}

/// The catalog's figures for `server`, and whether it ever took that
/// server's listing in (`None`: never).
pub fn figures(conn: &Connection, server: &str) -> rusqlite::Result<Option<Figures>> {
    let synced: Option<i64> = conn
        .prepare_cached("SELECT synced_ms FROM catalog_servers WHERE server = ?1")?
        .query_row(params![server], |r| r.get(0))
        .optional()?;
    if synced.is_none() {
        return Ok(None);
    }
    let mut figures = Figures::default();
    let mut stmt = conn.prepare_cached(
        "SELECT c.file, e.sha256 FROM copies c JOIN entries e ON e.id = c.entry
         WHERE c.server = ?1 AND c.kind = 'file'",
    )?;
    let mut rows = stmt.query(params![server])?;
    while let Some(row) = rows.next()? {
        let file: String = row.get(0)?;
        let sha: Option<String> = row.get(1)?;
        figures.files += 1;
        figures.files_digest ^= crate::proto::file::file_digest(&file, &sha.unwrap_or_default());
    }
    figures.documents = conn
        .prepare_cached("SELECT count(*) FROM copies WHERE server = ?1 AND kind = 'document'")?
        .query_row(params![server], |r| r.get::<_, i64>(0))?
        .max(0) as u64;
    Ok(Some(figures))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balancer::tracking::{TrackEvent, Tracker, TransferFilter, TransferState};

    fn open() -> (tempfile::TempDir, Tracker, std::thread::JoinHandle<()>) {
        let dir = tempfile::tempdir().unwrap();
        let (tracker, writer) = Tracker::open(&dir.path().join("balancer.db")).unwrap();
        (dir, tracker, writer)
    }

    fn record(name: &str, upload: &str, server: &str, file: &str, at: u64) -> FileRecord {
        FileRecord {
            owner: Some("ann".into()),
            name: name.into(),
            size: at,
            sha256: format!("{at:064x}"),
            upload_id: upload.into(),
            server: server.into(),
            file: file.into(),
            stored_ms: at,
        }
    }

    fn stored(tracker: &Tracker, r: FileRecord) -> Vec<Removal> {
        tracker
            .catalog_change(Change::FileStored {
                number: None,
                record: r,
            })
            .unwrap()
    }

    fn places(e: &Entry) -> Vec<(&str, &str)> {
        e.copies
            .iter()
            .map(|c| (c.server.as_str(), c.file.as_str()))
            .collect()
    }

    #[test]
    fn a_newer_file_takes_the_name_and_the_older_copy_becomes_a_removal() {
        let (_dir, tracker, _writer) = open();
        assert!(stored(&tracker, record("a b.txt", "up-1", "s1", "a_b.txt", 10)).is_empty());
        let removals = stored(&tracker, record("a b.txt", "up-2", "s2", "a_b.txt", 20));
        assert_eq!(
            removals
                .iter()
                .map(|r| (r.server.as_str(), r.file.as_deref(), r.upload_id.as_deref()))
                .collect::<Vec<_>>(),
            [("s1", Some("a_b.txt"), Some("up-1"))]
        );
        let found = tracker.catalog_files(Some("ann"), "a b.txt").unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(places(&found[0]), [("s2", "a_b.txt")]);
        assert_eq!(found[0].size, 20);
        // Nobody else's, and the removal waits until it is done.
        assert!(tracker
            .catalog_files(Some("bob"), "a b.txt")
            .unwrap()
            .is_empty());
        assert_eq!(tracker.catalog_removals().unwrap(), removals);
        tracker.catalog_note(Change::RemovalDone(removals[0].id));
        assert!(tracker.catalog_removals().unwrap().is_empty());
        // The same answer again (a repeated upload_end) changes nothing.
        assert!(stored(&tracker, record("a b.txt", "up-2", "s2", "a_b.txt", 20)).is_empty());
    }

    #[test]
    fn a_new_file_under_a_name_the_catalog_thought_taken_is_never_removed() {
        let (_dir, tracker, _writer) = open();
        stored(&tracker, record("x", "up-1", "s1", "x", 10));
        // The server's folder was emptied behind the catalog's back and the
        // new file got the same name there: nothing to remove.
        assert!(stored(&tracker, record("x", "up-2", "s1", "x", 20)).is_empty());
        let found = tracker.catalog_files(None, "x").unwrap();
        assert_eq!(found[0].copies[0].upload_id.as_deref(), Some("up-2"));
    }

    #[test]
    fn an_upload_resumes_where_its_bytes_are_and_strays_are_removed_once_stored() {
        let (_dir, tracker, _writer) = open();
        let started = |server: &str| Change::UploadStarted {
            upload_id: "up-3".into(),
            server: server.into(),
            owner: None,
            name: "big".into(),
            size: 100,
        };
        tracker.catalog_change(started("s1")).unwrap();
        assert_eq!(
            tracker
                .catalog_upload_server("up-3", None)
                .unwrap()
                .as_deref(),
            Some("s1")
        );
        tracker.catalog_change(started("s2")).unwrap();
        let mut r = record("big", "up-3", "s2", "big", 30);
        r.owner = None;
        let removals = stored(&tracker, r);
        assert_eq!(
            removals
                .iter()
                .map(|r| (r.server.as_str(), r.file.as_deref(), r.upload_id.as_deref()))
                .collect::<Vec<_>>(),
            [("s1", None, Some("up-3"))]
        );
        // Stored: the same upload again goes where the file is.
        assert_eq!(
            tracker
                .catalog_upload_server("up-3", None)
                .unwrap()
                .as_deref(),
            Some("s2")
        );
        assert_eq!(tracker.catalog_upload_server("up-4", None).unwrap(), None);
    }

    fn listed_file(name: &str, file: &str, upload: &str, at: u64) -> FileEntry {
        FileEntry {
            owner: Some("ann".into()),
            file: file.into(),
            upload_id: Some(upload.into()),
            ..FileEntry::file(name, at, &format!("{at:064x}"), "s1", at)
        }
    }

    #[test]
    fn a_listing_taken_in_replaces_what_the_catalog_says_of_that_server() {
        let (_dir, tracker, _writer) = open();
        assert_eq!(tracker.catalog_figures("s1").unwrap(), None);
        stored(&tracker, record("gone", "up-g", "s1", "gone", 5));
        stored(&tracker, record("kept", "up-k", "s2", "kept", 50));
        let listing = vec![
            listed_file("new", "new", "up-n", 7),
            // Older than the catalog's "kept" on s2: left over, removed.
            listed_file("kept", "kept~1", "up-o", 40),
        ];
        let sync = |listing: Vec<FileEntry>| {
            tracker
                .catalog_change(Change::Sync {
                    server: "s1".into(),
                    kind: EntryKind::File,
                    listing,
                })
                .unwrap()
        };
        let removals = sync(listing.clone());
        assert_eq!(removals.len(), 1);
        assert_eq!(removals[0].file.as_deref(), Some("kept~1"));
        assert!(tracker.catalog_files(None, "gone").unwrap().is_empty());
        assert_eq!(
            places(&tracker.catalog_files(None, "new").unwrap()[0]),
            [("s1", "new")]
        );
        assert_eq!(
            places(&tracker.catalog_files(None, "kept").unwrap()[0]),
            [("s2", "kept")]
        );
        // The figures match what the server would report for "new".
        let figures = tracker.catalog_figures("s1").unwrap().unwrap();
        assert_eq!(figures.files, 1);
        assert_eq!(
            figures.files_digest,
            crate::proto::file::file_digest("new", &format!("{:064x}", 7))
        );
        // Taken in again before the removal is done: it stays doomed.
        assert!(sync(listing).is_empty());
        assert_eq!(tracker.catalog_removals().unwrap().len(), 1);
        // A newer one on this server wins over s2's.
        let removals = sync(vec![listed_file("kept", "kept~1", "up-z", 60)]);
        assert_eq!(removals[0].server, "s2");
        assert!(tracker.catalog_files(None, "new").unwrap().is_empty());
    }

    #[test]
    fn documents_are_recorded_from_the_tracker_and_taken_in_from_listings() {
        let (_dir, tracker, _writer) = open();
        for (number, batch_apart) in [(1u64, false), (2, true)] {
            tracker.record_at(
                number * 10,
                TrackEvent::Received {
                    number,
                    client: "c".into(),
                    title: format!("doc {number}"),
                    size: 3,
                    user: Some("ann".into()),
                },
            );
            tracker.record_at(
                number * 10 + 1,
                TrackEvent::Sent {
                    number,
                    server: "s1".into(),
                },
            );
            if batch_apart {
                // Committed before `stored` arrives: the other path.
                tracker.catalog_figures("s1").unwrap();
            }
            tracker.record_at(
                number * 10 + 2,
                TrackEvent::Stored {
                    number,
                    server: "s1".into(),
                    file: format!("{number}_doc.json"),
                },
            );
        }
        let page = |owner| {
            tracker
                .catalog_page(owner, EntryKind::Document, &Cursor::default(), 10, true)
                .unwrap()
        };
        let docs = page(Some("ann"));
        assert_eq!(docs.len(), 2);
        assert_eq!((docs[0].name.as_str(), docs[0].number), ("doc 1", Some(1)));
        assert_eq!(places(&docs[1]), [("s1", "2_doc.json")]);
        assert!(page(Some("bob")).is_empty());
        // No files recorded from them.
        assert!(tracker
            .catalog_page(None, EntryKind::File, &Cursor::default(), 10, true)
            .unwrap()
            .is_empty());
        // A listing of s1 with a document the tracker never saw.
        let mut third = FileEntry::file("doc 3", 9, "", "s1", 30);
        third.kind = EntryKind::Document;
        third.number = Some(3);
        third.file = "3_doc.json".into();
        let mut first = third.clone();
        first.number = Some(1);
        first.file = "1_doc.json".into();
        tracker
            .catalog_change(Change::Sync {
                server: "s1".into(),
                kind: EntryKind::Document,
                listing: vec![first, third],
            })
            .unwrap();
        let figures = tracker.catalog_figures("s1").unwrap().unwrap();
        assert_eq!(figures.documents, 2);
        let all = page(None);
        assert_eq!(
            all.iter().map(|d| d.number).collect::<Vec<_>>(),
            [Some(1), Some(3)]
        );
    }

    #[test]
    fn a_delete_forgets_the_entry_and_is_recorded() {
        let (_dir, tracker, _writer) = open();
        stored(&tracker, record("d", "up-d", "s1", "d", 9));
        let entry = tracker.catalog_files(Some("ann"), "d").unwrap().remove(0);
        let removals = tracker
            .catalog_change(Change::Delete {
                entry: entry.id,
                transfer: Recorded {
                    number: 77,
                    client: "127.0.0.1:9".into(),
                    user: Some("ann".into()),
                },
            })
            .unwrap();
        assert_eq!(removals.len(), 1);
        assert!(tracker.catalog_files(None, "d").unwrap().is_empty());
        let records = tracker.query(&TransferFilter::default()).unwrap();
        assert_eq!(records[0].number, 77);
        assert_eq!(records[0].state, TransferState::Deleted);
        assert_eq!(records[0].server.as_deref(), Some("s1"));
    }
}
