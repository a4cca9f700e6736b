//! What making stored documents durable costs, by method and batch size:
//! one process writes small files the way a server's committer does
//! (temporary file, sync, hard link into place, remove the temporary
//! name, sync the folder) and reports files per second and CPU time per
//! file, its own and that of the kernel's threads (flushers, the journal,
//! the loop device): `syncfs` has the flusher threads write the data out,
//! where `fdatasync` writes it on the caller's time, so the process's CPU
//! alone would flatter `syncfs`. The kernel threads serve every program of
//! the machine: run it on a quiet one. The choice of `server --sync` rests
//! on these figures (README, "Making stores durable").
//!
//! ```text
//! cargo bench --bench durability [-- --dir PATH --files N --size BYTES
//!     --batches 1,8,32,128 --busy-writer]
//! ```
//!
//! `--dir` is where the files go (default: a temporary folder; give a
//! folder on a freshly made file system: on ext4 without a journal, files
//! created soon after many removals are several times slower to create).
//! Each method and batch size writes `--files` files (2000) of `--size`
//! bytes (1024) into a folder of its own, which is kept. `--busy-writer`
//! keeps another thread overwriting a large file on the same file system
//! meanwhile, without syncing it: what `syncfs` must then write out too.
//!
//! Methods, per batch of files:
//! - `fsync-each`: each file on its own, as a server did before its
//!   committer: fsync the file, link, fsync the folder (batch size 1 only);
//! - `fdatasync`: fdatasync each file, link them all, one folder fsync;
//! - `fdatasync-started`: the same, the writing out of every file of the
//!   batch started first (`sync_file_range`), as `server --sync fdatasync`
//!   does;
//! - `syncfs`: write them all, one syncfs, link them all, one folder fsync;
//! - `syncfs-twice`: the same with a second syncfs instead of the folder
//!   fsync.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

struct Options {
    dir: Option<PathBuf>,
    files: usize,
    size: usize,
    batches: Vec<usize>,
    busy_writer: bool,
}

fn parse_args() -> Result<Options, String> {
    let mut options = Options {
        dir: None,
        files: 2000,
        size: 1024,
        batches: vec![1, 8, 32, 128],
        busy_writer: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--dir" => options.dir = Some(value()?.into()),
            "--files" => options.files = number(&arg, &value()?)?,
            "--size" => options.size = number(&arg, &value()?)?,
            "--batches" => {
                options.batches = value()?
                    .split(',')
                    .map(|b| number("--batches", b))
                    .collect::<Result<_, _>>()?
            }
            "--busy-writer" => options.busy_writer = true,
            // Cargo passes --bench to every bench binary.
            "--bench" => {}
            other => return Err(format!("unknown option {other}")),
        }
    }
    Ok(options)
}

fn number(arg: &str, value: &str) -> Result<usize, String> {
    value
        .parse()
        .ok()
        .filter(|&n| n > 0)
        .ok_or(format!("{arg} {value}: not a positive whole number"))
}

#[derive(Clone, Copy, PartialEq)]
enum Method {
    FsyncEach,
    Fdatasync,
    FdatasyncStarted,
    Syncfs,
    SyncfsTwice,
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Method::FsyncEach => "fsync-each",
            Method::Fdatasync => "fdatasync",
            Method::FdatasyncStarted => "fdatasync-started",
            Method::Syncfs => "syncfs",
            Method::SyncfsTwice => "syncfs-twice",
        }
    }
}

/// CPU time the calling thread has used (user and system), in seconds.
fn thread_cpu_secs() -> f64 {
    // SAFETY: `getrusage` fills the struct it is given; all-zero is a
    // valid `rusage`.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// CPU time each of the kernel's own threads (children of kthreadd, pid
/// 2) has used, in clock ticks, by pid.
fn kernel_threads_cpu() -> HashMap<u32, u64> {
    let mut threads = HashMap::new();
    let Ok(entries) = fs::read_dir("/proc") else {
        return threads;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse().ok()) else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // After the command name in parentheses: state, ppid, ... and
        // utime, stime as the 12th and 13th fields after ppid.
        let Some(rest) = stat.rfind(')').map(|at| &stat[at + 2..]) else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.get(1) != Some(&"2") {
            continue;
        }
        let field = |i: usize| {
            fields
                .get(i)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        threads.insert(pid, field(11) + field(12));
    }
    threads
}

/// Seconds of CPU the kernel's threads used between two
/// `kernel_threads_cpu` (those that ended meanwhile are left out).
fn kernel_secs_between(before: &HashMap<u32, u64>, after: &HashMap<u32, u64>) -> f64 {
    // SAFETY: sysconf only reads a configuration value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let used: u64 = after
        .iter()
        .map(|(pid, t)| t.saturating_sub(before.get(pid).copied().unwrap_or(0)))
        .sum();
    used as f64 / ticks
}

fn syncfs(dir: &File) {
    // SAFETY: `dir` is an open descriptor for the whole call.
    let done = unsafe { libc::syncfs(dir.as_raw_fd()) };
    assert_eq!(done, 0, "syncfs: {}", std::io::Error::last_os_error());
}

struct Measured {
    files_per_sec: f64,
    cpu_us_per_file: f64,
    kernel_us_per_file: f64,
    syncs_per_file: f64,
}

/// Writes `options.files` files into a new folder `dir`, `batch` at a time.
fn run(dir: &Path, method: Method, batch: usize, options: &Options) -> Measured {
    fs::create_dir_all(dir).unwrap();
    let folder = File::open(dir).unwrap();
    folder.sync_all().unwrap();
    let body = vec![b'a'; options.size];
    let mut syncs = 0u64;
    let began = Instant::now();
    let kernel_before = kernel_threads_cpu();
    let cpu_before = thread_cpu_secs();
    let mut done = 0;
    while done < options.files {
        let count = batch.min(options.files - done);
        let temps: Vec<PathBuf> = (done..done + count)
            .map(|i| dir.join(format!(".tmp-{i}")))
            .collect();
        let mut started = Vec::new();
        for temp in &temps {
            let mut file = File::options()
                .write(true)
                .create_new(true)
                .open(temp)
                .unwrap();
            file.write_all(&body).unwrap();
            match method {
                Method::FsyncEach => file.sync_all().unwrap(),
                Method::Fdatasync => file.sync_data().unwrap(),
                Method::FdatasyncStarted => {
                    // SAFETY: `file` is an open descriptor for the call.
                    let fd = file.as_raw_fd();
                    unsafe { libc::sync_file_range(fd, 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
                    started.push(file);
                    continue;
                }
                Method::Syncfs | Method::SyncfsTwice => continue,
            }
            syncs += 1;
        }
        for file in started {
            file.sync_data().unwrap();
            syncs += 1;
        }
        if matches!(method, Method::Syncfs | Method::SyncfsTwice) {
            syncfs(&folder);
            syncs += 1;
        }
        for (i, temp) in temps.iter().enumerate() {
            fs::hard_link(temp, dir.join(format!("{}_doc.json", done + i))).unwrap();
            fs::remove_file(temp).unwrap();
        }
        match method {
            Method::SyncfsTwice => syncfs(&folder),
            _ => folder.sync_all().unwrap(),
        }
        syncs += 1;
        done += count;
    }
    let files = options.files as f64;
    let secs = began.elapsed().as_secs_f64();
    let cpu = thread_cpu_secs() - cpu_before;
    let kernel = kernel_secs_between(&kernel_before, &kernel_threads_cpu());
    Measured {
        files_per_sec: files / secs,
        cpu_us_per_file: cpu * 1e6 / files,
        kernel_us_per_file: kernel * 1e6 / files,
        syncs_per_file: syncs as f64 / files,
    }
}

/// Keeps overwriting a 256 MiB file in `dir`, 1 MiB at a time, never
/// syncing it, until `stop` is set: another program keeping the file
/// system busy, whose data is dirty again soon after any sync writes it
/// out. The file is written whole and synced first.
fn busy_writer(dir: PathBuf, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    use std::os::unix::fs::FileExt;
    const CHUNK: u64 = 1 << 20;
    const CHUNKS: u64 = 256;
    let path = dir.join("busy-writer.bin");
    let file = File::create(&path).unwrap();
    let chunk = vec![b'b'; CHUNK as usize];
    for i in 0..CHUNKS {
        file.write_all_at(&chunk, i * CHUNK).unwrap();
    }
    file.sync_all().unwrap();
    std::thread::spawn(move || {
        let mut i = 0;
        while !stop.load(Ordering::Relaxed) {
            file.write_all_at(&chunk, (i % CHUNKS) * CHUNK).unwrap();
            i += 1;
        }
        drop(file);
        let _ = fs::remove_file(&path);
    })
}

fn main() {
    let options = parse_args().unwrap_or_else(|e| {
        eprintln!("durability: {e}");
        std::process::exit(2);
    });
    let temp;
    let root = match &options.dir {
        Some(dir) => dir.clone(),
        None => {
            temp = tempfile::tempdir().expect("cannot create a temporary folder");
            temp.path().to_path_buf()
        }
    };
    fs::create_dir_all(&root).expect("cannot create the folder");
    let stop = Arc::new(AtomicBool::new(false));
    let writer = options
        .busy_writer
        .then(|| busy_writer(root.clone(), stop.clone()));
    println!(
        "{} files of {} bytes per row, into {}{}",
        options.files,
        options.size,
        root.display(),
        if options.busy_writer {
            ", another thread writing a large file there meanwhile"
        } else {
            ""
        }
    );
    println!("| method | batch | files/s | CPU µs/file | kernel threads µs/file | syncs/file |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    let mut rows = vec![(Method::FsyncEach, 1)];
    for &batch in &options.batches {
        for method in [
            Method::Fdatasync,
            Method::FdatasyncStarted,
            Method::Syncfs,
            Method::SyncfsTwice,
        ] {
            rows.push((method, batch));
        }
    }
    for (i, (method, batch)) in rows.into_iter().enumerate() {
        let dir = root.join(format!("{i:02}-{}-{batch}", method.name()));
        let m = run(&dir, method, batch, &options);
        println!(
            "| {} | {batch} | {:.0} | {:.1} | {:.1} | {:.2} |",
            method.name(),
            m.files_per_sec,
            m.cpu_us_per_file,
            m.kernel_us_per_file,
            m.syncs_per_file
        );
    }
    stop.store(true, Ordering::Relaxed);
    if let Some(writer) = writer {
        writer.join().expect("the busy writer panicked");
    }
}
