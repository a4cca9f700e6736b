//! Child processes the benchmarks start (killed and reaped when dropped),
//! and what /proc tells about a process: resident memory, CPU time,
//! context switches, threads, open files and its limit on them.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A child process, killed and reaped when dropped.
pub struct Child {
    pub name: String,
    process: std::process::Child,
    pub addr: SocketAddr,
    /// Reads the child's stdout to the end, so the child never blocks on a
    /// full pipe.
    stdout: Option<JoinHandle<()>>,
    lines: Receiver<String>,
}

impl Child {
    /// Starts one of our binaries and waits for its `listening on ADDR`
    /// line.
    pub fn start(name: &str, bin: &str, args: &[String]) -> Child {
        Child::start_with_open_files(name, bin, args, None)
    }

    /// The same, with the limit on open files raised to `open_files` first,
    /// or else as far as the hard limit allows (through the shell's `ulimit`, so that
    /// nothing here calls libc); the limit the child got is in
    /// `/proc/PID/limits` (see `open_files_limit`).
    pub fn start_with_open_files(
        name: &str,
        bin: &str,
        args: &[String],
        open_files: Option<u64>,
    ) -> Child {
        let mut command = match open_files {
            Some(n) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg(format!(
                        "ulimit -n {n} 2>/dev/null || ulimit -n \"$(ulimit -H -n)\"; exec \"$0\" \"$@\""
                    ))
                    .arg(bin)
                    .args(args);
                c
            }
            None => {
                let mut c = Command::new(bin);
                c.args(args);
                c
            }
        };
        command.env("RUST_LOG", "error");
        let mut child = Child::spawn(name, command);
        let mut seen = Vec::new();
        loop {
            let line = child.lines.recv_timeout(READY_TIMEOUT).unwrap_or_else(|e| {
                panic!("{name} never said it was listening ({e}); it printed {seen:?}")
            });
            if let Some(rest) = line.strip_prefix("listening on ") {
                let addr = rest.split([',', ' ']).next().unwrap_or_default();
                child.addr = addr
                    .parse()
                    .unwrap_or_else(|e| panic!("{name}: bad address in `{line}`: {e}"));
                return child;
            }
            seen.push(line);
        }
    }

    /// Starts `command` with its stdout read by a thread, its stderr
    /// shown, and no address yet.
    pub fn spawn(name: &str, mut command: Command) -> Child {
        let mut process = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({command:?}): {e}"));
        let stdout = process.stdout.take().expect("stdout is piped");
        let (lines_tx, lines) = mpsc::channel();
        let reader = thread::Builder::new()
            .name(format!("{name}-stdout"))
            .spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    // Once the address is known nobody listens; keep reading.
                    let _ = lines_tx.send(line);
                }
            })
            .expect("cannot start a thread to read a child's output");
        Child {
            name: name.to_string(),
            process,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            stdout: Some(reader),
            lines,
        }
    }

    /// Waits until `addr` accepts TCP connections (retrying every 20 ms up
    /// to 10 s), for programs that print no readiness line.
    pub fn wait_accepting(&mut self, addr: SocketAddr) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = self.process.try_wait() {
                return Err(format!("{} exited before accepting: {status}", self.name));
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                self.addr = addr;
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{} does not accept on {addr} after 10 s",
                    self.name
                ));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.process.id()
    }

    /// SIGKILL, then reap: the process gets no chance to clean up.
    pub fn kill9(&mut self) {
        if let Err(e) = self.process.kill() {
            eprintln!("cannot kill {}: {e}", self.name);
        }
        let _ = self.process.wait();
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        // An error means it already exited: reaping is all that is left.
        let _ = self.process.kill();
        let _ = self.process.wait();
        // The pipe closed with the process, so the reader is at its end.
        if let Some(reader) = self.stdout.take() {
            let _ = reader.join();
        }
    }
}

/// A port nobody listens on: bound, then released (another program could
/// take it in between; nothing else here picks ports that way).
pub fn free_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("cannot bind 127.0.0.1:0");
    listener
        .local_addr()
        .expect("a bound listener has an address")
}

/// A numeric field of `/proc/PID/status` (`VmRSS:`, `VmHWM:` in KiB,
/// `Threads:`), or None when the process is gone.
pub fn status_field(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Resident memory now, in MiB.
pub fn rss_mib(pid: u32) -> Option<f64> {
    status_field(pid, "VmRSS:").map(|kib| kib as f64 / 1024.0)
}

/// CPU time a process has used so far (user and system), in seconds.
pub fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold
    // spaces: utime and stime are the 12th and 13th of them.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    // SAFETY: sysconf only reads a configuration value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (ticks > 0).then(|| (utime + stime) as f64 / ticks as f64)
}

pub fn threads(pid: u32) -> Option<u64> {
    status_field(pid, "Threads:")
}

/// Open file descriptors of a process ("self" for this one).
pub fn open_files(pid: &str) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

/// The soft limit on open files of a process ("self" for this one).
pub fn open_files_limit(pid: &str) -> Option<u64> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Samples a process's resident memory every 50 ms on a thread and keeps
/// the largest value: `VmHWM` is a peak over the whole life of the
/// process, this is the peak of one scenario.
pub struct PeakRss {
    stop: mpsc::Sender<()>,
    sampler: JoinHandle<f64>,
}

impl PeakRss {
    pub fn start(pid: u32) -> PeakRss {
        let (stop, stopped) = mpsc::channel::<()>();
        let sampler = thread::Builder::new()
            .name("rss-sampler".into())
            .spawn(move || {
                let mut peak = 0.0f64;
                loop {
                    peak = peak.max(rss_mib(pid).unwrap_or(0.0));
                    match stopped.recv_timeout(Duration::from_millis(50)) {
                        Err(RecvTimeoutError::Timeout) => continue,
                        _ => return peak,
                    }
                }
            })
            .expect("cannot start the memory sampler");
        PeakRss { stop, sampler }
    }

    /// Stops sampling (after one last sample) and returns the peak in MiB.
    pub fn finish(self) -> f64 {
        drop(self.stop);
        self.sampler.join().expect("the memory sampler panicked")
    }
}

/// Context switches (voluntary and not) of each live thread of a process,
/// by thread id. `/proc/PID/status` counts only the main thread's, so the
/// threads are read one by one.
fn thread_switches(pid: u32) -> HashMap<u32, u64> {
    let mut out = HashMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in tasks.flatten() {
        let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            continue; // it ended meanwhile
        };
        let field = |name: &str| -> u64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0)
        };
        out.insert(
            tid,
            field("voluntary_ctxt_switches:") + field("nonvoluntary_ctxt_switches:"),
        );
    }
    out
}

/// Counts the context switches of some processes during a scenario: their
/// threads are read every 50 ms from /proc (each thread's count from the
/// first time it is seen, from zero for threads started after `start`),
/// so threads that come and go are counted too, all but the switches a
/// thread makes between its last sample and its end.
pub struct Switches {
    stop: mpsc::Sender<()>,
    sampler: JoinHandle<u64>,
}

impl Switches {
    pub fn start(pids: Vec<u32>) -> Switches {
        let first: Vec<HashMap<u32, u64>> = pids.iter().map(|&p| thread_switches(p)).collect();
        let (stop, stopped) = mpsc::channel::<()>();
        let sampler = thread::Builder::new()
            .name("switch-sampler".into())
            .spawn(move || {
                let mut last = first.clone();
                loop {
                    let done = !matches!(
                        stopped.recv_timeout(Duration::from_millis(50)),
                        Err(RecvTimeoutError::Timeout)
                    );
                    for (seen, &pid) in last.iter_mut().zip(&pids) {
                        seen.extend(thread_switches(pid));
                    }
                    if done {
                        break;
                    }
                }
                let mut total = 0;
                for (seen, before) in last.iter().zip(&first) {
                    for (tid, n) in seen {
                        total += n.saturating_sub(before.get(tid).copied().unwrap_or(0));
                    }
                }
                total
            })
            .expect("cannot start the context switch sampler");
        Switches { stop, sampler }
    }

    /// Stops sampling (after one last sample) and returns the switches
    /// counted.
    pub fn finish(self) -> u64 {
        drop(self.stop);
        self.sampler
            .join()
            .expect("the context switch sampler panicked")
    }
}

/// The first line a program prints, or `unknown`.
pub fn first_line(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(String::from)
        })
        .unwrap_or_else(|| "unknown".into())
}
