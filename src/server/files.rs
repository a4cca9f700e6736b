//! Files of any size in a server's storage folder.
//!
//! - `files/` holds complete files under safe names, each put in place
//!   only after its SHA-256 matched the client's (a hard link, so an
//!   existing name is never replaced: a second file with the same name gets
//!   `~N` before its extension).
//! - `.partial/<upload id>` holds an upload's bytes so far, with
//!   `<upload id>.json` (name, size); it survives restarts so an upload can
//!   resume, and is removed once complete, or after `ttl` without writes.
//! - `.uploads/<upload id>.json` records each complete upload (its name in
//!   `files/`, the name it was sent with, owner, size, checksum, time): a
//!   repeated `upload` of a finished id answers with the file in place
//!   instead of storing it twice, and `list` reads these.
//!
//! Files are removed only by `delete` (the balancer replacing a file by a
//! newer one of the same name, or a user's `delete`), record and bytes
//! together. The store keeps a digest of what it holds (`Inventory`), so
//! the balancer can tell cheaply whether its catalog is in step.

use crate::text::to_hex;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use super::storage::{link_first_free, safe_title, sync_dir};
use crate::text::unix_ms;

pub const FILES_DIR: &str = "files";
const PARTIAL_DIR: &str = ".partial";
const UPLOADS_DIR: &str = ".uploads";

/// A complete file, as `.uploads/` records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileMeta {
    pub upload_id: String,
    pub name: String,
    pub size: u64,
    pub sha256: String,
    pub stored_ms: u64,
    /// The user it belongs to, when the balancer has users.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// The name it was sent with, when `name` differs from it (records of
    /// older servers have none: `name` is all there is).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original: Option<String>,
}

impl FileMeta {
    /// The name it was sent with: what users call it.
    pub fn sent_as(&self) -> &str {
        self.original.as_deref().unwrap_or(&self.name)
    }

    fn digest(&self) -> u64 {
        crate::proto::file::file_digest(&self.name, &self.sha256)
    }
}

/// What `.partial/<id>.json` records about an upload under way.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct PartialMeta {
    name: String,
    size: u64,
    started_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    owner: Option<String>,
}

#[derive(Debug)]
pub enum FileError {
    /// The request cannot be carried out as sent.
    Invalid(String),
    /// The same upload is being received on another connection.
    InProgress(String),
    Offset {
        expected: u64,
        got: u64,
    },
    Size {
        declared: u64,
        got: u64,
    },
    Checksum {
        expected: String,
        got: String,
    },
    NotFound(String),
    /// The file of that name was written by another upload (a newer one).
    Replaced {
        name: String,
        upload_id: String,
    },
    Io(io::Error),
}

impl fmt::Display for FileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FileError::Invalid(m) => f.write_str(m),
            FileError::InProgress(id) => {
                write!(f, "upload {id} is being received on another connection")
            }
            FileError::Offset { expected, got } => write!(
                f,
                "chunk at offset {got}, but the server holds {expected} bytes of this upload"
            ),
            FileError::Size { declared, got } => write!(
                f,
                "the upload declared {declared} bytes but {got} arrived"
            ),
            FileError::Checksum { expected, got } => write!(
                f,
                "checksum mismatch: the client sent sha256 {expected}, the bytes received have {got}; nothing was stored"
            ),
            FileError::NotFound(name) => write!(f, "no file named {name:?} on this server"),
            FileError::Replaced { name, upload_id } => write!(
                f,
                "{name:?} on this server was written by upload {upload_id}, not the one given; \
                 left in place"
            ),
            FileError::Io(e) if super::storage::is_disk_full(e) => write!(
                f,
                "the server's disk is full ({e}); nothing was stored and the partial upload was removed"
            ),
            FileError::Io(e) => write!(f, "storage error: {e}"),
        }
    }
}

impl std::error::Error for FileError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            FileError::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<io::Error> for FileError {
    fn from(e: io::Error) -> Self {
        FileError::Io(e)
    }
}

pub struct FileStore {
    files: PathBuf,
    partial: PathBuf,
    uploads: PathBuf,
    /// Upload ids being received now.
    active: Mutex<HashSet<String>>,
    /// Serialises putting files in place, removing them and reading the
    /// records; guards the inventory of what is in place.
    place: Mutex<Inventory>,
    ttl: Duration,
    last_sweep: Mutex<SystemTime>,
}

/// The complete files, in short: how many, and the XOR of their digests
/// (see `proto::file::file_digest`), which changes with any file stored or
/// removed whatever the order.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Inventory {
    pub files: u64,
    pub digest: u64,
}

impl Inventory {
    fn toggle(&mut self, meta: &FileMeta, added: bool) {
        self.digest ^= meta.digest();
        if added {
            self.files += 1;
        } else {
            self.files = self.files.saturating_sub(1);
        }
    }
}

/// Result of `FileStore::begin`.
pub enum Begun<'a> {
    Receiving(Receiving<'a>),
    /// This upload id completed before.
    Complete(FileMeta),
}

impl FileStore {
    /// Opens the folders under `dir` (creating them) and removes partial
    /// uploads older than `ttl`.
    pub fn open(dir: &Path, ttl: Duration) -> io::Result<FileStore> {
        let store = FileStore {
            files: dir.join(FILES_DIR),
            partial: dir.join(PARTIAL_DIR),
            uploads: dir.join(UPLOADS_DIR),
            active: Mutex::new(HashSet::new()),
            place: Mutex::new(Inventory::default()),
            ttl,
            last_sweep: Mutex::new(SystemTime::UNIX_EPOCH),
        };
        for d in [&store.files, &store.partial, &store.uploads] {
            fs::create_dir_all(d)?;
        }
        let mut inventory = Inventory::default();
        for meta in store.records()? {
            inventory.toggle(&meta, true);
        }
        *Self::lock(&store.place) = inventory;
        store.sweep();
        Ok(store)
    }

    /// What is in place, in short.
    pub fn inventory(&self) -> Inventory {
        *Self::lock(&self.place)
    }

    fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Removes partial uploads not written for `ttl` (at most once a minute).
    pub fn sweep(&self) {
        let now = SystemTime::now();
        {
            let mut last = Self::lock(&self.last_sweep);
            if now.duration_since(*last).unwrap_or_default() < Duration::from_secs(60)
                && *last != SystemTime::UNIX_EPOCH
            {
                return;
            }
            *last = now;
        }
        let Ok(entries) = fs::read_dir(&self.partial) else {
            return;
        };
        let mut removed = 0;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let id = name.strip_suffix(".json").unwrap_or(&name).to_string();
            if Self::lock(&self.active).contains(&id) {
                continue;
            }
            let age = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| now.duration_since(t).ok())
                .unwrap_or_default();
            if age >= self.ttl && fs::remove_file(entry.path()).is_ok() && !name.ends_with(".json")
            {
                removed += 1;
            }
        }
        if removed > 0 {
            log::info!(
                "storage {}: removed {removed} partial uploads untouched for {:?} (--partial-ttl)",
                self.partial.display(),
                self.ttl
            );
        }
    }

    /// Starts or resumes upload `id` of `size` bytes named `name`, for
    /// `owner` (when users are on).
    pub fn begin(
        &self,
        id: &str,
        name: &str,
        size: u64,
        owner: Option<String>,
    ) -> Result<Begun<'_>, FileError> {
        if !crate::proto::file::valid_upload_id(id) {
            return Err(FileError::Invalid(
                "upload_id must be 8 to 64 letters, digits, '-' or '_'".into(),
            ));
        }
        self.sweep();
        if let Some(meta) = self.completed(id)? {
            if meta.owner != owner {
                return Err(FileError::Invalid(format!(
                    "upload {id} belongs to someone else"
                )));
            }
            if meta.size != size {
                return Err(FileError::Invalid(format!(
                    "upload {id} completed with {} bytes, not {size}",
                    meta.size
                )));
            }
            return Ok(Begun::Complete(meta));
        }
        if !Self::lock(&self.active).insert(id.to_string()) {
            return Err(FileError::InProgress(id.to_string()));
        }
        // From here on the id is ours; `Receiving` (or the guard on error)
        // gives it back.
        let guard = ActiveGuard { store: self, id };
        let wanted = PartialMeta {
            name: name.to_string(),
            size,
            started_ms: unix_ms(SystemTime::now()),
            owner: owner.clone(),
        };
        let (file, offset, hasher) = self.open_partial(id, &wanted)?;
        std::mem::forget(guard);
        Ok(Begun::Receiving(Receiving {
            store: self,
            id: id.to_string(),
            name: name.to_string(),
            size,
            owner,
            file,
            offset,
            hasher,
        }))
    }

    /// The partial file of upload `id`: the bytes held so far (checked to
    /// be whole and hashed) when it was begun with the same name, size and
    /// owner, else a new one.
    fn open_partial(
        &self,
        id: &str,
        wanted: &PartialMeta,
    ) -> Result<(File, u64, Sha256), FileError> {
        let meta_path = self.partial.join(format!("{id}.json"));
        let data_path = self.partial.join(id);
        let existing: Option<PartialMeta> = fs::read(&meta_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        match existing {
            Some(meta)
                if meta.name == wanted.name
                    && meta.size == wanted.size
                    && meta.owner == wanted.owner =>
            {
                let mut file = File::options().read(true).write(true).open(&data_path)?;
                let (held, hasher) = hash_prefix(&mut file, wanted.size)?;
                file.set_len(held)?;
                file.seek(SeekFrom::Start(held))?;
                Ok((file, held, hasher))
            }
            // Another user's upload says nothing of itself.
            Some(meta) if meta.owner != wanted.owner => Err(FileError::Invalid(format!(
                "upload {id} belongs to someone else"
            ))),
            Some(meta) => Err(FileError::Invalid(format!(
                "upload {id} is already used for {:?} of {} bytes",
                meta.name, meta.size
            ))),
            None => {
                write_replace(&meta_path, &serde_json::to_vec(wanted).unwrap_or_default())?;
                let file = File::create(&data_path)?;
                Ok((file, 0, Sha256::new()))
            }
        }
    }

    fn completed(&self, id: &str) -> Result<Option<FileMeta>, FileError> {
        match fs::read(self.uploads.join(format!("{id}.json"))) {
            Ok(bytes) => Ok(serde_json::from_slice(&bytes).ok()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Every record of a complete upload whose bytes are in place. The
    /// caller holds `place`, or is opening the store.
    fn records(&self) -> io::Result<Vec<FileMeta>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.uploads)? {
            let entry = entry?;
            let name = entry.file_name();
            if !name.to_string_lossy().ends_with(".json") {
                continue;
            }
            let Ok(bytes) = fs::read(entry.path()) else {
                continue;
            };
            let Ok(meta) = serde_json::from_slice::<FileMeta>(&bytes) else {
                continue;
            };
            if self.files.join(&meta.name).is_file() {
                out.push(meta);
            }
        }
        Ok(out)
    }

    /// Every complete file whose bytes are still in place, by name in the
    /// folder; only `owner`'s when given.
    pub fn list(&self, owner: Option<&str>) -> io::Result<Vec<FileMeta>> {
        let mut out = {
            let _place = Self::lock(&self.place);
            self.records()?
        };
        out.retain(|meta| owner.is_none_or(|o| meta.owner.as_deref() == Some(o)));
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// The complete file called `name` in the folder, or else the newest
    /// one sent as `name` (only `owner`'s when given).
    fn find(&self, name: &str, owner: Option<&str>) -> Result<FileMeta, FileError> {
        let files = self.list(owner)?;
        if let Some(meta) = files.iter().find(|m| m.name == name) {
            return Ok(meta.clone());
        }
        files
            .into_iter()
            .filter(|m| m.sent_as() == name)
            .max_by_key(|m| m.stored_ms)
            .ok_or_else(|| FileError::NotFound(name.to_string()))
    }

    /// Opens a complete file for reading: by its name in the folder, or
    /// the name it was sent with (only one of `owner`'s when given).
    pub fn open_file(
        &self,
        name: &str,
        owner: Option<&str>,
    ) -> Result<(File, FileMeta), FileError> {
        let meta = self.find(name, owner)?;
        let file = File::open(self.files.join(&meta.name))?;
        Ok((file, meta))
    }

    /// Removes a complete file, bytes and record, made durable before it
    /// returns: `name` as for `open_file`, only `owner`'s when given, and
    /// only the copy `upload_id` wrote when given.
    pub fn delete(
        &self,
        name: &str,
        owner: Option<&str>,
        upload_id: Option<&str>,
    ) -> Result<FileMeta, FileError> {
        let meta = self.find(name, owner)?;
        if let Some(wanted) = upload_id {
            if meta.upload_id != wanted {
                return Err(FileError::Replaced {
                    name: meta.name,
                    upload_id: meta.upload_id,
                });
            }
        }
        let mut inventory = Self::lock(&self.place);
        // The record first: a crash in between leaves bytes nobody lists,
        // never a record of bytes that are gone.
        let record = self.uploads.join(format!("{}.json", meta.upload_id));
        match fs::remove_file(&record) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(FileError::NotFound(name.to_string()))
            }
            Err(e) => return Err(e.into()),
        }
        sync_dir(&self.uploads)?;
        match fs::remove_file(self.files.join(&meta.name)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        sync_dir(&self.files)?;
        inventory.toggle(&meta, false);
        Ok(meta)
    }

    /// Removes the partial upload `upload_id` (only `owner`'s when given):
    /// the balancer stored the file elsewhere. A partial being received
    /// now stays (`InProgress`).
    pub fn delete_partial(&self, upload_id: &str, owner: Option<&str>) -> Result<(), FileError> {
        if !crate::proto::file::valid_upload_id(upload_id) {
            return Err(FileError::Invalid(
                "upload_id must be 8 to 64 letters, digits, '-' or '_'".into(),
            ));
        }
        if !Self::lock(&self.active).insert(upload_id.to_string()) {
            return Err(FileError::InProgress(upload_id.to_string()));
        }
        let _guard = ActiveGuard {
            store: self,
            id: upload_id,
        };
        let meta_path = self.partial.join(format!("{upload_id}.json"));
        let meta: Option<PartialMeta> = fs::read(&meta_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let Some(meta) = meta else {
            return Err(FileError::NotFound(upload_id.to_string()));
        };
        if owner.is_some_and(|o| meta.owner.as_deref() != Some(o)) {
            return Err(FileError::NotFound(upload_id.to_string()));
        }
        let _ = fs::remove_file(self.partial.join(upload_id));
        fs::remove_file(&meta_path)?;
        Ok(())
    }

    /// How many complete files there are.
    pub fn count(&self) -> u64 {
        self.inventory().files
    }
}

/// Gives an upload id back if `begin` fails after taking it.
struct ActiveGuard<'a> {
    store: &'a FileStore,
    id: &'a str,
}

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        FileStore::lock(&self.store.active).remove(self.id);
    }
}

/// An upload being received on one connection.
pub struct Receiving<'a> {
    store: &'a FileStore,
    id: String,
    name: String,
    size: u64,
    owner: Option<String>,
    file: File,
    offset: u64,
    hasher: Sha256,
}

impl Receiving<'_> {
    /// Bytes held so far: the next chunk starts here.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Appends a chunk that must start at `offset()` and stay within the
    /// declared size.
    pub fn write(&mut self, offset: u64, bytes: &[u8]) -> Result<(), FileError> {
        if offset != self.offset {
            return Err(FileError::Offset {
                expected: self.offset,
                got: offset,
            });
        }
        let end = offset + bytes.len() as u64;
        if end > self.size {
            return Err(FileError::Size {
                declared: self.size,
                got: end,
            });
        }
        if let Err(e) = self.file.write_all(bytes) {
            if super::storage::is_disk_full(&e) {
                // It cannot complete here: give the room back to everyone
                // else (the client starts over, on another server).
                let _ = self.file.set_len(0);
                let _ = fs::remove_file(self.store.partial.join(&self.id));
                let _ = fs::remove_file(self.store.partial.join(format!("{}.json", self.id)));
            }
            return Err(e.into());
        }
        self.hasher.update(bytes);
        self.offset = end;
        Ok(())
    }

    /// Checks size and checksum, makes the bytes durable and puts the file
    /// in place. On a checksum mismatch the partial upload is discarded:
    /// its bytes are wrong and a resume would keep them.
    pub fn finish(self, sha256: &str) -> Result<FileMeta, FileError> {
        if self.offset != self.size {
            return Err(FileError::Size {
                declared: self.size,
                got: self.offset,
            });
        }
        let got = to_hex(&self.hasher.clone().finalize());
        let store = self.store;
        let data_path = store.partial.join(&self.id);
        let meta_path = store.partial.join(format!("{}.json", self.id));
        if !got.eq_ignore_ascii_case(sha256.trim()) {
            let _ = fs::remove_file(&data_path);
            let _ = fs::remove_file(&meta_path);
            return Err(FileError::Checksum {
                expected: sha256.to_string(),
                got,
            });
        }
        self.file.sync_all()?;
        let mut inventory = FileStore::lock(&store.place);
        let name = link_unique(&data_path, &store.files, &safe_title(&self.name))?;
        let meta = FileMeta {
            upload_id: self.id.clone(),
            original: (name != self.name).then(|| self.name.clone()),
            name,
            size: self.size,
            sha256: got,
            stored_ms: unix_ms(SystemTime::now()),
            owner: self.owner.clone(),
        };
        write_replace(
            &store.uploads.join(format!("{}.json", self.id)),
            &serde_json::to_vec(&meta).unwrap_or_default(),
        )?;
        sync_dir(&store.files)?;
        sync_dir(&store.uploads)?;
        inventory.toggle(&meta, true);
        drop(inventory);
        fs::remove_file(&data_path)?;
        fs::remove_file(&meta_path)?;
        Ok(meta)
    }
}

impl Drop for Receiving<'_> {
    fn drop(&mut self) {
        FileStore::lock(&self.store.active).remove(&self.id);
    }
}

/// Hashes what a partial upload holds (at most `size` bytes).
fn hash_prefix(file: &mut File, size: u64) -> io::Result<(u64, Sha256)> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut held = 0u64;
    let mut limited = file.take(size);
    loop {
        let n = limited.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        held += n as u64;
    }
    Ok((held, hasher))
}

/// Writes `bytes` to `path` through a temporary file and a rename.
fn write_replace(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, path)
}

/// Links `from` into `dir` as `name`, or `stem~N.ext` with the first free
/// N; returns the name used.
fn link_unique(from: &Path, dir: &Path, name: &str) -> io::Result<String> {
    let (stem, ext) = match name.rfind('.') {
        Some(i) if i > 0 => (&name[..i], &name[i..]),
        _ => (name, ""),
    };
    let candidate = |n| match n {
        0 => name.to_string(),
        n => format!("{stem}~{n}{ext}"),
    };
    link_first_free(candidate, || Ok(()), |c| fs::hard_link(from, dir.join(c)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(bytes: &[u8]) -> String {
        to_hex(&Sha256::digest(bytes))
    }

    fn receiving<'a>(store: &'a FileStore, id: &str, name: &str, size: u64) -> Receiving<'a> {
        match store.begin(id, name, size, None).unwrap() {
            Begun::Receiving(r) => r,
            Begun::Complete(_) => panic!("already complete"),
        }
    }

    #[test]
    fn upload_resume_and_complete_once() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        {
            let store = FileStore::open(dir.path(), Duration::from_secs(3600)).unwrap();
            let mut r = receiving(&store, "upload-0001", "../a b.bin", data.len() as u64);
            r.write(0, &data[..100_000]).unwrap();
            // A second connection for the same upload is refused meanwhile.
            assert!(matches!(
                store.begin("upload-0001", "../a b.bin", data.len() as u64, None),
                Err(FileError::InProgress(_))
            ));
        }
        // A restart: the partial bytes are still there.
        let store = FileStore::open(dir.path(), Duration::from_secs(3600)).unwrap();
        let mut r = receiving(&store, "upload-0001", "../a b.bin", data.len() as u64);
        assert_eq!(r.offset(), 100_000);
        assert!(matches!(
            r.write(5, b"x"),
            Err(FileError::Offset {
                expected: 100_000,
                got: 5
            })
        ));
        r.write(100_000, &data[100_000..]).unwrap();
        let meta = r.finish(&sha(&data)).unwrap();
        assert_eq!(meta.name, "a_b.bin");
        assert_eq!(fs::read(dir.path().join("files/a_b.bin")).unwrap(), data);
        assert_eq!(
            fs::read_dir(dir.path().join(PARTIAL_DIR)).unwrap().count(),
            0
        );
        match store
            .begin("upload-0001", "../a b.bin", data.len() as u64, None)
            .unwrap()
        {
            Begun::Complete(m) => assert_eq!(m, meta),
            Begun::Receiving(_) => panic!("completed upload started again"),
        }
        assert_eq!(store.list(None).unwrap(), vec![meta.clone()]);
        // Same name, other upload: stored beside it.
        let mut r = receiving(&store, "upload-0002", "a b.bin", 3);
        r.write(0, b"abc").unwrap();
        assert_eq!(r.finish(&sha(b"abc")).unwrap().name, "a_b~1.bin");
        assert_eq!(store.open_file("a_b.bin", None).unwrap().1, meta);
        assert!(matches!(
            store.open_file("nope", None),
            Err(FileError::NotFound(_))
        ));
    }

    #[test]
    fn bad_uploads_leave_nothing_visible() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path(), Duration::from_secs(3600)).unwrap();
        assert!(matches!(
            store.begin("../../etc", "x", 1, None),
            Err(FileError::Invalid(_))
        ));
        let mut r = receiving(&store, "upload-0003", "x", 4);
        assert!(matches!(
            r.write(0, b"hello"),
            Err(FileError::Size {
                declared: 4,
                got: 5
            })
        ));
        r.write(0, b"hel").unwrap();
        assert!(matches!(
            r.finish(&sha(b"hel")),
            Err(FileError::Size { .. })
        ));
        let mut r = receiving(&store, "upload-0003", "x", 4);
        r.write(3, b"l").unwrap();
        assert!(matches!(
            r.finish(&sha(b"help")),
            Err(FileError::Checksum { .. })
        ));
        assert!(store.list(None).unwrap().is_empty());
        assert_eq!(fs::read_dir(dir.path().join(FILES_DIR)).unwrap().count(), 0);
        // The mismatched bytes were discarded: the upload starts over.
        assert_eq!(receiving(&store, "upload-0003", "x", 4).offset(), 0);
        // Another file under the same id is refused.
        assert!(matches!(
            store.begin("upload-0003", "y", 4, None),
            Err(FileError::Invalid(_))
        ));
    }

    #[test]
    fn files_are_listed_and_opened_for_their_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path(), Duration::from_secs(3600)).unwrap();
        for (id, owner) in [("upload-ann-1", "ann"), ("upload-bob-1", "bob")] {
            let Begun::Receiving(mut r) = store
                .begin(id, "same.txt", 2, Some(owner.to_string()))
                .unwrap()
            else {
                panic!("new upload")
            };
            r.write(0, &owner.as_bytes()[..2]).unwrap();
            r.finish(&sha(&owner.as_bytes()[..2])).unwrap();
        }
        let names = |owner| -> Vec<String> {
            store
                .list(owner)
                .unwrap()
                .into_iter()
                .map(|m| m.name)
                .collect()
        };
        assert_eq!(names(Some("ann")), ["same.txt"]);
        assert_eq!(names(Some("bob")), ["same~1.txt"]);
        assert_eq!(names(None).len(), 2);
        // Each opens their own by the name they sent; nobody else's.
        assert_eq!(
            store.open_file("same.txt", Some("bob")).unwrap().1.name,
            "same~1.txt"
        );
        assert_eq!(
            store.open_file("same.txt", Some("ann")).unwrap().1.name,
            "same.txt"
        );
        assert!(matches!(
            store.open_file("same~1.txt", Some("ann")),
            Err(FileError::NotFound(_))
        ));
        assert!(matches!(
            store.open_file("same.txt", Some("carl")),
            Err(FileError::NotFound(_))
        ));
        // Another user cannot take over an upload id.
        assert!(matches!(
            store.begin("upload-ann-1", "same.txt", 2, Some("bob".into())),
            Err(FileError::Invalid(_))
        ));
    }

    fn store_file(store: &FileStore, id: &str, name: &str, bytes: &[u8]) -> FileMeta {
        let mut r = receiving(store, id, name, bytes.len() as u64);
        r.write(0, bytes).unwrap();
        r.finish(&sha(bytes)).unwrap()
    }

    #[test]
    fn delete_removes_bytes_and_record_and_the_inventory_follows() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path(), Duration::from_secs(3600)).unwrap();
        let empty = store.inventory();
        let old = store_file(&store, "upload-del-1", "x y.txt", b"old");
        let new = store_file(&store, "upload-del-2", "x y.txt", b"newer");
        assert_eq!(
            (old.name.as_str(), new.name.as_str()),
            ("x_y.txt", "x_y~1.txt")
        );
        // The name sent is kept beside the name in the folder.
        assert_eq!((old.sent_as(), new.sent_as()), ("x y.txt", "x y.txt"));
        let both = store.inventory();
        assert_eq!(both.files, 2);
        // Only the copy of the upload named goes.
        assert!(matches!(
            store.delete("x_y~1.txt", None, Some("upload-del-1")),
            Err(FileError::Replaced { .. })
        ));
        assert_eq!(
            store.delete("x_y.txt", None, Some("upload-del-1")).unwrap(),
            old
        );
        assert!(!dir.path().join("files/x_y.txt").exists());
        assert!(matches!(
            store.delete("x_y.txt", None, Some("upload-del-1")),
            Err(FileError::NotFound(_))
        ));
        let one = store.inventory();
        assert_eq!(one.files, 1);
        assert_eq!(one.digest, empty.digest ^ new.digest());
        // By the name sent: the newest of that name.
        assert_eq!(store.open_file("x y.txt", None).unwrap().1, new);
        // Reopened, the store counts the same.
        drop(store);
        let store = FileStore::open(dir.path(), Duration::from_secs(3600)).unwrap();
        assert_eq!(store.inventory(), one);
        // A deleted upload's id starts afresh.
        assert_eq!(receiving(&store, "upload-del-1", "x y.txt", 3).offset(), 0);
    }

    #[test]
    fn a_partial_upload_can_be_removed_unless_it_is_being_received() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path(), Duration::from_secs(3600)).unwrap();
        let mut r = receiving(&store, "upload-part-1", "p.bin", 10);
        r.write(0, b"abc").unwrap();
        assert!(matches!(
            store.delete_partial("upload-part-1", None),
            Err(FileError::InProgress(_))
        ));
        drop(r);
        assert!(matches!(
            store.delete_partial("upload-part-1", Some("someone")),
            Err(FileError::NotFound(_))
        ));
        store.delete_partial("upload-part-1", None).unwrap();
        assert_eq!(
            fs::read_dir(dir.path().join(PARTIAL_DIR)).unwrap().count(),
            0
        );
        assert!(matches!(
            store.delete_partial("upload-part-1", None),
            Err(FileError::NotFound(_))
        ));
    }

    #[test]
    fn stale_partials_are_swept() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = FileStore::open(dir.path(), Duration::from_secs(3600)).unwrap();
            receiving(&store, "upload-0004", "x", 10)
                .write(0, b"abc")
                .unwrap();
        }
        assert_eq!(
            fs::read_dir(dir.path().join(PARTIAL_DIR)).unwrap().count(),
            2
        );
        let _store = FileStore::open(dir.path(), Duration::ZERO).unwrap();
        assert_eq!(
            fs::read_dir(dir.path().join(PARTIAL_DIR)).unwrap().count(),
            0
        );
    }
}
