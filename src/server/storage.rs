//! A server's storage folder: safe file names; durable, never-overwriting
//! writes, made durable together by the folder's committer (`commit`); and
//! an index of the request numbers held, so that a framed store is carried
//! out at most once.
//!
//! A store is claimed here by the thread that read it (`Storage::claim`),
//! turned into a `Commit` there (the document's bytes are made on that
//! thread), and handed to the committer, which completes it once its bytes
//! and its name are on disk.
//!
//! Nothing here deletes a stored document: a document the balancer says is
//! stored elsewhere (`forget`) is moved into `.duplicates/`, not removed.
//! Only `clean`, on the operator's request, removes documents.

mod commit;
mod keys;

pub use commit::{Commit, Deliver, Done, SyncMode};
pub use keys::Found;

use crate::proto::{ClientKey, Document, KeyProbe};
use crate::sync::lock;
use crate::text::unix_ms;
use crate::text::{count_a, rfc3339};
use serde::Serialize;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

/// Longest title part of a stored file name, in characters.
pub const MAX_TITLE_CHARS: usize = 80;
/// And in bytes: with the number prefix and a `~N.json` suffix the name
/// stays well under the 255-byte limit of common file systems.
pub const MAX_TITLE_BYTES: usize = 200;
/// Where documents stored on another server are moved (inside the storage
/// folder). Hidden, and a folder, so it is neither counted nor listed.
pub const DUPLICATES_DIR: &str = ".duplicates";
/// Prefix of the staging files a store writes before linking into place.
const TEMP_PREFIX: &str = ".tmp-";

/// The JSON written for each stored document.
#[derive(Debug, Serialize)]
struct StoredDocument<'a> {
    titolo: &'a str,
    contenuto: &'a str,
    numero_richiesta: u64,
    a_count: u64,
    received_at: String,
    /// `ORIGINAL_FORMAT` on a copy stored from an original-format
    /// connection: its number is whatever the sender wrote, so it never
    /// stands for a framed store of that number (see `Storage::claim`).
    #[serde(skip_serializing_if = "Option::is_none")]
    stored_from: Option<&'static str>,
    /// The client's key, also in the file's name.
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<ClientKey>,
}

/// `stored_from` of a document stored from an original-format connection.
const ORIGINAL_FORMAT: &str = "original-format";

/// Why a document was not stored.
#[derive(Debug)]
pub enum StoreError {
    /// The sender's deadline (`not_after_ms`) has passed.
    Expired {
        number: u64,
        not_after_ms: u64,
        now_ms: u64,
    },
    /// The balancer said this number is stored on another server.
    Forgotten(u64),
    /// Another connection is storing this number right now.
    InProgress(u64),
    Io(io::Error),
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Expired {
                number,
                not_after_ms,
                now_ms,
            } => write!(
                f,
                "request {number} expired {} ms ago (not_after_ms {not_after_ms}); not stored",
                now_ms.saturating_sub(*not_after_ms)
            ),
            StoreError::Forgotten(n) => write!(f, "request {n} is stored on another server"),
            StoreError::InProgress(n) => {
                write!(f, "request {n} is being stored by another connection")
            }
            StoreError::Io(e) => write!(f, "cannot store the document: {e}"),
        }
    }
}

impl std::error::Error for StoreError {}

impl From<io::Error> for StoreError {
    fn from(e: io::Error) -> Self {
        StoreError::Io(e)
    }
}

/// What a store may do with a request number.
pub enum Claim<'a> {
    /// The number is already stored, in this file: store nothing.
    Existing { file: String },
    /// The caller now owns the number and writes it with the `Writer`.
    New(Writer<'a>),
}

/// The right to store one request number. Until it is dropped, or until
/// the commit it becomes has ended, other stores of the same number get
/// `StoreError::InProgress`.
pub struct Writer<'a> {
    storage: &'a Storage,
    claim: Claimed,
    not_after_ms: Option<u64>,
}

impl Writer<'_> {
    /// The document as a commit for `Storage::submit`; `done` gets the
    /// stored file's name once its bytes and its name are durable, or why
    /// it was not stored. The deadline and the `forget` list are checked
    /// once more right before the file becomes visible, so nothing appears
    /// after the deadline or after a `forget`.
    pub fn commit(self, doc: &Document, a_count: u64, done: Box<dyn Done>) -> Commit {
        let (number, key) = (self.claim.number, self.claim.key);
        Commit::new(
            record(number, doc, a_count, None, key),
            keyed_base_name(number, &doc.title, key),
            commit::Kind::Framed {
                claim: self.claim,
                not_after_ms: self.not_after_ms,
            },
            done,
        )
    }

    /// Stores `bytes`, a copy of this number's document fetched from
    /// another server and checked, as `{base}.json` (its name there, less
    /// `.json`), and waits until it is durable (repair, see `replicate`).
    pub fn write_copy(self, bytes: Vec<u8>, base: String) -> Result<String, StoreError> {
        let storage = self.storage;
        let (done, outcome) = commit::waiter();
        let commit = Commit::new(
            Ok(bytes),
            base,
            commit::Kind::Framed {
                claim: self.claim,
                not_after_ms: self.not_after_ms,
            },
            done,
        );
        storage.submit(vec![commit]);
        outcome.wait()
    }

    /// Stores the document and waits until it is durable: a `commit` for
    /// a caller with nothing else to do meanwhile.
    pub fn write(self, doc: &Document, a_count: u64) -> Result<String, StoreError> {
        let storage = self.storage;
        let (done, outcome) = commit::waiter();
        storage.submit(vec![self.commit(doc, a_count, done)]);
        outcome.wait()
    }
}

/// A request number being written: until it is dropped, other stores of
/// it get `StoreError::InProgress`. Owned, as it goes to the committer
/// with the document.
struct Claimed {
    folder: Arc<Folder>,
    number: u64,
    /// The client's key, held while writing too.
    key: Option<ClientKey>,
}

impl Drop for Claimed {
    fn drop(&mut self) {
        let mut index = self.folder.index();
        index.writing.remove(&self.number);
        if let Some(key) = self.key {
            index.keys.writing.remove(&key);
        }
    }
}

/// What `forget` did.
#[derive(Debug, Default)]
pub struct Forgetting {
    /// Request numbers and the files moved into `.duplicates/`.
    pub moved: Vec<(u64, String)>,
    /// Files that could not be moved; they stay counted and are still
    /// never stored again.
    pub failed: Vec<(u64, String, io::Error)>,
}

/// The request numbers held, in memory; the folder is the truth it is
/// rebuilt from at start.
#[derive(Debug, Default)]
struct Index {
    /// Files by request number. The first is the one reported to a repeated
    /// store; several exist only for numbers stored in the original format,
    /// which are never de-duplicated.
    files: HashMap<u64, Vec<String>>,
    /// Stored documents, including `.json` files with no number in their
    /// name (put there by hand): what status reports count.
    documents: u64,
    /// Numbers being written right now.
    writing: HashSet<u64>,
    /// Numbers stored on another server (`forget`): never stored here.
    forgotten: HashSet<u64>,
    /// The client keys held, being written, forgotten or fenced.
    keys: keys::KeyIndex,
}

impl Index {
    fn add(&mut self, number: u64, file: String) {
        self.keys.add(&file);
        self.files.entry(number).or_default().push(file);
        self.documents += 1;
    }
}

/// The folder and its index: what the threads that claim stores and the
/// committer share.
struct Folder {
    dir: PathBuf,
    /// `TEMP_PREFIX` and the process id: the start of temporary names.
    temp_prefix: String,
    temp_seq: AtomicU64,
    index: Mutex<Index>,
}

pub struct Storage {
    folder: Arc<Folder>,
    committer: commit::Committer,
}

impl Storage {
    /// `open_with` the default `SyncMode`, the committer's thread named
    /// `storage-commit`.
    pub fn open(dir: &Path) -> io::Result<Storage> {
        Storage::open_with(dir, SyncMode::default(), "storage-commit".into())
    }

    /// Opens (creating if needed) a storage folder: removes staging files
    /// left by a crash, indexes the request numbers of stored files and of
    /// `.duplicates/` (still forgotten after a restart), and starts the
    /// folder's committer on a thread called `thread`, making stores
    /// durable as `sync` says. Dropping the `Storage` ends the committer
    /// once it has finished what it was given, and waits for it.
    pub fn open_with(dir: &Path, sync: SyncMode, thread: String) -> io::Result<Storage> {
        let folder = Folder::open(dir)?;
        let committer = commit::Committer::start(folder.clone(), sync, thread)?;
        Ok(Storage { folder, committer })
    }

    #[cfg(test)]
    fn open_with_disk(dir: &Path, sync: SyncMode, disk: Box<dyn commit::Disk>) -> Storage {
        let folder = Folder::open(dir).unwrap();
        let committer =
            commit::Committer::start_with(folder.clone(), sync, "test-commit".into(), disk)
                .unwrap();
        Storage { folder, committer }
    }

    pub fn dir(&self) -> &Path {
        &self.folder.dir
    }

    /// Number of stored documents (not counting `.duplicates/`).
    pub fn count(&self) -> u64 {
        self.folder.index().documents
    }

    /// How many syncs (of files, of the file system, of the folder) the
    /// committer has done: fewer than stores when they commit together.
    pub fn syncs(&self) -> u64 {
        self.committer.syncs()
    }

    /// Hands commits to the committer, which completes each once it is
    /// durable or has failed (see `Done`). Several commits handed over at
    /// once are committed together.
    pub fn submit(&self, commits: Vec<Commit>) {
        self.committer.submit(commits);
    }

    fn index(&self) -> MutexGuard<'_, Index> {
        self.folder.index()
    }

    /// Removes stored documents (and leftover temporary files). Only on an
    /// explicit request from the operator; `.duplicates/` is kept.
    pub fn clean(&self) -> io::Result<u64> {
        let mut removed = 0;
        for entry in fs::read_dir(self.dir())? {
            let path = entry?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if path.is_file() && (is_document_name(name) || name.starts_with(TEMP_PREFIX)) {
                fs::remove_file(&path)?;
                removed += 1;
            }
        }
        let mut index = self.index();
        index.files.clear();
        index.keys.files.clear();
        index.documents = 0;
        Ok(removed)
    }

    /// Decides what a framed store of `number` does: nothing (already
    /// stored), write it (the returned `Writer` holds the number), or
    /// refuse (past `not_after_ms`, forgotten, or being written right now).
    pub fn claim(&self, number: u64, not_after_ms: Option<u64>) -> Result<Claim<'_>, StoreError> {
        self.claim_keyed(number, not_after_ms, None)
    }

    /// `claim` for a document with the client's `key`: a key already
    /// stored is `Existing` whatever its number, one being written is
    /// `InProgress`, one forgotten (or fenced to another number by a
    /// `lookup`) is refused as forgotten.
    pub fn claim_keyed(
        &self,
        number: u64,
        not_after_ms: Option<u64>,
        key: Option<ClientKey>,
    ) -> Result<Claim<'_>, StoreError> {
        check_deadline(number, not_after_ms)?;
        let mut index = self.index();
        if index.forgotten.contains(&number) {
            return Err(StoreError::Forgotten(number));
        }
        if let Some(files) = index.files.get_mut(&number) {
            // Original-format copies indexed at start by their names are
            // dropped from the index the first time their number comes up.
            let copies: Vec<String> = files
                .iter()
                .filter(|f| self.folder.is_original_format_copy(f))
                .cloned()
                .collect();
            files.retain(|f| !copies.contains(f));
            if let Some(file) = files.first() {
                return Ok(Claim::Existing { file: file.clone() });
            }
            index.files.remove(&number);
        }
        if let Some(key) = key {
            match index.keys.claim(key, number) {
                keys::KeyClaim::New => {}
                keys::KeyClaim::Existing(file) => return Ok(Claim::Existing { file }),
                keys::KeyClaim::InProgress => return Err(StoreError::InProgress(number)),
                keys::KeyClaim::Refused => return Err(StoreError::Forgotten(number)),
            }
        }
        if !index.writing.insert(number) {
            if let Some(key) = key {
                index.keys.writing.remove(&key);
            }
            return Err(StoreError::InProgress(number));
        }
        Ok(Claim::New(Writer {
            storage: self,
            claim: Claimed {
                folder: self.folder.clone(),
                number,
                key,
            },
            not_after_ms,
        }))
    }

    /// Which of the keys in `probes` are held here (with their copies) or
    /// being written; the others are fenced to the number that came with
    /// them (see `keys`).
    pub fn lookup(&self, probes: &[KeyProbe]) -> Found {
        let mut found = self.index().keys.lookup(probes);
        for held in &mut found.held {
            held.a_count = self.stored_a_count(&held.file).unwrap_or(0);
        }
        found
    }

    /// Stores a document from an original-format connection whatever
    /// numbers are already held: the original balancer restarts its
    /// numbering at 1, so a repeated number from it is a new document. The
    /// copy is marked as such and kept out of the exactly-once index: a
    /// peer that cannot prove the cluster key must not be able to store a
    /// number ahead of the balancer and have the balancer's own store of
    /// it answered "already stored".
    pub fn store_copy(&self, number: u64, doc: &Document, a_count: u64) -> io::Result<String> {
        let (done, outcome) = commit::waiter();
        self.submit(vec![Commit::new(
            record(number, doc, a_count, Some(ORIGINAL_FORMAT), None),
            base_name(number, &doc.title),
            commit::Kind::Copy,
            done,
        )]);
        outcome.wait().map_err(|e| match e {
            StoreError::Io(e) => e,
            other => io::Error::other(other.to_string()),
        })
    }

    /// The letter count recorded in a stored file, or counted again from
    /// its content; `None` if the file cannot be read.
    pub fn stored_a_count(&self, file: &str) -> Option<u64> {
        let bytes = fs::read(self.dir().join(file)).ok()?;
        let value: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
        value["a_count"]
            .as_u64()
            .or_else(|| value["contenuto"].as_str().map(count_a))
    }

    /// Marks `numbers` as stored on another server: they are never stored
    /// here again, and the files already stored for them are moved into
    /// `.duplicates/` (original-format copies that happen to carry the
    /// same number are other documents, and stay).
    pub fn forget(&self, numbers: &[u64]) -> Forgetting {
        let mut to_move = Vec::new();
        {
            let mut index = self.index();
            for &number in numbers {
                index.forgotten.insert(number);
                if let Some(files) = index.files.remove(&number) {
                    let files: Vec<String> = files
                        .into_iter()
                        .filter(|f| !self.folder.is_original_format_copy(f))
                        .collect();
                    index.documents -= files.len() as u64;
                    files.iter().for_each(|f| index.keys.moved_aside(f));
                    to_move.extend(files.into_iter().map(|f| (number, f)));
                }
            }
        }
        self.move_all_aside(to_move)
    }

    /// Marks client `keys` as stored on another server, as `forget` does
    /// request numbers: never stored here again, and their copies moved
    /// into `.duplicates/`.
    pub fn forget_keys(&self, keys: &[ClientKey]) -> Forgetting {
        let mut to_move = Vec::new();
        {
            let mut index = self.index();
            for key in keys {
                index.keys.forgotten.insert(*key);
                let Some(file) = index.keys.files.remove(key) else {
                    continue;
                };
                let Some((number, _)) = parse_name(&file) else {
                    continue;
                };
                if let Some(files) = index.files.get_mut(&number) {
                    files.retain(|f| *f != file);
                    if files.is_empty() {
                        index.files.remove(&number);
                    }
                }
                index.documents -= 1;
                to_move.push((number, file));
            }
        }
        self.move_all_aside(to_move)
    }

    /// Moves files taken out of the index into `.duplicates/`; one that
    /// cannot be moved goes back into the index.
    fn move_all_aside(&self, to_move: Vec<(u64, String)>) -> Forgetting {
        let mut done = Forgetting::default();
        for (number, file) in to_move {
            match self.folder.move_aside(&file) {
                Ok(()) => done.moved.push((number, file)),
                Err(e) => {
                    // Still in the folder, so still counted.
                    self.index().add(number, file.clone());
                    done.failed.push((number, file, e));
                }
            }
        }
        done
    }
}

impl Folder {
    fn open(dir: &Path) -> io::Result<Arc<Folder>> {
        fs::create_dir_all(dir)?;
        let mut index = Index::default();
        let mut temps_removed = 0u64;
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            if !entry.file_type()?.is_file() {
                continue;
            }
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            if name.starts_with(TEMP_PREFIX) {
                // Never linked into place, so never acknowledged.
                fs::remove_file(entry.path())?;
                temps_removed += 1;
            } else if is_document_name(&name) {
                match parse_name(&name) {
                    Some((number, _)) => index.add(number, name),
                    None => index.documents += 1,
                }
            }
        }
        if temps_removed > 0 {
            log::warn!(
                "storage {}: removed {temps_removed} leftover temporary files ({TEMP_PREFIX}*) of an interrupted run",
                dir.display()
            );
        }
        for files in index.files.values_mut() {
            // The unsuffixed name first: that is the original copy.
            files.sort_by_key(|name| (parse_name(name).map_or(0, |(_, n)| n), name.clone()));
        }
        match fs::read_dir(dir.join(DUPLICATES_DIR)) {
            Ok(entries) => {
                for entry in entries {
                    let name = entry?.file_name();
                    if let Some((number, _)) = name.to_str().and_then(parse_name) {
                        index.forgotten.insert(number);
                    }
                    if let Some(key) = name.to_str().and_then(keys::parse_key) {
                        index.keys.forgotten.insert(key);
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        Ok(Arc::new(Folder {
            dir: dir.to_path_buf(),
            temp_prefix: format!("{TEMP_PREFIX}{}-", std::process::id()),
            temp_seq: AtomicU64::new(0),
            index: Mutex::new(index),
        }))
    }

    fn index(&self) -> MutexGuard<'_, Index> {
        lock(&self.index)
    }

    /// A new name for a temporary file in the folder.
    fn temp_name(&self) -> String {
        let seq = self.temp_seq.fetch_add(1, Ordering::Relaxed);
        format!("{}{seq}", self.temp_prefix)
    }

    /// A framed store of `number` whose file and name are durable now:
    /// from now on the number is answered with `file`.
    fn add_stored(&self, claim: &Claimed, file: String) -> Result<String, StoreError> {
        let number = claim.number;
        let mut index = self.index();
        let key_forgotten = claim.key.is_some_and(|k| index.keys.forgotten.contains(&k));
        if index.forgotten.contains(&number) || key_forgotten {
            drop(index);
            // A `forget` arrived between the last check and the link: the
            // copy was never acknowledged, so it goes where forgotten
            // copies go.
            if let Err(e) = self.move_aside(&file) {
                log::error!("cannot move request {number} ({file}) to {DUPLICATES_DIR}: {e}");
            }
            return Err(StoreError::Forgotten(number));
        }
        // In the same critical section as the end of `writing` (the claim
        // ends too), so a concurrent claim sees the number either in
        // progress or stored, never neither.
        index.add(number, file.clone());
        index.writing.remove(&number);
        if let Some(key) = claim.key {
            index.keys.writing.remove(&key);
        }
        Ok(file)
    }

    /// Whether a stored file is an original-format copy (see
    /// `store_copy`). Files indexed at start are told apart by reading
    /// them, which only a repeated number or a `forget` needs.
    fn is_original_format_copy(&self, file: &str) -> bool {
        let Ok(bytes) = fs::read(self.dir.join(file)) else {
            return false;
        };
        #[derive(serde::Deserialize)]
        struct Origin {
            stored_from: Option<String>,
        }
        serde_json::from_slice::<Origin>(&bytes)
            .is_ok_and(|o| o.stored_from.as_deref() == Some(ORIGINAL_FORMAT))
    }

    /// Moves a stored file into `.duplicates/`, never replacing a file
    /// there.
    fn move_aside(&self, file: &str) -> io::Result<()> {
        let duplicates = self.dir.join(DUPLICATES_DIR);
        fs::create_dir_all(&duplicates)?;
        let from = self.dir.join(file);
        let base = file.strip_suffix(".json").unwrap_or(file);
        let link = |name: &str| fs::hard_link(&from, duplicates.join(name));
        link_unique(base, &|| Ok(()), &link).map_err(|e| match e {
            StoreError::Io(e) => e,
            other => io::Error::other(other.to_string()),
        })?;
        sync_dir(&duplicates)?;
        fs::remove_file(&from)?;
        sync_dir(&self.dir)
    }

    /// Whether `number` may still become visible now.
    fn may_store(&self, claim: &Claimed, not_after_ms: Option<u64>) -> Result<(), StoreError> {
        let number = claim.number;
        check_deadline(number, not_after_ms)?;
        let index = self.index();
        let key_forgotten = claim.key.is_some_and(|k| index.keys.forgotten.contains(&k));
        if index.forgotten.contains(&number) || key_forgotten {
            return Err(StoreError::Forgotten(number));
        }
        Ok(())
    }
}

/// Creates, writes and removes a small file in `dir`: what a store needs
/// to be able to do, short of the fsync. The name carries `TEMP_PREFIX`,
/// so a copy left by a crash is removed at the next `Storage::open`.
pub fn check_writable(dir: &Path) -> io::Result<()> {
    let path = dir.join(format!("{TEMP_PREFIX}write-check-{}", std::process::id()));
    let written = File::create(&path).and_then(|mut f| f.write_all(b"lbft"));
    let removed = fs::remove_file(&path);
    written?;
    removed
}

/// The bytes of a stored document's file.
fn record(
    number: u64,
    doc: &Document,
    a_count: u64,
    stored_from: Option<&'static str>,
    key: Option<ClientKey>,
) -> io::Result<Vec<u8>> {
    let record = StoredDocument {
        titolo: &doc.title,
        contenuto: &doc.content,
        numero_richiesta: number,
        a_count,
        received_at: rfc3339(SystemTime::now()),
        stored_from,
        key,
    };
    serde_json::to_vec_pretty(&record).map_err(io::Error::other)
}

/// A stored document's file name without its `~N` suffix and `.json`.
fn base_name(number: u64, title: &str) -> String {
    format!("{number}_{}", safe_title(title))
}

/// `base_name`, with the client's key after the title when there is one:
/// `{number}_{title}@{key}`.
fn keyed_base_name(number: u64, title: &str, key: Option<ClientKey>) -> String {
    match key {
        Some(key) => format!("{}{}{key}", base_name(number, title), keys::KEY_MARK),
        None => base_name(number, title),
    }
}

/// Makes a folder's entries durable.
pub(super) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Links a file into place as `{base}.json`, or `{base}~N.json` with the
/// first free N, and returns the name (see `link_first_free`): two
/// documents can never overwrite each other. `before_link` runs right
/// before each attempt and may refuse.
fn link_unique(
    base: &str,
    before_link: &dyn Fn() -> Result<(), StoreError>,
    link: &dyn Fn(&str) -> io::Result<()>,
) -> Result<String, StoreError> {
    let name = |n| match n {
        0 => format!("{base}.json"),
        n => format!("{base}~{n}.json"),
    };
    link_first_free(name, before_link, link)
}

/// Links under the first free name of `name(0)`, `name(1)`, ... and
/// returns it: `link(name)` makes a hard link, which fails if the name
/// exists (unlike a rename). `before` runs right before each attempt and
/// may refuse.
pub(super) fn link_first_free<E: From<io::Error>>(
    name: impl Fn(u32) -> String,
    before: impl Fn() -> Result<(), E>,
    link: impl Fn(&str) -> io::Result<()>,
) -> Result<String, E> {
    for n in 0u32.. {
        let candidate = name(n);
        before()?;
        match link(&candidate) {
            Ok(()) => return Ok(candidate),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e.into()),
        }
    }
    unreachable!("u32 suffixes exhausted")
}

fn check_deadline(number: u64, not_after_ms: Option<u64>) -> Result<(), StoreError> {
    let Some(not_after_ms) = not_after_ms else {
        return Ok(());
    };
    let now_ms = unix_ms(SystemTime::now());
    if now_ms > not_after_ms {
        return Err(StoreError::Expired {
            number,
            not_after_ms,
            now_ms,
        });
    }
    Ok(())
}

/// The same error again, for each of the stores a failed sync fails.
fn copy_error(e: &io::Error) -> io::Error {
    match e.raw_os_error() {
        Some(code) => io::Error::from_raw_os_error(code),
        None => io::Error::new(e.kind(), e.to_string()),
    }
}

/// Whether an error says the file system has no room left.
pub fn is_disk_full(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::StorageFull || e.raw_os_error() == Some(libc::ENOSPC)
}

/// A stored document's file name: visible (no leading dot) `.json`.
pub(crate) fn is_document_name(name: &str) -> bool {
    !name.starts_with('.') && name.ends_with(".json")
}

/// The request number and `~N` suffix (0 when none) of a stored file name:
/// `{number}_{title}.json` or `{number}_{title}~N.json`.
pub(crate) fn parse_name(name: &str) -> Option<(u64, u32)> {
    let stem = name.strip_suffix(".json")?;
    let (number, title) = stem.split_once('_')?;
    if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let number = number.parse().ok()?;
    // Titles never contain `~` (see `safe_title`), so one here is a suffix.
    let suffix = title
        .rsplit_once('~')
        .and_then(|(_, n)| n.parse().ok())
        .unwrap_or(0);
    Some((number, suffix))
}

/// Turns an untrusted title into one safe path component: letters and digits
/// (accents included) and `-`, `_`, `.` are kept; separators, control
/// characters and anything else become `_`; no `..`, no leading dot, bounded
/// length, never empty.
pub fn safe_title(title: &str) -> String {
    let mut out = String::new();
    for c in title.chars().take(MAX_TITLE_CHARS * 4) {
        let keep = c.is_alphanumeric() || matches!(c, '-' | '_' | '.');
        let c = if keep { c } else { '_' };
        // Collapse runs of '_' and of '.', which also removes every "..".
        if (c == '_' || c == '.') && out.ends_with(c) {
            continue;
        }
        out.push(c);
    }
    let mut trimmed = String::new();
    for c in out
        .trim_matches(|c| c == '_' || c == '.')
        .chars()
        .take(MAX_TITLE_CHARS)
    {
        if trimmed.len() + c.len_utf8() > MAX_TITLE_BYTES {
            break;
        }
        trimmed.push(c);
    }
    let trimmed = trimmed.trim_end_matches(['_', '.']);
    if trimmed.is_empty() {
        "untitled".to_string()
    } else {
        trimmed.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn hostile_titles_become_one_safe_component() {
        for (input, expected) in [
            ("../../etc/x", "etc_x"),
            ("a/b", "a_b"),
            ("a\\b", "a_b"),
            ("nul\0byte", "nul_byte"),
            ("..", "untitled"),
            ("", "untitled"),
            ("  ", "untitled"),
            (".hidden", "hidden"),
            ("a..b", "a.b"),
            ("Città d'Arte", "Città_d_Arte"),
            ("line\nbreak\ttab", "line_break_tab"),
        ] {
            assert_eq!(safe_title(input), expected, "for {input:?}");
        }
        let long = "x".repeat(10_000);
        assert_eq!(safe_title(&long).chars().count(), MAX_TITLE_CHARS);
        let wide = safe_title(&"𝐀".repeat(100));
        assert!(
            wide.len() <= MAX_TITLE_BYTES && wide.starts_with("𝐀𝐀"),
            "{wide}"
        );
    }

    proptest::proptest! {
        /// Any title, whatever its characters, gives one safe, bounded,
        /// non-empty path component, and always the same one.
        #[test]
        fn any_title_gives_one_safe_component(title in "(?s).{0,400}") {
            let name = safe_title(&title);
            proptest::prop_assert!(!name.is_empty());
            proptest::prop_assert!(name != "." && name != "..");
            proptest::prop_assert!(!name.contains(['/', '\\', '\0', '~']), "{:?}", name);
            proptest::prop_assert!(!name.contains("..") && !name.starts_with('.'), "{:?}", name);
            proptest::prop_assert!(!name.chars().any(char::is_control), "{:?}", name);
            proptest::prop_assert!(name.len() <= MAX_TITLE_BYTES);
            proptest::prop_assert!(name.chars().count() <= MAX_TITLE_CHARS);
            let mut parts = Path::new(&name).components();
            proptest::prop_assert!(matches!(
                (parts.next(), parts.next()),
                (Some(std::path::Component::Normal(_)), None)
            ));
            proptest::prop_assert_eq!(safe_title(&title), name.clone());
            // A safe title is its own safe title.
            proptest::prop_assert_eq!(safe_title(&name), name);
        }
    }

    fn doc(title: &str, content: &str) -> Document {
        Document {
            title: title.into(),
            content: content.into(),
        }
    }

    /// Names in the folder (hidden ones included, folders marked with `/`).
    fn listing(dir: &Path) -> Vec<String> {
        let mut names: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let name = e.file_name().into_string().unwrap();
                if e.file_type().unwrap().is_dir() {
                    format!("{name}/")
                } else {
                    name
                }
            })
            .collect();
        names.sort();
        names
    }

    fn store_once(storage: &Storage, number: u64, d: &Document) -> String {
        match storage.claim(number, None).unwrap() {
            Claim::New(w) => w.write(d, count_a(&d.content)).unwrap(),
            Claim::Existing { file } => panic!("{number} already stored as {file}"),
        }
    }

    #[test]
    fn copies_never_overwrite_and_leave_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path()).unwrap();
        let d = doc("../x", "aaa");
        let first = storage.store_copy(1, &d, 3).unwrap();
        let second = storage.store_copy(1, &d, 3).unwrap();
        assert_eq!(first, "1_x.json");
        assert_eq!(second, "1_x~1.json");
        assert_eq!(listing(dir.path()), ["1_x.json", "1_x~1.json"]);
        let v: serde_json::Value =
            serde_json::from_slice(&fs::read(dir.path().join(&first)).unwrap()).unwrap();
        assert_eq!(v["titolo"], "../x");
        assert_eq!(v["a_count"], 3);
        assert_eq!(v["numero_richiesta"], 1);
        assert_eq!(storage.count(), 2);
    }

    #[test]
    fn a_number_is_stored_once_and_then_reported_existing() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path()).unwrap();
        let file = store_once(&storage, 7, &doc("t", "banana"));
        assert_eq!(file, "7_t.json");
        match storage.claim(7, None).unwrap() {
            Claim::Existing { file: f } => assert_eq!(f, file),
            Claim::New(_) => panic!("stored twice"),
        }
        assert_eq!(storage.stored_a_count(&file), Some(3));
        assert_eq!(storage.count(), 1);
        assert_eq!(listing(dir.path()), ["7_t.json"]);
    }

    #[test]
    fn original_format_copies_never_answer_a_framed_store() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path()).unwrap();
        // Someone without the cluster key stores number 9 first, in the
        // original format: the framed store of 9 still writes its own.
        let planted = storage.store_copy(9, &doc("t", "planted"), 0).unwrap();
        let ours = store_once(&storage, 9, &doc("t", "ours a"));
        assert_ne!(planted, ours);
        // The same after a restart, when the index is rebuilt from names.
        storage.store_copy(10, &doc("u", "planted"), 0).unwrap();
        drop(storage);
        let storage = Storage::open(dir.path()).unwrap();
        let ours = store_once(&storage, 10, &doc("u", "ours"));
        assert_eq!(ours, "10_u~1.json");
        assert!(
            matches!(storage.claim(10, None).unwrap(), Claim::Existing { file } if file == ours)
        );
        // `forget` moves the framed copy aside, never the planted one.
        let done = storage.forget(&[9, 10]);
        assert_eq!(done.moved.len(), 2, "{:?}", done.moved);
        assert_eq!(
            listing(dir.path()),
            [".duplicates/", "10_u.json", "9_t.json"]
        );
        assert_eq!(storage.count(), 2);
    }

    #[test]
    fn a_number_being_written_is_in_progress_until_the_writer_ends() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path()).unwrap();
        let Claim::New(writer) = storage.claim(5, None).unwrap() else {
            panic!()
        };
        assert!(matches!(
            storage.claim(5, None),
            Err(StoreError::InProgress(5))
        ));
        // A writer dropped without writing (an error while counting...)
        // frees the number.
        drop(writer);
        assert_eq!(store_once(&storage, 5, &doc("t", "")), "5_t.json");
    }

    #[test]
    fn reopening_rebuilds_the_index_and_removes_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        {
            let storage = Storage::open(dir.path()).unwrap();
            store_once(&storage, 12, &doc("twelve", "a"));
            storage.store_copy(3, &doc("three", "a"), 1).unwrap();
            storage.store_copy(3, &doc("three", "aa"), 2).unwrap();
        }
        fs::write(dir.path().join(".tmp-999-0"), b"half").unwrap();
        fs::write(dir.path().join(".tmp-999-1"), b"").unwrap();
        fs::write(dir.path().join("notes.json"), b"{}").unwrap();
        let storage = Storage::open(dir.path()).unwrap();
        assert_eq!(
            listing(dir.path()),
            [
                "12_twelve.json",
                "3_three.json",
                "3_three~1.json",
                "notes.json"
            ]
        );
        assert_eq!(storage.count(), 4);
        match storage.claim(12, None).unwrap() {
            Claim::Existing { file } => assert_eq!(file, "12_twelve.json"),
            Claim::New(_) => panic!("12 not indexed"),
        }
        // Original-format copies are counted but stand for no framed store.
        assert!(matches!(storage.claim(3, None).unwrap(), Claim::New(_)));
    }

    #[test]
    fn names_give_back_their_numbers() {
        assert_eq!(parse_name("12_t.json"), Some((12, 0)));
        assert_eq!(parse_name("12_a_b~3.json"), Some((12, 3)));
        assert_eq!(parse_name("12_.json"), Some((12, 0)));
        assert_eq!(parse_name("+1_t.json"), None);
        assert_eq!(parse_name("_t.json"), None);
        assert_eq!(parse_name("x_t.json"), None);
        assert_eq!(parse_name("12_t.txt"), None);
        assert_eq!(parse_name("99999999999999999999_t.json"), None);
    }

    #[test]
    fn past_deadline_is_refused_at_claim_and_before_the_link() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path()).unwrap();
        let past = unix_ms(SystemTime::now()) - 1;
        let e = storage.claim(1, Some(past)).err().unwrap();
        assert!(matches!(e, StoreError::Expired { number: 1, .. }), "{e}");
        assert!(e.to_string().contains("expired"), "{e}");

        let future = unix_ms(SystemTime::now()) + 60_000;
        let Claim::New(mut writer) = storage.claim(2, Some(future)).unwrap() else {
            panic!()
        };
        // The deadline passes while the document is being counted.
        writer.not_after_ms = Some(past);
        let e = writer.write(&doc("t", "a"), 1).unwrap_err();
        assert!(matches!(e, StoreError::Expired { number: 2, .. }), "{e}");
        assert!(listing(dir.path()).is_empty(), "{:?}", listing(dir.path()));
        assert_eq!(storage.count(), 0);
        // Refused, not stuck in progress: a retry with time left works.
        let Claim::New(writer) = storage.claim(2, Some(future)).unwrap() else {
            panic!()
        };
        assert_eq!(writer.write(&doc("t", "a"), 1).unwrap(), "2_t.json");
    }

    #[test]
    fn forget_moves_copies_aside_and_refuses_the_number_from_then_on() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path()).unwrap();
        store_once(&storage, 7, &doc("seven", "a"));
        store_once(&storage, 9, &doc("nine", "a"));
        // A file of the same name is already aside: it is not replaced.
        fs::create_dir(dir.path().join(DUPLICATES_DIR)).unwrap();
        fs::write(dir.path().join(DUPLICATES_DIR).join("7_seven.json"), b"old").unwrap();

        let done = storage.forget(&[7, 8]);
        assert_eq!(done.moved, [(7, "7_seven.json".to_string())]);
        assert!(done.failed.is_empty());
        assert_eq!(listing(dir.path()), [".duplicates/", "9_nine.json"]);
        assert_eq!(
            listing(&dir.path().join(DUPLICATES_DIR)),
            ["7_seven.json", "7_seven~1.json"]
        );
        assert_eq!(storage.count(), 1);
        for number in [7, 8] {
            let e = storage.claim(number, None).err().unwrap();
            assert!(matches!(e, StoreError::Forgotten(n) if n == number), "{e}");
            assert!(e.to_string().contains("stored on another server"), "{e}");
        }

        // Still forgotten after a restart (for numbers that had a copy).
        let storage = Storage::open(dir.path()).unwrap();
        assert_eq!(storage.count(), 1);
        assert!(matches!(
            storage.claim(7, None),
            Err(StoreError::Forgotten(7))
        ));
    }

    #[test]
    fn forget_during_a_write_keeps_the_document_from_appearing() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path()).unwrap();
        let Claim::New(writer) = storage.claim(4, None).unwrap() else {
            panic!()
        };
        assert!(storage.forget(&[4]).moved.is_empty());
        let e = writer.write(&doc("four", "a"), 1).unwrap_err();
        assert!(matches!(e, StoreError::Forgotten(4)), "{e}");
        assert!(listing(dir.path()).is_empty());
        assert_eq!(storage.count(), 0);
    }

    #[test]
    fn concurrent_stores_all_land_and_share_syncs() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path()).unwrap();
        let (threads, each) = (8u64, 10u64);
        std::thread::scope(|s| {
            for t in 0..threads {
                let storage = &storage;
                s.spawn(move || {
                    for i in 0..each {
                        let number = t * 100 + i;
                        store_once(storage, number, &doc("same title", "a"));
                    }
                });
            }
        });
        let names = listing(dir.path());
        assert_eq!(names.len() as u64, threads * each);
        assert_eq!(storage.count(), threads * each);
        for t in 0..threads {
            for i in 0..each {
                let name = format!("{}_same_title.json", t * 100 + i);
                assert!(names.contains(&name), "{name} missing");
            }
        }
        // At most a fdatasync and a folder fsync each.
        let syncs = storage.syncs();
        assert!((2..=2 * threads * each).contains(&syncs), "{syncs} syncs");
    }

    #[test]
    fn concurrent_claims_of_one_number_store_it_once() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path()).unwrap();
        let outcomes: Vec<&str> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    s.spawn(|| match storage.claim(42, None) {
                        Ok(Claim::New(w)) => {
                            w.write(&doc("t", "a"), 1).unwrap();
                            "new"
                        }
                        Ok(Claim::Existing { .. }) => "existing",
                        Err(StoreError::InProgress(_)) => "in progress",
                        Err(e) => panic!("{e}"),
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(outcomes.iter().filter(|o| **o == "new").count(), 1);
        assert_eq!(listing(dir.path()), ["42_t.json"]);
    }

    /// Claims `numbers` and commits them in one submission, each with a
    /// waiter; returns the outcomes in order.
    fn commit_together(storage: &Storage, numbers: &[u64]) -> Vec<Result<String, StoreError>> {
        let mut commits = Vec::new();
        let mut outcomes = Vec::new();
        for &number in numbers {
            let Claim::New(writer) = storage.claim(number, None).unwrap() else {
                panic!("{number} already stored")
            };
            let (done, outcome) = commit::waiter();
            commits.push(writer.commit(&doc("batch", "a"), 1, done));
            outcomes.push(outcome);
        }
        storage.submit(commits);
        outcomes.into_iter().map(commit::Outcome::wait).collect()
    }

    #[test]
    fn stores_handed_over_together_share_their_syncs() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path()).unwrap();
        let numbers: Vec<u64> = (1..=50).collect();
        for (number, outcome) in numbers.iter().zip(commit_together(&storage, &numbers)) {
            assert_eq!(outcome.unwrap(), format!("{number}_batch.json"));
        }
        // One syncfs for the files, one fsync for the folder's names.
        assert_eq!(storage.syncs(), 2);
        assert_eq!(storage.count(), 50);
        assert_eq!(listing(dir.path()).len(), 50);
        assert!(matches!(
            storage.claim(7, None).unwrap(),
            Claim::Existing { .. }
        ));

        // One fdatasync per file instead, still one fsync of the folder.
        let dir = tempfile::tempdir().unwrap();
        let storage =
            Storage::open_with(dir.path(), SyncMode::Fdatasync, "test-commit".into()).unwrap();
        for outcome in commit_together(&storage, &numbers) {
            outcome.unwrap();
        }
        assert_eq!(storage.syncs(), 51);
    }

    #[test]
    fn a_failed_sync_fails_every_store_of_its_batch_and_leaves_none_visible() {
        for (sync, fail) in [
            (SyncMode::Syncfs, "fs"),
            (SyncMode::Syncfs, "folder"),
            (SyncMode::Fdatasync, "file"),
            (SyncMode::Fdatasync, "folder"),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let failing = Arc::new(Mutex::new(vec![fail]));
            let disk = commit::tests::FailingDisk {
                fail: failing.clone(),
            };
            let storage = Storage::open_with_disk(dir.path(), sync, Box::new(disk));
            // More than a batch synced by file keeps open at once.
            let numbers: Vec<u64> = (1..=100).collect();
            for outcome in commit_together(&storage, &numbers) {
                let e = outcome.unwrap_err();
                assert!(e.to_string().contains("disk gone"), "{sync:?} {fail}: {e}");
            }
            assert!(listing(dir.path()).is_empty(), "{:?}", listing(dir.path()));
            assert_eq!(storage.count(), 0);
            // Refused, not stuck in progress: once the disk is back, the
            // same numbers are stored.
            failing.lock().unwrap().clear();
            for outcome in commit_together(&storage, &numbers) {
                outcome.unwrap();
            }
            assert_eq!(storage.count(), 100, "{sync:?} {fail}");
        }
    }

    #[test]
    fn nothing_is_stored_in_a_folder_moved_away() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("store");
        let storage = Storage::open(&dir).unwrap();
        let moved = root.path().join("store.moved");
        fs::rename(&dir, &moved).unwrap();
        fs::create_dir(&dir).unwrap();
        for outcome in commit_together(&storage, &[1, 2]) {
            let e = outcome.unwrap_err();
            assert!(e.to_string().contains("no longer the folder"), "{e}");
        }
        assert!(listing(&moved).is_empty(), "{:?}", listing(&moved));
        assert!(listing(&dir).is_empty(), "{:?}", listing(&dir));
    }

    #[test]
    fn a_refusal_right_before_the_link_fails_only_its_own_store() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path()).unwrap();
        let future = unix_ms(SystemTime::now()) + 60_000;
        let mut commits = Vec::new();
        let mut outcomes = Vec::new();
        for number in 1..=3 {
            let Claim::New(mut writer) = storage.claim(number, Some(future)).unwrap() else {
                panic!()
            };
            if number == 2 {
                // Its deadline passes while it waits for the committer.
                writer.not_after_ms = Some(1);
            }
            let (done, outcome) = commit::waiter();
            commits.push(writer.commit(&doc("t", "a"), 1, done));
            outcomes.push(outcome);
        }
        storage.forget(&[3]);
        storage.submit(commits);
        let outcomes: Vec<_> = outcomes.into_iter().map(commit::Outcome::wait).collect();
        assert_eq!(outcomes[0].as_deref().unwrap(), "1_t.json");
        assert!(matches!(
            outcomes[1],
            Err(StoreError::Expired { number: 2, .. })
        ));
        assert!(matches!(outcomes[2], Err(StoreError::Forgotten(3))));
        assert_eq!(listing(dir.path()), ["1_t.json"]);
    }
}
