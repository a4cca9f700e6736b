//! The balancer's catalog of stored files and documents, with real
//! servers, balancers and clients: a name sent twice keeps the newest (one
//! copy in the cluster), a server that is down makes its files
//! unavailable (not missing), `delete`, resume across runs of `send`, a
//! `get` that finds nothing leaves nothing, `.json` files that are not
//! documents, and a catalog that survives a restart and is rebuilt from
//! the servers when its state file is gone or behind.

mod util;

use lbft::auth::ClusterKey;
use lbft::proto::{Reply, Ticket};
use rand::{RngCore, SeedableRng};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::Ordering;
use util::relay::CountingRelay;
use util::{client_bin, start, start_balancer, start_server, Cluster, Proc, Raw};

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn client(balancer: SocketAddr, cwd: &Path, args: &[&str]) -> Output {
    util::run_client(balancer, args, cwd)
}

/// Complete files stored under `dirs` (their `files/` folders).
fn stored(dirs: &[PathBuf]) -> Vec<PathBuf> {
    util::uploads::stored_files_in(dirs)
}

fn random_file(path: &Path, size: usize, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut bytes = vec![0u8; size];
    rng.fill_bytes(&mut bytes);
    std::fs::write(path, bytes).unwrap();
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The listing line of `name`, if `list` shows it.
fn listed(balancer: SocketAddr, cwd: &Path, name: &str) -> Option<String> {
    let out = client(balancer, cwd, &["list"]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.starts_with(&format!("{name} ")))
        .map(str::to_owned)
}

#[test]
fn a_name_sent_twice_keeps_the_newest_once_in_proxy_and_redirect_mode() {
    for mode in ["proxy", "redirect"] {
        let cluster = Cluster::start(3, &[], &["--mode", mode]);
        let work = cluster.dir.path();
        let dup = work.join("dup.txt");
        std::fs::write(&dup, "v1\n").unwrap();
        let out = client(cluster.balancer.addr, work, &["send", "dup.txt"]);
        assert!(out.status.success(), "{mode}: {}", text(&out));
        std::fs::write(&dup, "v2-newer\n").unwrap();
        let out = client(cluster.balancer.addr, work, &["send", "dup.txt"]);
        assert!(out.status.success(), "{mode}: {}", text(&out));
        let out = client(
            cluster.balancer.addr,
            work,
            &["get", "dup.txt", "-o", "out.txt"],
        );
        assert!(out.status.success(), "{mode}: {}", text(&out));
        assert_eq!(
            std::fs::read_to_string(work.join("out.txt")).unwrap(),
            "v2-newer\n",
            "{mode}"
        );
        // One copy in the cluster, one entry in the listing.
        let files = stored(&cluster.server_dirs);
        assert_eq!(files.len(), 1, "{mode}: {files:?}");
        assert_eq!(std::fs::read(&files[0]).unwrap(), b"v2-newer\n");
        let out = client(cluster.balancer.addr, work, &["list", "--files"]);
        let listing = String::from_utf8_lossy(&out.stdout).to_string();
        assert_eq!(
            listing.lines().filter(|l| l.starts_with("dup.txt")).count(),
            1,
            "{mode}: {listing}"
        );

        // --no-clobber refuses instead, and keeps what is there.
        std::fs::write(&dup, "v3\n").unwrap();
        let out = client(
            cluster.balancer.addr,
            work,
            &["send", "--no-clobber", "dup.txt"],
        );
        assert!(!out.status.success(), "{mode}: {}", text(&out));
        assert!(
            text(&out).contains("exists: a file named \"dup.txt\" exists already"),
            "{mode}: {}",
            text(&out)
        );
        assert_eq!(stored(&cluster.server_dirs).len(), 1, "{mode}");
    }
}

#[test]
fn names_are_kept_as_sent_and_get_takes_them() {
    let cluster = Cluster::start(1, &[], &[]);
    let work = cluster.dir.path();
    let name = "we ird..name.txt";
    std::fs::write(work.join(name), "odd").unwrap();
    let out = client(cluster.balancer.addr, work, &["send", name]);
    assert!(out.status.success(), "{}", text(&out));
    // The server's folder has a safe name; the catalog maps to it.
    let files = stored(&cluster.server_dirs);
    assert!(files[0].ends_with("files/we_ird.name.txt"), "{files:?}");
    assert!(listed(cluster.balancer.addr, work, name).is_some());
    let out = client(cluster.balancer.addr, work, &["get", name, "-o", "back"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(std::fs::read(work.join("back")).unwrap(), b"odd");
}

#[test]
fn a_file_on_a_server_that_is_down_is_unavailable_until_it_is_back() {
    let mut cluster = Cluster::start(2, &[], &[]);
    let work = cluster.dir.path().to_path_buf();
    std::fs::write(work.join("kept.bin"), vec![5u8; 300_000]).unwrap();
    let out = client(cluster.balancer.addr, &work, &["send", "kept.bin"]);
    assert!(out.status.success(), "{}", text(&out));
    let holder = cluster
        .server_dirs
        .iter()
        .position(|d| d.join("files/kept.bin").exists())
        .expect("stored somewhere");
    let addr = cluster.servers[holder].addr;
    cluster.servers[holder].stop();

    // `get` finds the server not answering and says so, at once.
    let out = client(cluster.balancer.addr, &work, &["get", "kept.bin"]);
    assert!(!out.status.success());
    let said = text(&out);
    assert!(
        said.contains("unavailable:") && said.contains(&addr.to_string()),
        "{said}"
    );
    assert!(!said.contains("not_found"), "{said}");
    assert!(!work.join("kept.bin.part").exists());
    // `list` shows it unavailable, naming the server, once the balancer's
    // probes have taken the server down (no answer to wait on: polled).
    let marked = util::eventually(|| {
        listed(cluster.balancer.addr, &work, "kept.bin")
            .is_some_and(|l| l.contains(&format!("{addr} (unavailable)")))
    });
    let out = client(cluster.balancer.addr, &work, &["list"]);
    assert!(marked, "{}", text(&out));
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains(&format!("held only by {addr}")),
        "{}",
        text(&out)
    );

    // Back on the same address: `get` works again.
    let args: Vec<String> = vec![
        "--listen".into(),
        addr.to_string(),
        "--dir".into(),
        cluster.server_dirs[holder].display().to_string(),
    ];
    cluster.servers[holder] = start(util::server_bin(), &args, &work);
    let got = util::eventually(|| {
        client(
            cluster.balancer.addr,
            &work,
            &["get", "kept.bin", "-o", "k"],
        )
        .status
        .success()
    });
    assert!(got);
    assert_eq!(std::fs::read(work.join("k")).unwrap(), vec![5u8; 300_000]);
}

#[test]
fn delete_removes_the_bytes_and_the_entry_and_is_recorded() {
    let cluster = Cluster::start(2, &[], &[]);
    let work = cluster.dir.path();
    std::fs::write(work.join("gone.txt"), "bye").unwrap();
    let out = client(cluster.balancer.addr, work, &["send", "gone.txt"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(stored(&cluster.server_dirs).len(), 1);
    let out = client(cluster.balancer.addr, work, &["delete", "gone.txt"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("deleted gone.txt: removed from"),
        "{}",
        text(&out)
    );
    assert!(stored(&cluster.server_dirs).is_empty());
    assert!(listed(cluster.balancer.addr, work, "gone.txt").is_none());
    let out = client(cluster.balancer.addr, work, &["get", "gone.txt"]);
    assert!(
        text(&out).contains("not_found: no file named"),
        "{}",
        text(&out)
    );
    let out = client(cluster.balancer.addr, work, &["delete", "gone.txt"]);
    assert!(!out.status.success());
    let out = client(cluster.balancer.addr, work, &["transfers"]);
    let table = text(&out);
    assert!(
        table
            .lines()
            .any(|l| l.contains("deleted") && l.contains("gone.txt")),
        "{table}"
    );
    // Sent again after a delete: stored afresh.
    let out = client(cluster.balancer.addr, work, &["send", "gone.txt"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(stored(&cluster.server_dirs).len(), 1);
}

#[test]
fn a_get_of_a_missing_name_leaves_nothing_behind() {
    let cluster = Cluster::start(1, &[], &[]);
    let work = cluster.dir.path();
    let out = client(cluster.balancer.addr, work, &["get", "nosuch.bin"]);
    assert!(!out.status.success());
    let out = client(
        cluster.balancer.addr,
        work,
        &["get", "nosuch.bin", "-o", "OUTPUT"],
    );
    assert!(!out.status.success());
    for left in ["nosuch.bin", "nosuch.bin.part", "OUTPUT", "OUTPUT.part"] {
        assert!(!work.join(left).exists(), "{left} left behind");
    }
}

#[test]
fn a_json_file_that_is_not_a_document_is_refused_unless_sent_as_a_file() {
    let cluster = Cluster::start(1, &[], &[]);
    let work = cluster.dir.path();
    std::fs::write(work.join("wrong.json"), r#"{"name": "not a document"}"#).unwrap();
    std::fs::write(work.join("broken.json"), "{\"titolo\": ").unwrap();
    std::fs::write(work.join("arr.json"), "[1, 2, 3]").unwrap();
    let args = ["send", "wrong.json", "broken.json", "arr.json"];
    let out = client(cluster.balancer.addr, work, &args);
    assert!(!out.status.success());
    let said = text(&out);
    for (file, why) in [
        ("wrong.json", "`titolo` is missing"),
        ("broken.json", "not valid JSON"),
        ("arr.json", "expected an object with titolo and contenuto"),
    ] {
        let line = said
            .lines()
            .find(|l| l.contains(file))
            .unwrap_or_else(|| panic!("{file} not reported: {said}"));
        assert!(line.contains(why) && line.contains("--file"), "{line}");
    }
    assert!(stored(&cluster.server_dirs).is_empty());
    assert!(util::stored_files(&cluster.server_dirs[0]).is_empty());
    let out = client(
        cluster.balancer.addr,
        work,
        &["send", "--file", "wrong.json", "broken.json", "arr.json"],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(stored(&cluster.server_dirs).len(), 3);
}

/// `client send NAME` through `relay`, in `cwd`, not waited for.
fn spawn_send(relay: SocketAddr, cwd: &Path, name: &str) -> std::process::Child {
    Command::new(client_bin())
        .args(["--balancer", &relay.to_string(), "send", name])
        .current_dir(cwd)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn an_interrupted_send_resumes_from_what_the_server_holds_when_run_again() {
    const MIB: u64 = 1024 * 1024;
    let size = 48 * MIB + 12_345;
    let cluster = Cluster::start(2, &[], &[]);
    let work = cluster.dir.path();
    random_file(&work.join("big.bin"), size as usize, 3);

    // First run: killed (as by a crash) once 12 MiB went through.
    let relay = CountingRelay::start(cluster.balancer.addr, Some(12 * MIB));
    let mut first = spawn_send(relay.addr, work, "big.bin");
    relay.held.recv().unwrap();
    first.kill().unwrap();
    first.wait().unwrap();
    relay.release();

    // Second run: Ctrl-C once 12 more MiB went through; it says where it
    // stopped and that running it again resumes.
    let relay = CountingRelay::start(cluster.balancer.addr, Some(12 * MIB));
    let second = spawn_send(relay.addr, work, "big.bin");
    relay.held.recv().unwrap();
    let status = Command::new("kill")
        .args(["-INT", &second.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = second.wait_with_output().unwrap();
    relay.release();
    let said = text(&out);
    assert_eq!(out.status.code(), Some(130), "{said}");
    assert!(said.contains("resuming at byte"), "{said}");
    assert!(
        said.contains("interrupted: big.bin stopped after")
            && said.contains("run the same command again to resume"),
        "{said}"
    );

    // Third run: resumes, and sends less than the whole file.
    let relay = CountingRelay::start(cluster.balancer.addr, None);
    let out = spawn_send(relay.addr, work, "big.bin")
        .wait_with_output()
        .unwrap();
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    let from = util::uploads::resumed_from(&said);
    // Whole chunks of what went through before (the one cut short is not
    // kept): at least 11 MiB of the first run's 12.
    assert!(from >= 11 * MIB, "resumed from {from}: {said}");
    let sent = relay.from_clients.load(Ordering::SeqCst);
    assert!(
        sent < size - from + MIB,
        "{sent} bytes crossed the wire to send {} of {size}",
        size - from
    );
    // One file, whole; no partial left anywhere.
    let files = stored(&cluster.server_dirs);
    assert_eq!(files.len(), 1, "{files:?}");
    let mut h = Sha256::new();
    h.update(std::fs::read(&files[0]).unwrap());
    let mut expected = Sha256::new();
    expected.update(std::fs::read(work.join("big.bin")).unwrap());
    assert_eq!(h.finalize(), expected.finalize());
    for d in &cluster.server_dirs {
        assert_eq!(
            std::fs::read_dir(d.join(".partial")).unwrap().count(),
            0,
            "partial left in {}",
            d.display()
        );
    }
    // The runs cut short are recorded as interrupted, their error said
    // once, without a code in front of it.
    let out = client(cluster.balancer.addr, work, &["transfers", "--json"]);
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let states: Vec<&str> = lines.iter().map(|t| t["state"].as_str().unwrap()).collect();
    assert_eq!(
        states,
        ["stored", "interrupted", "interrupted"],
        "{lines:?}"
    );
    for t in &lines[1..] {
        let error = t["error"].as_str().unwrap();
        assert!(
            error.starts_with("the client went away") && !error.contains("size_mismatch"),
            "{error}"
        );
    }
}

/// The balancer of `cluster` started again on the same state file (or a
/// fresh one when it was removed), in front of the same servers.
fn restart_balancer(cluster: &mut Cluster) {
    cluster.balancer.stop();
    let addrs: Vec<SocketAddr> = cluster.servers.iter().map(|s| s.addr).collect();
    cluster.balancer = start_balancer(cluster.dir.path(), &addrs, &[]);
}

#[test]
fn the_catalog_survives_a_restart_and_is_rebuilt_without_its_state_file() {
    let mut cluster = Cluster::start(2, &[], &[]);
    let work = cluster.dir.path().to_path_buf();
    std::fs::write(work.join("a.txt"), "aaa").unwrap();
    std::fs::write(work.join("b c.txt"), "bc").unwrap();
    let out = client(cluster.balancer.addr, &work, &["send", "a.txt", "b c.txt"]);
    assert!(out.status.success(), "{}", text(&out));
    let documents = util::sample_documents();
    let out = Command::new(client_bin())
        .args(["--balancer", &cluster.balancer.addr.to_string()])
        .arg("--documents")
        .arg(documents.path())
        .args(["ftp", "3"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let shows_everything = |cluster: &Cluster| {
        let out = client(cluster.balancer.addr, &work, &["list"]);
        let listing = String::from_utf8_lossy(&out.stdout).to_string();
        let docs = listing.lines().filter(|l| l.contains("sample")).count();
        (
            listing.contains("a.txt") && listing.contains("b c.txt") && docs == 3,
            listing,
        )
    };
    let (all, listing) = shows_everything(&cluster);
    assert!(all, "{listing}");

    restart_balancer(&mut cluster);
    let (all, listing) = shows_everything(&cluster);
    assert!(all, "after a restart: {listing}");

    // Without its state file, the catalog is taken in from the servers'
    // listings (a `list` waits for that first look).
    cluster.balancer.stop();
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(work.join(format!("balancer.db{suffix}")));
    }
    restart_balancer(&mut cluster);
    let (all, listing) = shows_everything(&cluster);
    assert!(all, "rebuilt: {listing}");
    assert!(cluster.log().contains("the catalog has never seen it"));
    let out = client(
        cluster.balancer.addr,
        &work,
        &["get", "b c.txt", "-o", "bc"],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(std::fs::read(work.join("bc")).unwrap(), b"bc");
}

#[test]
fn a_catalog_behind_its_servers_catches_up_and_the_newest_file_wins() {
    let mut cluster = Cluster::start(1, &[], &[]);
    let work = cluster.dir.path().to_path_buf();
    std::fs::write(work.join("n.txt"), "old").unwrap();
    let out = client(cluster.balancer.addr, &work, &["send", "n.txt"]);
    assert!(out.status.success(), "{}", text(&out));
    cluster.balancer.stop();

    // While the balancer is away, a newer n.txt reaches the server (as when
    // the balancer stops between a server storing and the catalog
    // recording it): uploaded straight, with a ticket signed by the key.
    let server = cluster.servers[0].addr;
    let key = ClusterKey::from_file(&util::default_key(&work)).unwrap();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let body = b"newer";
    let ticket = Ticket::new(&server.to_string(), now_ms + 60_000).signed(&key, "behind-0001", 5);
    let mut raw = Raw::connect(server);
    raw.send_json(&json!({
        "type": "upload", "id": 1, "upload_id": "behind-0001", "name": "n.txt", "size": 5,
        "ticket": serde_json::to_value(ticket).unwrap()
    }));
    assert!(matches!(raw.reply(), Reply::UploadReady(_)));
    raw.send_json(&json!({"type": "chunk", "id": 1, "offset": 0, "body_len": 5}));
    raw.send_frame(body);
    raw.send_json(&json!({"type": "upload_end", "id": 2, "sha256": hex(&Sha256::digest(body))}));
    assert!(matches!(raw.reply(), Reply::FileStored(_)));
    assert_eq!(stored(&cluster.server_dirs).len(), 2);

    let addrs = [server];
    cluster.balancer = start_balancer(&work, &addrs, &[]);
    // The catalog sees the server hold more than it knows, takes its
    // listing in, and the newer file wins: the older one is removed.
    let caught_up = util::eventually(|| stored(&cluster.server_dirs).len() == 1);
    assert!(
        caught_up,
        "{:?}\n{}",
        stored(&cluster.server_dirs),
        cluster.log()
    );
    let out = client(cluster.balancer.addr, &work, &["get", "n.txt", "-o", "got"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(std::fs::read(work.join("got")).unwrap(), body);
    assert!(
        cluster.log().contains("catalog: behind on"),
        "{}",
        cluster.log()
    );
}

#[test]
fn a_server_answers_delete_and_inventory_only_after_the_handshake() {
    let dir = tempfile::tempdir().unwrap();
    let sdir = dir.path().join("s");
    let server: Proc = start_server(&sdir, &[]);
    let mut raw = Raw::connect(server.addr);
    raw.send_json(&json!({"type": "delete", "id": 1, "name": "x"}));
    match raw.reply() {
        Reply::Error(e) => assert_eq!(e.code, lbft::proto::ErrorCode::Unauthenticated),
        other => panic!("{other:?}"),
    }
    let mut proven = Raw::connect_to_server(server.addr, &sdir);
    proven.send_json(&json!({"type": "inventory", "id": 2}));
    match proven.reply() {
        Reply::Inventory(i) => assert_eq!((i.files, i.documents), (0, 0)),
        other => panic!("{other:?}"),
    }
    proven.send_json(&json!({"type": "delete", "id": 3, "name": "x"}));
    match proven.reply() {
        Reply::Error(e) => assert_eq!(e.code, lbft::proto::ErrorCode::NotFound),
        other => panic!("{other:?}"),
    }
}
