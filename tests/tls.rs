//! TLS on every link, with the real programs: certificates from
//! `balancer gen-certs`, traffic recorded by a relay in the middle, peers
//! trusting another CA, plaintext and original-format peers on TLS ports.

mod util;

use crossbeam_channel::{Receiver, TryRecvError};
use lbft::proto::{ErrorCode, Reply};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};
use util::*;

/// Writes a CA and certificates (balancer, 3 servers, client) into `dir`.
fn gen_certs(dir: &Path) {
    let out = Command::new(balancer_bin())
        .arg("gen-certs")
        .arg(dir)
        .args(["--servers", "3"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "gen-certs failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `--tls-cert`, `--tls-key` and `--tls-ca` for the party `name`.
fn tls_args(certs: &Path, name: &str) -> Vec<String> {
    let file = |f: String| certs.join(f).display().to_string();
    vec![
        "--tls-cert".into(),
        file(format!("{name}.pem")),
        "--tls-key".into(),
        file(format!("{name}-key.pem")),
        "--tls-ca".into(),
        file("ca.pem".into()),
    ]
}

/// A client that checks the balancer and presents no certificate: the
/// usual deployment.
fn ca_only(certs: &Path) -> Vec<String> {
    vec![
        "--tls-ca".into(),
        certs.join("ca.pem").display().to_string(),
    ]
}

fn refs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// Runs the client binary against `balancer` with `args` (TLS flags and a
/// command).
fn client(balancer: SocketAddr, args: &[String]) -> Output {
    Command::new(client_bin())
        .arg("--balancer")
        .arg(balancer.to_string())
        .args(args)
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Documents with distinctive contents, as files for `client send`.
fn documents(dir: &Path, tag: &str, n: usize) -> (Vec<PathBuf>, Vec<String>) {
    std::fs::create_dir_all(dir).unwrap();
    let mut paths = Vec::new();
    let mut contents = Vec::new();
    for i in 0..n {
        let content = format!("{tag} riservato numero {i}: la nebbia sale dal fiume");
        let path = dir.join(format!("{tag}{i}.json"));
        let doc = serde_json::json!({"titolo": format!("{tag} {i}"), "contenuto": content});
        std::fs::write(&path, doc.to_string()).unwrap();
        paths.push(path);
        contents.push(content);
    }
    (paths, contents)
}

/// Every stored document's content below `dir`.
fn stored_contents(dir: &Path) -> Vec<String> {
    if !dir.exists() {
        return Vec::new();
    }
    all_files(dir)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .filter_map(|p| {
            let value: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).ok()?).ok()?;
            Some(value["contenuto"].as_str()?.to_string())
        })
        .collect()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// A TCP relay in front of `target` that records every byte it passes,
/// both ways. Stops accepting when dropped.
struct Relay {
    addr: SocketAddr,
    stop: Option<crossbeam_channel::Sender<()>>,
    accept: Option<thread::JoinHandle<()>>,
}

impl Relay {
    fn start(target: SocketAddr, recorded: Arc<Mutex<Vec<u8>>>) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
        let accept = thread::spawn(move || relay_loop(listener, target, recorded, stopped));
        Relay {
            addr,
            stop: Some(stop),
            accept: Some(accept),
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        drop(self.stop.take());
        // Wake the accept loop so that it sees the stop.
        let _ = TcpStream::connect(self.addr);
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
    }
}

fn relay_loop(
    listener: TcpListener,
    target: SocketAddr,
    recorded: Arc<Mutex<Vec<u8>>>,
    stopped: Receiver<()>,
) {
    for incoming in listener.incoming() {
        if matches!(stopped.try_recv(), Err(TryRecvError::Disconnected)) {
            return;
        }
        let Ok(inbound) = incoming else { continue };
        let Ok(outbound) = TcpStream::connect(target) else {
            continue;
        };
        for (from, to) in [
            (inbound.try_clone().unwrap(), outbound.try_clone().unwrap()),
            (outbound, inbound),
        ] {
            let recorded = recorded.clone();
            thread::spawn(move || pump(from, to, &recorded));
        }
    }
}

/// Copies `from` to `to`, recording, until either side ends.
fn pump(mut from: TcpStream, mut to: TcpStream, recorded: &Mutex<Vec<u8>>) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                recorded.lock().unwrap().extend_from_slice(&buf[..n]);
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}

/// Polls `client admin servers` until `addr` is listed up.
fn wait_until_up(balancer: SocketAddr, client_tls: &[String], addr: SocketAddr) {
    let mut args = client_tls.to_vec();
    args.extend(["admin".into(), "servers".into()]);
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let out = client(balancer, &args);
        let listing = text(&out);
        let up = listing
            .lines()
            .any(|l| l.contains(&addr.to_string()) && l.contains(" up"));
        if up {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{addr} never came up at the balancer: {listing}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn documents_cross_every_link_encrypted_and_land_on_disk() {
    let work = tempfile::tempdir().unwrap();
    let certs = work.path().join("certs");
    gen_certs(&certs);
    let wire = Arc::new(Mutex::new(Vec::new()));

    // Two servers the balancer reaches through recording relays, and a
    // third that joins by registering through the client's relay. A relay
    // in the middle is what the cluster key's handshake is made to catch
    // (the proof names the address the server was reached at), so this
    // test runs without a key: TLS alone guards every link here.
    let server_dirs: Vec<PathBuf> = (1..=3)
        .map(|i| work.path().join(format!("store{i}")))
        .collect();
    let server_args = |name: &str| {
        let mut args = tls_args(&certs, name);
        args.push("--no-cluster-key".into());
        args
    };
    let s1 = start_server(&server_dirs[0], &refs(&server_args("server1")));
    let s2 = start_server(&server_dirs[1], &refs(&server_args("server2")));
    let r1 = Relay::start(s1.addr, wire.clone());
    let r2 = Relay::start(s2.addr, wire.clone());
    let balancer = start_balancer(
        work.path(),
        &[r1.addr, r2.addr],
        &refs(&server_args("balancer")),
    );
    let front = Relay::start(balancer.addr, wire.clone());
    let mut joining = server_args("server3");
    joining.extend(["--balancer".into(), front.addr.to_string()]);
    let s3 = start_server(&server_dirs[2], &refs(&joining));

    // The client presents no certificate: it checks the balancer's.
    let client_tls = ca_only(&certs);
    for addr in [r1.addr, r2.addr, s3.addr] {
        wait_until_up(front.addr, &client_tls, addr);
    }

    let (paths, contents) = documents(&work.path().join("docs"), "segreto", 12);
    let mut args = client_tls.clone();
    args.push("send".into());
    args.extend(paths.iter().map(|p| p.display().to_string()));
    let out = client(front.addr, &args);
    assert!(out.status.success(), "{}", text(&out));

    // Every document landed, spread over the servers.
    let mut stored = Vec::new();
    for dir in &server_dirs {
        stored.extend(stored_contents(dir));
    }
    stored.sort();
    let mut expected = contents.clone();
    expected.sort();
    assert_eq!(stored, expected);
    let via_relays =
        stored_contents(&server_dirs[0]).len() + stored_contents(&server_dirs[1]).len();
    assert!(via_relays > 0, "no document crossed a recorded server link");

    // The relays saw the traffic, and none of it in the clear.
    drop((front, r1, r2));
    let bytes = wire.lock().unwrap().clone();
    let plain: usize = contents.iter().map(String::len).sum();
    assert!(bytes.len() > plain, "only {} bytes recorded", bytes.len());
    for content in &contents {
        assert!(
            !contains(&bytes, content.as_bytes()),
            "`{content}` crossed the wire in the clear"
        );
    }
    assert!(!contains(&bytes, b"segreto"));
    assert!(
        !contains(&bytes, b"\"type\""),
        "frames crossed in the clear"
    );
    drop((s1, s2, s3, balancer));
}

#[test]
fn clients_of_another_ca_are_refused_with_a_clear_error_and_store_nothing() {
    let work = tempfile::tempdir().unwrap();
    let ours = work.path().join("ours");
    let theirs = work.path().join("theirs");
    gen_certs(&ours);
    gen_certs(&theirs);
    let (balancer, store) = tls_balancer(work.path(), &ours, &["--tls-client-certs", "required"]);
    let (paths, _) = documents(&work.path().join("docs"), "estraneo", 1);
    let send = |tls: Vec<String>| {
        let mut args = tls;
        args.push("send".into());
        args.push(paths[0].display().to_string());
        client(balancer.addr, &args)
    };

    // A client trusting another CA does not accept the balancer.
    let out = send(tls_args(&theirs, "client"));
    assert!(!out.status.success());
    let said = text(&out);
    assert!(
        said.contains("TLS handshake") && said.contains("certificate"),
        "unclear error: {said}"
    );

    // The balancer asks for client certificates (--tls-client-certs
    // required) and takes none from another CA, nor a client without one.
    let mut foreign = tls_args(&theirs, "client");
    foreign[5] = ours.join("ca.pem").display().to_string();
    let out = send(foreign);
    assert!(!out.status.success());
    let said = text(&out);
    assert!(said.contains("TLS"), "unclear error: {said}");
    let out = send(ca_only(&ours));
    assert!(!out.status.success());
    let said = text(&out);
    assert!(said.contains("TLS"), "unclear error: {said}");
    let log = std::fs::read_to_string(work.path().join("loadbalancer.log")).unwrap();
    assert!(log.contains("TLS handshake failed"), "{log}");

    assert!(stored_contents(&store).is_empty());
    // The rightful client is served.
    let out = send(tls_args(&ours, "client"));
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(stored_contents(&store).len(), 1);
}

#[test]
fn a_server_trusting_another_ca_never_gets_work() {
    let work = tempfile::tempdir().unwrap();
    let ours = work.path().join("ours");
    let theirs = work.path().join("theirs");
    gen_certs(&ours);
    gen_certs(&theirs);
    let foreign_dir = work.path().join("foreign");
    let foreign = start_server(&foreign_dir, &refs(&tls_args(&theirs, "server1")));
    let good_dir = work.path().join("good");
    let good = start_server(&good_dir, &refs(&tls_args(&ours, "server1")));
    let balancer = start_balancer(
        work.path(),
        &[foreign.addr, good.addr],
        &refs(&tls_args(&ours, "balancer")),
    );
    let client_tls = tls_args(&ours, "client");
    wait_until_up(balancer.addr, &client_tls, good.addr);
    let (paths, contents) = documents(&work.path().join("docs"), "solo", 6);
    let mut args = client_tls.clone();
    args.push("send".into());
    args.extend(paths.iter().map(|p| p.display().to_string()));
    let out = client(balancer.addr, &args);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(stored_contents(&good_dir).len(), contents.len());
    assert!(stored_contents(&foreign_dir).is_empty());
    let mut listing_args = client_tls;
    listing_args.extend(["admin".into(), "servers".into()]);
    let listing = text(&client(balancer.addr, &listing_args));
    let row = listing
        .lines()
        .find(|l| l.contains(&foreign.addr.to_string()))
        .unwrap_or_else(|| panic!("{listing}"));
    assert!(!row.contains(" up"), "{row}");
}

#[test]
fn clients_without_certificates_reach_a_balancer_that_uses_mutual_tls_with_its_servers() {
    let work = tempfile::tempdir().unwrap();
    let certs = work.path().join("certs");
    gen_certs(&certs);
    // The deployment as README shows it: every program started from one
    // folder (one cluster key), servers with their certificates and the
    // CA, the balancer likewise, clients with the CA only.
    let dirs: Vec<PathBuf> = (1..=2)
        .map(|i| work.path().join(format!("store{i}")))
        .collect();
    let servers: Vec<Proc> = dirs
        .iter()
        .enumerate()
        .map(|(i, d)| start_server(d, &refs(&tls_args(&certs, &format!("server{}", i + 1)))))
        .collect();
    let addrs: Vec<SocketAddr> = servers.iter().map(|s| s.addr).collect();
    let balancer = start_balancer(work.path(), &addrs, &refs(&tls_args(&certs, "balancer")));
    let client_tls = ca_only(&certs);
    for addr in &addrs {
        wait_until_up(balancer.addr, &client_tls, *addr);
    }
    let (paths, contents) = documents(&work.path().join("docs"), "deployed", 8);
    let mut args = client_tls.clone();
    args.push("send".into());
    args.extend(paths.iter().map(|p| p.display().to_string()));
    let out = client(balancer.addr, &args);
    assert!(out.status.success(), "{}", text(&out));
    let mut stored: Vec<String> = dirs.iter().flat_map(|d| stored_contents(d)).collect();
    stored.sort();
    let mut expected = contents;
    expected.sort();
    assert_eq!(stored, expected);
    assert!(
        dirs.iter().all(|d| !stored_contents(d).is_empty()),
        "every server took work"
    );

    // The servers take only peers with a certificate from the CA: a peer
    // that checks them but has none of its own is refused in the TLS
    // handshake, before a byte of the protocol.
    let out = client(
        servers[0].addr,
        &[
            &client_tls[..],
            &[
                "list".into(),
                "--server".into(),
                servers[0].addr.to_string(),
            ],
        ]
        .concat(),
    );
    assert!(!out.status.success());
    let said = text(&out);
    assert!(said.contains("TLS"), "{said}");
    let log = std::fs::read_to_string(work.path().join("loadbalancer.log")).unwrap();
    assert!(
        log.contains("security: TLS listener (client certificates: none), TLS connections verified against --tls-ca; cluster key"),
        "{log}"
    );
}

/// A balancer with TLS and one in-process server, in `work`.
fn tls_balancer(work: &Path, certs: &Path, extra: &[&str]) -> (Proc, PathBuf) {
    let store = work.join("store");
    let mut args = tls_args(certs, "balancer");
    args.extend(strings(&[
        "--listen",
        "127.0.0.1:0",
        "--local-servers",
        "1",
        "--local-base-port",
        "0",
        "--no-state",
        "--storage-dir",
    ]));
    args.push(store.display().to_string());
    args.extend(strings(extra));
    (start(balancer_bin(), &args, work), store)
}

#[test]
fn plaintext_peers_on_a_tls_port_are_refused_promptly_while_tls_clients_are_served() {
    let work = tempfile::tempdir().unwrap();
    let certs = work.path().join("certs");
    gen_certs(&certs);
    let (balancer, store) = tls_balancer(work.path(), &certs, &["--frame-timeout", "1s"]);

    // A framed client without TLS: an error frame saying why, then the end.
    let started = Instant::now();
    let mut plain = Raw::connect(balancer.addr);
    plain.store(1, "in chiaro", "questo non deve essere salvato");
    // A peer that starts a handshake and never finishes it.
    let mut stalled = TcpStream::connect(balancer.addr).unwrap();
    stalled.set_read_timeout(Some(REPLY_TIMEOUT)).unwrap();
    stalled.write_all(&[0x16, 0x03, 0x01]).unwrap();

    // Meanwhile an honest TLS client is served.
    let (paths, contents) = documents(&work.path().join("docs"), "onesto", 3);
    let mut args = tls_args(&certs, "client");
    args.push("send".into());
    args.extend(paths.iter().map(|p| p.display().to_string()));
    let out = client(balancer.addr, &args);
    assert!(out.status.success(), "{}", text(&out));

    match plain.reply() {
        Reply::Error(e) => {
            assert_eq!(e.id, None);
            assert_eq!(e.code, ErrorCode::BadRequest);
            assert!(e.message.contains("requires TLS"), "{}", e.message);
        }
        other => panic!("{other:?}"),
    }
    assert!(plain.is_closed());
    assert!(started.elapsed() < REPLY_TIMEOUT);

    // Dropped once --frame-timeout passes, not left hanging.
    let mut rest = Vec::new();
    let _ = stalled.read_to_end(&mut rest);
    assert!(
        started.elapsed() < REPLY_TIMEOUT,
        "a stalled handshake was kept {:?}",
        started.elapsed()
    );

    let mut stored = stored_contents(&store);
    stored.sort();
    let mut expected = contents;
    expected.sort();
    assert_eq!(stored, expected);
    let log = std::fs::read_to_string(work.path().join("loadbalancer.log")).unwrap();
    assert!(
        log.contains("plaintext connection from") && log.contains("requires TLS"),
        "{log}"
    );
    assert!(log.contains("TLS handshake failed"), "{log}");
}

/// One document as the original client writes it.
fn original_document(title: &str, content: &str) -> String {
    serde_json::json!({"titolo": title, "contenuto": content, "request_type": "file_di_testo"})
        .to_string()
}

#[test]
fn original_format_clients_need_allow_legacy_plaintext_on_a_tls_port() {
    let work = tempfile::tempdir().unwrap();
    let certs = work.path().join("certs");
    gen_certs(&certs);

    let strict = work.path().join("strict");
    std::fs::create_dir_all(&strict).unwrap();
    let (balancer, store) = tls_balancer(&strict, &certs, &[]);
    let mut conn = TcpStream::connect(balancer.addr).unwrap();
    conn.set_read_timeout(Some(REPLY_TIMEOUT)).unwrap();
    conn.write_all(original_document("vecchio", "rifiutato").as_bytes())
        .unwrap();
    let started = Instant::now();
    let mut rest = Vec::new();
    let _ = conn.read_to_end(&mut rest);
    assert!(rest.is_empty());
    assert!(started.elapsed() < REPLY_TIMEOUT, "not closed promptly");
    let log = std::fs::read_to_string(strict.join("loadbalancer.log")).unwrap();
    assert!(
        log.contains("original-format connection from") && log.contains("--allow-legacy-plaintext"),
        "{log}"
    );
    drop(balancer);
    assert!(stored_contents(&store).is_empty());

    let lenient = work.path().join("lenient");
    std::fs::create_dir_all(&lenient).unwrap();
    let (balancer, store) = tls_balancer(&lenient, &certs, &["--allow-legacy-plaintext"]);
    let mut conn = TcpStream::connect(balancer.addr).unwrap();
    conn.write_all(original_document("vecchio", "accolto in chiaro").as_bytes())
        .unwrap();
    drop(conn);
    // The original format has no acknowledgement: watch the disk.
    assert!(
        eventually(|| stored_contents(&store) == ["accolto in chiaro"]),
        "{:?}",
        stored_contents(&store)
    );
    // TLS clients are still served on the same port.
    let (paths, _) = documents(&lenient.join("docs"), "nuovo", 1);
    let mut args = tls_args(&certs, "client");
    args.push("send".into());
    args.push(paths[0].display().to_string());
    let out = client(balancer.addr, &args);
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn files_travel_encrypted_relayed_or_redirected() {
    let work = tempfile::tempdir().unwrap();
    let certs = work.path().join("certs");
    gen_certs(&certs);
    // A file with a distinctive run of text in it.
    let marker = b"file-plaintext-marker";
    let mut bytes = Vec::new();
    for i in 0..60_000u32 {
        bytes.extend_from_slice(marker);
        bytes.extend_from_slice(&i.to_be_bytes());
    }
    let path = work.path().join("secret.bin");
    std::fs::write(&path, &bytes).unwrap();

    // Proxy mode: the file crosses the recorded client link. Redirect
    // mode: the client uploads straight to the (in-process) server, with a
    // ticket, over TLS too.
    for mode in ["proxy", "redirect"] {
        let dir = work.path().join(mode);
        std::fs::create_dir_all(&dir).unwrap();
        let (balancer, store) = tls_balancer(&dir, &certs, &["--mode", mode]);
        let recorded = Arc::new(Mutex::new(Vec::new()));
        let relay = Relay::start(balancer.addr, recorded.clone());
        let mut args = tls_args(&certs, "client");
        args.extend(["send".into(), path.display().to_string()]);
        let out = client(relay.addr, &args);
        assert!(out.status.success(), "{mode}: {}", text(&out));
        assert!(text(&out).contains("as secret.bin on"), "{}", text(&out));
        drop(relay);

        let stored: Vec<PathBuf> = all_files(&store)
            .into_iter()
            .filter(|p| p.parent().is_some_and(|d| d.ends_with("files")))
            .collect();
        assert_eq!(stored.len(), 1, "{mode}: {stored:?}");
        assert_eq!(std::fs::read(&stored[0]).unwrap(), bytes);
        let wire = recorded.lock().unwrap();
        assert!(
            !contains(&wire, b"upload"),
            "{mode}: a request crossed in the clear"
        );
        if mode == "proxy" {
            assert!(wire.len() > bytes.len(), "the file did not cross the relay");
            assert!(!contains(&wire, marker), "the file crossed in the clear");
        }
    }
}
