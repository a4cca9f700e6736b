//! The link to one server: a thread that forwards jobs, one at a time, on a
//! persistent connection and routes each acknowledgement back to the client
//! connection that sent the document.

use super::dispatch::{Event, Job, Work};
use super::stats::ServerStats;
use super::BackendWire;
use crate::proto::{self, legacy, CallError, Connection, Reply, Request, StoreRequest};
use crossbeam_channel::{Receiver, Sender};
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

#[derive(Debug, Clone, Copy)]
pub struct LinkSettings {
    pub connect_timeout: Duration,
    /// How long a server may take to store one document.
    pub io_timeout: Duration,
    pub max_frame: usize,
    pub wire: BackendWire,
}

/// Why a forward failed on the connection itself.
struct LinkError {
    reason: String,
    /// The request was written, so the server may have stored it.
    delivered: bool,
}

pub fn spawn(
    index: usize,
    name: String,
    addr: SocketAddr,
    jobs: Receiver<Job>,
    events: Sender<Event>,
    settings: LinkSettings,
    stats: Arc<super::stats::Stats>,
) -> std::io::Result<thread::JoinHandle<()>> {
    thread::Builder::new()
        .name(format!("link-{}", addr.port()))
        .spawn(move || {
            let mut link = Link {
                addr,
                settings,
                conn: None,
            };
            let server_stats = &stats.servers[index];
            for mut job in jobs {
                server_stats.requests.fetch_add(1, Relaxed);
                let result = link.forward(&mut job);
                let event = settle(index, &name, job, result, server_stats, &stats);
                if events.send(event).is_err() {
                    return; // dispatcher gone: shutting down
                }
            }
        })
}

/// Turns the outcome of a forward into the client's reply (when final) and
/// the event for the dispatcher.
fn settle(
    index: usize,
    name: &str,
    job: Job,
    result: Result<Reply, LinkError>,
    server_stats: &ServerStats,
    stats: &super::stats::Stats,
) -> Event {
    let number = job.request_number.unwrap_or_default();
    let retry = |job, reason, link_failed, delivered| {
        server_stats.failures.fetch_add(1, Relaxed);
        Event::Retry {
            server: index,
            job,
            reason,
            link_failed,
            delivered,
        }
    };
    let reply = match result {
        Ok(Reply::Stored(mut stored)) => {
            log::info!(
                "request {number}: stored on server {name} as {} ({} letters A)",
                stored.file,
                stored.a_count
            );
            if let Work::Store(doc) = &job.work {
                server_stats
                    .bytes
                    .fetch_add(doc.content.len() as u64, Relaxed);
            }
            stored.id = job.id;
            stored.server = name.to_string();
            Reply::Stored(stored)
        }
        Ok(Reply::Calc(mut computed)) => {
            log::info!(
                "request {number}: computed on server {name}: {} {} {} = {}",
                computed.a,
                computed.operation.symbol(),
                computed.b,
                computed.result
            );
            computed.id = job.id;
            computed.server = name.to_string();
            Reply::Calc(computed)
        }
        Ok(Reply::Error(e)) if e.code.is_retryable() => {
            return retry(job, format!("{}: {}", e.code, e.message), false, true);
        }
        Ok(Reply::Error(mut e)) => {
            log::warn!("request {number}: refused by server {name}: {}", e.message);
            server_stats.failures.fetch_add(1, Relaxed);
            e.id = Some(job.id);
            let _ = job.reply.send(Reply::Error(e));
            return Event::Failed { server: index };
        }
        Ok(other) => return retry(job, format!("unexpected reply {other:?}"), true, true),
        Err(e) => return retry(job, e.reason, true, e.delivered),
    };
    stats.latency.observe(job.received.elapsed());
    let _ = job.reply.send(reply);
    Event::Done { server: index }
}

struct Link {
    addr: SocketAddr,
    settings: LinkSettings,
    conn: Option<Connection<TcpStream>>,
}

impl Link {
    fn connect(&self) -> Result<Connection<TcpStream>, LinkError> {
        let s = self.settings;
        crate::net::connect(&self.addr, s.connect_timeout, s.io_timeout)
            .map(|stream| Connection::new(stream, s.max_frame))
            .map_err(|e| LinkError {
                reason: format!("cannot connect: {e}"),
                delivered: false,
            })
    }

    /// Sends the job's document and waits for the server's reply. A reused
    /// connection that turns out dead (the server closed it while idle, or
    /// restarted) is replaced once before giving up.
    fn forward(&mut self, job: &mut Job) -> Result<Reply, LinkError> {
        let number = job.request_number.unwrap_or_default();
        if self.settings.wire == BackendWire::Legacy {
            return self.forward_legacy(job, number);
        }
        // The document moves into the request and back, not copied.
        let request = match &mut job.work {
            Work::Store(doc) => Request::Store(StoreRequest {
                id: number,
                doc: std::mem::take(doc),
                request_number: Some(number),
                not_after_ms: None,
            }),
            Work::Calc(operation) => Request::Calc {
                id: number,
                operation: *operation,
            },
        };
        let result = self.exchange(&request);
        if let (Request::Store(store), Work::Store(doc)) = (request, &mut job.work) {
            *doc = store.doc;
        }
        let reply = result?;
        if reply.id() != Some(number) && reply.id().is_some() {
            self.conn = None;
            return Err(LinkError {
                reason: format!("reply for id {:?} while waiting for {number}", reply.id()),
                delivered: true,
            });
        }
        Ok(reply)
    }

    /// Sends a document the way the original balancer did: a new connection,
    /// one `json.dumps` text, close. The original server never acknowledges,
    /// so a complete write is the best evidence of success there is.
    fn forward_legacy(&self, job: &Job, number: u64) -> Result<Reply, LinkError> {
        let doc = match &job.work {
            Work::Store(doc) => doc,
            Work::Calc(_) => {
                return Ok(Reply::error(
                    Some(number),
                    proto::ErrorCode::BadRequest,
                    "servers of the original format do not compute",
                ))
            }
        };
        let s = self.settings;
        let mut stream =
            crate::net::connect(&self.addr, s.connect_timeout, s.io_timeout).map_err(|e| {
                LinkError {
                    reason: format!("cannot connect: {e}"),
                    delivered: false,
                }
            })?;
        let text = legacy::dumps_document(doc, Some(number));
        stream
            .write_all(text.as_bytes())
            .and_then(|()| stream.flush())
            .map_err(|e| LinkError {
                reason: format!("cannot send: {e}"),
                delivered: false,
            })?;
        Ok(Reply::Stored(proto::Stored {
            id: number,
            server: self.addr.to_string(),
            request_number: number,
            file: legacy::original_file_name(number, &doc.title),
            a_count: crate::server::storage::count_a(&doc.content),
            existing: false,
        }))
    }

    fn exchange(&mut self, request: &Request) -> Result<Reply, LinkError> {
        let reused = self.conn.is_some();
        match self.exchange_once(request) {
            Err((first, cause))
                if reused
                    && !matches!(cause, CallError::Frame(proto::FrameError::Timeout { .. })) =>
            {
                log::debug!(
                    "link to {}: stale connection ({cause}), reconnecting",
                    self.addr
                );
                self.exchange_once(request).map_err(|(mut e, _)| {
                    // The first try may have reached the server even if the
                    // second could not connect.
                    e.delivered |= first.delivered;
                    e
                })
            }
            other => other.map_err(|e| e.0),
        }
    }

    fn exchange_once(&mut self, request: &Request) -> Result<Reply, (LinkError, CallError)> {
        let mut conn = match self.conn.take() {
            Some(c) => c,
            None => self.connect().map_err(|e| (e, CallError::Closed))?,
        };
        if let Err(e) = conn.send(request) {
            let err = LinkError {
                reason: format!("cannot send: {e}"),
                delivered: false,
            };
            return Err((err, e.into()));
        }
        match conn.recv::<Reply>() {
            Ok(reply) => {
                self.conn = Some(conn);
                Ok(reply)
            }
            Err(e) => {
                let err = LinkError {
                    reason: format!("no reply: {e}"),
                    delivered: true,
                };
                Err((err, e))
            }
        }
    }
}
