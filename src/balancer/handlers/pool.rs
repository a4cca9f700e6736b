//! The pool: `servers` (what the board shows), and the requests that
//! change it (`register`, `deregister`, `add_server`, `drain_server`,
//! `remove_server`), answered by the dispatcher. A change that may bring a
//! server in starts its link here, on this thread, so that the dispatcher
//! starts no thread of its own.

use super::{Flow, Io};
use crate::balancer::context::Conn;
use crate::balancer::event::{Change, Event, NewLink};
use crate::proto::{ErrorCode, Reply, ServerList};

/// Which change a request asks for.
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    Register,
    Deregister,
    Add,
    Drain,
    Remove,
}

pub fn servers(conn: &Conn, id: u64) -> Reply {
    Reply::Servers(ServerList {
        id,
        servers: conn.stats.views(),
        repair: conn.files.repair.as_ref().map(|_| conn.stats.repair.view()),
    })
}

/// `repair`: a pass of repair now, copies on servers down at all counted
/// lost.
pub fn repair(conn: &Conn, id: u64) -> Reply {
    match &conn.files.repair {
        Some(now) if now.send(()).is_ok() => Reply::Membership {
            id,
            message: format!(
                "repair started: {} entries were short of copies at the last pass",
                conn.stats
                    .repair
                    .left
                    .load(std::sync::atomic::Ordering::Relaxed)
            ),
        },
        _ => Reply::error(
            Some(id),
            ErrorCode::BadRequest,
            "no repair here: it needs --replicas above 1 and a state file",
        ),
    }
}

pub fn membership(conn: &Conn, id: u64, addr: &str, kind: Kind, io: &mut Io<'_>) -> Flow {
    let addr = match crate::net::resolve(addr) {
        Ok(a) => a,
        Err(e) => {
            let _ = io
                .replies
                .send(Reply::error(Some(id), ErrorCode::BadRequest, e));
            return Flow::Continue;
        }
    };
    if matches!(kind, Kind::Register | Kind::Deregister) {
        conn.open.is_a_server();
    }
    let change = match kind {
        Kind::Register => Change::Register(addr),
        Kind::Deregister => Change::Deregister(addr),
        Kind::Add => Change::Add(addr),
        Kind::Drain => Change::Drain(addr),
        Kind::Remove => Change::Remove(addr),
    };
    log::debug!("{change} from {}", conn.peer);
    // A heartbeat of a member, or of a server an operator took out,
    // needs no link.
    let needs_link = change.joins()
        && conn.board.find(addr).is_none()
        && !(matches!(change, Change::Register(_)) && conn.board.is_banned(addr));
    let link = if needs_link {
        match conn.links.start(addr) {
            Ok((id, stats, link)) => Some(NewLink { id, stats, link }),
            Err(e) => {
                log::error!("cannot start a link to {addr}: {e}");
                None
            }
        }
    } else {
        None
    };
    let event = Event::Membership {
        change,
        id,
        reply: io.replies.clone(),
        link,
    };
    if conn.events.send(event).is_err() {
        let _ = io.replies.send(Reply::error(
            Some(id),
            ErrorCode::ShuttingDown,
            "the balancer is shutting down",
        ));
    }
    Flow::Continue
}
