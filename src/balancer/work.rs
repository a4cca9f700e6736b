//! What travels between the stages of a request: a `Job` (one request on
//! its way to a server, with what it holds of its client's connection and
//! where its answer goes) and the `Work` it asks of the server. Every
//! stage takes jobs from here; this module knows none of them.

use super::client_out::ClientWriter;
use super::flow::Hold;
use super::replicas::Group;
use super::stats::{Kind, ServerStats, Stats};
use super::tracking::TrackEvent;
use super::ServerId;
use crate::proto::{self, ErrorCode, Operation, Reply};
use crate::text::now_ms;
use crossbeam_channel::Sender;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

/// A document as the balancer keeps it: encoded once, forwarded as is.
#[derive(Debug, Clone)]
pub struct StoreWork {
    /// For logs only, shortened.
    pub title: String,
    /// `"titolo":…,"contenuto":…` (see `proto::encode_document_fields`).
    pub fields: Vec<u8>,
    pub content_len: usize,
    /// The client's key of the document, forwarded with it.
    pub key: Option<proto::ClientKey>,
    /// The client sent it again: the servers are asked for its key before
    /// it is placed (`keys`).
    pub resent: bool,
}

/// What a job asks of a server.
#[derive(Debug)]
pub enum Work {
    Store(StoreWork),
    Calc(Operation),
    /// StorageRequest numbers the server should drop: stored elsewhere.
    Forget(Vec<u64>),
    /// Client keys the server should drop: stored elsewhere.
    ForgetKeys(Vec<proto::ClientKey>),
}

impl Work {
    /// How logs name it.
    pub fn describe(&self) -> String {
        match self {
            Work::Store(doc) => format!("\"{}\"", doc.title),
            Work::Calc(op) => format!("calc {op}"),
            Work::Forget(numbers) => format!("forget {} request numbers", numbers.len()),
            Work::ForgetKeys(keys) => format!("forget {} client keys", keys.len()),
        }
    }

    /// The counters it goes to; the balancer's own `forget` goes to none.
    pub fn kind(&self) -> Option<Kind> {
        match self {
            Work::Store(_) => Some(Kind::Document),
            Work::Calc(_) => Some(Kind::Calc),
            Work::Forget(_) | Work::ForgetKeys(_) => None,
        }
    }

    pub fn store(doc: &proto::Document) -> Work {
        Work::store_fields(doc, None)
    }

    /// A document to store, forwarded as `fields` (from
    /// `proto::raw_document_fields`) when given, else encoded from `doc`.
    pub fn store_fields(doc: &proto::Document, fields: Option<Vec<u8>>) -> Work {
        Work::Store(StoreWork {
            title: proto::truncate(&doc.title, 80),
            fields: fields.unwrap_or_else(|| proto::encode_document_fields(doc)),
            content_len: doc.content.len(),
            key: None,
            resent: false,
        })
    }

    /// The request a server gets, `number` being its id there and its
    /// request number, not to be stored after `not_after_ms`.
    pub fn encode(&self, number: u64, not_after_ms: u64) -> Vec<u8> {
        match self {
            Work::Store(doc) => proto::encode_forward_keyed(
                number,
                number,
                Some(not_after_ms),
                doc.key,
                &doc.fields,
            ),
            Work::Calc(operation) => proto::encode(&proto::StorageRequest::Calc {
                id: number,
                operation: *operation,
            }),
            Work::Forget(numbers) => proto::encode(&proto::StorageRequest::Forget {
                id: number,
                numbers: numbers.clone(),
                keys: Vec::new(),
            }),
            Work::ForgetKeys(keys) => proto::encode(&proto::StorageRequest::Forget {
                id: number,
                numbers: Vec::new(),
                keys: keys.clone(),
            }),
        }
    }
}

/// Why a forward did not come back with an answer worth giving.
#[derive(Debug, Clone, PartialEq)]
pub enum Failure {
    /// The connection failed (could not connect, broke, or the server
    /// took longer than `--server-timeout`).
    Link(String),
    /// The server answered with an error that another server may not
    /// have (a storage error, a full disk, an expired deadline...).
    Refused { code: ErrorCode, message: String },
    /// The balancer cut the connection itself (the server was removed).
    Cut,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Link(why) => f.write_str(why),
            Failure::Refused { code, message } => write!(f, "{code}: {message}"),
            Failure::Cut => f.write_str("cut off: the server was removed from the pool"),
        }
    }
}

/// One request (a document to store, an operation to compute) on its way
/// to a server.
#[derive(Debug)]
pub struct Job {
    /// The client's request id, echoed in the reply.
    pub id: u64,
    pub work: Work,
    pub client: SocketAddr,
    /// When the balancer received it.
    pub received: Instant,
    pub reply: Sender<Reply>,
    /// Assigned when first sent and kept across retries, so that a server
    /// can tell a retried document from a new one.
    pub request_number: Option<u64>,
    /// Forwards that may have reached a server.
    pub attempts: u32,
    /// Servers already tried, avoided while others are available.
    pub tried: Vec<ServerId>,
    /// Servers that may hold it: the request reached them, no answer came.
    pub uncertain: Vec<ServerId>,
    /// When it last started waiting in the queue.
    pub queued_at: Instant,
    /// Unix milliseconds after which the server it was last sent to must
    /// not store it (set when it is sent).
    pub not_after_ms: u64,
    /// The connection's window slot and byte budget, given back on drop.
    pub hold: Hold,
    /// The user who sent it (with `--users`), recorded with the transfer.
    pub user: Option<Arc<str>>,
    /// The client's connection, when a reply may be written to it straight
    /// away (framed clients); else the reply goes by `reply`.
    pub out: Option<ClientWriter>,
    /// With `--replicas` above 1: the document's other copies, which
    /// answer the client together.
    pub group: Option<Arc<Group>>,
}

impl Job {
    pub fn new(id: u64, work: Work, client: SocketAddr, reply: Sender<Reply>, hold: Hold) -> Job {
        let now = Instant::now();
        Job {
            id,
            work,
            client,
            received: now,
            reply,
            request_number: None,
            attempts: 0,
            tried: Vec::new(),
            uncertain: Vec::new(),
            queued_at: now,
            not_after_ms: 0,
            hold,
            user: None,
            out: None,
            group: None,
        }
    }

    /// Answers the client: straight to its socket when that needs no
    /// waiting, else through its connection's writer thread. The client
    /// may have gone; its reply has nowhere to go then.
    pub fn deliver(&self, reply: Reply) {
        if let Some(group) = &self.group {
            return group.deliver(reply);
        }
        let reply = match &self.out {
            Some(out) => match super::client_out::hold(out, reply, &self.reply) {
                Some(reply) => reply,
                None => return,
            },
            None => reply,
        };
        if let Some(Ok(mut out)) = self.out.as_ref().map(|o| o.try_lock()) {
            if out.try_message(&reply) {
                return;
            }
        }
        let _ = self.reply.send(reply);
    }

    /// Counts it sent to `server`.
    pub fn count_started(&self, server: &ServerStats) {
        if let Some(kind) = self.work.kind() {
            server.carried(kind).started.fetch_add(1, Relaxed);
        }
    }

    /// Counts it failed on `server`.
    pub fn count_failed(&self, server: &ServerStats) {
        if let Some(kind) = self.work.kind() {
            server.carried(kind).failures.fetch_add(1, Relaxed);
        }
    }

    /// Answers the client with an error; the job ends.
    pub fn fail(self, code: ErrorCode, message: String, stats: &Stats) {
        // A server may hold it: not known to have failed.
        let counter = if code == ErrorCode::MaybeStored {
            &stats.unknown
        } else {
            &stats.failed
        };
        counter.fetch_add(1, Relaxed);
        self.deliver(Reply::error(Some(self.id), code, message));
    }

    pub fn label(&self) -> String {
        match self.request_number {
            Some(n) => format!("request {n}"),
            None => format!("request from {} (id {})", self.client, self.id),
        }
    }

    /// Its request number, if it is a document (only documents are
    /// tracked).
    fn tracked(&self) -> Option<u64> {
        match self.work {
            Work::Store(_) => self.request_number,
            _ => None,
        }
    }

    /// Binds it for server `id` (called `name`): gives it its request
    /// number if it has none, and records the server as tried. Returns the
    /// events of the transfer this starts (`Received` the first time, then
    /// `Sent`).
    pub fn bind(
        &mut self,
        id: ServerId,
        name: &str,
        numbers: &crate::ids::Generator,
    ) -> Vec<(u64, TrackEvent)> {
        let number = *self.request_number.get_or_insert_with(|| numbers.next());
        log::debug!(
            "request {number}: {} from {} -> server {name}{}",
            self.work.describe(),
            self.client,
            if self.tried.is_empty() {
                String::new()
            } else {
                format!(" (retry {})", self.tried.len())
            }
        );
        let events = self.sent_events(name);
        self.tried.push(id);
        events
    }

    /// The events of handing it to `server`: `Received` the first time,
    /// then `Sent`. Made before the job records the server in `tried`.
    fn sent_events(&self, server: &str) -> Vec<(u64, TrackEvent)> {
        let (Work::Store(doc), Some(number)) = (&self.work, self.request_number) else {
            return Vec::new();
        };
        let now = now_ms();
        let mut events = Vec::with_capacity(2);
        if self.tried.is_empty() && self.group.as_ref().is_none_or(|g| g.first_sent()) {
            let waited = self.received.elapsed().as_millis() as u64;
            events.push((now.saturating_sub(waited), self.received_event(number, doc)));
        }
        events.push((
            now,
            TrackEvent::Sent {
                number,
                server: server.to_string(),
            },
        ));
        events
    }

    /// The event of a failure on `server` that will be tried again.
    pub fn retried_event(&self, server: &str, reason: &str) -> Option<TrackEvent> {
        Some(TrackEvent::Retried {
            number: self.tracked()?,
            server: server.to_string(),
            reason: reason.to_string(),
        })
    }

    /// The event of giving it up.
    pub fn failed_event(&self, code: ErrorCode, reason: &str) -> Option<TrackEvent> {
        Some(TrackEvent::Failed {
            number: self.tracked()?,
            code,
            reason: reason.to_string(),
        })
    }

    /// The event of receiving document `doc` as request `number`.
    fn received_event(&self, number: u64, doc: &StoreWork) -> TrackEvent {
        TrackEvent::Received {
            number,
            client: self.client.to_string(),
            title: doc.title.clone(),
            size: doc.content_len as u64,
            user: self.user.as_deref().map(str::to_owned),
        }
    }

    /// The events of a document sent again and found stored already, as
    /// request `number` on `server` (by a balancer that may be gone): its
    /// transfer, recorded if that balancer never did, ends stored.
    pub fn found_events(&self, number: u64, server: &str, file: &str) -> Vec<TrackEvent> {
        let Work::Store(doc) = &self.work else {
            return Vec::new();
        };
        vec![
            self.received_event(number, doc),
            TrackEvent::Stored {
                number,
                server: server.to_string(),
                file: file.to_string(),
            },
        ]
    }

    /// The event of `server` acknowledging it as `file`.
    pub fn stored_event(&self, server: &str, file: &str) -> Option<TrackEvent> {
        Some(TrackEvent::Stored {
            number: self.tracked()?,
            server: server.to_string(),
            file: file.to_string(),
        })
    }
}
