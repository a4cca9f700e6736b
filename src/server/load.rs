//! The server's view of its own load: a sampler thread reads the process'
//! memory and CPU through sysinfo; request counters are plain atomics.

use crossbeam_channel::{Receiver, RecvTimeoutError};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;
use sysinfo::{Pid, ProcessRefreshKind, ProcessesToUpdate, System};

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Sample {
    pub memory_bytes: u64,
    pub cpu_percent: f32,
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
    active: AtomicU64,
    sample: Mutex<Sample>,
}

impl Load {
    pub fn new(limits: Limits) -> Load {
        Load {
            limits,
            active: AtomicU64::new(0),
            sample: Mutex::new(Sample::default()),
        }
    }

    pub fn active(&self) -> u64 {
        self.active.load(Ordering::Relaxed)
    }

    pub fn sample(&self) -> Sample {
        *self.sample.lock().unwrap_or_else(|p| p.into_inner())
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

/// Samples this process every `interval` until `stop` is disconnected.
pub fn spawn_sampler(
    load: Arc<Load>,
    interval: Duration,
    stop: Receiver<()>,
) -> std::io::Result<thread::JoinHandle<()>> {
    thread::Builder::new()
        .name("server-load".into())
        .spawn(move || {
            let Ok(pid) = sysinfo::get_current_pid() else {
                log::warn!("cannot find own process id; memory and CPU are not sampled");
                return;
            };
            let mut system = System::new();
            loop {
                if let Some(sample) = sample_process(&mut system, pid) {
                    *load.sample.lock().unwrap_or_else(|p| p.into_inner()) = sample;
                }
                match stop.recv_timeout(interval) {
                    Err(RecvTimeoutError::Timeout) => {}
                    _ => return,
                }
            }
        })
}

fn sample_process(system: &mut System, pid: Pid) -> Option<Sample> {
    system.refresh_processes_specifics(
        ProcessesToUpdate::Some(&[pid]),
        false,
        ProcessRefreshKind::nothing().with_memory().with_cpu(),
    );
    let process = system.process(pid)?;
    Some(Sample {
        memory_bytes: process.memory(),
        cpu_percent: process.cpu_usage(),
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
