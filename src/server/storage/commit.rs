//! The committer: one thread per storage folder that makes the stores of
//! every connection durable together. At each wake-up it takes every
//! commit waiting (it never waits for more to arrive), writes each
//! document to a temporary file, makes all their bytes durable, links each
//! into place under its name (never over an existing file), makes the
//! folder's new names durable, and only then completes each store. So a
//! store is answered `stored` once its bytes and its name are on disk, and
//! a crash at any point leaves no visible document whose bytes were not
//! durable before its name appeared (at restart the index would answer a
//! repeated store of its number "already stored" from it).
//!
//! Under load the batches grow by themselves: commits arriving while one
//! batch is on its way to disk make up the next one. Files are named from
//! the folder's open descriptor, checked at each batch to be still the
//! folder at the storage's path.

use super::{copy_error, link_unique, Claimed, Folder, StoreError};
use crossbeam_channel::{Receiver, Sender};
use std::ffi::CString;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

/// How a batch's documents are made durable before their names appear.
/// Either way the new names are then made durable with one fsync of the
/// folder.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SyncMode {
    /// One `syncfs` of the folder's file system for the whole batch (a
    /// batch under `SYNCFS_FROM` documents: one `fdatasync` each, which
    /// costs no more and flushes nobody else's data). Much cheaper per document once several
    /// commit together, but it also writes out whatever other programs
    /// have left unwritten on the same file system, and waits for it.
    #[default]
    Syncfs,
    /// One `fdatasync` per document, the writing out of the whole batch
    /// started first so that the syncs find their bytes on the way (and,
    /// journaled, share commits): for a folder on a file system that other
    /// programs keep busy with writes.
    Fdatasync,
}

impl std::str::FromStr for SyncMode {
    type Err = String;

    fn from_str(s: &str) -> Result<SyncMode, String> {
        match s {
            "syncfs" => Ok(SyncMode::Syncfs),
            "fdatasync" => Ok(SyncMode::Fdatasync),
            other => Err(format!("{other}: not syncfs or fdatasync")),
        }
    }
}

/// Where a store's outcome goes. Called on the committer's thread, for
/// every store of a batch, before any of them is delivered: it must not
/// block. It may return what delivers it (and the outcomes that came with
/// it), which the committer runs once every outcome of the batch is taken,
/// so that a connection with several stores in a batch gets their replies
/// in one write.
pub trait Done: Send {
    fn done(self: Box<Self>, outcome: Result<String, StoreError>) -> Option<Deliver>;
}

/// Delivers outcomes (see `Done`).
pub type Deliver = Box<dyn FnOnce() + Send>;

/// A caller that waits for its outcome (`waiter`).
impl Done for Sender<Result<String, StoreError>> {
    fn done(self: Box<Self>, outcome: Result<String, StoreError>) -> Option<Deliver> {
        // A caller that stopped waiting has nobody to tell.
        let _ = self.send(outcome);
        None
    }
}

/// A `Done` for a caller that waits, and where it waits.
pub(super) fn waiter() -> (Box<dyn Done>, Outcome) {
    let (tx, rx) = crossbeam_channel::bounded(1);
    (Box::new(tx), Outcome(rx))
}

pub(super) struct Outcome(Receiver<Result<String, StoreError>>);

impl Outcome {
    pub(super) fn wait(self) -> Result<String, StoreError> {
        self.0
            .recv()
            .unwrap_or_else(|_| Err(StoreError::Io(stopped())))
    }
}

fn stopped() -> io::Error {
    io::Error::other("the storage committer has stopped")
}

/// One document for the committer.
pub struct Commit {
    bytes: io::Result<Vec<u8>>,
    /// Its file name without the `~N` suffix and `.json`.
    base: String,
    kind: Kind,
    done: Box<dyn Done>,
}

pub(super) enum Kind {
    /// A framed store: it holds its number's claim, may still be refused
    /// right before its name appears, and is then indexed by its number.
    Framed {
        claim: Claimed,
        not_after_ms: Option<u64>,
    },
    /// An original-format copy: always stored, never indexed by number.
    Copy,
}

impl Commit {
    pub(super) fn new(
        bytes: io::Result<Vec<u8>>,
        base: String,
        kind: Kind,
        done: Box<dyn Done>,
    ) -> Commit {
        Commit {
            bytes,
            base,
            kind,
            done,
        }
    }

    /// Ends the commit: its claim first (a sender told "failed" may retry at
    /// once), then its outcome.
    fn end(self, outcome: Result<String, StoreError>) -> Option<Deliver> {
        let Commit { kind, done, .. } = self;
        drop(kind);
        done.done(outcome)
    }
}

/// The calls that make things durable, apart so that tests can make them
/// fail.
pub(super) trait Disk: Send {
    /// A file's bytes and size (`fdatasync`).
    fn sync_file(&mut self, file: &File) -> io::Result<()>;
    /// Everything written to the file system holding `dir` (`syncfs`).
    fn sync_fs(&mut self, dir: &File) -> io::Result<()>;
    /// A folder's entries (`fsync` of the folder).
    fn sync_folder(&mut self, dir: &File) -> io::Result<()>;
}

struct RealDisk;

impl Disk for RealDisk {
    fn sync_file(&mut self, file: &File) -> io::Result<()> {
        file.sync_data()
    }

    fn sync_fs(&mut self, dir: &File) -> io::Result<()> {
        // SAFETY: `dir` is an open descriptor for the whole call.
        check(unsafe { libc::syncfs(dir.as_raw_fd()) })
    }

    fn sync_folder(&mut self, dir: &File) -> io::Result<()> {
        dir.sync_all()
    }
}

/// The folder, open: the committer names files relative to it, so that
/// the kernel does not walk the folder's whole path for each of the four
/// calls a document takes.
struct Dir(File);

impl Dir {
    /// Creates a file that must not exist yet, for writing.
    fn create_new(&self, name: &str) -> io::Result<File> {
        let name = c_name(name)?;
        let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC;
        // SAFETY: `name` is a NUL-terminated string and the folder's
        // descriptor is open for the whole call.
        let fd = unsafe { libc::openat(self.0.as_raw_fd(), name.as_ptr(), flags, 0o666) };
        check(fd)?;
        // SAFETY: `fd` was just opened and is owned by nobody else.
        Ok(unsafe { File::from_raw_fd(fd) })
    }

    /// Links `from` as `to` (both in the folder); fails if `to` exists.
    fn link(&self, from: &str, to: &str) -> io::Result<()> {
        let (from, to) = (c_name(from)?, c_name(to)?);
        let dir = self.0.as_raw_fd();
        // SAFETY: both names are NUL-terminated strings and the folder's
        // descriptor is open for the whole call.
        check(unsafe { libc::linkat(dir, from.as_ptr(), dir, to.as_ptr(), 0) })
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        let name = c_name(name)?;
        // SAFETY: as in `link`.
        check(unsafe { libc::unlinkat(self.0.as_raw_fd(), name.as_ptr(), 0) })
    }
}

/// A file name in the folder for a system call. Stored names never hold a
/// NUL (see `safe_title`); one that did would be refused.
fn c_name(name: &str) -> io::Result<CString> {
    CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in a file name"))
}

/// The result of a system call that returns -1 on error.
fn check(result: libc::c_int) -> io::Result<()> {
    if result == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Files a batch synced one by one keeps open at once: its files are
/// synced in groups of this many.
/// The smallest batch made durable by one `syncfs` (`--sync syncfs`).
const SYNCFS_FROM: usize = 8;

const OPEN_AT_ONCE: usize = 64;

/// Starts writing a file's bytes out without waiting (`sync_file_range`);
/// only a hint, its sync is what makes them durable.
fn start_writeback(file: &File) {
    // SAFETY: `file` is an open descriptor for the whole call.
    unsafe { libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
}

/// Whether `syncfs` reports write errors, as Linux does from 5.8 on.
/// Before, it returned 0 whatever became of the data, and a store whose
/// bytes never reached the disk would be acknowledged.
fn syncfs_reports_errors() -> bool {
    // SAFETY: `uname` fills the struct it is given; an all-zero `utsname`
    // is a valid value of it.
    let mut name: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `name` is a valid, writable `utsname` for the whole call.
    if unsafe { libc::uname(&mut name) } != 0 {
        return false;
    }
    let release: String = name
        .release
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8 as char)
        .collect();
    at_least_5_8(&release)
}

/// Whether a Linux release (`6.1.0-13-amd64`) is 5.8 or later.
fn at_least_5_8(release: &str) -> bool {
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let version = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    version >= (5, 8)
}

#[derive(Debug, Default)]
struct Counters {
    syncs: AtomicU64,
}

/// The committer's handle: its queue and its thread. Dropping it closes
/// the queue; the committer finishes what it holds and ends, and the drop
/// waits for it.
pub(super) struct Committer {
    commits: Option<Sender<Vec<Commit>>>,
    thread: Option<JoinHandle<()>>,
    counters: Arc<Counters>,
}

impl Committer {
    pub(super) fn start(folder: Arc<Folder>, sync: SyncMode, name: String) -> io::Result<Self> {
        Committer::start_with(folder, sync, name, Box::new(RealDisk))
    }

    pub(super) fn start_with(
        folder: Arc<Folder>,
        mut sync: SyncMode,
        name: String,
        disk: Box<dyn Disk>,
    ) -> io::Result<Self> {
        if sync == SyncMode::Syncfs && !syncfs_reports_errors() {
            log::warn!(
                "storage {}: this kernel's syncfs does not report write errors (before Linux 5.8): \
                 making each document durable with its own fdatasync instead",
                folder.dir.display()
            );
            sync = SyncMode::Fdatasync;
        }
        // Opened once: `syncfs` reports the errors of writes since the
        // descriptor was opened.
        let dir = Dir(File::open(&folder.dir)?);
        let counters = Arc::new(Counters::default());
        let (commits, queue) = crossbeam_channel::unbounded();
        let stage = Stage {
            folder,
            dir,
            sync,
            disk,
            counters: counters.clone(),
            committed: 0,
            batches: 0,
        };
        let thread = crate::sync::spawn_named(name, None, move || stage.run(&queue))?;
        Ok(Committer {
            commits: Some(commits),
            thread: Some(thread),
            counters,
        })
    }

    pub(super) fn submit(&self, commits: Vec<Commit>) {
        if commits.is_empty() {
            return;
        }
        let Some(queue) = &self.commits else {
            return;
        };
        if let Err(refused) = queue.send(commits) {
            // The committer ended (it panicked): nothing is stored.
            let deliveries: Vec<Deliver> = refused
                .into_inner()
                .into_iter()
                .filter_map(|c| c.end(Err(StoreError::Io(stopped()))))
                .collect();
            deliveries.into_iter().for_each(|deliver| deliver());
        }
    }

    pub(super) fn syncs(&self) -> u64 {
        self.counters.syncs.load(Ordering::Relaxed)
    }
}

impl Drop for Committer {
    fn drop(&mut self) {
        drop(self.commits.take());
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                log::error!("the storage committer panicked");
            }
        }
    }
}

/// The committer's own state, on its thread.
struct Stage {
    folder: Arc<Folder>,
    /// The folder, open: for names in it, and for syncs.
    dir: Dir,
    sync: SyncMode,
    disk: Box<dyn Disk>,
    counters: Arc<Counters>,
    committed: u64,
    batches: u64,
}

impl Stage {
    /// Commits batches until the queue is closed and empty.
    fn run(mut self, queue: &Receiver<Vec<Commit>>) {
        while let Ok(mut batch) = queue.recv() {
            for more in queue.try_iter() {
                batch.extend(more);
            }
            for deliver in self.commit(batch) {
                deliver();
            }
        }
        log::info!(
            "storage {}: {} documents made durable in {} commits with {} syncs",
            self.folder.dir.display(),
            self.committed,
            self.batches,
            self.counters.syncs.load(Ordering::Relaxed)
        );
    }

    /// Commits one batch; returns what delivers its outcomes.
    fn commit(&mut self, batch: Vec<Commit>) -> Vec<Deliver> {
        self.batches += 1;
        let size = batch.len();
        let mut ended: Vec<(Commit, Result<String, StoreError>)> = Vec::with_capacity(size);
        let staged = self.stage(batch, &mut ended);
        let linked = self.link(staged, &mut ended);
        self.make_names_durable(linked, &mut ended);
        let stored = ended.iter().filter(|(_, r)| r.is_ok()).count();
        self.committed += stored as u64;
        log::debug!(
            "storage {}: committed {stored} of {size} documents together",
            self.folder.dir.display()
        );
        ended
            .into_iter()
            .filter_map(|(commit, outcome)| commit.end(outcome))
            .collect()
    }

    /// Writes each document to a temporary file and makes their bytes
    /// durable. Returns the commits staged, with their temporary files;
    /// those that failed go to `ended`.
    fn stage(
        &mut self,
        batch: Vec<Commit>,
        ended: &mut Vec<(Commit, Result<String, StoreError>)>,
    ) -> Vec<(Commit, String)> {
        let together = batch.len() > 1;
        // A few files are cheaper synced one by one than by a sync of the
        // whole file system, which also writes out every other writer's
        // data (the other servers on the same disk among them).
        let by_file = self.sync == SyncMode::Fdatasync || batch.len() < SYNCFS_FROM;
        let mut staged = Vec::with_capacity(batch.len());
        // By file: the files written and not synced yet, kept open.
        let mut unsynced = Vec::new();
        // Not written, as a sync failed first (or the folder is gone):
        // they fail with it.
        let mut skipped = Vec::new();
        let mut failed = self.check_folder().err();
        for commit in batch {
            if failed.is_some() {
                skipped.push(commit);
                continue;
            }
            let temp = self.folder.temp_name();
            match self.write_temp(&temp, &commit.bytes) {
                Ok(file) => {
                    if by_file {
                        if together {
                            // Written out at once, all the batch together:
                            // each sync then finds its bytes on their way
                            // (and a journal commit the others' share).
                            start_writeback(&file);
                        }
                        unsynced.push(file);
                        if unsynced.len() == OPEN_AT_ONCE {
                            failed = self.sync_files(&mut unsynced).err();
                        }
                    }
                    staged.push((commit, temp));
                }
                Err(e) => {
                    let _ = self.dir.remove(&temp);
                    ended.push((commit, Err(e.into())));
                }
            }
        }
        if failed.is_none() && !staged.is_empty() {
            let synced = if by_file {
                self.sync_files(&mut unsynced)
            } else {
                self.counters.syncs.fetch_add(1, Ordering::Relaxed);
                self.disk.sync_fs(&self.dir.0)
            };
            failed = synced.err();
        }
        let Some(e) = failed else {
            return staged;
        };
        self.unstage(&e, staged, skipped, ended);
        Vec::new()
    }

    /// A batch that could not be made durable: every commit in it fails
    /// with `e`, and the temporary files written go.
    fn unstage(
        &self,
        e: &io::Error,
        staged: Vec<(Commit, String)>,
        skipped: Vec<Commit>,
        ended: &mut Vec<(Commit, Result<String, StoreError>)>,
    ) {
        log::error!(
            "storage {}: cannot make a batch of {} documents durable: {e}",
            self.folder.dir.display(),
            staged.len() + skipped.len() + ended.len()
        );
        for (commit, temp) in staged {
            let _ = self.dir.remove(&temp);
            ended.push((commit, Err(copy_error(e).into())));
        }
        for commit in skipped {
            ended.push((commit, Err(copy_error(e).into())));
        }
    }

    /// Whether the folder at the storage's path is still the one opened:
    /// files are named from its descriptor, and must not land in a folder
    /// moved away (or replaced) since.
    fn check_folder(&self) -> io::Result<()> {
        use std::os::unix::fs::MetadataExt;
        let opened = self.dir.0.metadata()?;
        let at_path = std::fs::metadata(&self.folder.dir)?;
        if (opened.dev(), opened.ino()) == (at_path.dev(), at_path.ino()) {
            return Ok(());
        }
        Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "{} is no longer the folder this server opened (moved or replaced)",
                self.folder.dir.display()
            ),
        ))
    }

    /// Creates the temporary file and writes the document into it.
    fn write_temp(&mut self, temp: &str, bytes: &io::Result<Vec<u8>>) -> io::Result<File> {
        let bytes = bytes.as_ref().map_err(copy_error)?;
        let mut file = self.dir.create_new(temp)?;
        file.write_all(bytes)?;
        Ok(file)
    }

    /// Syncs each of `files` and closes them.
    fn sync_files(&mut self, files: &mut Vec<File>) -> io::Result<()> {
        for file in files.drain(..) {
            self.counters.syncs.fetch_add(1, Ordering::Relaxed);
            self.disk.sync_file(&file)?;
        }
        Ok(())
    }

    /// Links each staged file into place under its name, checking right
    /// before that it may still appear. Returns the names linked.
    fn link(
        &mut self,
        staged: Vec<(Commit, String)>,
        ended: &mut Vec<(Commit, Result<String, StoreError>)>,
    ) -> Vec<(Commit, String)> {
        let mut linked = Vec::with_capacity(staged.len());
        for (commit, temp) in staged {
            let folder = &self.folder;
            let check = || match &commit.kind {
                Kind::Framed {
                    claim,
                    not_after_ms,
                } => folder.may_store(claim, *not_after_ms),
                Kind::Copy => Ok(()),
            };
            let dir = &self.dir;
            let name = link_unique(&commit.base, &check, &|name| dir.link(&temp, name));
            // The temporary name was only a staging area; whatever
            // happened, it must not linger.
            let _ = dir.remove(&temp);
            match name {
                Ok(name) => linked.push((commit, name)),
                Err(e) => ended.push((commit, Err(e))),
            }
        }
        linked
    }

    /// Makes the new names durable with one fsync of the folder, then
    /// indexes them. If it fails, none of them is kept: not acknowledged,
    /// the sender stores them elsewhere, and a copy here would be a
    /// duplicate.
    fn make_names_durable(
        &mut self,
        linked: Vec<(Commit, String)>,
        ended: &mut Vec<(Commit, Result<String, StoreError>)>,
    ) {
        if linked.is_empty() {
            return;
        }
        self.counters.syncs.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.disk.sync_folder(&self.dir.0) {
            log::error!(
                "storage {}: cannot make {} new names durable: {e}; removing them",
                self.folder.dir.display(),
                linked.len()
            );
            for (commit, name) in linked {
                let _ = self.dir.remove(&name);
                ended.push((commit, Err(copy_error(&e).into())));
            }
            return;
        }
        for (commit, name) in linked {
            let outcome = match &commit.kind {
                Kind::Framed { claim, .. } => self.folder.add_stored(claim, name),
                Kind::Copy => {
                    self.folder.index().documents += 1;
                    Ok(name)
                }
            };
            ended.push((commit, outcome));
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// Real syncs, except those `fail` names (`file`, `fs`, `folder`),
    /// which fail with `disk gone`.
    pub struct FailingDisk {
        pub fail: Arc<std::sync::Mutex<Vec<&'static str>>>,
    }

    impl Disk for FailingDisk {
        fn sync_file(&mut self, file: &File) -> io::Result<()> {
            self.check("file")?;
            RealDisk.sync_file(file)
        }

        fn sync_fs(&mut self, dir: &File) -> io::Result<()> {
            self.check("fs")?;
            RealDisk.sync_fs(dir)
        }

        fn sync_folder(&mut self, dir: &File) -> io::Result<()> {
            self.check("folder")?;
            RealDisk.sync_folder(dir)
        }
    }

    impl FailingDisk {
        fn check(&self, what: &str) -> io::Result<()> {
            if crate::sync::lock(&self.fail).contains(&what) {
                Err(io::Error::other(format!("disk gone ({what})")))
            } else {
                Ok(())
            }
        }
    }

    #[test]
    fn a_file_is_linked_into_place_only_where_nothing_is() {
        let folder = tempfile::tempdir().unwrap();
        let dir = Dir(File::open(folder.path()).unwrap());
        let names = || {
            let mut names: Vec<String> = std::fs::read_dir(folder.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            names.sort();
            names
        };
        for (name, body) in [("a", "first"), ("b", "second")] {
            let mut file = dir.create_new(name).unwrap();
            file.write_all(body.as_bytes()).unwrap();
        }
        assert_eq!(
            dir.create_new("a").unwrap_err().kind(),
            io::ErrorKind::AlreadyExists
        );
        dir.link("a", "x.json").unwrap();
        let e = dir.link("b", "x.json").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists, "{e}");
        let kept = std::fs::read_to_string(folder.path().join("x.json")).unwrap();
        assert_eq!(kept, "first");
        dir.remove("a").unwrap();
        dir.remove("b").unwrap();
        assert_eq!(names(), ["x.json"]);
    }

    #[test]
    fn syncfs_reports_errors_from_linux_5_8() {
        for (release, newer) in [
            ("5.8.0", true),
            ("6.18.44-fc-v1272", true),
            ("5.10.0-28-amd64", true),
            ("5.7.19", false),
            ("4.19.0-26-amd64", false),
            ("", false),
        ] {
            assert_eq!(at_least_5_8(release), newer, "{release}");
        }
    }
}
