//! Transfers are written as one row each, as they stand when written: the
//! events of a document (received, sent, stored) usually arrive within a
//! few milliseconds, and one `INSERT` of the outcome costs a third of an
//! `INSERT` and two `UPDATE`s. A transfer not ended yet is held back (up to
//! `HOLD_MS`, or until a query or a catalog change wants it), so that its
//! outcome usually joins it; rows go in many to a statement. What a query
//! sees is the same: it asks for a flush first.

use super::{catalog, TrackEvent, TransferState};
use crate::balancer::store::{placeholders, sql_args, statement_size, Db, DbError};
use std::collections::HashMap;
use std::time::{Duration, Instant};

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
    /// When the writer took its first event.
    arrived: Instant,
    /// Every copy stored (several with `--replicas`): server, file.
    copies: Vec<(String, String)>,
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
                self.index.insert(*number, self.rows.len());
                self.rows.push(NewRow::received(at_ms, event));
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
        self.rows[i].follow(at_ms, event);
        None
    }

    /// Takes out the rows to write now: those that ended, and those held
    /// back for `HOLD_MS` already; the others stay for a later batch.
    pub(super) fn take_ready(&mut self) -> NewRows {
        let hold = Duration::from_millis(HOLD_MS);
        let (ready, held): (Vec<NewRow>, Vec<NewRow>) = std::mem::take(&mut self.rows)
            .into_iter()
            .partition(|row| row.state.is_ended() || row.arrived.elapsed() >= hold);
        *self = NewRows::from_rows(held);
        NewRows::from_rows(ready)
    }

    fn from_rows(rows: Vec<NewRow>) -> NewRows {
        let index = rows
            .iter()
            .enumerate()
            .map(|(i, r)| (r.number, i))
            .collect();
        NewRows { rows, index }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Inserts the rows, each as it stands now (taken by `balancer`), many
    /// to a statement; stored documents also go into the catalog.
    pub(super) fn insert(self, db: &mut dyn Db, balancer: Option<&str>) -> Result<(), DbError> {
        let mut rest: &[NewRow] = &self.rows;
        while !rest.is_empty() {
            let n = statement_size(rest.len());
            let (chunk, tail) = rest.split_at(n);
            insert_chunk(db, chunk, balancer)?;
            rest = tail;
        }
        let docs: Vec<catalog::NewDocument<'_>> = self
            .rows
            .iter()
            .flat_map(NewRow::stored_documents)
            .collect();
        catalog::new_documents(db, &docs)
    }
}

/// How long a transfer not ended yet is held back before its row is
/// written anyway (so that `transfers --active` shows it).
pub(super) const HOLD_MS: u64 = 200;

fn insert_chunk(db: &mut dyn Db, rows: &[NewRow], balancer: Option<&str>) -> Result<(), DbError> {
    let sql = format!(
        "INSERT INTO transfers (number, client, title, size, servers, state, server, file,
             started_ms, ended_ms, duration_ms, last_error, \"user\", balancer)
         VALUES {}
         ON CONFLICT (number) DO UPDATE SET state = excluded.state,
             server = excluded.server, file = excluded.file,
             ended_ms = excluded.ended_ms, duration_ms = excluded.duration_ms
         WHERE excluded.state = 'stored' AND transfers.state <> 'stored'",
        placeholders(rows.len(), 14)
    );
    let servers: Vec<String> = rows
        .iter()
        .map(|r| serde_json::to_string(&r.servers).unwrap_or_else(|_| "[]".into()))
        .collect();
    let mut args = Vec::with_capacity(rows.len() * 14);
    for (row, servers) in rows.iter().zip(&servers) {
        let duration = row
            .ended_ms
            .map(|e| e.saturating_sub(row.started_ms) as i64);
        args.extend_from_slice(sql_args![
            row.number as i64,
            row.client.as_str(),
            row.title.as_str(),
            row.size as i64,
            servers.as_str(),
            row.state.as_str(),
            row.server.as_deref(),
            row.file.as_deref(),
            row.started_ms as i64,
            row.ended_ms.map(|e| e as i64),
            duration,
            row.last_error.as_deref(),
            row.user.as_deref(),
            balancer
        ]);
    }
    db.execute(&sql, &args)?;
    Ok(())
}

impl NewRow {
    /// The row a `Received` event starts.
    fn received(at_ms: u64, event: TrackEvent) -> NewRow {
        let TrackEvent::Received {
            number,
            client,
            title,
            size,
            user,
        } = event
        else {
            unreachable!("only a received event starts a row")
        };
        NewRow {
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
            arrived: Instant::now(),
            copies: Vec::new(),
        }
    }

    /// What a later event of its transfer changes.
    fn follow(&mut self, at_ms: u64, event: TrackEvent) {
        let ended = self.state.is_ended();
        // A table: one arm per kind of event.
        match event {
            // Received twice: the first one stands (as the insert's `ON
            // CONFLICT` has it, but for a stored outcome: a document sent
            // again and found stored ends its first transfer).
            TrackEvent::Received { .. } => {}
            TrackEvent::Sent { server, .. } if !ended => {
                self.servers.push(server);
                self.state = TransferState::Sending;
            }
            TrackEvent::Retried { server, reason, .. } if !ended => {
                self.state = TransferState::Retried;
                self.last_error = Some(format!("{server}: {reason}"));
            }
            TrackEvent::Stored { server, file, .. } => {
                self.state = TransferState::Stored;
                self.copies.push((server.clone(), file.clone()));
                self.server = Some(server);
                self.file = Some(file);
                self.ended_ms = Some(at_ms);
            }
            TrackEvent::Failed { code, reason, .. } if self.state != TransferState::Stored => {
                self.state = TransferState::of_failure(code);
                self.last_error = Some(format!("{code}: {reason}"));
                self.ended_ms = Some(at_ms);
            }
            TrackEvent::Interrupted { reason, .. } if self.state != TransferState::Stored => {
                self.state = TransferState::Interrupted;
                self.last_error = Some(reason);
                self.ended_ms = Some(at_ms);
            }
            _ => {}
        }
    }

    /// Its catalog entry's copies, if it is a stored document.
    fn stored_documents(&self) -> Vec<catalog::NewDocument<'_>> {
        let (TransferState::Stored, Some(at_ms)) = (self.state, self.ended_ms) else {
            return Vec::new();
        };
        self.copies
            .iter()
            .map(|(server, file)| catalog::NewDocument {
                number: self.number,
                owner: self.user.as_deref().unwrap_or(""),
                title: &self.title,
                size: self.size,
                server,
                file,
                at_ms,
            })
            .collect()
    }
}
