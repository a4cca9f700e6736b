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
use super::session::{Admitted, Session};
use crate::net;
use crate::proto::{ClientRequest, ErrorCode, FrameReader, PoolRequest, Reply};
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
    request: Admitted,
    raw_fields: Option<Vec<u8>>,
    held: Held,
    io: &mut Io<'_>,
) -> Flow {
    // Documents and computations go to servers, the rest is answered
    // here: documents picked so far leave first.
    let document = matches!(
        request,
        Admitted::Client(ClientRequest::Store(_) | ClientRequest::Calc { .. })
    );
    if !document {
        io.outbox.flush(conn);
    }
    match request {
        Admitted::Client(request) => client(conn, session, request, raw_fields, held, io),
        Admitted::Pool(request) => from_server(conn, request, io),
    }
}

/// A client's request.
fn client(
    conn: &Conn,
    session: &Session,
    request: ClientRequest,
    raw_fields: Option<Vec<u8>>,
    held: Held,
    io: &mut Io<'_>,
) -> Flow {
    let answer = |reply: Reply| {
        let _ = io.replies.send(reply);
        Flow::Continue
    };
    // A table: one arm per request, each handing it to its handler.
    match request {
        ClientRequest::Store(store) => documents::store(conn, session, store, raw_fields, held, io),
        ClientRequest::Calc { id, operation } => {
            documents::calc(conn, session, id, operation, held, io)
        }
        ClientRequest::Servers { id } => answer(pool::servers(conn, id)),
        ClientRequest::Repair { id } => answer(pool::repair(conn, id)),
        ClientRequest::AddServer { id, addr } => membership(conn, id, &addr, pool::Kind::Add, io),
        ClientRequest::DrainServer { id, addr } => {
            membership(conn, id, &addr, pool::Kind::Drain, io)
        }
        ClientRequest::RemoveServer { id, addr } => {
            membership(conn, id, &addr, pool::Kind::Remove, io)
        }
        ClientRequest::Transfers {
            id,
            active,
            failed,
            since_ms,
            limit,
        } => answer(queries::transfers(
            conn, session, id, active, failed, since_ms, limit,
        )),
        ClientRequest::Upload(upload) => conn.upload(
            upload,
            io.reader,
            io.replies,
            session.user_name().as_deref(),
        ),
        ClientRequest::Chunk(chunk) => answer(no_upload(chunk.id)),
        ClientRequest::UploadEnd { id, .. } => answer(no_upload(id)),
        ClientRequest::Get {
            id,
            name,
            offset,
            owner,
        } => match whose(id, session.owner_filter(), owner) {
            Ok(owner) => conn.get(id, &name, offset, owner, io.out),
            Err(refusal) => answer(*refusal),
        },
        ClientRequest::List { id, kind } => conn.list(id, session.owner_filter(), kind, io.out),
        ClientRequest::Delete { id, name, owner } => {
            answer(match whose(id, session.owner_filter(), owner) {
                Ok(owner) => conn.delete(id, &name, owner, session.user_name().as_deref()),
                Err(refusal) => *refusal,
            })
        }
    }
}

/// A server's request about its place in the pool, or its report on a
/// redirected upload.
fn from_server(conn: &Conn, request: PoolRequest, io: &mut Io<'_>) -> Flow {
    match request {
        PoolRequest::Register { id, addr } => membership(conn, id, &addr, pool::Kind::Register, io),
        PoolRequest::Deregister { id, addr } => {
            membership(conn, id, &addr, pool::Kind::Deregister, io)
        }
        PoolRequest::TransferEvent(event) => {
            let _ = io.replies.send(conn.transfer_event(*event));
            Flow::Continue
        }
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

/// The answer to a chunk or its end with no upload going on.
fn no_upload(id: u64) -> Reply {
    Reply::error(
        Some(id),
        ErrorCode::BadRequest,
        "no upload in progress on this connection (send `upload` first)",
    )
}
