//! Transfers that begin and end within one batch of the writer are written
//! as one row: the events of a document (received, sent, stored) usually
//! arrive within the same 100 ms, and one `INSERT` of the outcome costs a
//! third of an `INSERT` and two `UPDATE`s. What a query sees after the
//! commit is the same.

use super::{catalog, TrackEvent, TransferState};
use crate::balancer::store::{sql_args, Db, DbError};
use std::collections::HashMap;

/// A transfer received in this batch, with what happened to it since.
struct NewRow {
    number: u64,
    client: String,
    title: String,
    size: u64,
    user: Option<String>,
    servers: Vec<String>,
    state: TransferState,
    server: Option<String>,
    file: Option<String>,
    started_ms: u64,
    ended_ms: Option<u64>,
    last_error: Option<String>,
}

#[derive(Default)]
pub(super) struct NewRows {
    rows: Vec<NewRow>,
    /// Number → index in `rows`.
    index: HashMap<u64, usize>,
}

impl NewRows {
    /// Takes an event of a transfer received in this batch (or that starts
    /// one); gives back the others, for their row already in the file.
    pub(super) fn absorb(&mut self, at_ms: u64, event: TrackEvent) -> Option<TrackEvent> {
        let number = match &event {
            TrackEvent::Received { number, .. } if !self.index.contains_key(number) => {
                let TrackEvent::Received {
                    number,
                    client,
                    title,
                    size,
                    user,
                } = event
                else {
                    unreachable!("matched above")
                };
                self.index.insert(number, self.rows.len());
                self.rows.push(NewRow {
                    number,
                    client,
                    title,
                    size,
                    user,
                    servers: Vec::new(),
                    state: TransferState::Queued,
                    server: None,
                    file: None,
                    started_ms: at_ms,
                    ended_ms: None,
                    last_error: None,
                });
                return None;
            }
            TrackEvent::Received { number, .. }
            | TrackEvent::Sent { number, .. }
            | TrackEvent::Retried { number, .. }
            | TrackEvent::Stored { number, .. }
            | TrackEvent::Failed { number, .. }
            | TrackEvent::Interrupted { number, .. } => *number,
        };
        let Some(&i) = self.index.get(&number) else {
            return Some(event);
        };
        let row = &mut self.rows[i];
        let ended = row.state.is_ended();
        match event {
            // Received twice: the first one stands (as the insert's `ON
            // CONFLICT` has it, but for a stored outcome: a document sent
            // again and found stored ends its first transfer).
            TrackEvent::Received { .. } => {}
            TrackEvent::Sent { server, .. } if !ended => {
                row.servers.push(server);
                row.state = TransferState::Sending;
            }
            TrackEvent::Retried { server, reason, .. } if !ended => {
                row.state = TransferState::Retried;
                row.last_error = Some(format!("{server}: {reason}"));
            }
            TrackEvent::Stored { server, file, .. } => {
                row.state = TransferState::Stored;
                row.server = Some(server);
                row.file = Some(file);
                row.ended_ms = Some(at_ms);
            }
            TrackEvent::Failed { code, reason, .. } if row.state != TransferState::Stored => {
                row.state = TransferState::of_failure(code);
                row.last_error = Some(format!("{code}: {reason}"));
                row.ended_ms = Some(at_ms);
            }
            TrackEvent::Interrupted { reason, .. } if row.state != TransferState::Stored => {
                row.state = TransferState::Interrupted;
                row.last_error = Some(reason);
                row.ended_ms = Some(at_ms);
            }
            _ => {}
        }
        None
    }

    /// Inserts the rows, each as it stands at the end of the batch (taken
    /// by `balancer`); a stored document also goes into the catalog.
    pub(super) fn insert(self, db: &mut dyn Db, balancer: Option<&str>) -> Result<(), DbError> {
        for row in self.rows {
            let servers = serde_json::to_string(&row.servers).unwrap_or_else(|_| "[]".into());
            let duration = row
                .ended_ms
                .map(|e| e.saturating_sub(row.started_ms) as i64);
            db.execute(
                "INSERT INTO transfers (number, client, title, size, servers, state, server, file,
                     started_ms, ended_ms, duration_ms, last_error, \"user\", balancer)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)
                 ON CONFLICT (number) DO UPDATE SET state = excluded.state,
                     server = excluded.server, file = excluded.file,
                     ended_ms = excluded.ended_ms, duration_ms = excluded.duration_ms
                 WHERE excluded.state = 'stored' AND transfers.state <> 'stored'",
                sql_args![
                    row.number as i64,
                    &row.client,
                    &row.title,
                    row.size as i64,
                    &servers,
                    row.state.as_str(),
                    &row.server,
                    &row.file,
                    row.started_ms as i64,
                    row.ended_ms.map(|e| e as i64),
                    duration,
                    &row.last_error,
                    &row.user,
                    balancer
                ],
            )?;
            if let (TransferState::Stored, Some(server), Some(file), Some(at_ms)) =
                (row.state, &row.server, &row.file, row.ended_ms)
            {
                let doc = catalog::NewDocument {
                    number: row.number,
                    owner: row.user.as_deref().unwrap_or(""),
                    title: &row.title,
                    size: row.size,
                    server,
                    file,
                    at_ms,
                };
                catalog::new_document(db, &doc)?;
            }
        }
        Ok(())
    }
}
