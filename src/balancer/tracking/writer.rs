//! The writer thread: gathers a batch of events and changes, commits it
//! in one transaction, answers whoever waits on it. Under load batches
//! grow by themselves (up to `MAX_BATCH`); idle, an event waits at most
//! `BATCH_WINDOW`. A connection that broke (the database restarted) is
//! opened again before the next batch.

use super::{catalog, rows, schema, Msg, PoolChange, Shared, TrackEvent, TransferState};
use crate::balancer::store::{in_transaction, sql_args, Db, DbError};
use crossbeam_channel::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

/// Events committed in one transaction, at most.
const MAX_BATCH: usize = 1000;
/// How long the writer gathers events after the first of a batch: long
/// enough to make transactions few under load, short enough that a crash
/// loses little.
const BATCH_WINDOW: Duration = Duration::from_millis(100);
/// While gathering, the writer takes what has arrived, then sleeps this
/// long, rather than waking for every event (thousands a second under
/// load); a flush waits at most this long to be seen.
const GATHER_PAUSE: Duration = Duration::from_millis(5);

/// What the writer did, for its last log line and for tests.
#[derive(Debug, Default, PartialEq)]
pub(super) struct Written {
    pub events: u64,
    pub transactions: u64,
}

/// The writer thread: gathers a batch, commits it, answers flushes; ends
/// after the last batch once the channel disconnects.
pub(super) fn write_loop(conn: Box<dyn Db>, messages: &Receiver<Msg>, shared: &Shared) -> Written {
    // Clients are answered on a thread of their own, a batch at a time, so
    // that the writer goes on with the next commit meanwhile.
    if !shared.location.is_shared() {
        // Nobody waits on a commit (`Tracker::record_then`).
        return write_batches(conn, messages, shared, None);
    }
    std::thread::scope(|scope| {
        let (acks, to_run) = crossbeam_channel::unbounded::<Vec<super::Ack>>();
        let runner = std::thread::Builder::new()
            .name("tracker-acks".into())
            .spawn_scoped(scope, move || {
                for batch in to_run {
                    batch.into_iter().for_each(|ack| ack());
                }
            });
        if let Err(e) = &runner {
            log::warn!(
                "cannot start the thread that answers clients ({e}): the writer answers them"
            );
        }
        let acks = runner.is_ok().then_some(acks);
        write_batches(conn, messages, shared, acks.as_ref())
    })
}

fn write_batches(
    mut conn: Box<dyn Db>,
    messages: &Receiver<Msg>,
    shared: &Shared,
    acks: Option<&crossbeam_channel::Sender<Vec<super::Ack>>>,
) -> Written {
    let mut written = Written::default();
    // Transfers not ended yet, held back for their outcome (`rows`).
    let mut held = rows::NewRows::default();
    loop {
        let (batch, closed) = match next(messages, !held.is_empty()) {
            Next::Message(first) => gather(first, messages),
            Next::Idle => (Vec::new(), false),
            Next::Closed => (Vec::new(), true),
        };
        if conn.is_broken() {
            match shared.location.open_writer(&schema::TABLES) {
                Ok(new) => {
                    log::info!("{}: connected again", shared.location);
                    conn = new;
                }
                Err(e) => log::warn!("{}: cannot connect again: {e}", shared.location),
            }
        }
        let (events, answers) = commit(conn.as_mut(), batch, &mut held, closed, shared);
        written.events += events;
        written.transactions += 1;
        if !answers.is_empty() {
            match acks {
                Some(acks) => {
                    if let Err(e) = acks.send(answers) {
                        e.into_inner().into_iter().for_each(|ack| ack());
                    }
                }
                None => answers.into_iter().for_each(|ack| ack()),
            }
        }
        if closed {
            break;
        }
    }
    let dropped = shared.dropped.load(Relaxed);
    if dropped > 0 {
        log::warn!(
            "transfer tracking stopped: {} events recorded, {dropped} dropped (channel full or write failed)",
            written.events
        );
    } else {
        log::info!(
            "transfer tracking stopped: {} events recorded",
            written.events
        );
    }
    written
}

enum Next {
    Message(Msg),
    /// Nothing came while rows were held back: time to write them.
    Idle,
    Closed,
}

/// The next message; with rows held back, `rows::HOLD_MS` at most.
fn next(messages: &Receiver<Msg>, holding: bool) -> Next {
    if !holding {
        return messages.recv().map_or(Next::Closed, Next::Message);
    }
    match messages.recv_timeout(Duration::from_millis(rows::HOLD_MS)) {
        Ok(msg) => Next::Message(msg),
        Err(RecvTimeoutError::Timeout) => Next::Idle,
        Err(RecvTimeoutError::Disconnected) => Next::Closed,
    }
}

/// A batch that starts with `first`: what arrives within the window, up
/// to `MAX_BATCH`, ended early by someone waiting on it. Also whether the
/// channel disconnected.
fn gather(first: Msg, messages: &Receiver<Msg>) -> (Vec<Msg>, bool) {
    let deadline = Instant::now() + BATCH_WINDOW;
    let mut waited_on = is_waited_on(&first);
    let mut batch = vec![first];
    while batch.len() < MAX_BATCH {
        match messages.try_recv() {
            Ok(msg) => {
                waited_on |= is_waited_on(&msg);
                batch.push(msg);
                continue;
            }
            Err(TryRecvError::Disconnected) => return (batch, true),
            Err(TryRecvError::Empty) => {}
        }
        // Someone waits on this batch: what is there goes now.
        let now = Instant::now();
        if waited_on || now >= deadline {
            break;
        }
        std::thread::sleep(GATHER_PAUSE.min(deadline - now));
    }
    (batch, false)
}

/// Whether someone waits on the commit of `msg`: a flush, a client's
/// answer, a catalog change.
fn is_waited_on(msg: &Msg) -> bool {
    matches!(
        msg,
        Msg::Flush(_) | Msg::Acked { .. } | Msg::Catalog { done: Some(_), .. }
    )
}

/// Who waits on a batch's commit.
#[derive(Default)]
struct Waiting {
    flushed: Vec<crossbeam_channel::Sender<()>>,
    /// Clients answered once their transfer is committed (or once the
    /// commit failed: the document is stored all the same).
    acks: Vec<super::Ack>,
    changed: Vec<crossbeam_channel::Sender<Result<(), String>>>,
    cataloged: Vec<(
        crossbeam_channel::Sender<Result<catalog::Outcome, String>>,
        catalog::Outcome,
    )>,
}

/// Commits one batch in one transaction and answers whoever waits on it.
/// Returns how many events were written.
/// Rows held back are written once ready, or all of them when someone
/// waits on a flush or the writer stops (`last`). Returns the clients to
/// answer now that their transfers are committed.
fn commit(
    db: &mut dyn Db,
    batch: Vec<Msg>,
    held: &mut rows::NewRows,
    last: bool,
    shared: &Shared,
) -> (u64, Vec<super::Ack>) {
    let mut events = 0;
    let mut waiting = Waiting::default();
    let result = in_transaction(db, |db| {
        apply_batch(db, batch, held, shared, &mut events, &mut waiting)?;
        let ready = if last || !waiting.flushed.is_empty() {
            std::mem::take(held)
        } else {
            held.take_ready()
        };
        ready.insert(db, shared.balancer.as_deref())
    });
    let outcome = match result {
        Ok(()) => Ok(()),
        Err(e) => {
            log::warn!(
                "{}: cannot record {events} transfer events: {e}",
                shared.location
            );
            shared.dropped.fetch_add(events, Relaxed);
            events = 0;
            Err(e.to_string())
        }
    };
    for done in waiting.changed {
        let _ = done.send(outcome.clone());
    }
    for (done, removals) in waiting.cataloged {
        let _ = done.send(outcome.clone().map(|()| removals));
    }
    for done in waiting.flushed {
        let _ = done.send(());
    }
    (events, waiting.acks)
}

fn apply_batch(
    db: &mut dyn Db,
    batch: Vec<Msg>,
    new_rows: &mut rows::NewRows,
    shared: &Shared,
    events: &mut u64,
    waiting: &mut Waiting,
) -> Result<(), DbError> {
    let balancer = shared.balancer.as_deref();
    for msg in batch {
        match msg {
            Msg::Event { at_ms, event } => {
                if let Some(event) = new_rows.absorb(at_ms, event) {
                    apply(db, at_ms, &event, balancer)?;
                }
                *events += 1;
            }
            Msg::Acked { at_ms, event, then } => {
                if let Some(event) = new_rows.absorb(at_ms, event) {
                    apply(db, at_ms, &event, balancer)?;
                }
                *events += 1;
                waiting.acks.push(then);
            }
            Msg::Flush(done) => waiting.flushed.push(done),
            Msg::Server {
                change,
                addr,
                at_ms,
                done,
            } => {
                apply_server(db, at_ms, change, &addr, &shared.instance)?;
                waiting.changed.push(done);
            }
            Msg::Catalog {
                change,
                at_ms,
                done,
            } => {
                // A catalog change may touch a transfer received in this
                // batch: its row goes in first.
                std::mem::take(new_rows).insert(db, balancer)?;
                let removals = apply_catalog(db, at_ms, change, balancer)?;
                if let Some(done) = done {
                    waiting.cataloged.push((done, removals));
                }
            }
        }
    }
    Ok(())
}

/// A change of the catalog; a deleted file's transfer names the balancer
/// that took the deletion, if none took it before.
fn apply_catalog(
    db: &mut dyn Db,
    at_ms: u64,
    change: catalog::Change,
    balancer: Option<&str>,
) -> Result<catalog::Outcome, DbError> {
    let deleted = match &change {
        catalog::Change::Delete { transfer, .. } => Some(transfer.number),
        _ => None,
    };
    let removals = catalog::apply(db, at_ms, change)?;
    if let (Some(number), Some(balancer)) = (deleted, balancer) {
        db.execute(
            "UPDATE transfers SET balancer = ?2 WHERE number = ?1 AND balancer IS NULL",
            sql_args![number as i64, balancer],
        )?;
    }
    Ok(removals)
}

/// Transfers a balancer left open when it stopped without finishing them:
/// nothing will carry them on, so they end as interrupted. Events are
/// written behind the answers, so one of them may have been stored (and
/// even acknowledged) just before the stop: the record says so. With a
/// shared database only this balancer's own are its to close.
pub(super) fn mark_interrupted(
    db: &mut dyn Db,
    now_ms: u64,
    balancer: Option<&str>,
) -> Result<u64, DbError> {
    db.execute(
        "UPDATE transfers SET state = 'interrupted', ended_ms = ?1,
             duration_ms = CASE WHEN ?1 > started_ms THEN ?1 - started_ms ELSE 0 END,
             last_error = 'the balancer stopped before recording how this transfer ended; \
                           it may have been stored'
         WHERE state IN ('queued', 'sending', 'retried')
             AND (balancer IS NULL OR CAST(?2 AS TEXT) IS NULL OR balancer = ?2)",
        sql_args![now_ms as i64, balancer],
    )
}

/// A transfer sent to server `?2`: appended to its JSON list of servers.
const SENT_SQLITE: &str = "UPDATE transfers SET state = 'sending',
        servers = json_insert(servers, '$[#]', ?2)
    WHERE number = ?1 AND state IN ('queued', 'sending', 'retried')";
const SENT_POSTGRES: &str = "UPDATE transfers SET state = 'sending',
        servers = (servers::jsonb || jsonb_build_array(?2::text))::text
    WHERE number = ?1 AND state IN ('queued', 'sending', 'retried')";

/// The SQL that ends a transfer: `?3` is the time, `?1` its number.
const DURATION: &str = "CASE WHEN ?3 > started_ms THEN ?3 - started_ms ELSE 0 END";

fn apply(
    db: &mut dyn Db,
    at_ms: u64,
    event: &TrackEvent,
    balancer: Option<&str>,
) -> Result<(), DbError> {
    // Integers are i64 in both stores; numbers are 63 bits and times fit.
    let at = at_ms as i64;
    // A table: one statement per kind of event.
    match event {
        TrackEvent::Received {
            number,
            client,
            title,
            size,
            user,
        } => {
            db.execute(
                "INSERT INTO transfers (number, client, title, size, state, started_ms, \"user\",
                     balancer)
                 VALUES (?1, ?2, ?3, ?4, 'queued', ?5, ?6, ?7) ON CONFLICT (number) DO NOTHING",
                sql_args![
                    *number as i64,
                    client,
                    title,
                    *size as i64,
                    at,
                    user,
                    balancer
                ],
            )?;
        }
        TrackEvent::Sent { number, server } => {
            let sql = db.dialect().pick(SENT_SQLITE, SENT_POSTGRES);
            db.execute(sql, sql_args![*number as i64, server])?;
        }
        TrackEvent::Retried {
            number,
            server,
            reason,
        } => {
            db.execute(
                "UPDATE transfers SET state = 'retried', last_error = ?2
                 WHERE number = ?1 AND state IN ('queued', 'sending', 'retried')",
                sql_args![*number as i64, &format!("{server}: {reason}")],
            )?;
        }
        TrackEvent::Stored {
            number,
            server,
            file,
        } => {
            let found = db.execute(
                &format!(
                    "UPDATE transfers SET state = 'stored', server = ?2, file = ?4, ended_ms = ?3,
                         duration_ms = {DURATION}
                     WHERE number = ?1"
                ),
                sql_args![*number as i64, server, at, file],
            )?;
            if found > 0 {
                catalog::document_stored(db, *number, server, file, at_ms)?;
            }
        }
        TrackEvent::Interrupted { number, reason } => {
            db.execute(
                &format!(
                    "UPDATE transfers SET state = 'interrupted', last_error = ?2, ended_ms = ?3,
                         duration_ms = {DURATION}
                     WHERE number = ?1 AND state <> 'stored'"
                ),
                sql_args![*number as i64, reason, at],
            )?;
        }
        TrackEvent::Failed {
            number,
            code,
            reason,
        } => {
            db.execute(
                &format!(
                    "UPDATE transfers SET state = ?4, last_error = ?2, ended_ms = ?3,
                         duration_ms = {DURATION}
                     WHERE number = ?1 AND state <> 'stored'"
                ),
                sql_args![
                    *number as i64,
                    &format!("{code}: {reason}"),
                    at,
                    TransferState::of_failure(*code).as_str()
                ],
            )?;
        }
    }
    Ok(())
}

/// Writes a change of the pool. A change that would leave the row as it
/// is writes nothing, so that what a balancer learned from another (and
/// does in turn) is not written back as its own.
fn apply_server(
    db: &mut dyn Db,
    at_ms: u64,
    change: PoolChange,
    addr: &str,
    instance: &str,
) -> Result<(), DbError> {
    let at = at_ms as i64;
    let sql = match change {
        // A server saved again keeps the time it was first added, unless
        // it had left or been taken out in between.
        PoolChange::Joined | PoolChange::Drained | PoolChange::Removed => {
            "INSERT INTO servers (address, added_ms, state, changed_ms, changed_by)
             VALUES (?1, ?2, ?3, ?2, ?4)
             ON CONFLICT (address) DO UPDATE SET state = excluded.state,
                 added_ms = excluded.added_ms, changed_ms = excluded.changed_ms,
                 changed_by = excluded.changed_by
             WHERE servers.state <> excluded.state"
        }
        // Whether drained or removed, it stays as the operator left it.
        PoolChange::Banned => {
            "INSERT INTO servers (address, added_ms, state, changed_ms, changed_by)
             VALUES (?1, ?2, ?3, ?2, ?4)
             ON CONFLICT (address) DO UPDATE SET state = excluded.state,
                 changed_ms = excluded.changed_ms, changed_by = excluded.changed_by
             WHERE servers.state NOT IN ('removed', 'drained')"
        }
        // Only a server in the pool leaves it: one an operator took out
        // stays out.
        PoolChange::Left => {
            "UPDATE servers SET state = ?3, changed_ms = ?2, changed_by = ?4
             WHERE address = ?1 AND state = 'active'"
        }
    };
    db.execute(sql, sql_args![addr, at, change.state(), instance])?;
    Ok(())
}
