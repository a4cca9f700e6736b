//! Balancers sharing one PostgreSQL state (`--state postgres://...`) act
//! as one service: users, transfers and the pool are the same on each.
//! Every test runs a real throwaway PostgreSQL cluster (`util::pg`) and
//! real balancers and servers.

mod util;

use lbft::ids;
use lbft::proto::{Reply, TransferView};
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use util::pg::Pg;
use util::*;

/// How soon a change of the pool on one balancer must reach the others.
const PROPAGATION: Duration = Duration::from_secs(2);
const PASSWORD: &str = "correct horse battery";

/// A folder with `count` servers (started first: they make the cluster
/// key the balancers then read) and a database of its own.
struct Service {
    pg: Pg,
    url: String,
    dir: tempfile::TempDir,
    servers: Vec<Proc>,
    server_dirs: Vec<std::path::PathBuf>,
}

impl Service {
    fn new(count: usize) -> Service {
        let pg = Pg::start();
        let url = pg.create_db("lbft");
        let dir = tempfile::tempdir().unwrap();
        let mut servers = Vec::new();
        let mut server_dirs = Vec::new();
        for i in 0..count {
            let sdir = dir.path().join(format!("server{i}"));
            servers.push(start_server(&sdir, &[]));
            server_dirs.push(sdir);
        }
        Service {
            pg,
            url,
            dir,
            servers,
            server_dirs,
        }
    }

    /// Balancer `name` (its log `name.log`) on the shared state, in front
    /// of every server.
    fn balancer(&self, name: &str, extra: &[&str]) -> Proc {
        let addrs: Vec<SocketAddr> = self.servers.iter().map(|s| s.addr).collect();
        let log = format!("{name}.log");
        let mut args = vec!["--state", &self.url, "--log-file", &log];
        args.extend(extra);
        if addrs.is_empty() {
            args.extend(["--listen", "127.0.0.1:0", "--check-interval", "100ms"]);
            return start(balancer_bin(), &strings(&args), self.dir.path());
        }
        start_balancer(self.dir.path(), &addrs, &args)
    }

    /// `count` servers started with `--balancer` naming every one of
    /// `balancers`, once each balancer has them all up; their folders.
    fn servers_joining(
        &self,
        count: usize,
        balancers: &[SocketAddr],
    ) -> (Vec<Proc>, Vec<std::path::PathBuf>) {
        let list: Vec<String> = balancers.iter().map(|b| b.to_string()).collect();
        let list = list.join(",");
        let dirs: Vec<std::path::PathBuf> = (0..count)
            .map(|i| self.dir.path().join(format!("server{i}")))
            .collect();
        let procs = dirs
            .iter()
            .map(|d| start_server(d, &["--balancer", &list, "--heartbeat", "100ms"]))
            .collect();
        for &b in balancers {
            assert!(eventually(|| servers(b)
                .iter()
                .filter(|v| v.state == "up")
                .count()
                == count));
        }
        (procs, dirs)
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default()
    }

    /// `client ARGS` against `balancer`, in the folder (its cluster key).
    fn client(&self, balancer: SocketAddr, args: &[&str]) -> Output {
        let out = run_client(balancer, args, self.dir.path());
        assert!(out.status.success(), "client {args:?}: {out:?}");
        out
    }

    fn transfers(&self, balancer: SocketAddr) -> Vec<TransferView> {
        let out = self.client(balancer, &["transfers", "--json", "--limit", "10000"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    }
}

/// `balancer --state URL user ARGS`, the password on standard input.
fn user_cmd_at(url: &str, args: &[&str], cwd: &Path) -> Output {
    let mut child = Command::new(balancer_bin())
        .args(["--state", url, "user"])
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    writeln!(child.stdin.take().unwrap(), "{PASSWORD}").unwrap();
    child.wait_with_output().unwrap()
}

fn contents(tag: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{tag} {i} banana")).collect()
}

#[test]
fn a_user_added_once_logs_in_on_every_balancer() {
    let service = Service::new(1);
    let one = service.balancer("one", &["--users"]);
    let two = service.balancer("two", &["--users"]);
    let out = user_cmd_at(&service.url, &["add", "alice"], service.dir.path());
    assert!(out.status.success(), "{out:?}");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("added alice"), "{said}");
    let out = user_cmd_at(&service.url, &["list"], service.dir.path());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "alice");

    for balancer in [two.addr, one.addr] {
        let mut raw = Raw::connect(balancer);
        raw.send_json(&json!({"type": "login", "id": 1, "user": "alice", "password": PASSWORD}));
        match raw.reply() {
            Reply::Welcome { user, .. } => assert_eq!(user.as_deref(), Some("alice")),
            other => panic!("{other:?}"),
        }
        raw.store(2, "t", "banana");
        assert!(matches!(raw.reply(), Reply::Stored(_)));
    }
    let out = user_cmd_at(&service.url, &["remove", "alice"], service.dir.path());
    assert!(out.status.success(), "{out:?}");
    let mut raw = Raw::connect(two.addr);
    raw.send_json(&json!({"type": "login", "id": 1, "user": "alice", "password": PASSWORD}));
    assert!(matches!(raw.reply(), Reply::Error(_)));
}

#[test]
fn a_server_drained_on_one_balancer_gets_no_work_from_any() {
    let service = Service::new(2);
    let one = service.balancer("one", &[]);
    let two = service.balancer("two", &[]);
    let drained = service.servers[0].addr.to_string();
    for b in [one.addr, two.addr] {
        assert!(eventually(|| servers(b).iter().all(|v| v.state == "up")));
    }
    service.client(one.addr, &["admin", "drain", &drained]);
    let told = Instant::now();
    let gone = |b| servers(b).iter().all(|v| v.name != drained);
    assert!(
        util::poll_until(PROPAGATION, || gone(two.addr)),
        "{drained} still in the second balancer's pool {:?} after the drain",
        told.elapsed()
    );
    assert!(gone(one.addr));
    let before = stored_files(&service.server_dirs[0]).len();
    let others = stored_files(&service.server_dirs[1]).len();
    for (b, tag) in [(one.addr, "one"), (two.addr, "two")] {
        let seen = send_batch(b, contents(tag, 50), || {});
        assert_eq!(seen.stored.len(), 50, "{:?}", seen.errors);
        assert!(seen.stored.values().all(|s| s.server != drained));
    }
    assert_eq!(stored_files(&service.server_dirs[0]).len(), before);
    assert_eq!(stored_files(&service.server_dirs[1]).len(), others + 100);
    assert!(service.log("two").contains("following another balancer"));

    // Added back on the second, it takes work on the first again.
    service.client(two.addr, &["admin", "add", &drained]);
    assert!(util::poll_until(PROPAGATION, || servers(one.addr)
        .iter()
        .any(|v| v.name == drained)));
}

/// Every transfer, by number, with the balancer each view names.
fn by_number(views: &[TransferView]) -> BTreeMap<u64, Option<String>> {
    views
        .iter()
        .map(|v| (v.number, v.balancer.clone()))
        .collect()
}

#[test]
fn transfers_of_every_balancer_show_on_each_with_unique_numbers() {
    let service = Service::new(2);
    let one = service.balancer("one", &[]);
    let mut two = service.balancer("two", &[]);
    let per = 200;
    let mut taken = BTreeMap::new();
    for b in [one.addr, two.addr] {
        let seen = send_batch(b, contents(&b.to_string(), per), || {});
        assert_eq!(seen.stored.len(), per, "{:?}", seen.errors);
        for stored in seen.stored.values() {
            assert!(taken.insert(stored.request_number, b.to_string()).is_none());
        }
    }
    // Numbers of different balancers differ in their node.
    let nodes: BTreeSet<(String, u16)> = taken
        .iter()
        .map(|(n, b)| (b.clone(), ids::parts(*n).node))
        .collect();
    assert_eq!(nodes.len(), 2, "one node per balancer: {nodes:?}");

    let expected: BTreeMap<u64, Option<String>> =
        taken.iter().map(|(n, b)| (*n, Some(b.clone()))).collect();
    for b in [one.addr, two.addr] {
        // Each balancer's writer commits its own within a moment: another
        // balancer sees them once it has.
        let mut views = Vec::new();
        let all = util::poll_until(PROPAGATION, || {
            views = service.transfers(b);
            views.len() == 2 * per && views.iter().all(|v| v.state == "stored")
        });
        assert!(all, "{} of {} transfers on {b}", views.len(), 2 * per);
        assert_eq!(by_number(&views), expected);
    }
    let table = service.client(one.addr, &["transfers", "--limit", "10000"]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.lines().next().unwrap().ends_with("BALANCER"),
        "{table}"
    );
    assert!(table.contains(&two.addr.to_string()));

    // A restarted balancer shows the same history.
    two.stop();
    let two = service.balancer("two", &[]);
    assert_eq!(by_number(&service.transfers(two.addr)), expected);
}

#[test]
fn a_server_joins_every_balancer_it_is_told() {
    let service = Service::new(0);
    let one = service.balancer("one", &[]);
    let two = service.balancer("two", &[]);
    let list = format!("{},{}", one.addr, two.addr);
    let dir = service.dir.path().join("joiner");
    let joiner = start_server(&dir, &["--balancer", &list, "--heartbeat", "100ms"]);
    let name = joiner.addr.to_string();
    for (b, log) in [(one.addr, "one"), (two.addr, "two")] {
        assert!(eventually(|| servers(b)
            .iter()
            .any(|v| v.name == name && v.state == "up")));
        // By its own registration, not only by following the other.
        assert!(eventually(|| service.log(log).contains(&format!(
            "server {name} joined the pool (registered)"
        ))));
    }
}

#[test]
fn a_password_is_never_shown() {
    let service = Service::new(1);
    let secret = "s3cr3t-never-shown";
    let url = service
        .url
        .replacen("://lbft@", &format!("://lbft:{secret}@"), 1);
    let addrs = [service.servers[0].addr];
    let b = start_balancer(
        service.dir.path(),
        &addrs,
        &["--state", &url, "--log-file", "secret.log"],
    );
    assert!(b.banner.iter().all(|l| !l.contains(secret)));
    let log = service.log("secret");
    assert!(log.contains("postgres://lbft@127.0.0.1"), "{log}");
    assert!(!log.contains(secret));

    // A database that cannot be reached: the error names it, not the password.
    let closed = url.replace(&format!(":{}/", service.pg.port), ":1/");
    let out = Command::new(balancer_bin())
        .args(["--listen", "127.0.0.1:0", "--state", &closed, "--log-file"])
        .arg(service.dir.path().join("closed.log"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("postgres://lbft@127.0.0.1:1/lbft"), "{err}");
    assert!(!err.contains(secret), "{err}");
    let help = Command::new(balancer_bin()).arg("--help").output().unwrap();
    assert!(String::from_utf8_lossy(&help.stdout).contains("--state-password-file"));
}

/// Two balancers on one PostgreSQL, three servers registered with both,
/// three clients given both: one balancer is killed (SIGKILL) in the
/// middle of 3 × 2,000 documents. Every client finishes with none failed;
/// every document is stored once; the survivor's history has every one of
/// them stored, and so does the killed balancer's once it is back.
#[test]
fn a_balancer_killed_mid_batch_leaves_one_whole_history() {
    const CLIENTS: usize = 3;
    const DOCUMENTS: usize = 2000;
    let service = Service::new(0);
    let mut one = service.balancer(
        "one",
        &["--server-timeout", "3s", "--probe-timeout", "300ms"],
    );
    let two = service.balancer(
        "two",
        &["--server-timeout", "3s", "--probe-timeout", "300ms"],
    );
    let list = format!("{},{}", one.addr, two.addr);
    let (_servers, dirs) = service.servers_joining(3, &[one.addr, two.addr]);
    let work = service.dir.path();
    let output = batches::send_through_a_kill(work, &list, CLIENTS, DOCUMENTS, || one.stop());
    assert!(
        batches::failed_over(&output) > 0,
        "nobody failed over: {output:?}"
    );
    batches::assert_each_stored_once(&dirs, CLIENTS, DOCUMENTS);

    let titles: BTreeSet<String> = (0..CLIENTS)
        .flat_map(|c| (0..DOCUMENTS).map(move |i| batches::title(c, i)))
        .collect();
    let stored_titles = |views: &[TransferView]| -> BTreeSet<String> {
        views
            .iter()
            .filter(|v| v.state == "stored")
            .map(|v| v.title.clone())
            .collect()
    };
    let survivor = service.transfers(two.addr);
    let in_history = stored_titles(&survivor);
    let missing: Vec<&String> = titles.difference(&in_history).collect();
    assert!(
        missing.is_empty(),
        "{} documents not stored in the survivor's history of {} transfers, such as {:?}",
        missing.len(),
        survivor.len(),
        &missing[..missing.len().min(10)]
    );
    let stored: BTreeMap<u64, String> = survivor
        .iter()
        .filter(|v| v.state == "stored")
        .map(|v| (v.number, v.title.clone()))
        .collect();
    let one = service.balancer("one", &[]);
    let back = service.transfers(one.addr);
    let back_stored: BTreeMap<u64, String> = back
        .iter()
        .filter(|v| v.state == "stored")
        .map(|v| (v.number, v.title.clone()))
        .collect();
    assert_eq!(back_stored, stored, "the restarted balancer's history");
}

/// An upload through a balancer that dies mid-file goes on through the
/// next one given, from what the server holds: the shared catalog knows
/// the partial.
#[test]
fn an_upload_resumes_through_the_next_balancer() {
    const MIB: u64 = 1024 * 1024;
    let size = 40 * MIB + 4321;
    let service = Service::new(0);
    let mut one = service.balancer("one", &[]);
    let two = service.balancer("two", &[]);
    let (_servers, dirs) = service.servers_joining(2, &[one.addr, two.addr]);
    let work = service.dir.path();
    let mut bytes = vec![0u8; size as usize];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut bytes);
    std::fs::write(work.join("big.bin"), &bytes).unwrap();

    // Through a relay in front of the first balancer, held once 12 MiB
    // went through; the balancer is killed while the client waits.
    let relay = util::relay::CountingRelay::start(one.addr, Some(12 * MIB));
    let client = Command::new(client_bin())
        .args(["--balancer", &format!("{},{}", relay.addr, two.addr)])
        .args(["send", "big.bin"])
        .current_dir(work)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    relay.held.recv().unwrap();
    one.stop();
    relay.release();
    let out = client.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{said}");
    assert!(said.contains("going on through"), "{said}");
    // Resumed, not started over: how much of the 12 MiB that passed the
    // relay had reached the server when the balancer died depends on the
    // sockets' buffers and the machine's load (7 MiB seen on a busy one).
    let from = util::uploads::resumed_from(&said);
    assert!(from >= MIB, "resumed from {from}: {said}");
    let stored = util::uploads::stored_files_in(&dirs);
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert!(
        std::fs::read(&stored[0]).unwrap() == bytes,
        "the bytes differ"
    );
}
