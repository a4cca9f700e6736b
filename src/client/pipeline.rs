//! Many requests on one connection in flat memory.
//!
//! Three threads share the work, as in lsp-server: a writer makes each
//! request only when a slot of the window is free and writes it; a reader
//! turns reply frames into events; the caller's thread keeps the books (which
//! ids are outstanding and what the caller wants back with each) and reports
//! every request exactly once. Nothing grows with the number of requests:
//! only the window's worth of outstanding requests is held at any time.
//!
//! How a connection ends decides what unanswered requests are reported as:
//! after the balancer's `shutting_down` frame (id `null`) they were never
//! read, so they failed; after a plain close (or a broken stream) they may or
//! may not have been carried out, so they are unknown.

use super::{Config, Error};
use crate::net::Stream;
use crate::proto::{
    self, ClientRequest, ErrorCode, ErrorReply, FrameError, FrameReader, FrameWriter, Reply,
};
use crate::sync::spawn_named;
use crossbeam_channel::{bounded, Receiver, Sender};
use std::collections::HashMap;
use std::net::Shutdown;
use std::time::Duration;

/// Requests in flight on one connection unless configured otherwise: enough
/// to keep a balancer busy across a round trip, small enough that what the
/// client holds for them stays a few megabytes at most.
pub const DEFAULT_WINDOW: usize = 256;

/// The answer to one request: its reply, or the error that took its place.
pub type Answer = Result<Reply, ErrorReply>;

/// What became of one request.
#[derive(Debug, Clone, PartialEq)]
pub enum Fate {
    /// The balancer answered it.
    Answered(Answer),
    /// It never left this process: it could not be made, or the connection
    /// ended before its turn.
    NotSent(String),
    /// The balancer said it was shutting down before it read the request, so
    /// the request was not carried out.
    ShuttingDown,
    /// It was sent and the connection ended before an answer: it may or may
    /// not have been carried out.
    Unknown,
}

/// A request ready to go with what the caller wants back along with its
/// fate, or the same with the reason the request could not be made.
pub type Prepared<M> = Result<(ClientRequest, M), (M, String)>;

/// The writer's half of the window: a counting semaphore made of a bounded
/// channel. A token goes in before each request and blocks while the window
/// is full.
pub struct WindowEntry(Sender<()>);

/// The bookkeeper's half: takes a token out per finished request. Dropping
/// it tells a waiting writer to stop.
pub struct WindowExit(Receiver<()>);

/// A window of `size` requests (at least one).
pub fn window(size: usize) -> (WindowEntry, WindowExit) {
    let (tx, rx) = bounded(size.max(1));
    (WindowEntry(tx), WindowExit(rx))
}

impl WindowEntry {
    /// Waits for a free slot; false once the bookkeeper has stopped.
    pub fn enter(&self) -> bool {
        self.0.send(()).is_ok()
    }

    /// Takes a slot if one is free right now, without waiting.
    pub fn try_enter(&self) -> bool {
        self.0.try_send(()).is_ok()
    }
}

impl WindowExit {
    /// Frees the slot of a finished request.
    pub fn leave(&self) {
        // Every finished request entered first, so a token is always there.
        let _ = self.0.try_recv();
    }
}

/// What the writer and the reader tell the bookkeeper, on one channel so
/// that their order is kept: the writer announces a request before its bytes
/// go out, so the announcement always comes before the answer.
enum Event<M> {
    /// ClientRequest `id` is about to be written.
    Sending(u64, M),
    /// ClientRequest `id` could not be made.
    NotMade(u64, M, String),
    /// The writer has made every request, or stopped early for the reason
    /// given.
    WriterDone(Option<String>),
    Reply(Reply),
    /// The reader has stopped; nothing more comes from the balancer.
    End(End),
}

/// How the balancer's side of the connection ended.
#[derive(Debug, Clone, PartialEq)]
enum End {
    /// The balancer announced it is shutting down: whatever it has not
    /// answered it never read.
    ShuttingDown,
    /// The stream closed or broke, for the reason given.
    Closed(String),
    /// The balancer refused the TLS session before reading anything (it
    /// asks for a client certificate, or does not trust this one): no
    /// request was carried out.
    Refused(String),
}

/// Whoever is told what became of each request.
pub trait Observer<M> {
    /// Called once per id (`meta` is `None` for a request the connection
    /// ended before it was made).
    fn report(&mut self, id: u64, meta: Option<M>, fate: Fate);

    /// Called when no answer has come for `QUIET_AFTER` while requests are
    /// outstanding; again after the next answer and another quiet stretch.
    fn quiet(&mut self) {}
}

impl<M, F: FnMut(u64, Option<M>, Fate)> Observer<M> for F {
    fn report(&mut self, id: u64, meta: Option<M>, fate: Fate) {
        self(id, meta, fate)
    }
}

/// How long without an answer before the observer is told it is quiet.
pub const QUIET_AFTER: Duration = Duration::from_secs(2);

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Outcome {
    /// How the connection ended, when it ended before every request was
    /// answered.
    pub note: Option<String>,
    /// Set when the user interrupted the run (`Config::interrupt`); the
    /// requests it counts were not reported.
    pub interrupted: Option<Interrupted>,
}

/// What was left when the user interrupted a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interrupted {
    /// Sent and not answered: they may still be carried out.
    pub in_flight: u64,
    /// Never sent.
    pub never_sent: u64,
}

/// Connects to the balancer with the configured timeouts, and logs in
/// when the configuration has credentials.
pub fn connect(config: &Config) -> Result<Stream, Error> {
    super::login::open(config)
}

/// Connects, then runs as `run_on`; returns the note of the outcome.
pub fn run<M: Send + 'static>(
    config: &Config,
    count: u64,
    make: impl FnMut(u64) -> Prepared<M> + Send + 'static,
    report: impl FnMut(u64, Option<M>, Fate),
) -> Result<Option<String>, Error> {
    let stream = connect(config)?;
    Ok(run_on(stream, config, count, make, report)?.note)
}

/// Sends requests `1..=count` on `stream`, at most `config.window`
/// unanswered at a time, and reports each id once to `observer`.
///
/// `make(id)` runs on the writer thread when request `id` has a slot in the
/// window, so requests are built one at a time, never all up front; the
/// request it returns must carry that id. `meta` is held only while its
/// request is outstanding.
///
/// A message on `config.interrupt` stops the run: what is outstanding or
/// not yet made is then counted in the outcome, not reported.
pub fn run_on<M: Send + 'static>(
    stream: Stream,
    config: &Config,
    count: u64,
    make: impl FnMut(u64) -> Prepared<M> + Send + 'static,
    mut observer: impl Observer<M>,
) -> Result<Outcome, Error> {
    let (entry, exit) = window(config.window);
    // Bounded so that a peer flooding replies is held back by the socket;
    // the writer never has more than the window's worth of events queued.
    let (events_tx, events) = bounded(config.window.max(1));
    let writer = {
        let stream = stream.try_clone()?;
        let events = events_tx.clone();
        spawn_named("client-writer".into(), None, move || {
            write_requests(stream, count, make, entry, events)
        })?
    };
    let reader = {
        let stream = stream.try_clone()?;
        spawn_named("client-reader".into(), None, move || {
            read_replies(stream, events_tx)
        })
    };
    let reader = match reader {
        Ok(reader) => reader,
        Err(e) => {
            // Stop the writer before giving up: it holds the other end of
            // the window.
            let _ = stream.shutdown(Shutdown::Both);
            drop(exit);
            drop(events);
            let _ = writer.join();
            return Err(e.into());
        }
    };
    let mut books = Books::new(count);
    let interrupt = config.interrupt.as_ref();
    let interrupted = follow(&mut books, &events, &exit, interrupt, &mut observer);
    // Why it stopped is settled now: what phase 2 sees follows from our
    // own shutdown.
    let cause = books.cause();
    // Phase 2: stop both threads, and keep receiving until both are done so
    // that neither ever blocks on a full channel while being joined.
    let _ = stream.shutdown(Shutdown::Both);
    drop(exit);
    books.wind_down(&events, &mut observer);
    drop(events);
    for (thread, name) in [(writer, "writer"), (reader, "reader")] {
        if thread.join().is_err() {
            log::error!("the client's {name} thread panicked");
        }
    }
    Ok(books.outcome(interrupted, &cause, &mut observer))
}

/// Phase 1 of a run: takes events until every id is reported, the
/// connection has ended or the user interrupts (then true).
fn follow<M>(
    books: &mut Books<M>,
    events: &Receiver<Event<M>>,
    exit: &WindowExit,
    interrupt: Option<&Receiver<()>>,
    observer: &mut impl Observer<M>,
) -> bool {
    let never = crossbeam_channel::never();
    let mut interrupt = interrupt.unwrap_or(&never);
    // Quiet is told once per stretch without answers.
    let mut quiet_told = false;
    while !books.settled() {
        crossbeam_channel::select! {
            recv(events) -> event => {
                let Ok(event) = event else { break };
                if matches!(event, Event::Reply(_)) {
                    quiet_told = false;
                }
                books.apply(event, Some(exit), observer);
            }
            recv(interrupt) -> signal => match signal {
                Ok(()) => return true,
                // Nobody can interrupt any more.
                Err(_) => interrupt = &never,
            },
            default(QUIET_AFTER) => {
                if !quiet_told && !books.outstanding.is_empty() {
                    quiet_told = true;
                    observer.quiet();
                }
            }
        }
    }
    false
}

/// The bookkeeper's state: what is outstanding and how far things got.
struct Books<M> {
    count: u64,
    outstanding: HashMap<u64, M>,
    /// Requests reported so far.
    reported: u64,
    /// The highest id the writer has handed over (ids go out in order).
    made: u64,
    writer_done: Option<Option<String>>,
    end: Option<End>,
}

impl<M> Books<M> {
    fn new(count: u64) -> Self {
        Books {
            count,
            outstanding: HashMap::new(),
            reported: 0,
            made: 0,
            writer_done: None,
            end: None,
        }
    }

    /// Nothing more can change: every id reported, the balancer's side has
    /// ended, or the writer stopped early with nothing left to answer.
    fn settled(&self) -> bool {
        self.reported == self.count
            || self.end.is_some()
            || (self.writer_done.is_some() && self.outstanding.is_empty())
    }

    /// Takes in one event. `exit` is the window while the connection is
    /// up. After it was shut (`None`), requests the writer announced join
    /// the outstanding ones (no answer can come for them now), and a reply
    /// answers nothing outstanding: the reader's end comes after every
    /// reply it read.
    fn apply(
        &mut self,
        event: Event<M>,
        exit: Option<&WindowExit>,
        observer: &mut impl Observer<M>,
    ) {
        match event {
            Event::Sending(id, meta) => {
                self.made = id;
                self.outstanding.insert(id, meta);
            }
            Event::NotMade(id, meta, why) => {
                self.made = id;
                if let Some(exit) = exit {
                    exit.leave();
                }
                self.reported += 1;
                observer.report(id, Some(meta), Fate::NotSent(why));
            }
            Event::WriterDone(why) => self.writer_done = Some(why),
            Event::Reply(reply) => {
                if let Some(exit) = exit {
                    self.answered(reply, exit, observer);
                }
            }
            // A reader woken by our own shutdown: the first reason stands.
            Event::End(end) => {
                self.end.get_or_insert(end);
            }
        }
    }

    /// A reply: its request is reported, and leaves the window.
    fn answered(&mut self, reply: Reply, exit: &WindowExit, observer: &mut impl Observer<M>) {
        let answer = match reply {
            Reply::Error(e) => Err(e),
            other => Ok(other),
        };
        let id = match &answer {
            Ok(reply) => reply.id(),
            Err(e) => e.id,
        };
        let Some((id, meta)) = id.and_then(|id| self.outstanding.remove_entry(&id)) else {
            log::debug!("ignoring a reply to no outstanding request: {answer:?}");
            return;
        };
        exit.leave();
        self.reported += 1;
        observer.report(id, Some(meta), Fate::Answered(answer));
    }

    /// Takes the events left once the connection is shut, until both
    /// threads are done.
    fn wind_down(&mut self, events: &Receiver<Event<M>>, observer: &mut impl Observer<M>) {
        while !(self.writer_done.is_some() && self.end.is_some()) {
            let Ok(event) = events.recv() else { break };
            self.apply(event, None, observer);
        }
    }

    /// The outcome of a run once both threads are done: what was left when
    /// the user interrupted it, or else what `finish` reports.
    fn outcome(self, interrupted: bool, cause: &str, observer: &mut impl Observer<M>) -> Outcome {
        if !interrupted {
            return Outcome {
                note: self.finish(cause, observer),
                interrupted: None,
            };
        }
        let in_flight = self.outstanding.len() as u64;
        Outcome {
            note: None,
            interrupted: Some(Interrupted {
                in_flight,
                never_sent: self.count - self.reported - in_flight,
            }),
        }
    }

    /// Why the exchange stopped, as known when it settled: the balancer's
    /// side ending says more than the writer failing because of it.
    fn cause(&self) -> String {
        match (&self.end, &self.writer_done) {
            (Some(End::ShuttingDown), _) => "the balancer is shutting down".into(),
            (Some(End::Closed(why) | End::Refused(why)), _) | (None, Some(Some(why))) => {
                why.clone()
            }
            (None, _) => "the connection ended".into(),
        }
    }

    /// Reports what is left once both threads are done; returns the note on
    /// how the connection ended, if anything was left.
    fn finish(mut self, cause: &str, observer: &mut impl Observer<M>) -> Option<String> {
        if self.reported == self.count {
            return None;
        }
        let shutting_down = self.end == Some(End::ShuttingDown);
        let refused = matches!(self.end, Some(End::Refused(_)));
        let mut left: Vec<(u64, M)> = self.outstanding.drain().collect();
        left.sort_by_key(|(id, _)| *id);
        let unanswered = left.len() as u64;
        for (id, meta) in left {
            let fate = if shutting_down {
                Fate::ShuttingDown
            } else if refused {
                Fate::NotSent(cause.to_string())
            } else {
                Fate::Unknown
            };
            observer.report(id, Some(meta), fate);
        }
        let unmade = self.count - self.made;
        for id in self.made + 1..=self.count {
            let fate = if shutting_down {
                Fate::ShuttingDown
            } else {
                Fate::NotSent(cause.to_string())
            };
            observer.report(id, None, fate);
        }
        Some(format!(
            "{cause}; {unanswered} sent and unanswered, {unmade} never sent"
        ))
    }
}

fn write_requests<M>(
    stream: Stream,
    count: u64,
    mut make: impl FnMut(u64) -> Prepared<M>,
    entry: WindowEntry,
    events: Sender<Event<M>>,
) {
    let mut writer = FrameWriter::new(stream);
    let mut stopped = None;
    for id in 1..=count {
        if !entry.enter() {
            break; // the bookkeeper has stopped
        }
        match make(id) {
            Ok((request, meta)) => {
                debug_assert_eq!(request.id(), id, "make(id) must return request `id`");
                if events.send(Event::Sending(id, meta)).is_err() {
                    break;
                }
                if let Err(e) = writer.message(&request) {
                    // The reader sees the broken stream too and says how it
                    // ended; this reason covers the requests never written.
                    stopped = Some(format!("writing to the balancer failed: {e}"));
                    break;
                }
            }
            Err((meta, why)) => {
                if events.send(Event::NotMade(id, meta, why)).is_err() {
                    break;
                }
            }
        }
    }
    let _ = events.send(Event::WriterDone(stopped));
}

fn read_replies<M>(stream: Stream, events: Sender<Event<M>>) {
    let tls = stream.is_tls();
    let mut reader = FrameReader::new(stream, proto::DEFAULT_MAX_FRAME);
    let mut answered = false;
    let end = loop {
        match reader.message::<Reply>() {
            Ok(Some(Ok(Reply::Error(e)))) if e.id.is_none() => {
                break if e.code == ErrorCode::ShuttingDown {
                    End::ShuttingDown
                } else {
                    End::Closed(format!(
                        "the balancer ended the connection: {}: {}",
                        e.code, e.message
                    ))
                };
            }
            Ok(Some(Ok(reply))) => {
                answered = true;
                if events.send(Event::Reply(reply)).is_err() {
                    return;
                }
            }
            // Which request it answered is unknowable, so waiting on would
            // only end in a timeout.
            Ok(Some(Err(e))) => {
                break End::Closed(format!("unreadable reply from the balancer: {e}"))
            }
            Ok(None) => break End::Closed("the balancer closed the connection".into()),
            // A TLS alert before any answer: the session was refused in
            // its handshake, before the balancer read a request.
            Err(FrameError::Io(e)) if tls && !answered && crate::net::tls::is_tls_failure(&e) => {
                break End::Refused(format!("the balancer refused the TLS session: {e}"))
            }
            Err(e) => break End::Closed(format!("connection to the balancer failed: {e}")),
        }
    };
    let _ = events.send(Event::End(end));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{encode, write_frame, Document, StoreRequest, Stored};
    use std::net::{SocketAddr, TcpListener, TcpStream};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use std::thread;
    use std::time::Duration;

    #[test]
    fn window_blocks_when_full_and_stops_the_writer_when_closed() {
        let (entry, exit) = window(2);
        assert!(entry.try_enter());
        assert!(entry.try_enter());
        assert!(!entry.try_enter(), "a third request must wait");
        exit.leave();
        assert!(entry.try_enter(), "a finished request frees its slot");
        drop(exit);
        assert!(!entry.enter(), "a writer waiting on a closed window stops");
    }

    #[test]
    fn a_window_of_zero_still_lets_one_request_through() {
        let (entry, _exit) = window(0);
        assert!(entry.try_enter());
        assert!(!entry.try_enter());
    }

    fn store(id: u64) -> ClientRequest {
        ClientRequest::Store(StoreRequest {
            id,
            doc: Document {
                title: format!("doc {id}"),
                content: "a".into(),
            },
            request_number: None,
            not_after_ms: None,
            key: None,
            resent: false,
        })
    }

    fn stored(id: u64) -> Reply {
        Reply::Stored(Stored {
            id,
            server: "fake".into(),
            request_number: id,
            file: format!("{id}.json"),
            a_count: 1,
            existing: false,
            copies: Vec::new(),
            under_replicated: false,
        })
    }

    /// The fake balancer's end of the connection.
    fn accept(listener: &TcpListener) -> TcpStream {
        let (stream, _) = listener.accept().unwrap();
        // Replies go out as header and payload writes: without this, Nagle
        // holds each payload until the client's delayed ack.
        stream.set_nodelay(true).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        stream
    }

    fn config(addr: SocketAddr, window: usize) -> Config {
        Config {
            balancer: addr,
            reply_timeout: Duration::from_secs(20),
            window,
            ..Config::default()
        }
    }

    /// A peer that reads `window` requests before answering any, then
    /// checks how many the client has made: it must be exactly the window,
    /// since the next one waits for a slot. Then it answers everything.
    #[test]
    fn requests_are_made_lazily_within_the_window() {
        const WINDOW: usize = 8;
        const COUNT: u64 = 50;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let made = Arc::new(AtomicU64::new(0));
        let made_seen = Arc::clone(&made);
        let peer = thread::spawn(move || {
            let stream = accept(&listener);
            let mut reader = FrameReader::new(&stream, proto::DEFAULT_MAX_FRAME);
            let mut read = |n: usize| -> Vec<u64> {
                (0..n)
                    .map(|_| match reader.message::<ClientRequest>() {
                        Ok(Some(Ok(r))) => r.id(),
                        other => panic!("expected a request, got {other:?}"),
                    })
                    .collect()
            };
            let first = read(WINDOW);
            assert_eq!(first, (1..=WINDOW as u64).collect::<Vec<_>>());
            // Made before being sent, so all of them are counted by now;
            // the next one cannot be made before an answer frees a slot.
            let made_before_any_answer = made_seen.load(Ordering::SeqCst);
            let mut write = &stream;
            for id in first {
                write_frame(&mut write, &encode(&stored(id))).unwrap();
            }
            for _ in WINDOW as u64..COUNT {
                let id = read(1)[0];
                write_frame(&mut write, &encode(&stored(id))).unwrap();
            }
            made_before_any_answer
        });
        let mut fates = Vec::new();
        let note = run(
            &config(addr, WINDOW),
            COUNT,
            move |id| {
                made.fetch_add(1, Ordering::SeqCst);
                Ok((store(id), id))
            },
            |id, meta, fate| fates.push((id, meta, fate)),
        )
        .unwrap();
        assert_eq!(peer.join().unwrap(), WINDOW as u64);
        assert_eq!(note, None);
        assert_eq!(fates.len(), COUNT as usize);
        for (id, meta, fate) in fates {
            assert_eq!(
                meta,
                Some(id),
                "each answer comes with its own request's meta"
            );
            assert_eq!(fate, Fate::Answered(Ok(stored(id))));
        }
    }

    /// What `report` was called with: id, meta, fate.
    type Reported = (u64, Option<u64>, Fate);

    /// Runs `count` requests against a peer that reads `read` requests,
    /// answers the first `answer` of them, then sends `last` (if any) and
    /// closes its side. Returns the fates in id order and the note.
    fn end_early(
        count: u64,
        read: usize,
        answer: usize,
        last: Option<Reply>,
    ) -> (Vec<Reported>, Option<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let peer = thread::spawn(move || {
            let stream = accept(&listener);
            let mut reader = FrameReader::new(&stream, proto::DEFAULT_MAX_FRAME);
            let ids: Vec<u64> = (0..read)
                .map(|_| match reader.message::<ClientRequest>() {
                    Ok(Some(Ok(r))) => r.id(),
                    other => panic!("expected a request, got {other:?}"),
                })
                .collect();
            let mut write = &stream;
            for id in &ids[..answer] {
                write_frame(&mut write, &encode(&stored(*id))).unwrap();
            }
            if let Some(last) = last {
                write_frame(&mut write, &encode(&last)).unwrap();
            }
            // Close gracefully: our side first, then read until the client
            // closes, so no unread byte turns the close into a reset.
            stream.shutdown(Shutdown::Write).unwrap();
            while let Ok(Some(_)) = reader.frame() {}
        });
        let mut fates = Vec::new();
        let note = run(
            &config(addr, 16),
            count,
            |id| Ok((store(id), id)),
            |id, meta, fate| fates.push((id, meta, fate)),
        )
        .unwrap();
        peer.join().unwrap();
        fates.sort_by_key(|(id, _, _)| *id);
        (fates, note)
    }

    #[test]
    fn after_shutting_down_every_unanswered_request_failed() {
        let frame = Reply::error(None, ErrorCode::ShuttingDown, "bye");
        let (fates, note) = end_early(100, 12, 5, Some(frame));
        assert_eq!(fates.len(), 100);
        for (id, meta, fate) in &fates {
            if *id <= 5 {
                assert_eq!(*fate, Fate::Answered(Ok(stored(*id))));
            } else {
                assert_eq!(*fate, Fate::ShuttingDown, "request {id}");
            }
            if *id <= 12 {
                assert_eq!(*meta, Some(*id), "request {id} was sent");
            }
        }
        let note = note.expect("a note on the early end");
        assert!(note.contains("shutting down"), "{note}");
    }

    #[test]
    fn after_a_plain_close_sent_requests_are_unknown_and_the_rest_not_sent() {
        let (fates, note) = end_early(100, 12, 5, None);
        assert_eq!(fates.len(), 100);
        let unknown: Vec<u64> = fates
            .iter()
            .filter(|(_, _, f)| *f == Fate::Unknown)
            .map(|(id, _, _)| *id)
            .collect();
        // The peer read 12, so at least 6..=12 were sent; the window lets
        // at most 16 be outstanding.
        assert!(
            unknown.starts_with(&[6, 7, 8, 9, 10, 11, 12]),
            "{unknown:?}"
        );
        assert!(unknown.len() <= 16, "{unknown:?}");
        for (id, meta, fate) in &fates {
            match fate {
                Fate::Answered(_) => assert!(*id <= 5),
                Fate::Unknown => assert!(meta.is_some()),
                Fate::NotSent(why) => {
                    assert!(*id > 12, "request {id} was read by the peer");
                    assert!(why.contains("closed"), "{why}");
                }
                Fate::ShuttingDown => panic!("nobody said shutting down"),
            }
        }
        assert!(note.is_some());
    }

    #[test]
    fn a_request_that_cannot_be_made_is_reported_and_the_rest_go_on() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let peer = thread::spawn(move || {
            let stream = accept(&listener);
            let mut reader = FrameReader::new(&stream, proto::DEFAULT_MAX_FRAME);
            let mut write = &stream;
            while let Ok(Some(Ok(request))) = reader.message::<ClientRequest>() {
                write_frame(&mut write, &encode(&stored(request.id()))).unwrap();
            }
        });
        let mut fates = Vec::new();
        let note = run(
            &config(addr, 2),
            5,
            |id| match id {
                2 | 4 => Err((id, "unreadable".to_string())),
                _ => Ok((store(id), id)),
            },
            |id, meta, fate| fates.push((id, meta, fate)),
        )
        .unwrap();
        peer.join().unwrap();
        fates.sort_by_key(|(id, _, _)| *id);
        assert_eq!(note, None);
        let expected: Vec<Reported> = (1..=5)
            .map(|id| {
                let fate = match id {
                    2 | 4 => Fate::NotSent("unreadable".into()),
                    _ => Fate::Answered(Ok(stored(id))),
                };
                (id, Some(id), fate)
            })
            .collect();
        assert_eq!(fates, expected);
    }
}
