//! The link to one server: a thread that forwards jobs, one at a time, on a
//! persistent connection and routes each acknowledgement back to the client
//! connection that sent the document.

use super::dispatch::{Event, Job};
use super::BackendWire;
use crate::proto::{self, legacy, CallError, Connection, Reply, Request, StoreRequest};
use crossbeam_channel::{Receiver, Sender};
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
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
) -> std::io::Result<thread::JoinHandle<()>> {
    thread::Builder::new()
        .name(format!("link-{}", addr.port()))
        .spawn(move || {
            let mut link = Link {
                addr,
                settings,
                conn: None,
            };
            for mut job in jobs {
                let number = job.request_number.unwrap_or_default();
                let event = match link.forward(&mut job) {
                    Ok(Reply::Stored(mut stored)) => {
                        log::info!(
                            "request {number}: stored on server {name} as {} ({} letters A)",
                            stored.file,
                            stored.a_count
                        );
                        stored.id = job.id;
                        stored.server = name.clone();
                        let _ = job.reply.send(Reply::Stored(stored));
                        Event::Done { server: index }
                    }
                    Ok(Reply::Error(e)) if e.code.is_retryable() => Event::Retry {
                        server: index,
                        job,
                        reason: format!("{}: {}", e.code, e.message),
                        link_failed: false,
                        delivered: true,
                    },
                    Ok(Reply::Error(mut e)) => {
                        log::warn!("request {number}: refused by server {name}: {}", e.message);
                        e.id = Some(job.id);
                        let _ = job.reply.send(Reply::Error(e));
                        Event::Done { server: index }
                    }
                    Ok(other) => {
                        link.conn = None;
                        Event::Retry {
                            server: index,
                            job,
                            reason: format!("unexpected reply {other:?}"),
                            link_failed: true,
                            delivered: true,
                        }
                    }
                    Err(e) => Event::Retry {
                        server: index,
                        job,
                        reason: e.reason,
                        link_failed: true,
                        delivered: e.delivered,
                    },
                };
                if events.send(event).is_err() {
                    return; // dispatcher gone: shutting down
                }
            }
        })
}

struct Link {
    addr: SocketAddr,
    settings: LinkSettings,
    conn: Option<Connection<TcpStream>>,
}

impl Link {
    fn connect(&self) -> Result<Connection<TcpStream>, LinkError> {
        let s = self.settings;
        proto::connect(&self.addr, s.connect_timeout, s.io_timeout)
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
        let request = Request::Store(StoreRequest {
            id: number,
            doc: std::mem::take(&mut job.doc),
            request_number: Some(number),
        });
        let result = self.exchange(&request);
        let Request::Store(store) = request else {
            unreachable!()
        };
        job.doc = store.doc;
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
        let s = self.settings;
        let mut stream =
            proto::connect(&self.addr, s.connect_timeout, s.io_timeout).map_err(|e| LinkError {
                reason: format!("cannot connect: {e}"),
                delivered: false,
            })?;
        let text = legacy::dumps_document(&job.doc, Some(number));
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
            file: legacy::original_file_name(number, &job.doc.title),
            a_count: crate::server::storage::count_a(&job.doc.content),
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
