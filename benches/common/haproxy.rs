//! HAProxy as the reference: a plain TCP balancer, round robin, in front of
//! the same servers. It pins each client connection to one server, so one
//! client talks to one server through it, as on the direct path.

use super::process::{first_line, free_port, Child};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The `haproxy` program, if installed (on PATH or in /usr/sbin).
pub fn find() -> Option<PathBuf> {
    let works = |bin: &Path| {
        Command::new(bin)
            .arg("-v")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    [PathBuf::from("haproxy"), PathBuf::from("/usr/sbin/haproxy")]
        .into_iter()
        .find(|bin| works(bin))
}

/// The first line of `haproxy -v`.
pub fn version(bin: &Path) -> String {
    first_line(&bin.display().to_string(), &["-v"])
}

pub const INSTALL_HINT: &str = "HAProxy is not installed; the haproxy rows are skipped. \
    Install it with `sudo apt-get install haproxy` (Debian, Ubuntu) and run again.";

/// The configuration: TCP mode, round robin, no health checks (the
/// servers stay up), timeouts long enough for the slowest scenario.
fn config(listen: SocketAddr, servers: &[SocketAddr], maxconn: u64) -> String {
    let mut cfg = format!(
        "global\n    maxconn {maxconn}\n\n\
         defaults\n    mode tcp\n    balance roundrobin\n    timeout connect 5s\n    \
         timeout client 120s\n    timeout server 120s\n\n\
         frontend clients\n    bind {listen}\n    default_backend storage\n\n\
         backend storage\n"
    );
    for (i, server) in servers.iter().enumerate() {
        cfg.push_str(&format!("    server s{i} {server}\n"));
    }
    cfg
}

/// `maxconn` 20000, or less when the limit on open files is too low for
/// it: HAProxy refuses to start unless it may open two descriptors per
/// connection (it raises its own soft limit, up to the hard limit).
pub fn maxconn() -> u64 {
    let limit = open_files_hard_limit().unwrap_or(40_200);
    (limit.saturating_sub(200) / 2).min(20_000)
}

fn open_files_hard_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(4)?.parse().ok()
}

/// Writes the configuration into `dir` and starts `haproxy -f CFG -db`
/// (foreground) on a free port; returns once it accepts connections.
pub fn start(bin: &Path, dir: &Path, servers: &[SocketAddr]) -> Result<Child, String> {
    let listen = free_port();
    let cfg_path = dir.join("haproxy.cfg");
    std::fs::write(&cfg_path, config(listen, servers, maxconn()))
        .map_err(|e| format!("cannot write {}: {e}", cfg_path.display()))?;
    let mut command = Command::new(bin);
    command.arg("-f").arg(&cfg_path).arg("-db");
    let mut child = Child::spawn("haproxy", command);
    child.wait_accepting(listen)?;
    Ok(child)
}
