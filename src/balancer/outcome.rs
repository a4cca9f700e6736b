//! What becomes of a job when its server has answered (or its connection
//! failed): the client's reply, the transfer's record, the counters, and
//! what the dispatcher needs to hear. It runs on the thread that read the
//! answer (a lane's reader, a legacy worker): a document stored is
//! answered from there, with no other thread woken. The dispatcher hears
//! only of what it has to act on: a place freed while jobs wait, a retry,
//! a `forget` answered, a document stored after others may have stored it.

use super::board::Board;
use super::event::Event;
use super::lane::Finish;
use super::stats::{Kind, ServerStats, Stats};
use super::tracking::Tracker;
use super::work::{Failure, Job, Work};
use super::ServerId;
use crate::proto::{ErrorCode, Reply};
use crossbeam_channel::Sender;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

pub struct Outcomes {
    pub board: Arc<Board>,
    pub events: Sender<Event>,
    pub stats: Arc<Stats>,
    pub tracker: Option<Tracker>,
}

impl Finish for Outcomes {
    fn finish(
        &self,
        id: ServerId,
        server: &ServerStats,
        job: Job,
        result: Result<Reply, (Failure, bool)>,
    ) {
        server.in_flight.fetch_sub(1, Relaxed);
        let report = self.board.must_report(server);
        if let Work::Forget(_) | Work::ForgetKeys(_) = job.work {
            return self.forgotten(id, server, job, result);
        }
        let ended = match result {
            Ok(Reply::Stored(stored)) => self.stored(id, server, job, stored),
            Ok(Reply::Calc(computed)) => self.computed(server, job, computed),
            // A server that wants the handshake from a balancer without the
            // key: nothing will go there, so it counts as unreachable.
            Ok(Reply::Error(e)) if e.code == ErrorCode::Unauthenticated => {
                let why = format!(
                    "the server wants the cluster handshake, and this balancer has no cluster key \
                     (--no-cluster-key): {}",
                    e.message
                );
                return self.retry(id, server, job, Failure::Link(why), false);
            }
            Ok(Reply::Error(e)) if e.code.is_retryable() => {
                let failure = Failure::Refused {
                    code: e.code,
                    message: e.message,
                };
                return self.retry(id, server, job, failure, true);
            }
            Ok(Reply::Error(e)) => self.refused(server, job, e),
            Ok(other) => {
                let failure = Failure::Link(format!("unexpected answer {other:?}"));
                return self.retry(id, server, job, failure, true);
            }
            Err((failure, delivered)) => return self.retry(id, server, job, failure, delivered),
        };
        if ended && server.watched.load(Relaxed) {
            let _ = self.events.send(Event::Served(id));
        } else if report {
            let _ = self.events.send(Event::Freed(id));
        }
        // The job has dropped by now, giving back its connection's window
        // slot and its bytes.
    }
}

impl Outcomes {
    /// A computation answered: delivered to its client.
    fn computed(
        &self,
        server: &ServerStats,
        job: Job,
        mut computed: crate::proto::Computed,
    ) -> bool {
        log::debug!(
            "request {}: computed on server {}: {} {} {} = {}",
            job.request_number.unwrap_or_default(),
            server.name,
            computed.a,
            computed.operation.symbol(),
            computed.b,
            computed.result
        );
        computed.id = job.id;
        computed.server = server.name.clone();
        self.stats.latency.observe(job.received.elapsed());
        job.deliver(Reply::Calc(computed));
        true
    }

    /// A request the server refused for good: the client hears why.
    fn refused(&self, server: &ServerStats, job: Job, mut e: crate::proto::ErrorReply) -> bool {
        log::warn!(
            "request {}: refused by server {} after {} ms: {}",
            job.request_number.unwrap_or_default(),
            server.name,
            job.received.elapsed().as_millis(),
            e.message
        );
        let reason = format!("server {}: {}", server.name, e.message);
        self.track(job.failed_event(e.code, &reason));
        job.count_failed(server);
        self.stats.failed.fetch_add(1, Relaxed);
        e.id = Some(job.id);
        job.deliver(Reply::Error(e));
        false
    }

    fn track(&self, event: Option<super::tracking::TrackEvent>) {
        if let (Some(t), Some(event)) = (&self.tracker, event) {
            t.record(event);
        }
    }

    fn stored(
        &self,
        id: ServerId,
        server: &ServerStats,
        mut job: Job,
        mut stored: crate::proto::Stored,
    ) -> bool {
        let number = job.request_number.unwrap_or_default();
        log::info!(
            "request {number}: {} from {} stored on server {} as {}{} ({} letters A) in {} ms",
            job.work.describe(),
            job.client,
            server.name,
            stored.file,
            if stored.existing {
                " (already there)"
            } else {
                ""
            },
            stored.a_count,
            job.received.elapsed().as_millis()
        );
        let event = job.stored_event(&server.name, &stored.file);
        if let Work::Store(doc) = &job.work {
            server
                .carried(Kind::Document)
                .bytes
                .fetch_add(doc.content_len as u64, Relaxed);
        }
        let uncertain = std::mem::take(&mut job.uncertain);
        if !uncertain.is_empty() {
            let key = match &job.work {
                Work::Store(doc) => doc.key,
                _ => None,
            };
            let _ = self.events.send(Event::Doubt {
                server: id,
                number,
                key,
                uncertain,
            });
        }
        self.stats.latency.observe(job.received.elapsed());
        stored.id = job.id;
        stored.server = server.name.clone();
        // Recorded before the client hears of it, so that a query made
        // after the acknowledgement sees it.
        match (&self.tracker, event) {
            (Some(t), Some(event)) => {
                t.record_then(event, Box::new(move || job.deliver(Reply::Stored(stored))))
            }
            _ => job.deliver(Reply::Stored(stored)),
        }
        true
    }

    fn retry(
        &self,
        id: ServerId,
        server: &ServerStats,
        job: Job,
        failure: Failure,
        delivered: bool,
    ) {
        job.count_failed(server);
        let event = Event::Retry {
            server: id,
            job: Box::new(job),
            failure,
            delivered,
        };
        if let Err(e) = self.events.send(event) {
            // The dispatcher is gone: the balancer has shut down past its
            // drain deadline.
            if let Event::Retry { job, .. } = e.into_inner() {
                job.fail(
                    ErrorCode::ShuttingDown,
                    "the balancer shut down before this request was answered; it may have been stored"
                        .into(),
                    &self.stats,
                );
            }
        }
    }

    fn forgotten(
        &self,
        id: ServerId,
        server: &ServerStats,
        mut job: Job,
        result: Result<Reply, (Failure, bool)>,
    ) {
        let ok = forget_done(server, &result);
        let event = match &mut job.work {
            Work::Forget(numbers) => Event::Forgotten {
                server: id,
                numbers: std::mem::take(numbers),
                ok,
            },
            Work::ForgetKeys(keys) => Event::KeysForgotten {
                server: id,
                keys: std::mem::take(keys),
                ok,
            },
            _ => return,
        };
        let _ = self.events.send(event);
    }
}

/// Whether a `forget` was carried out, logged.
fn forget_done(server: &ServerStats, result: &Result<Reply, (Failure, bool)>) -> bool {
    match result {
        Ok(Reply::Forgotten { moved, .. }) => {
            log::info!(
                "server {}: forgot what is stored elsewhere ({moved} copies moved aside)",
                server.name,
            );
            true
        }
        Ok(other) => {
            log::warn!(
                "server {}: unexpected answer to forget: {other:?}",
                server.name
            );
            false
        }
        Err((failure, _)) => {
            log::warn!("server {}: forget failed: {failure}", server.name);
            false
        }
    }
}
