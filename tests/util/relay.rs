//! A relay in front of a balancer that counts what clients send and can
//! hold a client mid-file, for tests of interrupted uploads.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;

/// Forwards connections to `target`, counting the bytes clients send.
/// When the count first passes `hold_after`, it stops reading the client
/// (which then blocks, mid-file) and says so on `held`; it reads on (and
/// forwards nothing more) once `release` is called.
pub struct CountingRelay {
    pub addr: SocketAddr,
    pub from_clients: Arc<AtomicU64>,
    pub held: mpsc::Receiver<()>,
    release: Mutex<Option<mpsc::Sender<()>>>,
}

/// Forwards every connection on a new listener to `target`: answers go
/// back as they come; what the client sends goes through `upstream`
/// (client, server), on a thread of its own. Returns the listener's
/// address.
pub fn forward<F>(target: SocketAddr, upstream: F) -> SocketAddr
where
    F: Fn(TcpStream, TcpStream) + Clone + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { break };
            let Ok(server) = TcpStream::connect(target) else {
                continue;
            };
            let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            thread::spawn(move || {
                let (mut from, mut to) = (s2, c2);
                let _ = std::io::copy(&mut from, &mut to);
                let _ = to.shutdown(Shutdown::Write);
            });
            let upstream = upstream.clone();
            thread::spawn(move || upstream(client, server));
        }
    });
    addr
}

impl CountingRelay {
    pub fn start(target: SocketAddr, hold_after: Option<u64>) -> CountingRelay {
        let from_clients = Arc::new(AtomicU64::new(0));
        let (held_tx, held) = mpsc::channel();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let hold = Arc::new(Mutex::new(Some((held_tx, release_rx))));
        let counted = from_clients.clone();
        let addr = forward(target, move |mut from, mut to| {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match from.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
                let total = counted.fetch_add(n as u64, Ordering::SeqCst) + n as u64;
                if hold_after.is_some_and(|h| total > h) {
                    if let Some((held, release)) = hold.lock().unwrap().take() {
                        let _ = held.send(());
                        // The client blocks on its writes until it is
                        // stopped; then whatever is left is read.
                        let _ = release.recv();
                        let _ = std::io::copy(&mut from, &mut std::io::sink());
                        break;
                    }
                }
            }
            let _ = to.shutdown(Shutdown::Both);
        });
        CountingRelay {
            addr,
            from_clients,
            held,
            release: Mutex::new(Some(release_tx)),
        }
    }

    pub fn release(&self) {
        self.release.lock().unwrap().take();
    }
}
