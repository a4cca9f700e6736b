//! Node ids leased from the shared state, so that balancers sharing one
//! PostgreSQL database give out request numbers that never collide (the
//! node is part of every number, see `ids`) without anyone configuring
//! `--balancer-id`.
//!
//! The `nodes` table holds one row per node in use: who holds it and until
//! when (the database's clock, so that balancers' clocks need not agree).
//! A balancer takes the lowest node free or expired, renews its lease every
//! `RENEW_EVERY` on a thread of its own, and gives it back when it stops;
//! a balancer that died leaves its node to be taken again after
//! `LEASE_FOR`.

use super::store::{in_transaction, sql_args, Db, DbError, Location};
use super::tracking::{state_error, StateError};
use crate::error::Error;
use crate::ids::MAX_NODE;
use crossbeam_channel::{Receiver, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::Duration;

/// How long a lease lasts unless renewed.
pub const LEASE_FOR: Duration = Duration::from_secs(30);
/// How often it is renewed: several renewals fit in one lease, so that a
/// slow database or a missed one does not lose it.
const RENEW_EVERY: Duration = Duration::from_secs(5);

/// The database's clock, in Unix milliseconds.
const NOW_MS: &str = "(extract(epoch FROM clock_timestamp()) * 1000)::bigint";

/// A node id held by this balancer.
pub struct Lease {
    location: Location,
    node: u16,
    holder: String,
    conn: Box<dyn Db>,
}

impl Lease {
    /// Takes the lowest node id not held by a live balancer; `holder`
    /// names this one in the table.
    pub fn take(location: &Location, holder: &str) -> Result<Lease, Error> {
        let error = state_error(location);
        let mut conn = location
            .open_reader()
            .map_err(|e| error(StateError::Db(e)))?;
        let node = in_transaction(conn.as_mut(), |db| take_free(db, holder))
            .map_err(|e| error(StateError::Db(e)))?;
        let node = node.ok_or_else(|| {
            Error::Config(format!(
                "every balancer id (0-{MAX_NODE}) is leased in {location}: give --balancer-id"
            ))
        })?;
        Ok(Lease {
            location: location.clone(),
            node,
            holder: holder.to_string(),
            conn,
        })
    }

    pub fn node(&self) -> u16 {
        self.node
    }

    /// Renews the lease until `stop` disconnects, then gives it back.
    pub fn spawn(mut self, stop: Receiver<()>) -> std::io::Result<JoinHandle<()>> {
        crate::sync::spawn_named("node-lease".into(), Some(256 * 1024), move || {
            while let Err(RecvTimeoutError::Timeout) = stop.recv_timeout(RENEW_EVERY) {
                self.renew();
            }
            if let Err(e) = self.release() {
                log::warn!("cannot give back balancer id {}: {e}", self.node);
            }
        })
    }

    fn renew(&mut self) {
        if self.conn.is_broken() {
            match self.location.open_reader() {
                Ok(conn) => self.conn = conn,
                Err(e) => return log::warn!("cannot renew balancer id {}: {e}", self.node),
            }
        }
        let sql =
            format!("UPDATE nodes SET until_ms = {NOW_MS} + ?3 WHERE node = ?1 AND holder = ?2");
        let args = sql_args![i64::from(self.node), &self.holder, lease_ms()];
        match self.conn.execute(&sql, args) {
            Ok(1) => {}
            // Expired and taken: numbers may now collide with its new holder's.
            Ok(_) => log::error!(
                "balancer id {} was leased to another balancer after this one failed to renew \
                 it in time: request numbers may repeat; restart this balancer",
                self.node
            ),
            Err(e) => log::warn!("cannot renew balancer id {}: {e}", self.node),
        }
    }

    fn release(&mut self) -> Result<u64, DbError> {
        self.conn.execute(
            "DELETE FROM nodes WHERE node = ?1 AND holder = ?2",
            sql_args![i64::from(self.node), &self.holder],
        )
    }
}

fn lease_ms() -> i64 {
    LEASE_FOR.as_millis() as i64
}

/// Takes the lowest free node inside the caller's transaction (one
/// balancer at a time: an advisory lock).
fn take_free(db: &mut dyn Db, holder: &str) -> Result<Option<u16>, DbError> {
    db.query("SELECT pg_advisory_xact_lock(7264151)", &[])?;
    let free = db.query_opt(
        &format!(
            "SELECT n::bigint FROM generate_series(0, ?1::bigint) AS n
             WHERE NOT EXISTS (SELECT 1 FROM nodes WHERE node = n AND until_ms > {NOW_MS})
             ORDER BY n LIMIT 1"
        ),
        sql_args![i64::from(MAX_NODE)],
    )?;
    let Some(row) = free else {
        return Ok(None);
    };
    let node = row.i64(0)?;
    db.execute(
        &format!(
            "INSERT INTO nodes (node, holder, until_ms) VALUES (?1, ?2, {NOW_MS} + ?3)
             ON CONFLICT (node) DO UPDATE SET holder = excluded.holder,
                 until_ms = excluded.until_ms"
        ),
        sql_args![node, holder, lease_ms()],
    )?;
    u16::try_from(node)
        .map(Some)
        .map_err(|_| DbError::Decode(format!("node {node}")))
}
