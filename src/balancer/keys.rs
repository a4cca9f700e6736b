//! Documents a client sends again (`resent`): before one is placed, the
//! servers are asked whether they already hold its client key, since the
//! balancer that had it first may have died after a server stored it and
//! before the client heard.
//!
//! The question goes through one seam, `KeyLookup`: today `AskServers`
//! asks every server in the pool at once (one `lookup` per server for the
//! whole batch); a lookup in a store shared by the balancers could answer
//! it instead. The rule is the same whoever answers:
//! - a server holds the key: the document is answered `stored` there;
//! - no server holds it: it is placed as usual; a server that answered
//!   "not here" has fenced the key to the request number given, so an older
//!   forward still on its way cannot store a second copy there;
//! - a server did not answer (down, silent past `--server-timeout`): it may
//!   hold a copy. The document is placed elsewhere and, once stored, that
//!   server is told to `forget` the key when it is back (as for request
//!   numbers), so no document is lost and no second copy stays.

use super::backend::ServerReach;
use super::board::Board;
use super::ServerId;
use crate::proto::{HeldKey, KeyProbe, Reply, StorageRequest};
use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Pause before asking again about keys a server is writing right now.
const BUSY_PAUSE: Duration = Duration::from_millis(20);

/// Where a key is, as far as the servers could tell.
#[derive(Debug, Clone, PartialEq)]
pub enum Placement {
    /// Stored on the server at `server` (its address).
    Held { server: String, held: HeldKey },
    /// No server that answered holds it; `silent` may.
    Absent { silent: Vec<ServerId> },
}

/// Why one server could not be asked.
#[derive(Debug)]
pub enum LookupError {
    Io(std::io::Error),
    Call(crate::proto::CallError),
    Answer(String),
}

impl fmt::Display for LookupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LookupError::Io(e) => write!(f, "cannot connect: {e}"),
            LookupError::Call(e) => write!(f, "no answer to lookup: {e}"),
            LookupError::Answer(why) => write!(f, "unexpected answer to lookup: {why}"),
        }
    }
}

impl std::error::Error for LookupError {}

/// Answers where the keys of documents sent again may be stored.
pub trait KeyLookup: Send + Sync {
    /// One placement per probe, in the same order.
    fn lookup(&self, probes: &[KeyProbe]) -> Vec<Placement>;
}

/// The lookup that asks every server in the pool.
pub struct AskServers {
    pub board: Arc<Board>,
    pub reach: ServerReach,
}

/// One server's answer: the keys it holds and those it is writing.
type Answer = Result<(Vec<HeldKey>, Vec<crate::proto::ClientKey>), LookupError>;

impl AskServers {
    fn ask(&self, addr: std::net::SocketAddr, probes: &[KeyProbe]) -> Answer {
        let mut conn = self.reach.connect(addr).map_err(LookupError::Io)?;
        let request = StorageRequest::Lookup {
            id: 2,
            keys: probes.to_vec(),
        };
        let answer = match conn.call(&request).map_err(LookupError::Call)? {
            Reply::Keys { held, busy, .. } => Ok((held, busy)),
            other => Err(LookupError::Answer(format!("{other:?}"))),
        };
        let _ = conn.get_ref().shutdown(std::net::Shutdown::Both);
        answer
    }

    /// Asks every server at once, each on a thread of its own.
    fn ask_all(
        &self,
        servers: &[(ServerId, std::net::SocketAddr)],
        probes: &[KeyProbe],
    ) -> Vec<Answer> {
        std::thread::scope(|scope| {
            let asked: Vec<_> = servers
                .iter()
                .map(|&(id, addr)| {
                    std::thread::Builder::new()
                        .name(format!("key-lookup{}", id.0))
                        .spawn_scoped(scope, move || self.ask(addr, probes))
                })
                .collect();
            asked
                .into_iter()
                .map(|t| match t {
                    Ok(t) => t.join().unwrap_or_else(|_| {
                        Err(LookupError::Answer("the lookup thread panicked".into()))
                    }),
                    Err(e) => Err(LookupError::Io(e)),
                })
                .collect()
        })
    }
}

impl KeyLookup for AskServers {
    fn lookup(&self, probes: &[KeyProbe]) -> Vec<Placement> {
        let servers: Vec<(ServerId, std::net::SocketAddr)> = self
            .board
            .servers()
            .iter()
            .map(|g| (g.id, g.addr))
            .collect();
        let deadline = Instant::now() + self.reach.server_timeout;
        let mut found = Found::new(probes.len());
        let mut asking: Vec<usize> = (0..servers.len()).collect();
        loop {
            let open: Vec<KeyProbe> = found.open(probes);
            let round: Vec<_> = asking.iter().map(|&i| servers[i]).collect();
            let answers = self.ask_all(&round, &open);
            let mut busy_on = Vec::new();
            for (&(id, addr), answer) in round.iter().zip(answers) {
                match answer {
                    Ok((held, busy)) => {
                        found.held(probes, &addr.to_string(), held);
                        if !busy.is_empty() {
                            busy_on.push((id, busy));
                        }
                    }
                    Err(e) => {
                        log::warn!("server {addr}: {e}; documents sent again go elsewhere, and it will be told to forget them");
                        found.silent(id, probes, None);
                    }
                }
            }
            busy_on.retain(|(_, busy)| busy.iter().any(|k| found.is_open(probes, *k)));
            if busy_on.is_empty() {
                break;
            }
            if Instant::now() + BUSY_PAUSE >= deadline {
                for (id, busy) in busy_on {
                    found.silent(id, probes, Some(&busy));
                }
                break;
            }
            std::thread::sleep(BUSY_PAUSE);
            let again: HashSet<ServerId> = busy_on.iter().map(|(id, _)| *id).collect();
            asking.retain(|&i| again.contains(&servers[i].0));
        }
        found.finish()
    }
}

/// What the rounds of a lookup found, per probe.
struct Found {
    held: Vec<Option<(String, HeldKey)>>,
    silent: Vec<Vec<ServerId>>,
}

impl Found {
    fn new(n: usize) -> Found {
        Found {
            held: vec![None; n],
            silent: vec![Vec::new(); n],
        }
    }

    fn is_open(&self, probes: &[KeyProbe], key: crate::proto::ClientKey) -> bool {
        probes
            .iter()
            .zip(&self.held)
            .any(|(p, h)| p.key == key && h.is_none())
    }

    /// The probes no server holds yet.
    fn open(&self, probes: &[KeyProbe]) -> Vec<KeyProbe> {
        probes
            .iter()
            .zip(&self.held)
            .filter(|(_, h)| h.is_none())
            .map(|(p, _)| *p)
            .collect()
    }

    fn held(&mut self, probes: &[KeyProbe], server: &str, held: Vec<HeldKey>) {
        for h in held {
            for (i, p) in probes.iter().enumerate() {
                if p.key == h.key && self.held[i].is_none() {
                    self.held[i] = Some((server.to_string(), h.clone()));
                }
            }
        }
    }

    /// Server `id` could not tell about `keys` (all of them when `None`).
    fn silent(
        &mut self,
        id: ServerId,
        probes: &[KeyProbe],
        keys: Option<&[crate::proto::ClientKey]>,
    ) {
        for (i, p) in probes.iter().enumerate() {
            if keys.is_none_or(|keys| keys.contains(&p.key)) && !self.silent[i].contains(&id) {
                self.silent[i].push(id);
            }
        }
    }

    fn finish(self) -> Vec<Placement> {
        self.held
            .into_iter()
            .zip(self.silent)
            .map(|(held, silent)| match held {
                Some((server, held)) => Placement::Held { server, held },
                None => Placement::Absent { silent },
            })
            .collect()
    }
}
