//! The dispatcher's errands: what it needs done over a connection of its
//! own, which its thread never opens. One thread carries them out in
//! turn and reports each back to the dispatcher's inbox.

use super::backend::{self, BackendSettings};
use super::event::Event;
use super::ServerId;
use crate::proto::{Connection, Reply, StorageRequest};
use crossbeam_channel::{Receiver, Sender};
use std::net::SocketAddr;
use std::thread::JoinHandle;

/// Something the dispatcher needs done.
#[derive(Debug)]
pub enum Errand {
    /// Tell a server that left the pool to forget these request numbers
    /// (cut off from it), on a fresh connection.
    Forget {
        server: ServerId,
        addr: SocketAddr,
        numbers: Vec<u64>,
    },
}

/// Starts the errand thread; it stops when the dispatcher drops its end.
pub fn spawn(
    errands: Receiver<Errand>,
    events: Sender<Event>,
    settings: BackendSettings,
) -> std::io::Result<JoinHandle<()>> {
    crate::sync::spawn_named("errands".into(), None, move || {
        for errand in errands {
            match errand {
                Errand::Forget {
                    server,
                    addr,
                    numbers,
                } => {
                    let ok = match forget(addr, &settings, &numbers) {
                        Ok(moved) => {
                            log::info!(
                                "server {addr} (removed) forgot {} requests cut off from it ({moved} copies moved aside)",
                                numbers.len()
                            );
                            true
                        }
                        Err(why) => {
                            log::warn!(
                                "server {addr} (removed) could not be told to forget {} requests cut off from it: {why}; they go elsewhere once it may no longer store them",
                                numbers.len()
                            );
                            false
                        }
                    };
                    let event = Event::Forgotten {
                        server,
                        numbers,
                        ok,
                    };
                    if events.send(event).is_err() {
                        return;
                    }
                }
            }
        }
    })
}

/// Sends `forget` and waits for its answer: how many copies were moved
/// aside.
fn forget(addr: SocketAddr, settings: &BackendSettings, numbers: &[u64]) -> Result<u64, String> {
    let stream = backend::connect_framed(addr, settings)?;
    let mut conn = Connection::new(stream, settings.max_frame);
    let request = StorageRequest::Forget {
        id: 2,
        numbers: numbers.to_vec(),
        keys: Vec::new(),
    };
    match conn.call(&request) {
        Ok(Reply::Forgotten { moved, .. }) => Ok(moved),
        Ok(Reply::Error(e)) => Err(format!("{}: {}", e.code, e.message)),
        Ok(other) => Err(format!("unexpected answer {other:?}")),
        Err(e) => Err(e.to_string()),
    }
}
