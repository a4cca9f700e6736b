//! The server's view of its own load: a sampler thread reads, through
//! sysinfo, the process' memory and CPU and the machine's CPU, memory, disk
//! and network, and checks that the storage folder can still be written;
//! request counters are plain atomics.

use crossbeam_channel::{Receiver, RecvTimeoutError};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};
use sysinfo::{Disks, Networks, Pid, ProcessRefreshKind, ProcessesToUpdate, System};

/// Below this much free space on the storage folder's filesystem the server
/// says it cannot store: a document could not be written whole.
pub const MIN_FREE_BYTES: u64 = 1024 * 1024;

/// What the sampler last saw.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Sample {
    /// Resident memory of this process.
    pub memory_bytes: u64,
    /// CPU use of the whole machine, percent.
    pub cpu_percent: f32,
    /// CPU use of this process, percent of one core.
    pub process_cpu_percent: f32,
    pub memory_used_bytes: u64,
    pub memory_total_bytes: u64,
    /// The filesystem holding the storage folder.
    pub disk_used_bytes: u64,
    pub disk_free_bytes: u64,
    /// A file could be created and removed in the storage folder, and its
    /// filesystem has at least `MIN_FREE_BYTES` free.
    pub storage_writable: bool,
    /// All interfaces, since the sampler started.
    pub net_rx_bytes: u64,
    pub net_tx_bytes: u64,
}

/// Limits past which the server reports itself overloaded.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_active: u64,
    pub max_memory_bytes: u64,
}

/// Load counters shared by a server's threads.
#[derive(Debug)]
pub struct Load {
    pub limits: Limits,
    started: Instant,
    active: AtomicU64,
    sample: Mutex<Sample>,
    /// Free bytes when a write last found the disk full (`NO_FULL_DISK`
    /// when none since the disk had room again): the server says it cannot
    /// store until the disk has gained `MIN_FREE_BYTES` over that, so that
    /// one full-disk error is believed rather than retried.
    full_at_free: AtomicU64,
}

const NO_FULL_DISK: u64 = u64::MAX;

impl Load {
    pub fn new(limits: Limits) -> Load {
        Load {
            limits,
            started: Instant::now(),
            active: AtomicU64::new(0),
            sample: Mutex::new(Sample::default()),
            full_at_free: AtomicU64::new(NO_FULL_DISK),
        }
    }

    /// A write in `folder` found its disk full: the server reports that it
    /// cannot store, from now on, until the disk has room again.
    pub fn note_disk_full(&self, folder: &Path) {
        let mut sample = crate::sync::lock(&self.sample);
        let free = folder_space(folder).map_or(sample.disk_free_bytes, |(_, free)| free);
        sample.storage_writable = false;
        drop(sample);
        if self.full_at_free.swap(free, Ordering::Relaxed) == NO_FULL_DISK {
            log::error!(
                "storage {}: the disk filled up with {free} bytes free: reporting that this \
                 server cannot store until it has {MIN_FREE_BYTES} bytes more",
                folder.display()
            );
        }
    }

    fn full_at_free(&self) -> Option<u64> {
        Some(self.full_at_free.load(Ordering::Relaxed)).filter(|&f| f != NO_FULL_DISK)
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    pub fn active(&self) -> u64 {
        self.active.load(Ordering::Relaxed)
    }

    pub fn sample(&self) -> Sample {
        *crate::sync::lock(&self.sample)
    }

    fn store(&self, sample: Sample) {
        *crate::sync::lock(&self.sample) = sample;
    }

    /// Marks one request as in progress until the guard drops.
    pub fn begin(&self) -> ActiveGuard<'_> {
        self.active.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(self)
    }

    /// Like `begin`, for a request that ends on another thread: a store
    /// counts from when it is read until the committer has answered it.
    pub fn begin_owned(self: &Arc<Load>) -> Active {
        self.active.fetch_add(1, Ordering::Relaxed);
        Active(self.clone())
    }

    pub fn overloaded(&self) -> bool {
        is_overloaded(self.active(), self.sample().memory_bytes, self.limits)
    }
}

/// The overload rule: too many requests at once, or too much memory.
pub fn is_overloaded(active: u64, memory_bytes: u64, limits: Limits) -> bool {
    active >= limits.max_active || memory_bytes > limits.max_memory_bytes
}

pub struct ActiveGuard<'a>(&'a Load);

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An owned `ActiveGuard` (see `Load::begin_owned`).
pub struct Active(Arc<Load>);

impl Drop for Active {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Samples every `interval`, on a thread called `name`, until `stop` is
/// disconnected. `storage` is the folder whose disk is reported.
pub fn spawn_sampler(
    name: String,
    load: Arc<Load>,
    storage: PathBuf,
    interval: Duration,
    stop: Receiver<()>,
) -> std::io::Result<thread::JoinHandle<()>> {
    // The first sample is taken before returning, so no status report ever
    // shows the zeros of "not sampled yet".
    let mut sampler = Sampler::new(&storage);
    load.store(sampler.sample(&load));
    crate::sync::spawn_named(name, None, move || loop {
        match stop.recv_timeout(interval) {
            Err(RecvTimeoutError::Timeout) => load.store(sampler.sample(&load)),
            _ => return,
        }
    })
}

struct Sampler {
    pid: Option<Pid>,
    system: System,
    disks: Disks,
    networks: Networks,
    /// The storage folder as given, for the write check.
    folder: PathBuf,
    /// Canonicalised, to find the filesystem holding it.
    storage: PathBuf,
    net_base: (u64, u64),
    /// Why storage was unavailable at the last sample, to log changes once.
    unwritable: Option<String>,
}

/// The mount point, among `mounts`, of the filesystem holding `path`: the
/// longest one that is a prefix of it (component-wise, so `/home` does not
/// hold `/homework`). `path` must be canonical, so that symbolic links
/// lead to the filesystem that really holds it; `/` holds everything when
/// listed, and `None` means that the disk list does not show it (some
/// containers), in which case the disk figures are unknown.
pub fn holding_mount<'a>(
    path: &Path,
    mounts: impl IntoIterator<Item = &'a Path>,
) -> Option<&'a Path> {
    mounts
        .into_iter()
        .filter(|m| path.starts_with(m))
        .max_by_key(|m| m.as_os_str().len())
}

/// Total and available bytes of the file system holding `folder`
/// (`statvfs`), as an unprivileged writer sees them.
fn folder_space(folder: &Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(folder.as_os_str().as_bytes()).ok()?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is a valid NUL-terminated string and `stat` points to
    // writable memory the size of a `statvfs`, which the call fills in
    // when it returns 0 (and only then is it read).
    let stat = unsafe {
        if libc::statvfs(path.as_ptr(), stat.as_mut_ptr()) != 0 {
            return None;
        }
        stat.assume_init()
    };
    let unit = stat.f_frsize as u64;
    Some((
        (stat.f_blocks as u64).saturating_mul(unit),
        (stat.f_bavail as u64).saturating_mul(unit),
    ))
}

/// Whether the server can store, from the write check and the free space
/// of the folder's filesystem (`None` when unknown: the write check alone
/// decides), and the free space when a write last found the disk full, if
/// it did. `Err` says why not.
pub fn storage_verdict(
    write: io::Result<()>,
    free_bytes: Option<u64>,
    full_at_free: Option<u64>,
) -> Result<(), String> {
    write.map_err(|e| format!("cannot write to the storage folder: {e}"))?;
    match (free_bytes, full_at_free) {
        (Some(free), _) if free < MIN_FREE_BYTES => Err(format!(
            "only {free} bytes free on the storage folder's filesystem (at least {MIN_FREE_BYTES} needed)"
        )),
        (Some(free), Some(full)) if free < full.saturating_add(MIN_FREE_BYTES) => Err(format!(
            "the disk filled up with {full} bytes free; {free} free now, waiting for {MIN_FREE_BYTES} more"
        )),
        // Unknown free space: the next write tells.
        (None, Some(_)) => Err("the disk filled up".into()),
        _ => Ok(()),
    }
}

impl Sampler {
    fn new(storage: &Path) -> Sampler {
        let pid = sysinfo::get_current_pid().ok();
        if pid.is_none() {
            log::warn!("cannot find own process id; process memory is not sampled");
        }
        let networks = Networks::new_with_refreshed_list();
        let net_base = net_totals(&networks);
        Sampler {
            pid,
            system: System::new(),
            disks: Disks::new_with_refreshed_list(),
            networks,
            folder: storage.to_path_buf(),
            storage: storage
                .canonicalize()
                .unwrap_or_else(|_| storage.to_path_buf()),
            net_base,
            unwritable: None,
        }
    }

    fn sample(&mut self, load: &Load) -> Sample {
        let system = &mut self.system;
        system.refresh_cpu_usage();
        system.refresh_memory();
        let (memory_bytes, process_cpu_percent) = self.pid.map_or((0, 0.0), |pid| {
            system.refresh_processes_specifics(
                ProcessesToUpdate::Some(&[pid]),
                false,
                ProcessRefreshKind::nothing().with_memory().with_cpu(),
            );
            system
                .process(pid)
                .map_or((0, 0.0), |p| (p.memory(), p.cpu_usage()))
        });
        // The folder's own file system first (any mount, tmpfs included);
        // the disk list where that cannot be asked.
        let space = folder_space(&self.folder).or_else(|| {
            self.disks.refresh(false);
            let list = self.disks.list();
            let mount = holding_mount(&self.storage, list.iter().map(|d| d.mount_point()));
            let disk = list.iter().find(|d| Some(d.mount_point()) == mount)?;
            Some((disk.total_space(), disk.available_space()))
        });
        let (disk_used_bytes, disk_free_bytes) =
            space.map_or((0, 0), |(total, free)| (total.saturating_sub(free), free));
        let full_at_free = load.full_at_free();
        let verdict = storage_verdict(
            super::storage::check_writable(&self.folder),
            space.map(|(_, free)| free),
            full_at_free,
        );
        if full_at_free.is_some() && verdict.is_ok() {
            load.full_at_free.store(NO_FULL_DISK, Ordering::Relaxed);
        }
        self.networks.refresh(true);
        let (rx, tx) = net_totals(&self.networks);
        let sample = Sample {
            memory_bytes,
            cpu_percent: system.global_cpu_usage(),
            process_cpu_percent,
            memory_used_bytes: system.used_memory(),
            memory_total_bytes: system.total_memory(),
            disk_used_bytes,
            disk_free_bytes,
            storage_writable: verdict.is_ok(),
            net_rx_bytes: rx.saturating_sub(self.net_base.0),
            net_tx_bytes: tx.saturating_sub(self.net_base.1),
        };
        self.log_storage_change(&verdict);
        sample
    }

    /// Logs when storage becomes unavailable and when it is back, not at
    /// every sample in between.
    fn log_storage_change(&mut self, verdict: &Result<(), String>) {
        let dir = self.folder.display();
        match (verdict, &self.unwritable) {
            (Err(why), None) => log::error!("storage {dir}: {why}; reporting that it cannot store"),
            (Ok(()), Some(_)) => log::info!("storage {dir}: writable again"),
            _ => {}
        }
        self.unwritable = verdict.as_ref().err().cloned();
    }
}

fn net_totals(networks: &Networks) -> (u64, u64) {
    networks.list().values().fold((0, 0), |(rx, tx), n| {
        (rx + n.total_received(), tx + n.total_transmitted())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_active: 4,
        max_memory_bytes: 1000,
    };

    #[test]
    fn overload_rule() {
        assert!(!is_overloaded(0, 0, LIMITS));
        assert!(!is_overloaded(3, 1000, LIMITS));
        assert!(is_overloaded(4, 0, LIMITS));
        assert!(is_overloaded(0, 1001, LIMITS));
    }

    #[test]
    fn guard_counts_active_requests() {
        let load = Load::new(LIMITS);
        let a = load.begin();
        let b = load.begin();
        assert_eq!(load.active(), 2);
        drop(a);
        assert_eq!(load.active(), 1);
        drop(b);
        assert_eq!(load.active(), 0);
    }

    #[test]
    fn the_longest_mount_point_above_the_folder_holds_it() {
        let mounts = [
            Path::new("/"),
            Path::new("/home"),
            Path::new("/home/u/data"),
            Path::new("/homework"),
        ];
        let holding = |p: &str| holding_mount(Path::new(p), mounts.iter().copied());
        assert_eq!(
            holding("/home/u/data/json/5001"),
            Some(Path::new("/home/u/data"))
        );
        assert_eq!(holding("/home/u/json"), Some(Path::new("/home")));
        assert_eq!(holding("/homeworks/x"), Some(Path::new("/")));
        assert_eq!(holding("/homework/x"), Some(Path::new("/homework")));
        assert_eq!(holding_mount(Path::new("/x"), [Path::new("/mnt")]), None);
    }

    #[test]
    fn storage_verdicts() {
        assert_eq!(storage_verdict(Ok(()), Some(MIN_FREE_BYTES), None), Ok(()));
        // An unknown filesystem leaves the write check to decide.
        assert_eq!(storage_verdict(Ok(()), None, None), Ok(()));
        let full = storage_verdict(Ok(()), Some(MIN_FREE_BYTES - 1), None).unwrap_err();
        assert!(full.contains("bytes free"), "{full}");
        let denied = io::Error::from(io::ErrorKind::PermissionDenied);
        let ro = storage_verdict(Err(denied), Some(u64::MAX), None).unwrap_err();
        assert!(ro.contains("cannot write to the storage folder"), "{ro}");
        // After a full disk, room must grow by MIN_FREE_BYTES first.
        let at = 3 * MIN_FREE_BYTES;
        let waiting = storage_verdict(Ok(()), Some(at + 10), Some(at)).unwrap_err();
        assert!(waiting.contains("filled up"), "{waiting}");
        assert_eq!(
            storage_verdict(Ok(()), Some(at + MIN_FREE_BYTES), Some(at)),
            Ok(())
        );
    }

    #[test]
    fn a_full_disk_is_reported_at_once_and_until_it_has_room() {
        let dir = tempfile::tempdir().unwrap();
        let load = Load::new(Limits {
            max_active: 10,
            max_memory_bytes: u64::MAX,
        });
        let mut sampler = Sampler::new(dir.path());
        load.store(sampler.sample(&load));
        assert!(load.sample().storage_writable);
        load.note_disk_full(dir.path());
        assert!(!load.sample().storage_writable);
        // The same free space as when it filled up: still full.
        load.full_at_free
            .store(load.sample().disk_free_bytes, Ordering::Relaxed);
        load.store(sampler.sample(&load));
        assert!(!load.sample().storage_writable);
        // Room again (a file system with far more than the mark free).
        load.full_at_free.store(0, Ordering::Relaxed);
        load.store(sampler.sample(&load));
        assert!(load.sample().storage_writable);
        assert_eq!(load.full_at_free(), None);
    }

    #[test]
    fn a_sample_of_a_writable_folder() {
        let dir = tempfile::tempdir().unwrap();
        let mut sampler = Sampler::new(dir.path());
        let load = Load::new(Limits {
            max_active: 10,
            max_memory_bytes: u64::MAX,
        });
        let sample = sampler.sample(&load);
        assert!(sample.storage_writable);
        assert!(sample.memory_bytes > 0);
        // The check leaves nothing behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        // A folder that is gone cannot store.
        drop(dir);
        assert!(!sampler.sample(&load).storage_writable);
    }
}
