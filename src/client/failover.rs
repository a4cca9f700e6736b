//! Documents sent through several balancers (`--balancer A,B`): the batch
//! goes to the first that answers and, when its connection ends before
//! every document is answered (the balancer died, reset the connection or
//! stopped answering), goes on through the next one.
//!
//! Each document carries a client key (`ClientKey`: a random number
//! chosen per run and the document's place in the batch). Documents
//! already answered are not sent again; those sent and unanswered are sent
//! again marked `resent`, so that the next balancer first asks the servers
//! whether one already holds the key (the first balancer may have had it
//! stored just before it died); those never sent go as new ones.
//!
//! Rounds run one after the other, each a `pipeline` run on one
//! connection; what the source of documents has not made yet is made by
//! the round that gets to it, so memory stays the window's worth.

use super::pipeline::{self, Fate, Observer, Outcome, Prepared};
use super::{Batch, Config, Error};
use crate::proto::{ClientKey, ClientRequest, Document, ErrorCode, StoreRequest};
use std::collections::VecDeque;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

/// Makes document `index` of the batch, or says why it cannot be made
/// (title to show, reason).
pub type MakeDocument = Box<dyn FnMut(u64) -> Result<Document, (String, String)> + Send>;

/// A document on its way: what a round keeps of it until it is answered.
pub struct InFlight {
    /// Its place in the batch, from 0.
    pub index: u64,
    pub title: String,
    /// Kept to be sent again through another balancer (`None` when it
    /// could not be made).
    doc: Option<Document>,
}

/// What is left to send: documents to send again first, then those not
/// made yet.
struct Source {
    make: MakeDocument,
    count: u64,
    next: u64,
    again: VecDeque<(u64, Document)>,
    run: u64,
    /// Keys go with the documents (several balancers).
    keyed: bool,
    max_frame: usize,
    /// What the last round said of the documents it never made (not sent,
    /// or not read by a balancer shutting down).
    unmade: Option<Fate>,
}

impl Source {
    fn left(&self) -> u64 {
        self.again.len() as u64 + (self.count - self.next)
    }

    /// The request for round id `id`.
    fn prepare(&mut self, id: u64) -> Prepared<InFlight> {
        let (index, made, resent) = match self.again.pop_front() {
            Some((index, doc)) => (index, Ok(doc), true),
            None => {
                let index = self.next;
                self.next += 1;
                (index, (self.make)(index), false)
            }
        };
        let doc = match made {
            Ok(doc) => doc,
            Err((title, why)) => {
                let meta = InFlight {
                    index,
                    title,
                    doc: None,
                };
                return Err((meta, why));
            }
        };
        let title = doc.title.clone();
        let request = ClientRequest::Store(StoreRequest {
            id,
            doc: if self.keyed { doc.clone() } else { doc },
            request_number: None,
            not_after_ms: None,
            key: self.keyed.then(|| ClientKey::new(self.run, index)),
            resent,
        });
        let ClientRequest::Store(store) = &request else {
            unreachable!()
        };
        let kept = self.keyed.then(|| store.doc.clone());
        let meta = InFlight {
            index,
            title,
            doc: kept,
        };
        match super::too_large(&request, self.max_frame) {
            Some(why) => Err((meta, why)),
            None => Ok((request, meta)),
        }
    }
}

/// Reports a round's documents to the batch, except those to send again.
struct Round<'b, 'a, W: Write> {
    batch: &'b mut Batch<'a, W>,
    source: Arc<Mutex<Source>>,
    /// Unanswered documents go to the next balancer.
    more: bool,
}

impl<W: Write> Observer<InFlight> for Round<'_, '_, W> {
    fn report(&mut self, _id: u64, meta: Option<InFlight>, fate: Fate) {
        // Never made: the source makes it in the next round, or says
        // this of it at the end.
        let Some(meta) = meta else {
            crate::sync::lock(&self.source).unmade.get_or_insert(fate);
            return;
        };
        let again = match &fate {
            Fate::Unknown | Fate::ShuttingDown => true,
            Fate::Answered(Err(e)) => e.code == ErrorCode::ShuttingDown,
            _ => false,
        };
        if let (true, true, Some(doc)) = (again, self.more, &meta.doc) {
            let mut source = crate::sync::lock(&self.source);
            source.again.push_back((meta.index, doc.clone()));
            return;
        }
        let mut batch = &mut *self.batch;
        Observer::<String>::report(&mut batch, meta.index + 1, Some(meta.title), fate);
    }

    fn quiet(&mut self) {
        let mut batch = &mut *self.batch;
        Observer::<String>::quiet(&mut batch);
    }
}

/// Sends `count` documents made by `make` through the balancers of
/// `config` (see the module); prints as `store_documents` does. Returns
/// the outcome of the last round.
pub(super) fn send<W: Write>(
    config: &Config,
    count: u64,
    make: MakeDocument,
    batch: &mut Batch<'_, W>,
    first: (usize, crate::net::Stream),
) -> Result<Outcome, Error> {
    let balancers = config.all_balancers();
    let source = Arc::new(Mutex::new(Source {
        make,
        count,
        next: 0,
        again: VecDeque::new(),
        run: rand::random(),
        keyed: balancers.len() > 1,
        max_frame: config.max_frame,
        unmade: None,
    }));
    let (mut at, mut stream) = first;
    // Each balancer may be tried twice over (one that restarted).
    let mut turns = 2 * balancers.len();
    loop {
        let round_config = Config {
            balancer: balancers[at],
            ..config.clone()
        };
        let left = {
            let mut source = crate::sync::lock(&source);
            source.unmade = None;
            source.left()
        };
        let made = source.clone();
        let make = move |id| crate::sync::lock(&made).prepare(id);
        turns -= 1;
        let more = balancers.len() > 1 && turns > 0;
        let round = Round {
            batch: &mut *batch,
            source: source.clone(),
            more,
        };
        let outcome = pipeline::run_on(stream, &round_config, left, make, round)?;
        let left = crate::sync::lock(&source).left();
        if outcome.interrupted.is_some() || left == 0 || !more {
            return Ok(finish(outcome, &source, batch));
        }
        let why = outcome.note.clone().unwrap_or_default();
        let Some((next, next_stream)) = connect_next(config, &balancers, at) else {
            return Ok(finish(outcome, &source, batch));
        };
        batch.printer.say(&format!(
            "balancer {} failed ({why}); going on through {}: {left} documents left",
            balancers[at], balancers[next]
        ));
        (at, stream) = (next, next_stream);
    }
}

/// The first balancer after `at` (in turn, `at` itself last) that answers.
fn connect_next(
    config: &Config,
    balancers: &[SocketAddr],
    at: usize,
) -> Option<(usize, crate::net::Stream)> {
    (1..=balancers.len())
        .map(|step| (at + step) % balancers.len())
        .find_map(|i| {
            let config = Config {
                balancer: balancers[i],
                ..config.clone()
            };
            pipeline::connect(&config).ok().map(|stream| (i, stream))
        })
}

/// Reports what no balancer could take: sent ones as unknown, the rest as
/// not sent.
fn finish<W: Write>(
    outcome: Outcome,
    source: &Arc<Mutex<Source>>,
    batch: &mut Batch<'_, W>,
) -> Outcome {
    if outcome.interrupted.is_some() {
        return outcome;
    }
    let mut source = crate::sync::lock(source);
    let cause = outcome.note.clone().unwrap_or_default();
    for (index, doc) in std::mem::take(&mut source.again) {
        let mut b = &mut *batch;
        Observer::<String>::report(&mut b, index + 1, Some(doc.title), Fate::Unknown);
    }
    let fate = source.unmade.take().unwrap_or(Fate::NotSent(cause));
    for index in source.next..source.count {
        let mut b = &mut *batch;
        Observer::<String>::report(&mut b, index + 1, None, fate.clone());
    }
    source.next = source.count;
    outcome
}
