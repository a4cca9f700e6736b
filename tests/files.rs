//! Files of any size: real servers and balancers, real bytes, checked on
//! disk. Uploads through the balancer (proxy) and straight to a server
//! with a ticket (redirect), resume after a killed server and a cut
//! connection, listing and download, and every kind of bad upload.

mod util;

use lbft::auth::ClusterKey;
use lbft::proto::Ticket;
use lbft::proto::{ErrorCode, Reply};
use rand::{Rng, RngCore, SeedableRng};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};
use util::{client_bin, start_balancer, start_server, Cluster, Raw, SmallDisk};

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256_file(path: &Path) -> String {
    let mut f = std::fs::File::open(path).unwrap();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    hex(&h.finalize())
}

/// Writes `size` pseudo-random bytes (NULs and invalid UTF-8 included).
fn random_file(path: &Path, size: u64, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill_bytes(&mut buf[..n]);
        f.write_all(&buf[..n]).unwrap();
        left -= n as u64;
    }
    f.flush().unwrap();
}

fn client(balancer: SocketAddr, cwd: &Path, args: &[&str]) -> Output {
    util::run_client(balancer, args, cwd)
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Complete files stored under `dirs` (their `files/` folders).
fn stored(dirs: &[PathBuf]) -> Vec<PathBuf> {
    util::uploads::stored_files_in(dirs)
}

#[test]
fn any_file_goes_through_the_balancer_and_comes_back() {
    let cluster = Cluster::start(3, &[], &[]);
    let work = cluster.dir.path();
    let data = work.join("photo.bin");
    random_file(&data, 5 * 1024 * 1024 + 123, 1);
    let doc = work.join("doc.json");
    std::fs::write(&doc, r#"{"titolo": "Nota", "contenuto": "abracadabra"}"#).unwrap();

    let out = client(
        cluster.balancer.addr,
        work,
        &["send", "photo.bin", "doc.json"],
    );
    assert!(out.status.success(), "{}", text(&out));
    let sha = sha256_file(&data);
    assert!(text(&out).contains(&sha), "{}", text(&out));

    // The file landed once, whole, under its name; the document went as a
    // document.
    let files = stored(&cluster.server_dirs);
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(files[0].ends_with("files/photo.bin"));
    assert_eq!(sha256_file(&files[0]), sha);
    let docs: usize = cluster
        .server_dirs
        .iter()
        .map(|d| util::stored_files(d).len())
        .sum();
    assert_eq!(docs, 1);

    // `--file` sends a document as a plain file.
    let out = client(cluster.balancer.addr, work, &["send", "--file", "doc.json"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(stored(&cluster.server_dirs).len(), 2);

    let out = client(cluster.balancer.addr, work, &["list"]);
    let listing = text(&out);
    assert!(out.status.success(), "{listing}");
    assert!(
        listing.contains("photo.bin") && listing.contains(&sha),
        "{listing}"
    );
    assert!(listing.contains("doc.json"), "{listing}");

    let out = client(
        cluster.balancer.addr,
        work,
        &["get", "photo.bin", "-o", "back.bin"],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(sha256_file(&work.join("back.bin")), sha);
    assert!(!work.join("back.bin.part").exists());

    let out = client(cluster.balancer.addr, work, &["get", "nowhere.bin"]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("not_found: no file named \"nowhere.bin\""),
        "{}",
        text(&out)
    );
}

/// Forwards connections to `target`; the first connection to carry more
/// than `cut_after` bytes from the client is cut (both ways), once.
struct CutRelay {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
}

impl CutRelay {
    fn start(target: SocketAddr, cut_after: u64) -> CutRelay {
        let cut = Arc::new(AtomicBool::new(false));
        let done = cut.clone();
        let addr = util::relay::forward(target, move |mut from, mut to| {
            let mut buf = vec![0u8; 64 * 1024];
            let mut total = 0u64;
            loop {
                let n = match from.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                total += n as u64;
                if total > cut_after && !done.swap(true, Ordering::SeqCst) {
                    let _ = from.shutdown(Shutdown::Both);
                    let _ = to.shutdown(Shutdown::Both);
                    return;
                }
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            let _ = to.shutdown(Shutdown::Write);
        });
        CutRelay { addr, cut }
    }
}

/// The size of the partial upload a server holds, and which server.
fn partial_bytes(dirs: &[PathBuf]) -> Option<(usize, u64)> {
    for (i, d) in dirs.iter().enumerate() {
        let Ok(entries) = std::fs::read_dir(d.join(".partial")) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.ends_with(".json") {
                return Some((i, e.metadata().map(|m| m.len()).unwrap_or(0)));
            }
        }
    }
    None
}

#[test]
fn a_200_mib_upload_survives_a_cut_connection_and_a_killed_server() {
    let seed: u64 = rand::thread_rng().gen();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    const MIB: u64 = 1024 * 1024;
    let size = 200 * MIB + rng.gen_range(0..MIB);
    let cut_at = rng.gen_range(20 * MIB..90 * MIB);
    let kill_at = rng.gen_range(110 * MIB..180 * MIB);
    eprintln!(
        "seed {seed}: {size} bytes, connection cut after {cut_at}, server killed past {kill_at}"
    );

    let mut cluster = Cluster::start(3, &[], &["--server-timeout", "5s"]);
    let work = cluster.dir.path().to_path_buf();
    let data = work.join("big.bin");
    random_file(&data, size, seed);
    let relay = CutRelay::start(cluster.balancer.addr, cut_at);

    let mut child = Command::new(client_bin())
        .args(["--balancer", &relay.addr.to_string(), "send", "big.bin"])
        .current_dir(&work)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();

    // Kill -9 the server receiving the file once it holds `kill_at` bytes
    // (after the cut: the upload resumed on it first).
    let killed = kill_receiver(&mut cluster, &mut child, kill_at, || {
        relay.cut.load(Ordering::SeqCst)
    });
    let out = child.wait_with_output().unwrap();
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert!(relay.cut.load(Ordering::SeqCst));
    assert!(said.contains("resuming at byte"), "{said}");
    assert!(said.contains("starting again on"), "{said}");

    // One complete copy, on a server that was not killed, with the bytes
    // sent; nothing partial visible anywhere.
    let files = stored(&cluster.server_dirs);
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(!files[0].starts_with(&cluster.server_dirs[killed]));
    assert_eq!(std::fs::metadata(&files[0]).unwrap().len(), size);
    assert_eq!(sha256_file(&files[0]), sha256_file(&data));
}

/// With `--replicas 2`, a server killed while it receives a 200 MiB file:
/// the upload goes on elsewhere and ends with two checked copies, on two
/// servers that were not killed.
#[test]
fn a_200_mib_upload_with_two_replicas_survives_a_killed_server() {
    const MIB: u64 = 1024 * 1024;
    let size = 200 * MIB + 777;
    let kill_at = 60 * MIB;
    let mut cluster = Cluster::start(3, &[], &["--server-timeout", "5s", "--replicas", "2"]);
    let work = cluster.dir.path().to_path_buf();
    let data = work.join("big.bin");
    random_file(&data, size, 25);
    let mut child = Command::new(client_bin())
        .args([
            "--balancer",
            &cluster.balancer.addr.to_string(),
            "send",
            "big.bin",
        ])
        .current_dir(&work)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let killed = kill_receiver(&mut cluster, &mut child, kill_at, || true);
    let out = child.wait_with_output().unwrap();
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    let files = stored(&cluster.server_dirs);
    assert_eq!(files.len(), 2, "two copies: {files:?}");
    let want = sha256_file(&data);
    for file in &files {
        assert!(!file.starts_with(&cluster.server_dirs[killed]), "{file:?}");
        assert_eq!(sha256_file(file), want, "{file:?}");
    }
    assert_ne!(files[0].parent(), files[1].parent(), "one copy per server");
}

/// Kills (SIGKILL) the server receiving the client's file once it holds
/// `at` bytes and `also` holds; which server it was.
fn kill_receiver(
    cluster: &mut Cluster,
    child: &mut std::process::Child,
    at: u64,
    also: impl Fn() -> bool,
) -> usize {
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        assert!(
            Instant::now() < deadline,
            "the upload never got to {at} bytes"
        );
        if let Some(status) = child.try_wait().unwrap() {
            panic!("client ended before the kill: {status}");
        }
        match partial_bytes(&cluster.server_dirs) {
            Some((i, held)) if held >= at && also() => {
                cluster.servers[i].stop();
                return i;
            }
            _ => thread::sleep(Duration::from_millis(5)),
        }
    }
}

fn upload_json(id: u64, upload_id: &str, name: &str, size: u64) -> serde_json::Value {
    json!({"type": "upload", "id": id, "upload_id": upload_id, "name": name, "size": size})
}

fn chunk(raw: &mut Raw, id: u64, offset: u64, body: &[u8]) {
    raw.send_json(&json!({"type": "chunk", "id": id, "offset": offset, "body_len": body.len()}));
    raw.send_frame(body);
}

fn error_code(reply: Reply) -> ErrorCode {
    match reply {
        Reply::Error(e) => e.code,
        other => panic!("expected an error, got {other:?}"),
    }
}

fn ready_offset(reply: Reply) -> u64 {
    match reply {
        Reply::UploadReady(r) => r.offset,
        other => panic!("expected upload_ready, got {other:?}"),
    }
}

#[test]
fn bad_uploads_get_clear_errors_and_leave_nothing_visible() {
    let dir = tempfile::tempdir().unwrap();
    let sdir = dir.path().join("s");
    // The upload conversation itself: no tickets (see the keyed tests).
    let server = start_server(&sdir, &["--no-cluster-key"]);
    let addr = server.addr;
    let sha = |b: &[u8]| hex(&Sha256::digest(b));

    // A chunk with no upload started.
    let mut raw = Raw::connect(addr);
    chunk(&mut raw, 1, 0, b"x");
    assert_eq!(error_code(raw.reply()), ErrorCode::BadRequest);

    // A hostile upload id.
    let mut raw = Raw::connect(addr);
    raw.send_json(&upload_json(1, "../../etc", "x", 1));
    assert_eq!(error_code(raw.reply()), ErrorCode::BadRequest);

    // A chunk past the declared size.
    let mut raw = Raw::connect(addr);
    raw.send_json(&upload_json(1, "upload-past-size", "a.bin", 4));
    assert_eq!(ready_offset(raw.reply()), 0);
    chunk(&mut raw, 1, 0, b"hello");
    assert_eq!(error_code(raw.reply()), ErrorCode::SizeMismatch);
    assert!(raw.is_closed());

    // Fewer bytes than declared.
    let mut raw = Raw::connect(addr);
    raw.send_json(&upload_json(1, "upload-short", "b.bin", 10));
    assert_eq!(ready_offset(raw.reply()), 0);
    chunk(&mut raw, 1, 0, b"abc");
    raw.send_json(&json!({"type": "upload_end", "id": 1, "sha256": sha(b"abc")}));
    assert_eq!(error_code(raw.reply()), ErrorCode::SizeMismatch);

    // Resuming it: the server holds 3 bytes; a chunk beyond that is refused.
    let mut raw = Raw::connect(addr);
    raw.send_json(&upload_json(1, "upload-short", "b.bin", 10));
    assert_eq!(ready_offset(raw.reply()), 3);
    chunk(&mut raw, 1, 7, b"xyz");
    assert_eq!(error_code(raw.reply()), ErrorCode::BadOffset);

    // A body frame that is not as long as its chunk said.
    let mut raw = Raw::connect(addr);
    raw.send_json(&upload_json(1, "upload-short", "b.bin", 10));
    assert_eq!(ready_offset(raw.reply()), 3);
    raw.send_json(&json!({"type": "chunk", "id": 1, "offset": 3, "body_len": 5}));
    raw.send_frame(b"12");
    assert_eq!(error_code(raw.reply()), ErrorCode::SizeMismatch);

    // The wrong checksum: refused, and the bytes are discarded.
    let mut raw = Raw::connect(addr);
    raw.send_json(&upload_json(1, "upload-bad-sum", "c.bin", 3));
    assert_eq!(ready_offset(raw.reply()), 0);
    chunk(&mut raw, 1, 0, b"abc");
    raw.send_json(&json!({"type": "upload_end", "id": 2, "sha256": sha(b"abd")}));
    assert_eq!(error_code(raw.reply()), ErrorCode::ChecksumMismatch);

    // A second upload racing the same id.
    let mut first = Raw::connect(addr);
    first.send_json(&upload_json(1, "upload-raced", "../../etc/passwd", 6));
    assert_eq!(ready_offset(first.reply()), 0);
    let mut second = Raw::connect(addr);
    second.send_json(&upload_json(1, "upload-raced", "../../etc/passwd", 6));
    assert_eq!(error_code(second.reply()), ErrorCode::InProgress);
    // Meanwhile the server serves documents.
    second.store(2, "still served", "aaa");
    assert!(matches!(second.reply(), Reply::Stored(_)));
    chunk(&mut first, 1, 0, b"abc");
    chunk(&mut first, 1, 3, b"def");
    first.send_json(&json!({"type": "upload_end", "id": 3, "sha256": sha(b"abcdef")}));
    match first.reply() {
        Reply::FileStored(s) => {
            // Kept as sent; stored under a safe name.
            assert_eq!(
                (s.name.as_str(), s.file.as_str()),
                ("../../etc/passwd", "etc_passwd")
            );
            assert_eq!((s.size, s.sha256), (6, sha(b"abcdef")));
        }
        other => panic!("{other:?}"),
    }
    // Asking again for a finished upload gives the same file, not a copy.
    let mut again = Raw::connect(addr);
    again.send_json(&upload_json(1, "upload-raced", "../../etc/passwd", 6));
    assert_eq!(ready_offset(again.reply()), 6);
    again.send_json(&json!({"type": "upload_end", "id": 4, "sha256": sha(b"abcdef")}));
    match again.reply() {
        Reply::FileStored(s) => assert!(s.existing),
        other => panic!("{other:?}"),
    }

    // Only the good file is visible, inside the storage folder.
    let files = stored(std::slice::from_ref(&sdir));
    assert_eq!(files, vec![sdir.join("files/etc_passwd")]);
    assert_eq!(std::fs::read(&files[0]).unwrap(), b"abcdef");
}

/// Uploads `body` straight to a server with `ticket` and returns the reply
/// to `upload`.
fn upload_with_ticket(
    addr: SocketAddr,
    upload_id: &str,
    size: u64,
    ticket: serde_json::Value,
) -> Reply {
    let mut raw = Raw::connect(addr);
    let mut request = upload_json(1, upload_id, "t.bin", size);
    request["ticket"] = ticket;
    raw.send_json(&request);
    raw.reply()
}

#[test]
fn redirect_mode_sends_clients_to_servers_with_tickets_that_cannot_be_forged() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("cluster.key");
    let key_arg = key_file.display().to_string();
    let key_args = ["--cluster-key-file", key_arg.as_str()];
    let dirs: Vec<PathBuf> = (0..2).map(|i| dir.path().join(format!("s{i}"))).collect();
    let servers: Vec<_> = dirs.iter().map(|d| start_server(d, &key_args)).collect();
    let addrs: Vec<SocketAddr> = servers.iter().map(|s| s.addr).collect();
    let mut balancer_args = vec!["--mode", "redirect"];
    balancer_args.extend(key_args);
    let balancer = start_balancer(dir.path(), &addrs, &balancer_args);

    let data = dir.path().join("r.bin");
    random_file(&data, 3 * 1024 * 1024, 7);
    let out = client(balancer.addr, dir.path(), &["send", "r.bin"]);
    assert!(out.status.success(), "{}", text(&out));
    let files = stored(&dirs);
    assert_eq!(files.len(), 1);
    assert_eq!(sha256_file(&files[0]), sha256_file(&data));
    let log = std::fs::read_to_string(dir.path().join("loadbalancer.log")).unwrap();
    assert!(log.contains("redirected to"), "{log}");
    // The server reports the transfer to the balancer, which tracks it.
    let tracked = util::eventually(|| {
        let out = client(balancer.addr, dir.path(), &["transfers"]);
        let listing = text(&out);
        listing.contains("r.bin") && listing.contains("stored")
    });
    assert!(
        tracked,
        "{}",
        text(&client(balancer.addr, dir.path(), &["transfers"]))
    );

    // Straight to a server without a ticket, or with a bad one: refused.
    let key = ClusterKey::from_file(&key_file).unwrap();
    let sign = |id: &str, size: u64, server: &str, expires_ms: u64| {
        serde_json::to_value(Ticket::new(server, expires_ms).signed(&key, id, size)).unwrap()
    };
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let s0 = addrs[0].to_string();
    let mut raw = Raw::connect(addrs[0]);
    raw.send_json(&upload_json(1, "no-ticket-1", "t.bin", 3));
    assert_eq!(error_code(raw.reply()), ErrorCode::BadTicket);
    let forged =
        Ticket::new(&s0, now_ms + 60_000).signed(&ClusterKey::generate(), "forged-0001", 3);
    let forged = serde_json::to_value(forged).unwrap();
    assert_eq!(
        error_code(upload_with_ticket(addrs[0], "forged-0001", 3, forged)),
        ErrorCode::BadTicket
    );
    let expired = sign("expired-001", 3, &s0, now_ms - 1_000);
    assert_eq!(
        error_code(upload_with_ticket(addrs[0], "expired-001", 3, expired)),
        ErrorCode::BadTicket
    );
    let other_server = sign("elsewhere-1", 3, &addrs[1].to_string(), now_ms + 60_000);
    assert_eq!(
        error_code(upload_with_ticket(addrs[0], "elsewhere-1", 3, other_server)),
        ErrorCode::BadTicket
    );
    // A ticket for 3 bytes does not cover 4.
    let good = sign("resized-001", 3, &s0, now_ms + 60_000);
    assert_eq!(
        error_code(upload_with_ticket(addrs[0], "resized-001", 4, good.clone())),
        ErrorCode::BadTicket
    );
    assert_eq!(
        ready_offset(upload_with_ticket(addrs[0], "resized-001", 3, good)),
        0
    );
    assert_eq!(stored(&dirs).len(), 1);
}

#[test]
fn documents_keep_flowing_while_a_large_upload_is_open() {
    let cluster = Cluster::start(1, &[], &[]);
    let addr = cluster.balancer.addr;
    // An upload that has started and then waits.
    let mut upload = Raw::connect(addr);
    upload.send_json(&upload_json(
        1,
        "slow-upload-1",
        "slow.bin",
        2 * 1024 * 1024,
    ));
    assert_eq!(ready_offset(upload.reply()), 0);
    let first = vec![7u8; 1024 * 1024];
    chunk(&mut upload, 1, 0, &first);

    // 300 documents to the same (only) server meanwhile.
    let acked = AtomicU64::new(0);
    let seen = util::send_batch(addr, (0..300).map(|i| format!("doc {i}")).collect(), || {
        acked.fetch_add(1, Ordering::Relaxed);
    });
    assert_eq!(seen.stored.len(), 300, "errors: {:?}", seen.errors);

    chunk(&mut upload, 1, 1024 * 1024, &first);
    let mut h = Sha256::new();
    h.update(&first);
    h.update(&first);
    upload.send_json(&json!({"type": "upload_end", "id": 2, "sha256": hex(&h.finalize())}));
    assert!(matches!(upload.reply(), Reply::FileStored(_)));
    assert_eq!(stored(&cluster.server_dirs).len(), 1);
}

#[test]
#[cfg_attr(lbft_not_root, ignore = "needs root: mounts a small tmpfs")]
fn a_disk_that_fills_up_mid_file_is_a_clear_error_and_the_server_keeps_storing() {
    let dir = tempfile::tempdir().unwrap();
    let disk = match SmallDisk::mount(dir.path().join("disk"), "4m") {
        Ok(d) => d,
        Err(why) => panic!("cannot mount a small tmpfs to fill up, as root: {why}"),
    };
    // Declared after the disk, so the server stops before it is unmounted.
    let server = start_server(&disk.path.join("s"), &["--no-cluster-key"]);
    let sha = |b: &[u8]| hex(&Sha256::digest(b));
    let mut raw = Raw::connect(server.addr);
    let size = 8 * 1024 * 1024u64;
    raw.send_json(&upload_json(1, "too-big-for-disk", "big.bin", size));
    assert_eq!(ready_offset(raw.reply()), 0);
    let block = vec![1u8; 512 * 1024];
    let mut offset = 0;
    let reply = loop {
        assert!(offset < size, "8 MiB fitted on a 4 MiB disk");
        chunk(&mut raw, 1, offset, &block);
        offset += block.len() as u64;
        // The server answers only when something is wrong.
        raw.stream
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let mut header = [0u8; 4];
        match raw.stream.peek(&mut header) {
            Ok(4) => {
                raw.stream
                    .set_read_timeout(Some(util::REPLY_TIMEOUT))
                    .unwrap();
                break raw.reply();
            }
            _ => continue,
        }
    };
    match reply {
        Reply::Error(e) => {
            assert_eq!(e.code, ErrorCode::DiskFull, "{}", e.message);
            assert!(e.message.contains("disk is full"), "{}", e.message);
        }
        other => panic!("{other:?}"),
    }
    // Nothing visible, the room given back, and documents still stored.
    let sdir = disk.path.join("s");
    assert!(stored(std::slice::from_ref(&sdir)).is_empty());
    let mut other = Raw::connect(server.addr);
    other.store(1, "after the full disk", "abc");
    assert!(matches!(other.reply(), Reply::Stored(_)));
    // A small file still fits.
    other.send_json(&upload_json(2, "small-after-full", "small.bin", 3));
    assert_eq!(ready_offset(other.reply()), 0);
    chunk(&mut other, 2, 0, b"abc");
    other.send_json(&json!({"type": "upload_end", "id": 3, "sha256": sha(b"abc")}));
    assert!(matches!(other.reply(), Reply::FileStored(_)));
    drop(server);
}

#[test]
fn a_redirected_upload_whose_server_dies_goes_on_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("cluster.key");
    let key_arg = key_file.display().to_string();
    let key_args = ["--cluster-key-file", key_arg.as_str()];
    let dirs: Vec<PathBuf> = (0..2).map(|i| dir.path().join(format!("s{i}"))).collect();
    let mut servers: Vec<_> = dirs.iter().map(|d| start_server(d, &key_args)).collect();
    let addrs: Vec<SocketAddr> = servers.iter().map(|s| s.addr).collect();
    let mut balancer_args = vec!["--mode", "redirect"];
    balancer_args.extend(key_args);
    let balancer = start_balancer(dir.path(), &addrs, &balancer_args);

    let size = 60 * 1024 * 1024;
    let data = dir.path().join("far.bin");
    random_file(&data, size, 11);
    let mut child = Command::new(client_bin())
        .args(["--balancer", &balancer.addr.to_string(), "send", "far.bin"])
        .current_dir(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let killed = loop {
        assert!(Instant::now() < deadline, "the upload never got going");
        if let Some(status) = child.try_wait().unwrap() {
            panic!("client ended before the kill: {status}");
        }
        match partial_bytes(&dirs) {
            Some((i, held)) if held >= size / 3 => {
                servers[i].stop();
                break i;
            }
            _ => thread::sleep(Duration::from_millis(5)),
        }
    };
    let out = child.wait_with_output().unwrap();
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("starting again on"), "{said}");
    let files = stored(&dirs);
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(!files[0].starts_with(&dirs[killed]));
    assert_eq!(sha256_file(&files[0]), sha256_file(&data));
}
