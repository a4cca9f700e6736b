//! Questions answered from the balancer's own records.

use crate::balancer::context::Conn;
use crate::balancer::session::Session;
use crate::balancer::tracking::TransferFilter;
use crate::proto::{ErrorCode, Reply, TransferList};

/// `transfers`, from the state file: a user sees only their own (admins:
/// all).
pub fn transfers(
    conn: &Conn,
    session: &Session,
    id: u64,
    active: bool,
    failed: bool,
    since_ms: Option<u64>,
    limit: Option<u32>,
) -> Reply {
    let Some(tracker) = &conn.tracker else {
        return Reply::error(
            Some(id),
            ErrorCode::BadRequest,
            "transfer tracking is off: this balancer runs with --no-state",
        );
    };
    let filter = TransferFilter {
        active,
        failed,
        since_ms,
        limit,
        user: session.owner_filter(),
    };
    match tracker.query(&filter) {
        Ok(records) => Reply::Transfers(TransferList {
            id,
            transfers: records.into_iter().map(Into::into).collect(),
        }),
        Err(e) => {
            log::warn!("connection from {}: transfers: {e}", conn.peer);
            Reply::error(Some(id), ErrorCode::Internal, e.to_string())
        }
    }
}
