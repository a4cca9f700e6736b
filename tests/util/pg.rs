//! A throwaway PostgreSQL cluster for tests and benchmarks: `initdb` into
//! a temporary folder, `pg_ctl start` on a free loopback port (its unix
//! socket in the same folder), `pg_ctl stop` and the folder removed on
//! drop. Run as root, the cluster runs as `nobody` (PostgreSQL refuses
//! root), the folder handed to it.
//!
//! Without PostgreSQL installed the helper panics with a message saying
//! how to get it: a test of the shared state must not pass without one.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Who logs in: the cluster's superuser, with trust on loopback.
pub const PG_USER: &str = "lbft";
/// The unprivileged account a cluster started by root runs as.
const RUN_AS: &str = "nobody";

pub struct Pg {
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
    as_root: bool,
}

/// The newest `/usr/lib/postgresql/*/bin` with `initdb`.
fn find_bin() -> PathBuf {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    match found.pop() {
        Some((_, bin)) => bin,
        None => panic!(
            "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb): the shared-state \
             tests need a real one. Run .ci/run, which installs it (apt-get install postgresql)."
        ),
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("a free loopback port");
    listener.local_addr().unwrap().port()
}

impl Pg {
    /// A new cluster, running; `settings` are extra `-c NAME=VALUE`s.
    pub fn start_with(settings: &[&str]) -> Pg {
        let bin = find_bin();
        let dir = tempfile::Builder::new()
            .prefix("lbft-pg")
            .tempdir()
            .unwrap();
        let as_root = is_root();
        if as_root {
            let status = Command::new("chown")
                .args([
                    "-R",
                    &format!("{RUN_AS}:"),
                    &dir.path().display().to_string(),
                ])
                .status()
                .expect("chown runs");
            assert!(
                status.success(),
                "cannot hand {} to {RUN_AS}",
                dir.path().display()
            );
        }
        let mut pg = Pg {
            dir,
            bin,
            port: 0,
            as_root,
        };
        let data = pg.data().display().to_string();
        pg.run(
            "initdb",
            &[
                "-D",
                &data,
                "-U",
                PG_USER,
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        );
        // A port found free may be taken before the cluster binds it: try
        // a few.
        for _ in 0..5 {
            pg.port = free_port();
            let mut options = format!(
                "-c listen_addresses=127.0.0.1 -p {} -k {}",
                pg.port,
                pg.dir.path().display()
            );
            for s in settings {
                options.push_str(&format!(" -c {s}"));
            }
            let log = pg.dir.path().join("postgres.log").display().to_string();
            let out = pg.try_run(
                "pg_ctl",
                &["start", "-w", "-D", &data, "-l", &log, "-o", &options],
            );
            if out.status.success() {
                return pg;
            }
        }
        panic!("PostgreSQL did not start; its log:\n{}", pg.log());
    }

    /// A new cluster with the defaults of tests: durable writes off, for
    /// speed (a test's cluster does not outlive a crash anyway).
    pub fn start() -> Pg {
        Pg::start_with(&[
            "fsync=off",
            "synchronous_commit=off",
            "full_page_writes=off",
        ])
    }

    /// A new cluster with PostgreSQL's own defaults (durable commits), as
    /// a deployment has them: for benchmarks.
    pub fn start_with_defaults() -> Pg {
        Pg::start_with(&[])
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }

    /// A new, empty database; returns its URL (no password: trust).
    pub fn create_db(&self, name: &str) -> String {
        let port = self.port.to_string();
        self.run(
            "createdb",
            &["-h", "127.0.0.1", "-p", &port, "-U", PG_USER, name],
        );
        self.url(name)
    }

    pub fn url(&self, db: &str) -> String {
        format!("postgres://{PG_USER}@127.0.0.1:{}/{db}", self.port)
    }

    /// Runs `psql -c SQL` on `db`; returns its output (unaligned, no
    /// headers).
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let port = self.port.to_string();
        let out = self.run(
            "psql",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                PG_USER,
                "-d",
                db,
                "-At",
                "-c",
                sql,
            ],
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn try_run(&self, tool: &str, args: &[&str]) -> Output {
        let program = self.bin.join(tool);
        let mut command = if self.as_root {
            let mut c = Command::new("runuser");
            c.args(["-u", RUN_AS, "--"]).arg(&program);
            c
        } else {
            Command::new(&program)
        };
        command
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()))
    }

    fn run(&self, tool: &str, args: &[&str]) -> Output {
        let out = self.try_run(tool, args);
        assert!(
            out.status.success(),
            "{tool} {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        let data = self.data().display().to_string();
        // pg_ctl waits until every process of the cluster has exited.
        let out = self.try_run("pg_ctl", &["stop", "-w", "-m", "immediate", "-D", &data]);
        if !out.status.success() && self.data().join("postmaster.pid").exists() {
            eprintln!(
                "pg_ctl stop failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}
