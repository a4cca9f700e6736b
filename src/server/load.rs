//! The server's view of its own load: a sampler thread reads, through
//! sysinfo, the process' memory and the machine's CPU, memory, disk and
//! network; request counters are plain atomics.

use crate::net;
use crossbeam_channel::{Receiver, RecvTimeoutError};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};
use sysinfo::{Disks, Networks, Pid, ProcessRefreshKind, ProcessesToUpdate, System};

/// What the sampler last saw.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Sample {
    /// Resident memory of this process.
    pub memory_bytes: u64,
    /// CPU use of the whole machine, percent.
    pub cpu_percent: f32,
    pub memory_used_bytes: u64,
    pub memory_total_bytes: u64,
    /// The filesystem holding the storage folder.
    pub disk_used_bytes: u64,
    pub disk_free_bytes: u64,
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
}

impl Load {
    pub fn new(limits: Limits) -> Load {
        Load {
            limits,
            started: Instant::now(),
            active: AtomicU64::new(0),
            sample: Mutex::new(Sample::default()),
        }
    }

    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    pub fn active(&self) -> u64 {
        self.active.load(Ordering::Relaxed)
    }

    pub fn sample(&self) -> Sample {
        *crate::net::lock(&self.sample)
    }

    fn store(&self, sample: Sample) {
        *crate::net::lock(&self.sample) = sample;
    }

    /// Marks one request as in progress until the guard drops.
    pub fn begin(&self) -> ActiveGuard<'_> {
        self.active.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(self)
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
    load.store(sampler.sample());
    net::spawn_named(name, None, move || loop {
        match stop.recv_timeout(interval) {
            Err(RecvTimeoutError::Timeout) => load.store(sampler.sample()),
            _ => return,
        }
    })
}

struct Sampler {
    pid: Option<Pid>,
    system: System,
    disks: Disks,
    networks: Networks,
    storage: PathBuf,
    net_base: (u64, u64),
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
            storage: storage
                .canonicalize()
                .unwrap_or_else(|_| storage.to_path_buf()),
            net_base,
        }
    }

    fn sample(&mut self) -> Sample {
        let system = &mut self.system;
        system.refresh_cpu_usage();
        system.refresh_memory();
        let memory_bytes = self.pid.map_or(0, |pid| {
            system.refresh_processes_specifics(
                ProcessesToUpdate::Some(&[pid]),
                false,
                ProcessRefreshKind::nothing().with_memory(),
            );
            system.process(pid).map_or(0, |p| p.memory())
        });
        self.disks.refresh(false);
        // The disk holding the folder: the longest mount point above it.
        let (disk_used_bytes, disk_free_bytes) = self
            .disks
            .list()
            .iter()
            .filter(|d| self.storage.starts_with(d.mount_point()))
            .max_by_key(|d| d.mount_point().as_os_str().len())
            .map_or((0, 0), |d| {
                let free = d.available_space();
                (d.total_space().saturating_sub(free), free)
            });
        self.networks.refresh(true);
        let (rx, tx) = net_totals(&self.networks);
        Sample {
            memory_bytes,
            cpu_percent: system.global_cpu_usage(),
            memory_used_bytes: system.used_memory(),
            memory_total_bytes: system.total_memory(),
            disk_used_bytes,
            disk_free_bytes,
            net_rx_bytes: rx.saturating_sub(self.net_base.0),
            net_tx_bytes: tx.saturating_sub(self.net_base.1),
        }
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
}
