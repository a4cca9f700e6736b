//! Documents and computations: each becomes a job for a server. While a
//! server can take it and nothing waits before it, the connection's own
//! thread picks the server on the board and sends it there; the jobs of
//! one read (a client that pipelines) go together, one write per server
//! connection. Otherwise it waits in the dispatcher's queue.

use super::{Flow, Held, Io};
use crate::balancer::board::Gate;
use crate::balancer::context::Conn;
use crate::balancer::event::Event;
use crate::balancer::flow::Hold;
use crate::balancer::keys::Placement;
use crate::balancer::limits::Limit;
use crate::balancer::replicas::Group;
use crate::balancer::session::Session;
use crate::balancer::work::{Job, Work};
use crate::proto::{self, ClientKey, ErrorCode, KeyProbe, Operation, Reply, StoreRequest};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

/// Jobs picked for servers on this thread and not yet sent: a client's
/// whole read goes to each server in one write.
#[derive(Default)]
pub struct Outbox {
    jobs: Vec<(Arc<Gate>, Job)>,
    /// Documents sent again, to be looked up together before they are
    /// placed (`keys`).
    resent: Vec<(ClientKey, Job)>,
}

impl Outbox {
    fn push(&mut self, gate: Arc<Gate>, job: Job) {
        self.jobs.push((gate, job));
    }

    /// Sends what was picked, each server's jobs together; documents sent
    /// again are looked up first (all of this read at once) and placed
    /// only if no server holds them.
    pub fn flush(&mut self, conn: &Conn) {
        if !self.resent.is_empty() {
            let resent = std::mem::take(&mut self.resent);
            settle_resent(conn, resent, |gate, job| self.push(gate, job));
        }
        let mut groups: Vec<(Arc<Gate>, Vec<Job>)> = Vec::new();
        for (gate, job) in self.jobs.drain(..) {
            match groups.iter_mut().find(|(g, _)| g.id == gate.id) {
                Some((_, jobs)) => jobs.push(job),
                None => groups.push((gate, vec![job])),
            }
        }
        for (gate, jobs) in groups {
            gate.link.send(jobs);
        }
    }
}

pub fn store(
    conn: &Conn,
    session: &Session,
    store: StoreRequest,
    raw_fields: Option<Vec<u8>>,
    held: Held,
    io: &mut Io<'_>,
) -> Flow {
    let peer = conn.peer;
    let size = store.doc.content.len();
    if let Some(max) = conn.settings.max_document_size.filter(|&max| size > max) {
        conn.stats.limits.hit(Limit::DocumentTooLarge, || {
            format!("connection from {peer} sent a document of {size} bytes (--max-document-size {max})")
        });
        let _ = io.replies.send(Reply::error(
            Some(store.id),
            ErrorCode::TooLarge,
            format!(
                "the document has {size} bytes of content, more than this balancer takes (--max-document-size {max})"
            ),
        ));
        return Flow::Continue;
    }
    log::debug!(
        "document received from {peer}: \"{}\" (id {}, {size} bytes)",
        proto::truncate(&store.doc.title, 80),
        store.id,
    );
    let mut work = Work::store_fields(&store.doc, raw_fields);
    let Work::Store(doc) = &mut work else {
        unreachable!("store_fields makes a store");
    };
    doc.key = store.key;
    doc.resent = store.resent;
    match store.key.filter(|_| store.resent && conn.keys.is_some()) {
        Some(key) => {
            let job = new_job(conn, session, store.id, work, held, io);
            io.outbox.resent.push((key, job));
            Flow::Continue
        }
        None if conn.settings.replicas.target > 1 => {
            let job = new_job(conn, session, store.id, work, held, io);
            store_copies(conn, job, io)
        }
        None => submit(conn, session, store.id, work, held, io),
    }
}

/// A document with `--replicas` above 1: one job per copy, sharing a
/// group that answers the client once they are stored (see `replicas`).
/// Refused at once when too few servers are up for the copies.
fn store_copies(conn: &Conn, mut job: Job, io: &mut Io<'_>) -> Flow {
    let replicas = conn.settings.replicas;
    let up = conn
        .board
        .servers()
        .iter()
        .filter(|g| g.may_accept())
        .count();
    let want = match replicas.copies_with(up) {
        Ok(want) => want,
        Err(why) => {
            conn.stats.received.fetch_add(1, Relaxed);
            job.fail(ErrorCode::TooFewServers, why, &conn.stats);
            return Flow::Continue;
        }
    };
    let number = *job
        .request_number
        .get_or_insert_with(|| conn.numbers.next());
    let hold = std::mem::take(&mut job.hold);
    let group = Arc::new(Group::new(
        job.id,
        want,
        replicas,
        job.reply.clone(),
        job.out.take(),
        hold,
    ));
    let Work::Store(doc) = &job.work else {
        unreachable!("store_copies takes documents");
    };
    let mut copies = Vec::with_capacity(want);
    for _ in 1..want {
        let work = Work::Store(doc.clone());
        let mut copy = Job::new(job.id, work, job.client, job.reply.clone(), Hold::default());
        copy.request_number = Some(number);
        copy.user = job.user.clone();
        copy.group = Some(group.clone());
        copies.push(copy);
    }
    job.group = Some(group);
    conn.stats.received.fetch_add(1, Relaxed);
    for copy in std::iter::once(job).chain(copies) {
        if let Flow::Close = place(conn, copy, |gate, job| io.outbox.push(gate, job)) {
            return Flow::Close;
        }
    }
    Flow::Continue
}

/// Documents sent again: their keys are looked up on the servers; one
/// held somewhere is answered from there, the others are placed as usual,
/// the servers that could not tell noted as ones that may hold a copy
/// (told to forget it once it is stored elsewhere).
fn settle_resent(conn: &Conn, resent: Vec<(ClientKey, Job)>, mut send: impl FnMut(Arc<Gate>, Job)) {
    let Some(lookup) = &conn.keys else {
        return;
    };
    let mut jobs = Vec::with_capacity(resent.len());
    let mut probes = Vec::with_capacity(resent.len());
    for (key, mut job) in resent {
        // Numbered now: a server that finds the key absent lets only this
        // number store it from then on.
        let number = *job
            .request_number
            .get_or_insert_with(|| conn.numbers.next());
        probes.push(KeyProbe {
            key,
            request_number: number,
        });
        jobs.push(job);
    }
    let placements = lookup.lookup(&probes);
    for (mut job, placement) in jobs.into_iter().zip(placements) {
        match placement {
            Placement::Held { server, held } => {
                log::info!(
                    "{} sent again from {}: already stored on server {server} as {} (request {})",
                    job.work.describe(),
                    job.client,
                    held.file,
                    held.request_number
                );
                conn.stats.received.fetch_add(1, Relaxed);
                conn.stats.latency.observe(job.received.elapsed());
                let mut events = job.found_events(held.request_number, &server, &held.file);
                let reply = Reply::Stored(proto::Stored {
                    id: job.id,
                    server,
                    request_number: held.request_number,
                    file: held.file,
                    a_count: held.a_count,
                    existing: true,
                    copies: Vec::new(),
                    under_replicated: false,
                });
                match (&conn.tracker, events.pop()) {
                    (Some(t), Some(stored)) => {
                        events.into_iter().for_each(|e| t.record(e));
                        t.record_then(stored, Box::new(move || job.deliver(reply)));
                    }
                    _ => job.deliver(reply),
                }
            }
            Placement::Absent { silent } => {
                job.uncertain = silent;
                if let Flow::Close = dispatch(conn, job, &mut send) {
                    return;
                }
            }
        }
    }
}

pub fn calc(
    conn: &Conn,
    session: &Session,
    id: u64,
    operation: Operation,
    held: Held,
    io: &mut Io<'_>,
) -> Flow {
    log::debug!(
        "calc request received from {}: {operation} (id {id})",
        conn.peer
    );
    submit(conn, session, id, Work::Calc(operation), held, io)
}

/// Sends the job to a server that can take it now, or queues it.
fn submit(
    conn: &Conn,
    session: &Session,
    id: u64,
    work: Work,
    held: Held,
    io: &mut Io<'_>,
) -> Flow {
    let job = new_job(conn, session, id, work, held, io);
    dispatch(conn, job, |gate, job| io.outbox.push(gate, job))
}

fn new_job(conn: &Conn, session: &Session, id: u64, work: Work, held: Held, io: &Io<'_>) -> Job {
    let hold = Hold {
        permit: Some(held.permit),
        bytes: Some(held.bytes),
        busy: Some(conn.mark.busy()),
    };
    let mut job = Job::new(id, work, conn.peer, io.replies.clone(), hold);
    job.user = session.user_name();
    job.out = Some(io.out.clone());
    job
}

/// A document of the original format: no reply goes anywhere (the
/// original client reads none); what happens is logged.
pub fn legacy_document(conn: &Conn, id: u64, doc: &proto::Document, hold: Hold) -> Flow {
    let (discard, _) = crossbeam_channel::bounded(0);
    let job = Job::new(id, Work::store(doc), conn.peer, discard, hold);
    dispatch(conn, job, |gate, job| gate.link.send(vec![job]))
}

/// Gives the job to `send` with a server that can take it now, or to the
/// dispatcher's queue. `Close` when the balancer is shutting down.
fn dispatch(conn: &Conn, job: Job, send: impl FnOnce(Arc<Gate>, Job)) -> Flow {
    conn.stats.received.fetch_add(1, Relaxed);
    place(conn, job, send)
}

/// `dispatch`, for a job already counted (a copy of a document).
fn place(conn: &Conn, mut job: Job, send: impl FnOnce(Arc<Gate>, Job)) -> Flow {
    let gate = match &job.group {
        None => conn.board.take_now(&job.tried),
        Some(group) => conn.board.take_now_for(&job.tried, group),
    };
    if let Some(gate) = gate {
        for (at, event) in job.bind(gate.id, gate.name(), &conn.numbers) {
            if let Some(t) = &conn.tracker {
                t.record_at(at, event);
            }
        }
        job.count_started(&gate.stats);
        send(gate, job);
        return Flow::Continue;
    }
    // Counted before it goes, so that no other thread overtakes it.
    conn.board.enqueued();
    if let Err(e) = conn.events.send(Event::Submit(Box::new(job))) {
        conn.board.dequeued(1);
        if let Event::Submit(job) = e.into_inner() {
            job.fail(
                ErrorCode::ShuttingDown,
                "the balancer is shutting down; the request was not stored".into(),
                &conn.stats,
            );
        }
        return Flow::Close;
    }
    Flow::Continue
}
