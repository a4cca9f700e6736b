//! Copies of one document on several servers (`--replicas N`): a client's
//! document becomes N jobs, one per copy, sharing a `Group`. Each copy is
//! placed like any document, except that it never goes to a server that
//! holds, or is storing, another copy of it (`claimed`): a copy that
//! fails on a server goes to another one not already claimed. The client
//! is answered once, by the group: `stored` naming every copy when all N
//! are durable; with fewer (servers went down and `--min-replicas`
//! allows it) `stored` flagged `under_replicated`; else the last error.
//!
//! The group holds the client's window slot and bytes until it answers.
//! It knows nothing of servers but their ids, so that the stages below it
//! (board, links) can ask it which servers to leave out.

use super::client_out::ClientWriter;
use super::flow::Hold;
use super::ServerId;
use crate::proto::{CopyPlace, ErrorCode, ErrorReply, Reply, Stored};
use crossbeam_channel::Sender;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// How many copies a document wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replicas {
    /// `--replicas`: copies an acknowledgement stands for.
    pub target: usize,
    /// `--min-replicas`: fewer copies than this are never acknowledged.
    pub min: usize,
}

impl Default for Replicas {
    fn default() -> Self {
        Replicas { target: 1, min: 1 }
    }
}

impl Replicas {
    /// Whether the settings make sense: both at least 1, `min` at most
    /// `target`.
    pub fn check(self) -> Result<(), String> {
        if self.target == 0 || self.min == 0 || self.min > self.target {
            return Err(format!(
                "--replicas ({}) and --min-replicas ({}) must be at least 1, and --min-replicas \
                 at most --replicas",
                self.target, self.min
            ));
        }
        Ok(())
    }

    /// Copies to make with `up` servers able to take work: `target`, or
    /// as many as are up when that is at least `min`. Else the refusal.
    pub fn copies_with(self, up: usize) -> Result<usize, String> {
        if up >= self.target {
            return Ok(self.target);
        }
        if up >= self.min.max(1) {
            return Ok(up);
        }
        Err(format!(
            "{up} servers are up; --replicas {} needs that many distinct servers for each \
             document (--min-replicas {} allows no fewer): nothing was stored",
            self.target, self.min
        ))
    }
}

/// The copies of one document.
pub struct Group {
    /// The client's request id.
    id: u64,
    /// Copies being made.
    want: usize,
    replicas: Replicas,
    reply: Sender<Reply>,
    out: Option<ClientWriter>,
    /// The document's `received` event is recorded once, by the first copy
    /// sent.
    received: AtomicBool,
    state: Mutex<GroupState>,
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Group")
            .field("id", &self.id)
            .field("want", &self.want)
            .finish_non_exhaustive()
    }
}

struct GroupState {
    /// Servers that hold a copy, are storing one, or may hold one.
    claimed: Vec<ServerId>,
    /// Copies not answered yet.
    pending: usize,
    stored: Vec<Stored>,
    failure: Option<ErrorReply>,
    answered: bool,
    hold: Hold,
}

impl Group {
    pub fn new(
        id: u64,
        want: usize,
        replicas: Replicas,
        reply: Sender<Reply>,
        out: Option<ClientWriter>,
        hold: Hold,
    ) -> Group {
        Group {
            id,
            want,
            replicas,
            reply,
            out,
            received: AtomicBool::new(false),
            state: Mutex::new(GroupState {
                claimed: Vec::with_capacity(want),
                pending: want,
                stored: Vec::with_capacity(want),
                failure: None,
                answered: false,
                hold,
            }),
        }
    }

    /// Servers a copy may not go to.
    pub fn claimed(&self) -> Vec<ServerId> {
        crate::sync::lock(&self.state).claimed.clone()
    }

    /// Claims `server` for a copy; false when another copy has it.
    pub fn claim(&self, server: ServerId) -> bool {
        let mut state = crate::sync::lock(&self.state);
        if state.claimed.contains(&server) {
            return false;
        }
        state.claimed.push(server);
        true
    }

    /// True for the first copy to ask: it records the document received.
    pub fn first_sent(&self) -> bool {
        !self.received.swap(true, Ordering::Relaxed)
    }

    /// One copy's answer (`stored`, or the error it ended with). The
    /// client hears once every copy is stored, or none is pending.
    pub fn deliver(&self, reply: Reply) {
        let mut state = crate::sync::lock(&self.state);
        if state.answered {
            return;
        }
        state.pending = state.pending.saturating_sub(1);
        match reply {
            Reply::Stored(stored) => state.stored.push(stored),
            Reply::Error(e) => state.failure = Some(e),
            other => {
                state.failure = Some(ErrorReply {
                    id: Some(self.id),
                    code: ErrorCode::ServerFailed,
                    message: format!("unexpected answer {other:?}"),
                })
            }
        }
        let done = state.stored.len() >= self.want
            || (state.pending == 0 && state.stored.len() >= self.replicas.min.max(1));
        let answer = if done {
            Reply::Stored(self.acknowledgement(&state.stored))
        } else if state.pending == 0 {
            Reply::Error(self.refusal(&state))
        } else {
            return;
        };
        state.answered = true;
        let hold = std::mem::take(&mut state.hold);
        drop(state);
        self.send(answer);
        drop(hold);
    }

    fn acknowledgement(&self, stored: &[Stored]) -> Stored {
        let first = &stored[0];
        Stored {
            id: self.id,
            server: first.server.clone(),
            request_number: first.request_number,
            file: first.file.clone(),
            a_count: first.a_count,
            existing: stored.iter().all(|s| s.existing),
            copies: stored
                .iter()
                .map(|s| CopyPlace {
                    server: s.server.clone(),
                    file: s.file.clone(),
                })
                .collect(),
            under_replicated: stored.len() < self.replicas.target,
        }
    }

    fn refusal(&self, state: &GroupState) -> ErrorReply {
        let mut e = state.failure.clone().unwrap_or(ErrorReply {
            id: None,
            code: ErrorCode::ServerFailed,
            message: "no copy was stored".into(),
        });
        e.id = Some(self.id);
        if !state.stored.is_empty() {
            let on: Vec<&str> = state.stored.iter().map(|s| s.server.as_str()).collect();
            e.message = format!(
                "{}; only {} copies were stored (on {}), fewer than --min-replicas {}",
                e.message,
                on.len(),
                on.join(", "),
                self.replicas.min
            );
        }
        e
    }

    /// Straight to the client's socket when that needs no waiting, else
    /// through its connection's writer thread (as `Job::deliver`).
    fn send(&self, reply: Reply) {
        if let Some(Ok(mut out)) = self.out.as_ref().map(|o| o.try_lock()) {
            if out.try_message(&reply) {
                return;
            }
        }
        let _ = self.reply.send(reply);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(server: &str) -> Reply {
        Reply::Stored(Stored {
            id: 9,
            server: server.into(),
            request_number: 5,
            file: "5_t.json".into(),
            a_count: 1,
            existing: false,
            copies: Vec::new(),
            under_replicated: false,
        })
    }

    fn group(
        want: usize,
        target: usize,
        min: usize,
    ) -> (Group, crossbeam_channel::Receiver<Reply>) {
        let (tx, rx) = crossbeam_channel::unbounded();
        let replicas = Replicas { target, min };
        (Group::new(1, want, replicas, tx, None, Hold::default()), rx)
    }

    #[test]
    fn answered_once_every_copy_is_stored() {
        let (g, rx) = group(2, 2, 2);
        g.deliver(stored("a"));
        assert!(rx.try_recv().is_err());
        g.deliver(stored("b"));
        let Ok(Reply::Stored(s)) = rx.try_recv() else {
            panic!("no acknowledgement")
        };
        assert_eq!(s.copies.len(), 2);
        assert!(!s.under_replicated);
        assert_eq!(s.id, 1);
    }

    #[test]
    fn fewer_copies_are_acknowledged_only_down_to_the_minimum() {
        let (g, rx) = group(2, 3, 2);
        g.deliver(stored("a"));
        g.deliver(stored("b"));
        let Ok(Reply::Stored(s)) = rx.try_recv() else {
            panic!("no acknowledgement")
        };
        assert!(s.under_replicated);
        let (g, rx) = group(2, 2, 2);
        g.deliver(stored("a"));
        g.deliver(Reply::error(None, ErrorCode::Storage, "disk"));
        let Ok(Reply::Error(e)) = rx.try_recv() else {
            panic!("no refusal")
        };
        assert_eq!(e.code, ErrorCode::Storage);
        assert!(e.message.contains("only 1 copies"), "{}", e.message);
    }

    #[test]
    fn a_server_is_claimed_by_one_copy_only() {
        let (g, _rx) = group(2, 2, 2);
        assert!(g.claim(ServerId(1)));
        assert!(!g.claim(ServerId(1)));
        assert_eq!(g.claimed(), vec![ServerId(1)]);
    }

    #[test]
    fn copies_wanted_follow_the_servers_up() {
        let r = Replicas { target: 2, min: 2 };
        assert_eq!(r.copies_with(4), Ok(2));
        assert!(r.copies_with(1).is_err());
        let r = Replicas { target: 2, min: 1 };
        assert_eq!(r.copies_with(1), Ok(1));
        assert!(r.copies_with(0).is_err());
    }
}
