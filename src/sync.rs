//! Threads and locks: named threads (the error says which could not
//! start), joining those that ended, and a lock that survives a panicked
//! holder.

use std::io;
use std::sync::{Mutex, MutexGuard};
use std::thread::{self, JoinHandle};

/// Names a thread and starts it; the error says which thread could not
/// start.
pub fn spawn_named<T: Send + 'static>(
    name: String,
    stack: Option<usize>,
    f: impl FnOnce() -> T + Send + 'static,
) -> io::Result<thread::JoinHandle<T>> {
    let mut builder = thread::Builder::new().name(name.clone());
    if let Some(size) = stack {
        builder = builder.stack_size(size);
    }
    builder
        .spawn(f)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot start thread {name}: {e}")))
}

/// Joins the threads that have ended; returns how many panicked.
pub fn join_finished(workers: &mut Vec<JoinHandle<()>>) -> usize {
    let (done, running): (Vec<_>, Vec<_>) = std::mem::take(workers)
        .into_iter()
        .partition(|w| w.is_finished());
    *workers = running;
    done.into_iter()
        .map(JoinHandle::join)
        .filter(Result::is_err)
        .count()
}

/// Locks a mutex whose data stays valid even if a holder panicked (plain
/// counters and maps, never left half-updated).
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}
