//! Files through the balancer: uploads relayed chunk by chunk to one
//! server (proxy mode) or handed a ticket to go there directly (redirect
//! mode), downloads relayed back, listings and deletes. With a state file
//! these go by the catalog (`catalog`): a stored file takes the entry of
//! its name, `list` reads the catalog, `get` goes straight to a server
//! that holds the file, and an upload resumes on the server that holds its
//! bytes so far. Without one, listings and downloads ask every server.
//!
//! A file transfer has a connection to its server of its own, opened for
//! it, so a large file never holds up the links that carry documents. The
//! balancer holds one chunk at a time per transfer.

pub use super::backend::ServerReach;
use super::catalog::sync;
use super::catalog::{Change, Copy, Cursor, Entry, FileRecord, Recorded, Removal};
use super::client_out::ClientWriter;
use super::context::Conn;
pub use super::context::{FileSettings, Mode};
use super::event::{Event, Picked};
use super::flow::Reservation;
use super::stats::{Ended, Kind, Transfer};
use super::tracking::TrackEvent;
use crate::auth::ClusterKey;
use crate::net;
use crate::proto::file::{body_len, valid_upload_id, BodyError, LIST_PAGE};
use crate::proto::FrameError;
use crate::proto::{
    Chunk, ClientRequest, Connection, Deadline, Deleted, EntryKind, ErrorCode, FileEntry,
    FileHeader, FileList, FileStored, FrameReader, ListKind, Redirect, Reply, StorageRequest,
    Ticket, TransferEvent, UploadReady, UploadRequest,
};
use crate::text::now_ms;
use crossbeam_channel::Sender;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How a conversation ended for the client connection.
pub enum Next {
    Continue,
    /// The client's stream is out of step or gone.
    Close,
}

/// A signed ticket for `upload` on `server`, valid for `ttl`.
fn ticket(
    key: &ClusterKey,
    upload: &UploadRequest,
    server: &str,
    ttl: Duration,
    number: u64,
    report_to: Option<String>,
) -> Ticket {
    let expires_ms = now_ms() + ttl.as_millis() as u64;
    Ticket {
        number,
        report_to,
        owner: upload.owner.clone(),
        ..Ticket::new(server, expires_ms)
    }
    .signed(key, &upload.upload_id, upload.size)
}

impl Conn {
    /// Asks the dispatcher for a server for a file, `prefer`red when it can
    /// take work, avoiding those in `avoid`.
    pub(super) fn pick_server(&self, prefer: Option<&str>, avoid: &[String]) -> Option<Picked> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let event = Event::PickServer {
            prefer: prefer.map(str::to_owned),
            avoid: avoid.to_vec(),
            reply: tx,
        };
        self.events.send(event).ok()?;
        rx.recv_timeout(self.files.wait).ok().flatten()
    }

    /// A connection of its own to a server, which proves the cluster key
    /// first when there is one (see `handshake`).
    pub(super) fn connect_server(
        &self,
        addr: SocketAddr,
    ) -> std::io::Result<Connection<net::Stream>> {
        self.files.reach.connect(addr)
    }

    /// Where an upload's bytes so far are, for a client that does not say
    /// (a new run of the same `send`): the catalog remembers.
    fn resume_server(&self, up: &UploadRequest) -> Option<String> {
        if up.server.is_some() {
            return up.server.clone();
        }
        let tracker = self.tracker.as_ref()?;
        tracker
            .catalog_upload_server(&up.upload_id, up.owner.as_deref())
            .unwrap_or_else(|e| {
                log::warn!("cannot read the catalog: {e}");
                None
            })
    }

    /// Refuses an upload with `no_clobber` whose name is taken.
    fn clobbers(&self, up: &UploadRequest) -> Option<Reply> {
        if !up.no_clobber {
            return None;
        }
        let tracker = self.tracker.as_ref()?;
        match tracker.catalog_files(Some(up.owner.as_deref().unwrap_or("")), &up.name) {
            Ok(found) if !found.is_empty() => Some(Reply::error(
                Some(up.id),
                ErrorCode::Exists,
                format!(
                    "a file named {:?} exists already (sent without --no-clobber, a new file \
                     replaces it)",
                    crate::proto::truncate(&up.name, 200)
                ),
            )),
            Ok(_) => None,
            Err(e) => Some(Reply::error(
                Some(up.id),
                ErrorCode::Internal,
                format!("cannot read the catalog: {e}"),
            )),
        }
    }

    /// Records that `server` holds (or is to hold) the bytes of `up`, so
    /// that the same `send` run again resumes there; waits for the commit.
    fn note_partial(&self, up: &UploadRequest, server: &str) {
        if let Some(tracker) = &self.tracker {
            let change = Change::UploadStarted {
                upload_id: up.upload_id.clone(),
                server: server.to_string(),
                owner: up.owner.clone(),
                name: up.name.clone(),
                size: up.size,
            };
            if let Err(e) = tracker.catalog_change(change) {
                log::warn!("upload {}: cannot record where it goes: {e}", up.upload_id);
            }
        }
    }

    /// An `upload` from the client: picks a server, then either redirects
    /// the client there or relays the upload to it.
    pub(super) fn upload(
        &self,
        mut up: UploadRequest,
        reader: &mut FrameReader<net::Paced>,
        replies: &Sender<Reply>,
        user: Option<&str>,
    ) -> Next {
        // Whatever the client said, the file is the logged-in user's.
        up.owner = user.map(str::to_owned);
        if let Some(refusal) = self.refuse_upload(&up) {
            let _ = replies.send(refusal);
            return Next::Continue;
        }
        // A new run of the same `send` goes back to the bytes it left.
        let resume_on = self.resume_server(&up);
        let (server_name, number, server) = match self.route_upload(&up, &resume_on, user) {
            Ok(relay) => relay,
            Err(answer) => {
                let _ = replies.send(*answer);
                return Next::Continue;
            }
        };
        let resumed_elsewhere = resume_on.as_ref().is_some_and(|s| *s != server_name);
        up.server = None;
        up.no_clobber = false;
        up.ticket = self
            .files
            .key
            .as_ref()
            .map(|k| ticket(k, &up, &server_name, self.files.ticket_ttl, number, None));
        // Counted on its server from here, under way until this returns.
        let transfer = self.stats.server_named(&server_name).transfer(Kind::Upload);
        let mut server = server;
        let ready = match self.begin_relayed(&up, &server_name, &mut server, &transfer) {
            Ok(ready) => ready,
            Err(answer) => {
                let _ = replies.send(*answer);
                return Next::Continue;
            }
        };
        self.log_relay_start(&up, &server_name, ready.offset, resumed_elsewhere);
        self.note_partial(&up, &server_name);
        self.track_start(number, &up, &server_name, user);
        let _ = replies.send(Reply::UploadReady(ready));
        let (reply, next) = match self.relay_chunks(&up, &server_name, server, reader, &transfer) {
            Ok(reply) => (Some(reply), Next::Continue),
            Err(stopped) => (
                self.relay_stopped(&up, &server_name, number, *stopped),
                Next::Close,
            ),
        };
        let reply = reply.map(|r| self.relay_answered(&up, &server_name, number, r, &transfer));
        // Counted done before the client hears of it.
        drop(transfer);
        if let Some(reply) = reply {
            let _ = replies.send(reply);
        }
        next
    }

    /// Why an upload is refused before any server is asked, if it is.
    fn refuse_upload(&self, up: &UploadRequest) -> Option<Reply> {
        if !valid_upload_id(&up.upload_id) {
            return Some(Reply::error(
                Some(up.id),
                ErrorCode::BadRequest,
                "upload_id must be 8 to 64 letters, digits, '-' or '_'",
            ));
        }
        if up.size > self.files.max_file_size {
            return Some(Reply::error(
                Some(up.id),
                ErrorCode::TooLarge,
                format!(
                    "the file has {} bytes, more than this balancer takes (--max-file-size {})",
                    up.size, self.files.max_file_size
                ),
            ));
        }
        self.clobbers(up)
    }

    /// Picks the server for an upload and, in proxy mode, connects to it
    /// (another server when one cannot be reached). `Err` is the answer
    /// for the client instead: a redirect, or why no server takes it.
    fn route_upload(
        &self,
        up: &UploadRequest,
        resume_on: &Option<String>,
        user: Option<&str>,
    ) -> Result<(String, u64, Connection<net::Stream>), Box<Reply>> {
        let mut avoid = Vec::new();
        loop {
            let Some(picked) = self.pick_server(resume_on.as_deref(), &avoid) else {
                self.stats.transfer_ended(Kind::Upload, Ended::Failed);
                return Err(Box::new(Reply::error(
                    Some(up.id),
                    ErrorCode::NoServer,
                    format!(
                        "no server could take a file for --queue-timeout ({:?}): all down, overloaded or draining",
                        self.files.wait
                    ),
                )));
            };
            if self.files.mode == Mode::Redirect {
                return Err(Box::new(self.redirect(up, picked, user)));
            }
            let Picked { name, addr, number } = picked;
            match self.connect_server(addr) {
                Ok(c) => return Ok((name, number, c)),
                Err(e) => {
                    log::warn!(
                        "upload {} from {}: cannot reach {name}: {e}",
                        up.upload_id,
                        self.peer
                    );
                    let server = self.stats.server_named(&name);
                    server.carried(Kind::Upload).started.fetch_add(1, Relaxed);
                    server.carried(Kind::Upload).failures.fetch_add(1, Relaxed);
                    avoid.push(name);
                }
            }
        }
    }

    /// Sends the client to `picked` with a signed ticket (redirect mode).
    fn redirect(&self, up: &UploadRequest, picked: Picked, user: Option<&str>) -> Reply {
        let Picked { name, number, .. } = picked;
        let Some(key) = &self.files.key else {
            return Reply::error(
                Some(up.id),
                ErrorCode::Internal,
                "redirect mode needs a cluster key",
            );
        };
        let report_to = self.files.advertise.map(|a| a.to_string());
        let ticket = ticket(key, up, &name, self.files.ticket_ttl, number, report_to);
        log::info!(
            "upload {} of {:?} ({} bytes) from {}: redirected to {name}",
            up.upload_id,
            crate::proto::truncate(&up.name, 80),
            up.size,
            self.peer
        );
        self.note_partial(up, &name);
        self.track_start(number, up, &name, user);
        Reply::Redirect(Redirect {
            id: up.id,
            upload_id: up.upload_id.clone(),
            server: name,
            ticket,
        })
    }

    /// Asks the server to take a relayed upload. `Err` is the answer for
    /// the client when it will not.
    fn begin_relayed(
        &self,
        up: &UploadRequest,
        server_name: &str,
        server: &mut Connection<net::Stream>,
        transfer: &Transfer,
    ) -> Result<UploadReady, Box<Reply>> {
        let refused = match server.call(&StorageRequest::Upload(up.clone())) {
            Ok(Reply::UploadReady(r)) => return Ok(r),
            Ok(other) => other,
            Err(e) => server_failed(up.id, server_name, &e.to_string()),
        };
        transfer.failed();
        self.stats.transfer_ended(Kind::Upload, Ended::Failed);
        Err(Box::new(refused))
    }

    fn log_relay_start(
        &self,
        up: &UploadRequest,
        server_name: &str,
        offset: u64,
        resumed_elsewhere: bool,
    ) {
        log::info!(
            "upload {} of {:?} ({} bytes) from {} -> server {server_name}{}",
            up.upload_id,
            crate::proto::truncate(&up.name, 80),
            up.size,
            self.peer,
            match (offset, resumed_elsewhere) {
                (0, true) => " (its previous server is gone: starting again)".to_string(),
                (0, false) => String::new(),
                (n, _) => format!(" (resuming at byte {n})"),
            }
        );
    }

    /// A relayed upload that stopped early: counted, logged and tracked.
    /// Returns the reply worth sending the client, if any.
    fn relay_stopped(
        &self,
        up: &UploadRequest,
        server_name: &str,
        number: u64,
        stopped: Stopped,
    ) -> Option<Reply> {
        let Stopped {
            why,
            reply,
            client_left,
        } = stopped;
        let peer = self.peer;
        if client_left || reply.is_none() {
            self.stats.transfer_ended(Kind::Upload, Ended::Abandoned);
        }
        if client_left {
            log::info!(
                "upload {} from {peer}: the client went away ({why}); \
                 {server_name} keeps the bytes for a resume",
                up.upload_id
            );
            self.track(TrackEvent::Interrupted {
                number,
                reason: format!("the client went away: {why}"),
            });
        } else if reply.is_none() {
            log::info!("upload {} from {peer}: {why}", up.upload_id);
            self.track(TrackEvent::Failed {
                number,
                code: ErrorCode::ServerFailed,
                reason: why,
            });
        }
        reply.filter(|_| !client_left)
    }

    /// The server's answer to a relayed upload, counted, logged and
    /// tracked; a stored file goes into the catalog.
    fn relay_answered(
        &self,
        up: &UploadRequest,
        server_name: &str,
        number: u64,
        reply: Reply,
        transfer: &Transfer,
    ) -> Reply {
        let peer = self.peer;
        if let Reply::FileStored(stored) = reply {
            log::info!(
                "upload {} from {peer}: stored as {} on {server_name} ({} bytes)",
                up.upload_id,
                stored.file,
                stored.size
            );
            self.stats.transfer_ended(Kind::Upload, Ended::Done);
            return self.file_stored(Some(number), stored, up.owner.clone());
        }
        // The client's own mistakes are not the server's failures.
        if by_the_client(&reply) {
            self.stats.transfer_ended(Kind::Upload, Ended::Abandoned);
        } else {
            transfer.failed();
            self.stats.transfer_ended(Kind::Upload, Ended::Failed);
        }
        log::warn!("upload {} from {peer}: {}", up.upload_id, describe(&reply));
        let (code, reason) = error_parts(&reply);
        self.track(TrackEvent::Failed {
            number,
            code,
            reason,
        });
        reply
    }

    /// A server stored a file: the catalog gives its name to it, then the
    /// older file of that name is removed from its server. Returns the
    /// answer for the client. Without a state file only the transfer is
    /// recorded (there is none either).
    fn file_stored(&self, number: Option<u64>, stored: FileStored, owner: Option<String>) -> Reply {
        let Some(tracker) = &self.tracker else {
            return Reply::FileStored(stored);
        };
        let copy_owner = owner.clone();
        let record = FileRecord {
            owner,
            name: stored.name.clone(),
            size: stored.size,
            sha256: stored.sha256.clone(),
            upload_id: stored.upload_id.clone(),
            server: stored.server.clone(),
            file: if stored.file.is_empty() {
                stored.name.clone()
            } else {
                stored.file.clone()
            },
            // The server's clock, as in its listings, which a rebuild
            // compares.
            stored_ms: if stored.stored_ms > 0 {
                stored.stored_ms
            } else {
                now_ms()
            },
        };
        match tracker.catalog_change(Change::FileStored { number, record }) {
            Ok(removals) => {
                self.remove(removals);
                if self.files.replicas > 1 {
                    self.copy_upload(&stored, copy_owner.as_deref());
                }
            }
            // The bytes are stored; the catalog takes them in at its next
            // look at that server.
            Err(e) => log::error!(
                "upload {}: stored on {}, but the catalog cannot record it: {e}",
                stored.upload_id,
                stored.server
            ),
        }
        Reply::FileStored(stored)
    }

    /// Carries out removals on servers that are up; the others wait in the
    /// catalog for the server to be back. Returns the servers done and
    /// those left for later.
    fn remove(&self, removals: Vec<Removal>) -> (Vec<String>, Vec<String>) {
        let Some(tracker) = &self.tracker else {
            return (Vec::new(), Vec::new());
        };
        let down = self.down_servers();
        sync::carry_out(tracker, &self.files.reach, &down, removals)
    }

    /// Servers the balancer knows to be down, and why.
    fn down_servers(&self) -> HashMap<String, String> {
        let views = self.stats.views();
        views
            .into_iter()
            .filter(|v| v.state == "down")
            .map(|v| (v.name, "down".to_string()))
            .collect()
    }

    fn track(&self, event: TrackEvent) {
        if let Some(t) = &self.tracker {
            t.record(event);
        }
    }

    fn track_start(&self, number: u64, up: &UploadRequest, server: &str, user: Option<&str>) {
        self.track(TrackEvent::Received {
            number,
            client: self.peer.to_string(),
            title: up.name.clone(),
            size: up.size,
            user: user.map(str::to_owned),
        });
        self.track(TrackEvent::Sent {
            number,
            server: server.to_string(),
        });
    }

    /// Copies chunks from the client to the server until `upload_end`.
    /// `Ok` holds the server's answer to it (the connection goes on); `Err`
    /// says why the upload stopped early, with the reply to send the client
    /// before closing its connection, if one is worth sending.
    ///
    /// This thread reads the client; a scoped writer thread writes the
    /// server, so one chunk is read while the one before is written (at
    /// most `RELAY_DEPTH` chunks are between the two), and a scoped watcher
    /// reads what the server says. A server answers only `upload_end`,
    /// unless it refuses a chunk (a wrong offset, past the size, a full
    /// disk): then the watcher ends this thread's reading of the client at
    /// once, so the refusal reaches a client that waits for an answer
    /// instead of sending on.
    fn relay_chunks(
        &self,
        up: &UploadRequest,
        server_name: &str,
        server: Connection<net::Stream>,
        reader: &mut FrameReader<net::Paced>,
        transfer: &Transfer,
    ) -> Result<Reply, Box<Stopped>> {
        let (to_server, chunks) = crossbeam_channel::bounded::<Relayed>(RELAY_DEPTH);
        let (spare_tx, spare) = crossbeam_channel::bounded::<Vec<u8>>(RELAY_DEPTH + 1);
        let (said_tx, said) = crossbeam_channel::bounded::<Result<Reply, String>>(1);
        let server_stream = server.get_ref().clone();
        let client = reader.get_ref().stream().clone();
        let reading_client = AtomicBool::new(true);
        let max = self.settings.max_frame;
        let name = std::thread::current().name().unwrap_or("conn").to_string();
        std::thread::scope(|scope| {
            let writer = std::thread::Builder::new()
                .name(format!("{name}-up"))
                .spawn_scoped(scope, move || {
                    write_chunks(server, chunks, spare_tx, transfer.byte_counter())
                });
            let writer = match writer {
                Ok(w) => w,
                Err(e) => return Err(stopped(format!("cannot start a thread: {e}"), None)),
            };
            let watch = std::thread::Builder::new()
                .name(format!("{name}-watch"))
                .spawn_scoped(scope, || {
                    watch_server(&server_stream, max, said_tx, &reading_client, &client)
                });
            let read = self.read_chunks(up, reader, &to_server, &spare);
            reading_client.store(false, Ordering::SeqCst);
            drop(to_server);
            let joined = writer.join();
            let result = match joined {
                Err(_) => Err(stopped("the relay's writer panicked", None)),
                Ok((server, written)) => {
                    self.settle_upload(up, server_name, server, read, written, &said)
                }
            };
            // The transfer's own connection: done with, and the watcher
            // ends with it.
            let _ = server_stream.shutdown(std::net::Shutdown::Both);
            if watch.is_err() {
                log::error!("cannot start the relay's watcher thread");
            }
            result
        })
    }

    /// What an upload comes to, from what the client's side (`read`), the
    /// writer (`written`) and the server (`said`) did.
    fn settle_upload(
        &self,
        up: &UploadRequest,
        server_name: &str,
        server: Connection<net::Stream>,
        read: Result<(u64, String), Box<Stopped>>,
        written: Result<(), (u64, String)>,
        said: &crossbeam_channel::Receiver<Result<Reply, String>>,
    ) -> Result<Reply, Box<Stopped>> {
        let id = up.id;
        match (read, written) {
            // The server broke or refused first: its reason goes to the
            // client.
            (_, Err((offset, e))) => {
                let reply = match said.recv_timeout(Duration::from_millis(500)) {
                    Ok(Ok(Reply::Error(e))) => Reply::Error(answering(id, e)),
                    _ => server_failed(id, server_name, &e),
                };
                Err(stopped(
                    format!("stopped at byte {offset}: {}", error_parts(&reply).1),
                    Some(reply),
                ))
            }
            // A refusal ends the reading of the client too (it looks as if
            // the client went away): it comes first (the watcher hands it
            // on before it ends the reading).
            (Err(stop), Ok(())) => match said.recv_timeout(Duration::ZERO) {
                Ok(Ok(Reply::Error(e))) => {
                    let reply = Reply::Error(answering(id, e));
                    Err(stopped(error_parts(&reply).1, Some(reply)))
                }
                // The server broke or closed while the client was sending
                // (the watcher ended the reading): its failure, and the
                // client is told so.
                Ok(Err(why)) => {
                    let reply = server_failed(id, server_name, &why);
                    Err(stopped(describe(&reply), Some(reply)))
                }
                _ => Err(stop),
            },
            (Ok((end_id, sha256)), Ok(())) => {
                Ok(self.end_upload(server_name, server, end_id, sha256, said))
            }
        }
    }

    /// Sends `upload_end` and waits for the server's answer to it.
    fn end_upload(
        &self,
        server_name: &str,
        mut server: Connection<net::Stream>,
        end_id: u64,
        sha256: String,
        said: &crossbeam_channel::Receiver<Result<Reply, String>>,
    ) -> Reply {
        let sent = server.send(&StorageRequest::UploadEnd { id: end_id, sha256 });
        match said.recv_timeout(self.files.server_timeout) {
            Ok(Ok(Reply::Error(e))) => Reply::Error(answering(end_id, e)),
            Ok(Ok(reply)) => reply,
            Ok(Err(why)) => server_failed(end_id, server_name, &why),
            Err(_) => server_failed(
                end_id,
                server_name,
                &match sent {
                    Err(e) => e.to_string(),
                    Ok(()) => format!(
                        "no answer to upload_end within --server-timeout ({:?})",
                        self.files.server_timeout
                    ),
                },
            ),
        }
    }

    /// Reads chunks from the client and hands them to the writer until
    /// `upload_end`, whose id and checksum it returns.
    fn read_chunks(
        &self,
        up: &UploadRequest,
        reader: &mut FrameReader<net::Paced>,
        to_server: &Sender<Relayed>,
        spare: &crossbeam_channel::Receiver<Vec<u8>>,
    ) -> Result<(u64, String), Box<Stopped>> {
        let frame_timeout = self.settings.frame_timeout;
        let mut at = 0;
        loop {
            let request = match reader.message_within::<ClientRequest>(frame_timeout) {
                Ok(Some(Ok(r))) => r,
                Ok(None) => return Err(left(format!("the connection closed after byte {at}"))),
                Err(e) if went_away(&e) => return Err(left(format!("after byte {at}: {e}"))),
                Err(e) => return Err(stopped(e.to_string(), e.reply().map(Reply::Error))),
                Ok(Some(Err(bad))) => {
                    return Err(stopped(bad.message.clone(), Some(Reply::Error(bad.into()))))
                }
            };
            match request {
                ClientRequest::Chunk(chunk) => {
                    let (body, reserved) = self.read_chunk(up.id, &chunk, at, reader, spare)?;
                    at = chunk.offset + chunk.body_len;
                    if to_server.send((chunk, body, reserved)).is_err() {
                        // The writer stopped: the caller reports why.
                        return Err(stopped("the server connection broke", None));
                    }
                }
                ClientRequest::UploadEnd { id: end_id, sha256 } => return Ok((end_id, sha256)),
                other => {
                    let reply = crate::proto::out_of_step(other.id(), other.kind());
                    return Err(stopped(error_parts(&reply).1, Some(reply)));
                }
            }
        }
    }

    /// Reads the body of one chunk from the client (`at` bytes have come
    /// before it), holding budget for its bytes.
    fn read_chunk(
        &self,
        id: u64,
        chunk: &Chunk,
        at: u64,
        reader: &mut FrameReader<net::Paced>,
        spare: &crossbeam_channel::Receiver<Vec<u8>>,
    ) -> Result<(Vec<u8>, Reservation), Box<Stopped>> {
        let max_body = self.settings.max_frame as u64;
        if chunk.body_len > max_body {
            let reply = Reply::error(
                Some(id),
                ErrorCode::FrameTooLarge,
                format!(
                    "chunk of {} bytes exceeds the maximum of {max_body}",
                    chunk.body_len
                ),
            );
            return Err(stopped(describe(&reply), Some(reply)));
        }
        // Budget is taken as the body's bytes arrive, so a chunk announced
        // and never sent holds none.
        let mut reserved = self.budget.open();
        let mut body = spare.try_recv().unwrap_or_default();
        let deadline = Instant::now() + self.settings.frame_timeout;
        let read = read_chunk_body(reader, chunk.body_len, deadline, &mut body, |n| {
            reserved.grow(n)
        });
        reserved.complete();
        match read {
            Ok(()) => Ok((body, reserved)),
            Err(BodyError::Frame(e)) if went_away(&e) => {
                Err(left(format!("in the chunk at byte {at}: {e}")))
            }
            Err(e) => {
                let reply = Reply::error(Some(id), ErrorCode::SizeMismatch, e.to_string());
                Err(stopped(e.to_string(), Some(reply)))
            }
        }
    }

    /// A server's report on a redirected upload, signed with the cluster
    /// key: recorded like any other transfer, and a stored file goes into
    /// the catalog before the answer (the server waits for it before it
    /// answers its client).
    pub(super) fn transfer_event(&self, event: TransferEvent) -> Reply {
        let id = event.id;
        if !self.files.key.as_ref().is_some_and(|k| event.is_signed(k)) {
            log::warn!(
                "transfer_event from {} refused: not signed with this balancer's cluster key",
                self.peer
            );
            return Reply::error(
                Some(id),
                ErrorCode::BadTicket,
                "transfer_event must be signed with the cluster key",
            );
        }
        log_reported(&event);
        let TransferEvent {
            number,
            server,
            state,
            file,
            error,
            stored,
            ..
        } = event;
        self.count_reported(&server, &state);
        match (state.as_str(), stored) {
            ("started", _) => self.track(TrackEvent::Sent { number, server }),
            ("stored", Some(s)) => {
                let stored = FileStored {
                    id,
                    upload_id: s.upload_id,
                    name: s.name,
                    file: file.unwrap_or_default(),
                    size: s.size,
                    sha256: s.sha256,
                    server,
                    stored_ms: s.stored_ms,
                    existing: false,
                };
                self.file_stored(Some(number), stored, s.owner);
            }
            ("stored", None) => {
                return Reply::error(
                    Some(id),
                    ErrorCode::BadRequest,
                    "a `stored` transfer_event must say what was stored (`stored`)",
                )
            }
            ("interrupted", _) => self.track(TrackEvent::Interrupted {
                number,
                reason: error.unwrap_or_else(|| "the client went away".into()),
            }),
            _ => self.track(TrackEvent::Failed {
                number,
                code: ErrorCode::ServerFailed,
                reason: error.unwrap_or_else(|| state.clone()),
            }),
        }
        Reply::Recorded { id }
    }

    /// A redirected upload's report, counted as relayed uploads are (bytes
    /// aside). The reporter is a member of the cluster.
    fn count_reported(&self, server: &str, state: &str) {
        self.open.is_a_server();
        let upload = self.stats.server_named(server);
        let upload = upload.carried(Kind::Upload);
        match state {
            "started" => {
                upload.started.fetch_add(1, Relaxed);
            }
            "stored" => self.stats.transfer_ended(Kind::Upload, Ended::Done),
            _ => {
                upload.failures.fetch_add(1, Relaxed);
                self.stats.transfer_ended(Kind::Upload, Ended::Failed);
            }
        }
    }

    /// The servers to ask for files: every one in the pool that is not
    /// known to be down.
    fn file_servers(&self) -> Vec<(String, SocketAddr)> {
        self.stats
            .views()
            .into_iter()
            .filter(|v| v.state != "down")
            .filter_map(|v| Some((v.name.clone(), v.name.parse().ok()?)))
            .collect()
    }

    /// `list`: the catalog's files and documents (only `owner`'s when
    /// given), in `files` frames of at most `LIST_PAGE` entries; without a
    /// state file, every server's files, asked now.
    pub(super) fn list(
        &self,
        id: u64,
        owner: Option<String>,
        kind: Option<ListKind>,
        out: &ClientWriter,
    ) -> Next {
        let Some(tracker) = &self.tracker else {
            return send_to(out, &self.list_servers(id, owner, kind));
        };
        let rebuilding = self.catalog_rebuilding();
        let kind = kind.unwrap_or(ListKind::All);
        let mut listing = Listing {
            id,
            page: Vec::new(),
            reachable: self.reachable(),
            replicas: self.files.replicas,
            out,
        };
        let mut first = true;
        for entry_kind in [EntryKind::File, EntryKind::Document] {
            if !kind.has(entry_kind) {
                continue;
            }
            let mut after = Cursor::default();
            loop {
                let entries = match tracker.catalog_page(
                    owner.as_deref(),
                    entry_kind,
                    &after,
                    LIST_PAGE,
                    first,
                ) {
                    Ok(e) => e,
                    Err(e) => return send_to(out, &catalog_unreadable(id, e)),
                };
                first = false;
                let Some(last) = entries.last() else { break };
                after = Cursor {
                    name: last.name.clone(),
                    id: last.id,
                };
                if let Next::Close = listing.take(&entries) {
                    return Next::Close;
                }
                if entries.len() < LIST_PAGE {
                    break;
                }
            }
        }
        listing.finish(rebuilding)
    }

    /// Servers whose listing the catalog has not taken in yet; waits a
    /// little for the first look at the servers after a start.
    fn catalog_rebuilding(&self) -> Vec<String> {
        match &self.files.catalog {
            Some(progress) => {
                progress.wait_first_look(self.files.wait);
                progress.rebuilding()
            }
            None => Vec::new(),
        }
    }

    /// Every server in the pool, with whether it is down.
    fn reachable(&self) -> HashMap<String, bool> {
        self.stats
            .views()
            .into_iter()
            .map(|v| (v.name, v.state != "down"))
            .collect()
    }

    /// `list` without a catalog: every server's files (and documents, as
    /// `kind` asks), asked now.
    fn list_servers(&self, id: u64, owner: Option<String>, kind: Option<ListKind>) -> Reply {
        let kind = kind.unwrap_or(ListKind::All);
        let mut all = FileList {
            id,
            files: Vec::new(),
            unreachable: Vec::new(),
            rebuilding: Vec::new(),
            more: false,
        };
        for (name, addr) in self.file_servers() {
            let answer = self
                .connect_server(addr)
                .map_err(|e| e.to_string())
                .and_then(|mut c| {
                    let mut listed = Vec::new();
                    for part in [ListKind::Files, ListKind::Documents] {
                        let wanted = match part {
                            ListKind::Documents => kind.has(EntryKind::Document),
                            _ => kind.has(EntryKind::File),
                        };
                        if wanted {
                            listed.extend(sync::fetch_listing(&mut c, id, owner.clone(), part)?);
                        }
                    }
                    Ok(listed)
                });
            match answer {
                Ok(files) => all.files.extend(files),
                Err(e) => all.unreachable.push(format!("{name}: {e}")),
            }
        }
        all.files
            .sort_by(|a, b| (&a.name, &a.server).cmp(&(&b.name, &b.server)));
        Reply::Files(all)
    }

    /// `get`: the file `name` of `owner` (everyone's for an admin, then
    /// the only one of that name), from a server holding it, relayed to
    /// the client. Without a state file, the first server holding a file
    /// of that name.
    pub(super) fn get(
        &self,
        id: u64,
        name: &str,
        offset: u64,
        owner: Option<String>,
        out: &ClientWriter,
    ) -> Next {
        let Some(tracker) = &self.tracker else {
            return self.get_from_any(id, name, offset, owner, out);
        };
        let rebuilding = self.catalog_rebuilding();
        let entry = match document_entry(tracker, name) {
            Some(e) => e,
            None => match self.one_entry(tracker, id, owner.as_deref(), name, &rebuilding) {
                Ok(e) => e,
                Err(reply) => return send_to(out, &reply),
            },
        };
        let reachable = self.reachable();
        let mut down = Vec::new();
        let mut gone = Vec::new();
        // Servers that are up first.
        let mut copies = entry.copies.clone();
        copies.sort_by_key(|c| !reachable.get(&c.server).copied().unwrap_or(false));
        for copy in &copies {
            let request = StorageRequest::Get {
                id,
                name: copy.file.clone(),
                offset,
                owner: entry.owner.clone(),
            };
            match self.ask_copy(&copy.server, &reachable, &request) {
                Fetched::Header(header, server) => {
                    let transfer = self
                        .stats
                        .server_named(&copy.server)
                        .transfer(Kind::Download);
                    return self.relay_download(header, server, out, &transfer);
                }
                Fetched::Gone => gone.push(copy.server.clone()),
                Fetched::Refused(e) => {
                    return send_to(
                        out,
                        &Reply::Error(crate::proto::ErrorReply { id: Some(id), ..e }),
                    )
                }
                Fetched::Unreachable(why) => down.push(format!("{} ({why})", copy.server)),
            }
        }
        send_to(out, &not_fetched(id, name, &down, &gone))
    }

    /// Asks `server` for a copy of a file, if it is up.
    fn ask_copy(
        &self,
        server: &str,
        reachable: &HashMap<String, bool>,
        request: &StorageRequest,
    ) -> Fetched {
        match reachable.get(server) {
            Some(true) => {}
            Some(false) => return Fetched::Unreachable("down".into()),
            None => return Fetched::Unreachable("not in the pool".into()),
        }
        let Ok(addr) = server.parse::<SocketAddr>() else {
            return Fetched::Unreachable("not an address".into());
        };
        let mut connection = match self.connect_server(addr) {
            Ok(c) => c,
            Err(e) => return Fetched::Unreachable(format!("not answering: {e}")),
        };
        match connection.call(request) {
            Ok(Reply::File(header)) => Fetched::Header(header, connection),
            Ok(Reply::Error(e)) if e.code == ErrorCode::NotFound => Fetched::Gone,
            Ok(Reply::Error(e)) if e.code == ErrorCode::BadOffset => Fetched::Refused(e),
            Ok(other) => Fetched::Unreachable(describe(&other)),
            Err(e) => Fetched::Unreachable(format!("failed: {e}")),
        }
    }

    /// The one file entry `name` a request means: `owner`'s, or for an
    /// admin (no owner) the only one of that name. Else the error reply.
    fn one_entry(
        &self,
        tracker: &super::tracking::Tracker,
        id: u64,
        owner: Option<&str>,
        name: &str,
        rebuilding: &[String],
    ) -> Result<Entry, Box<Reply>> {
        let shown = crate::proto::truncate(name, 200);
        let mut entries = tracker.catalog_files(owner, name).map_err(|e| {
            Box::new(Reply::error(
                Some(id),
                ErrorCode::Internal,
                format!("cannot read the catalog: {e}"),
            ))
        })?;
        match entries.len() {
            0 => {
                let mut message = format!("no file named {shown:?}");
                if !rebuilding.is_empty() {
                    message.push_str(&format!(
                        " (the catalog is still taking in the listing of {})",
                        rebuilding.join(", ")
                    ));
                }
                Err(Box::new(Reply::error(
                    Some(id),
                    ErrorCode::NotFound,
                    message,
                )))
            }
            1 => Ok(entries.remove(0)),
            _ => {
                let owners: Vec<String> = entries
                    .iter()
                    .map(|e| e.owner.clone().unwrap_or_else(|| "nobody".into()))
                    .collect();
                Err(Box::new(Reply::error(
                    Some(id),
                    ErrorCode::BadRequest,
                    format!(
                        "several users have a file named {shown:?} ({}): say whose with --owner",
                        owners.join(", ")
                    ),
                )))
            }
        }
    }

    /// `get` without a catalog: the first server holding a file of that
    /// name.
    fn get_from_any(
        &self,
        id: u64,
        name: &str,
        offset: u64,
        owner: Option<String>,
        out: &ClientWriter,
    ) -> Next {
        let mut problems = Vec::new();
        for (server_name, addr) in self.file_servers() {
            let mut server = match self.connect_server(addr) {
                Ok(c) => c,
                Err(e) => {
                    problems.push(format!("{server_name}: {e}"));
                    continue;
                }
            };
            let request = StorageRequest::Get {
                id,
                name: name.to_string(),
                offset,
                owner: owner.clone(),
            };
            match server.call(&request) {
                Ok(Reply::File(header)) => {
                    let transfer = self
                        .stats
                        .server_named(&server_name)
                        .transfer(Kind::Download);
                    return self.relay_download(header, server, out, &transfer);
                }
                Ok(Reply::Error(e)) if e.code == ErrorCode::NotFound => {}
                Ok(other) => problems.push(format!("{server_name}: {}", describe(&other))),
                Err(e) => problems.push(format!("{server_name}: {e}")),
            }
        }
        let mut message = format!(
            "no server holds a file named {:?}",
            crate::proto::truncate(name, 200)
        );
        if !problems.is_empty() {
            message.push_str(&format!(" (could not ask: {})", problems.join("; ")));
        }
        send_to(out, &Reply::error(Some(id), ErrorCode::NotFound, message))
    }

    /// `delete`: removes the file `name` of `owner` (for an admin, of the
    /// user given, or the only one of that name) from the catalog, then
    /// its bytes from the servers that hold them (those down, once they
    /// are back); recorded as a transfer.
    pub(super) fn delete(
        &self,
        id: u64,
        name: &str,
        owner: Option<String>,
        user: Option<&str>,
    ) -> Reply {
        let Some(tracker) = &self.tracker else {
            return Reply::error(
                Some(id),
                ErrorCode::BadRequest,
                "`delete` needs the balancer's catalog, kept in its state file (this balancer \
                 runs with --no-state)",
            );
        };
        let rebuilding = self.catalog_rebuilding();
        let entry = match self.one_entry(tracker, id, owner.as_deref(), name, &rebuilding) {
            Ok(e) => e,
            Err(reply) => return *reply,
        };
        let number = self.numbers.next();
        let change = Change::Delete {
            entry: entry.id,
            transfer: Recorded {
                number,
                client: self.peer.to_string(),
                user: user.map(str::to_owned),
            },
        };
        let removals = match tracker.catalog_change(change) {
            Ok(r) => r,
            Err(e) => {
                return Reply::error(
                    Some(id),
                    ErrorCode::Internal,
                    format!("cannot change the catalog: {e}"),
                )
            }
        };
        let (servers, pending) = self.remove(removals);
        self.log_deleted(name, &entry, number, &servers, &pending);
        Reply::Deleted(Deleted {
            id,
            name: entry.name,
            servers,
            pending,
        })
    }

    fn log_deleted(
        &self,
        name: &str,
        entry: &Entry,
        number: u64,
        servers: &[String],
        pending: &[String],
    ) {
        log::info!(
            "{:?} of {} deleted by {} (transfer {number}): removed from {}{}",
            crate::proto::truncate(name, 80),
            entry.owner.as_deref().unwrap_or("nobody"),
            self.peer,
            if servers.is_empty() {
                "no server".to_string()
            } else {
                servers.join(", ")
            },
            if pending.is_empty() {
                String::new()
            } else {
                format!("; from {} once back", pending.join(", "))
            }
        );
    }

    fn relay_download(
        &self,
        header: FileHeader,
        mut server: Connection<net::Stream>,
        out: &ClientWriter,
        transfer: &Transfer,
    ) -> Next {
        let (id, peer) = (header.id, self.peer);
        let ended = |how| self.stats.transfer_ended(Kind::Download, how);
        if crate::sync::lock(out)
            .message(&Reply::File(header.clone()))
            .is_err()
        {
            ended(Ended::Abandoned);
            return Next::Close;
        }
        let mut at = header.offset;
        while at < header.size {
            let (chunk, body) = match receive_chunk(&mut server, &header, at) {
                Ok(received) => received,
                Err(reply) => {
                    transfer.failed();
                    ended(Ended::Failed);
                    let _ = crate::sync::lock(out).message(&*reply);
                    return Next::Close;
                }
            };
            let mut w = crate::sync::lock(out);
            if w.message(&Reply::Chunk(Chunk {
                id,
                offset: at,
                body_len: chunk.body_len,
            }))
            .and_then(|()| w.body(&body))
            .is_err()
            {
                log::info!("download of {} by {peer}: client left", header.name);
                ended(Ended::Abandoned);
                return Next::Close;
            }
            transfer.bytes(chunk.body_len);
            at += chunk.body_len;
        }
        ended(Ended::Done);
        log::info!(
            "download of {} ({} bytes from byte {}) by {peer} from {} done",
            header.name,
            header.size,
            header.offset,
            header.server
        );
        Next::Continue
    }
}

/// What a server answered when asked for a copy of a file.
enum Fetched {
    Header(FileHeader, Connection<net::Stream>),
    /// It no longer holds it.
    Gone,
    /// It refused the request itself (a bad offset).
    Refused(crate::proto::ErrorReply),
    /// Why it could not be asked, or failed.
    Unreachable(String),
}

/// The answer when no copy of `name` could be had: unavailable when some
/// holder could not be reached, else not found.
fn not_fetched(id: u64, name: &str, down: &[String], gone: &[String]) -> Reply {
    let shown = crate::proto::truncate(name, 200);
    if !down.is_empty() {
        Reply::error(
            Some(id),
            ErrorCode::Unavailable,
            format!(
                "{shown:?} is stored on {}, which cannot be reached now; try again once it is \
                 back",
                down.join(", ")
            ),
        )
    } else {
        Reply::error(
            Some(id),
            ErrorCode::NotFound,
            format!(
                "{shown:?} was listed on {}, which no longer holds it; the catalog is brought \
                 in step at its next look at the servers",
                gone.join(", ")
            ),
        )
    }
}

/// The next chunk of a download and its body from the server, which must
/// start at `at` and stay within the file. `Err` is the reply for the
/// client when the server fails.
fn receive_chunk(
    server: &mut Connection<net::Stream>,
    header: &FileHeader,
    at: u64,
) -> Result<(Chunk, Vec<u8>), Box<Reply>> {
    let id = header.id;
    let chunk = match server.recv::<Reply>() {
        Ok(Reply::Chunk(c)) if c.offset == at && c.body_len <= header.size - at => c,
        Ok(Reply::Error(e)) => return Err(Box::new(Reply::Error(e))),
        Ok(_) => {
            return Err(Box::new(Reply::error(
                Some(id),
                ErrorCode::ServerFailed,
                format!("server {} sent an unexpected reply", header.server),
            )))
        }
        Err(e) => return Err(Box::new(server_failed(id, &header.server, &e.to_string()))),
    };
    match server.read_body(chunk.body_len) {
        Ok(body) => Ok((chunk, body)),
        Err(e) => Err(Box::new(server_failed(id, &header.server, &e.to_string()))),
    }
}

/// A `list` answer being sent page by page.
struct Listing<'a> {
    id: u64,
    page: Vec<FileEntry>,
    reachable: HashMap<String, bool>,
    /// `--replicas`: entries with fewer live copies are flagged.
    replicas: usize,
    out: &'a ClientWriter,
}

impl Listing<'_> {
    /// Adds catalog entries; sends a page when it is full.
    fn take(&mut self, entries: &[Entry]) -> Next {
        for e in entries {
            if let Some(listed) = listed(e, &self.reachable, self.replicas) {
                self.page.push(listed);
            }
        }
        if self.page.len() < LIST_PAGE {
            return Next::Continue;
        }
        let frame = FileList {
            id: self.id,
            files: std::mem::take(&mut self.page),
            unreachable: Vec::new(),
            rebuilding: Vec::new(),
            more: true,
        };
        send_to(self.out, &Reply::Files(frame))
    }

    /// Sends the last page.
    fn finish(self, rebuilding: Vec<String>) -> Next {
        let last = FileList {
            id: self.id,
            files: self.page,
            unreachable: Vec::new(),
            rebuilding,
            more: false,
        };
        send_to(self.out, &Reply::Files(last))
    }
}

/// The answer when the catalog cannot be read.
fn catalog_unreadable(id: u64, e: impl std::fmt::Display) -> Reply {
    Reply::error(
        Some(id),
        ErrorCode::Internal,
        format!("cannot read the catalog: {e}"),
    )
}

/// Reads the raw frame of a chunk's body, `expected` bytes long, whole by
/// `deadline`; `admit(n)` runs before each piece of `n` bytes is read.
fn read_chunk_body(
    reader: &mut FrameReader<net::Paced>,
    expected: u64,
    deadline: Instant,
    body: &mut Vec<u8>,
    admit: impl FnMut(usize),
) -> Result<(), BodyError> {
    reader.get_mut().set_deadline(Some(deadline));
    let header = reader.header();
    reader.get_mut().set_deadline(None);
    let len = body_len(header, expected)?;
    reader
        .payload_into_by(len, deadline, body, admit)
        .map_err(BodyError::Frame)
}

/// Chunks read from the client and not yet written to the server, at most.
const RELAY_DEPTH: usize = 2;

/// A chunk on its way: header, bytes, and their share of the byte budget.
type Relayed = (Chunk, Vec<u8>, Reservation);

/// The relay's writer: sends chunks to the server until the channel closes
/// or a write fails (with the offset and the error), then gives the
/// connection back. Emptied buffers go back for the next chunks.
fn write_chunks(
    mut server: Connection<net::Stream>,
    chunks: crossbeam_channel::Receiver<Relayed>,
    spare: Sender<Vec<u8>>,
    relayed: &AtomicU64,
) -> (Connection<net::Stream>, Result<(), (u64, String)>) {
    for (chunk, body, reserved) in chunks {
        let offset = chunk.offset;
        let sent = server
            .send(&StorageRequest::Chunk(chunk))
            .and_then(|()| server.send_payload(&body));
        drop(reserved);
        if let Err(e) = sent {
            return (server, Err((offset, e.to_string())));
        }
        relayed.fetch_add(body.len() as u64, Ordering::Relaxed);
        let _ = spare.try_send(body);
    }
    (server, Ok(()))
}

/// The relay's watcher: reads the server's one answer (to `upload_end`, or
/// a refusal of a chunk before it) and hands it on. An answer while the
/// client is still being read is a refusal, or the server gone: the
/// client's reading is ended so that the relay stops at once.
fn watch_server(
    server: &net::Stream,
    max: usize,
    said: Sender<Result<Reply, String>>,
    reading_client: &AtomicBool,
    client: &net::Stream,
) {
    let mut reader = FrameReader::new(server, max + crate::proto::FORWARD_HEADROOM);
    let answer = loop {
        match reader.message::<Reply>() {
            Ok(Some(Ok(reply))) => break Ok(reply),
            Ok(Some(Err(bad))) => break Err(format!("unreadable reply: {bad}")),
            Ok(None) => break Err("the server closed the connection".to_string()),
            // Quiet while a large file streams in: servers answer at the end.
            Err(FrameError::Timeout { mid_frame: false }) => continue,
            Err(e) => break Err(e.to_string()),
        }
    };
    // Handed on first: whoever finds the client's reading ended looks for
    // it.
    let _ = said.send(answer);
    if reading_client.load(Ordering::SeqCst) {
        client.end_reading();
    }
}

/// Why an upload stopped before `upload_end`, and the reply worth sending
/// the client before its connection closes.
struct Stopped {
    why: String,
    reply: Option<Reply>,
    /// The client went away (closed, cut off, or stalled mid-frame): the
    /// upload is interrupted, its bytes so far kept for a resume.
    client_left: bool,
}

fn stopped(why: impl Into<String>, reply: Option<Reply>) -> Box<Stopped> {
    Box::new(Stopped {
        why: why.into(),
        reply,
        client_left: false,
    })
}

fn left(why: impl Into<String>) -> Box<Stopped> {
    Box::new(Stopped {
        why: why.into(),
        reply: None,
        client_left: true,
    })
}

/// Whether a read error of the client's stream means it went away.
fn went_away(e: &FrameError) -> bool {
    matches!(
        e,
        FrameError::Truncated { .. } | FrameError::Io(_) | FrameError::Timeout { .. }
    )
}

/// How a listing shows `entry`: from a copy on a server that can be
/// reached, else (unavailable) from its first copy. None for an entry with
/// no copy.
fn listed(entry: &Entry, reachable: &HashMap<String, bool>, replicas: usize) -> Option<FileEntry> {
    let live = |c: &&Copy| reachable.get(&c.server).copied().unwrap_or(false);
    let mut listed = match entry.copies.iter().find(live) {
        Some(copy) => entry.listed(copy, true),
        None => entry.listed(entry.copies.first()?, false),
    };
    // With --replicas: the copies on servers up, and whether too few.
    if replicas > 1 {
        let copies = entry.copies.iter().filter(live).count();
        listed.copies = copies as u64;
        listed.under_replicated = copies < replicas;
    }
    Some(listed)
}

/// The document a `get` names by its file name on a server
/// (`<request number>_<title>.json`), when the catalog has it: its copies
/// are on every server that holds it.
fn document_entry(tracker: &super::tracking::Tracker, name: &str) -> Option<Entry> {
    let (number, _) = name.strip_suffix(".json")?.split_once('_')?;
    let number: u64 = number.parse().ok()?;
    let entry = tracker.catalog_document(number).ok()??;
    entry.copies.iter().any(|c| c.file == name).then_some(entry)
}

/// Whose file a `get` or `delete` means: the user's own (`filter`, when
/// users are on and they are not an admin), or for an admin (or anyone
/// without users) the user they name, if any. Naming another user without
/// being an admin is refused.
pub(super) fn whose(
    id: u64,
    filter: Option<String>,
    asked: Option<String>,
) -> Result<Option<String>, Box<Reply>> {
    match (filter, asked) {
        (Some(mine), Some(other)) if mine != other => Err(Box::new(Reply::error(
            Some(id),
            ErrorCode::Forbidden,
            "only an admin may name another user's file (--owner)",
        ))),
        (Some(mine), _) => Ok(Some(mine)),
        (None, asked) => Ok(asked),
    }
}

/// Writes one reply to the client; `Close` when it cannot take it.
fn send_to(out: &ClientWriter, reply: &Reply) -> Next {
    match crate::sync::lock(out).message(reply) {
        Ok(()) => Next::Continue,
        Err(_) => Next::Close,
    }
}

fn server_failed(id: u64, server: &str, why: &str) -> Reply {
    Reply::error(
        Some(id),
        ErrorCode::ServerFailed,
        format!("server {server} failed during the transfer: {why}"),
    )
}

/// Whether an upload ended on a mistake of the client's (its frames, its
/// sizes, its checksum) rather than a failure of the server's.
fn by_the_client(reply: &Reply) -> bool {
    matches!(
        reply,
        Reply::Error(e) if matches!(
            e.code,
            ErrorCode::BadRequest
                | ErrorCode::SizeMismatch
                | ErrorCode::FrameTooLarge
                | ErrorCode::InvalidJson
                | ErrorCode::UnknownType
                | ErrorCode::BadOffset
                | ErrorCode::TooLarge
                | ErrorCode::ChecksumMismatch
        )
    )
}

/// An error reply's code and message (its message says what it is; the
/// code goes beside it, not into it).
fn error_parts(reply: &Reply) -> (ErrorCode, String) {
    match reply {
        Reply::Error(e) => (e.code, e.message.clone()),
        other => (ErrorCode::ServerFailed, describe(other)),
    }
}

fn describe(reply: &Reply) -> String {
    match reply {
        Reply::Error(e) => format!("{}: {}", e.code, e.message),
        other => format!("unexpected `{}` reply", reply_kind(other)),
    }
}

fn reply_kind(reply: &Reply) -> String {
    serde_json::to_value(reply)
        .ok()
        .and_then(|v| v.get("type").and_then(|t| t.as_str()).map(str::to_owned))
        .unwrap_or_default()
}

/// A server's error reply, given the id of the client's request.
fn answering(id: u64, mut e: crate::proto::ErrorReply) -> crate::proto::ErrorReply {
    e.id = Some(id);
    e
}

fn log_reported(event: &TransferEvent) {
    log::info!(
        "redirected transfer {} on {}: {}{}",
        event.number,
        event.server,
        event.state,
        match (&event.file, &event.error) {
            (Some(f), _) => format!(" as {f}"),
            (None, Some(e)) => format!(": {e}"),
            _ => String::new(),
        }
    );
}
