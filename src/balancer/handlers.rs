//! One handler per kind of request a client sends, after the connection's
//! loop (`intake`) has read it whole, checked who sent it and taken its
//! share of the connection's window and the byte budget. Each handler
//! carries out its request and answers it, or hands it on (a document to a
//! server).

mod documents;
mod pool;
mod queries;

pub use documents::{legacy_document, Outbox};

use super::client_out::ClientWriter;
use super::context::Conn;
use super::flow::{Permit, Reservation};
use super::relay::whose;
use super::session::Session;
use crate::net;
use crate::proto::{ErrorCode, FrameReader, Reply, Request};
use crossbeam_channel::Sender;

/// What a request arrived with: its place in the connection's window and
/// its bytes of the budget, kept by a job until it is done.
pub struct Held {
    pub permit: Permit,
    pub bytes: Reservation,
}

/// The connection's ways to answer and to read on.
pub struct Io<'a> {
    /// The rest of an upload comes from here.
    pub reader: &'a mut FrameReader<net::Paced>,
    /// The client's socket, for replies written at once.
    pub out: &'a ClientWriter,
    /// The connection's writer thread, for replies that may wait.
    pub replies: &'a Sender<Reply>,
    /// Documents picked for servers, sent together.
    pub outbox: &'a mut Outbox,
}

/// Whether the connection goes on.
pub use super::relay::Next as Flow;

/// Carries out one request. `raw_fields` are a document's fields as the
/// client wrote them, forwarded as they are.
pub fn handle(
    conn: &Conn,
    session: &Session,
    request: Request,
    raw_fields: Option<Vec<u8>>,
    held: Held,
    io: &mut Io<'_>,
) -> Flow {
    // Documents and computations go to servers, the rest is answered
    // here: documents picked so far leave first.
    if !matches!(request, Request::Store(_) | Request::Calc { .. }) {
        io.outbox.flush(conn);
    }
    if let Some((id, addr, kind)) = pool_change(&request) {
        return membership(conn, id, addr, kind, io);
    }
    let answer = |reply: Reply| {
        let _ = io.replies.send(reply);
        Flow::Continue
    };
    // A table: one arm per request, each handing it to its handler.
    match request {
        Request::Store(store) => documents::store(conn, session, store, raw_fields, held, io),
        Request::Calc { id, operation } => documents::calc(conn, session, id, operation, held, io),
        Request::Servers { id } => answer(pool::servers(conn, id)),
        Request::Repair { id } => answer(pool::repair(conn, id)),
        Request::Transfers {
            id,
            active,
            failed,
            since_ms,
            limit,
        } => answer(queries::transfers(
            conn, session, id, active, failed, since_ms, limit,
        )),
        Request::Upload(upload) => conn.upload(
            upload,
            io.reader,
            io.replies,
            session.user_name().as_deref(),
        ),
        Request::Get {
            id,
            name,
            offset,
            owner,
        } => match whose(id, session.owner_filter(), owner) {
            Ok(owner) => conn.get(id, &name, offset, owner, io.out),
            Err(refusal) => answer(*refusal),
        },
        Request::List { id, kind, .. } => conn.list(id, session.owner_filter(), kind, io.out),
        Request::Delete {
            id, name, owner, ..
        } => answer(match whose(id, session.owner_filter(), owner) {
            Ok(owner) => conn.delete(id, &name, owner, session.user_name().as_deref()),
            Err(refusal) => *refusal,
        }),
        Request::TransferEvent(event) => answer(conn.transfer_event(event)),
        // Requests for other peers, or out of their place.
        other => answer(refusal(&other)),
    }
}

/// Carries out a change to the pool; a server removed for good lost its
/// copies, so repair (`--replicas`) looks at once.
fn membership(conn: &Conn, id: u64, addr: &str, kind: pool::Kind, io: &mut Io<'_>) -> Flow {
    let removed = matches!(kind, pool::Kind::Remove);
    let flow = pool::membership(conn, id, addr, kind, io);
    if let (true, Some(now)) = (removed, &conn.files.repair) {
        let _ = now.send(());
    }
    flow
}

/// The change to the pool a request asks for (joining, leaving, an
/// operator's add, drain or remove), with its id and address.
fn pool_change(request: &Request) -> Option<(u64, &str, pool::Kind)> {
    let (id, addr, kind) = match request {
        Request::Register { id, addr } => (id, addr, pool::Kind::Register),
        Request::Deregister { id, addr } => (id, addr, pool::Kind::Deregister),
        Request::AddServer { id, addr } => (id, addr, pool::Kind::Add),
        Request::DrainServer { id, addr } => (id, addr, pool::Kind::Drain),
        Request::RemoveServer { id, addr } => (id, addr, pool::Kind::Remove),
        _ => return None,
    };
    Some((*id, addr.as_str(), kind))
}

/// The answer to a request the balancer does not carry out from a client.
fn refusal(request: &Request) -> Reply {
    let message = match request {
        Request::Forget { .. } | Request::Lookup { .. } => {
            "`forget` and `lookup` are sent by the balancer to storage servers, not to the balancer"
        }
        Request::Status { .. } => {
            "`status` is answered by storage servers; ask the balancer for `servers`"
        }
        Request::Chunk(_) | Request::UploadEnd { .. } => {
            "no upload in progress on this connection (send `upload` first)"
        }
        Request::Inventory { .. } => "`inventory` is answered by storage servers",
        // Answered by the session before they get here.
        _ => "handshake or login out of place",
    };
    Reply::error(Some(request.id()), ErrorCode::BadRequest, message)
}
