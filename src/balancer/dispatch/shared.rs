//! The dispatcher behind its lock, and the loop of its thread.
//!
//! The thread waits on its channels without the lock and takes it for each
//! message. Other threads take it for `submit_now`, `take_now` and finished
//! jobs; when a call of theirs brings the dispatcher's next timer forward
//! (a link found stopped may start an outage), they wake the thread with
//! `Event::Wake` so that it sleeps on the new one.

use super::{Dispatcher, Event, Job, MAX_WAITING};
use crate::balancer::link::Pool;
use crossbeam_channel::{select, Receiver, Sender};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Instant;

pub struct Shared {
    dispatcher: Mutex<Dispatcher>,
    /// The dispatcher thread's events, for what it must handle itself.
    events: Sender<Event>,
}

impl Shared {
    pub fn new(dispatcher: Dispatcher, events: Sender<Event>) -> Arc<Shared> {
        Arc::new(Shared {
            dispatcher: Mutex::new(dispatcher),
            events,
        })
    }

    fn with<R>(&self, f: impl FnOnce(&mut Dispatcher) -> R) -> (R, bool) {
        let mut d = crate::net::lock(&self.dispatcher);
        let before = d.next_timer();
        let result = f(&mut d);
        let after = d.next_timer();
        d.stats.queue_depth.store(d.waiting.len() as u64, Relaxed);
        let sooner = match (before, after) {
            (_, None) => false,
            (None, Some(_)) => true,
            (Some(b), Some(a)) => a < b,
        };
        (result, sooner)
    }

    /// `with` for threads other than the dispatcher's: wakes it when its
    /// next timer came forward. False when it needed waking and is gone.
    fn call<R>(&self, f: impl FnOnce(&mut Dispatcher) -> R) -> (R, bool) {
        let (result, sooner) = self.with(f);
        (result, !sooner || self.events.send(Event::Wake).is_ok())
    }

    /// See `Dispatcher::submit_now`.
    pub fn submit_now(&self, job: Job) -> Option<Job> {
        self.call(|d| d.submit_now(job)).0
    }

    /// See `Dispatcher::take_now`.
    pub fn take_now(&self, job: &mut Job) -> Option<Arc<Pool>> {
        self.call(|d| d.take_now(job)).0
    }

    /// Tells the dispatcher how a job ended: a job done is counted off here
    /// and now; anything else goes to its thread. False when the dispatcher
    /// thread is gone (shutting down).
    pub fn report(&self, event: Event) -> bool {
        if !matches!(event, Event::Done { .. }) {
            return self.events.send(event).is_ok();
        }
        self.call(|d| d.on_event(event)).1
    }

    /// `report` for a worker of a server's link: also returns the job the
    /// dispatcher gave that server as a result (see
    /// `Dispatcher::on_done_handing_back`), for the worker to carry out
    /// next.
    pub fn report_handing_back(&self, event: Event) -> (bool, Option<Job>) {
        if !matches!(event, Event::Done { .. }) {
            return (self.events.send(event).is_ok(), None);
        }
        let (next, alive) = self.call(|d| d.on_done_handing_back(event));
        (alive, next)
    }

    /// Runs the dispatcher thread until shut down (`stop` disconnected, or
    /// every job sender gone) and drained. The servers' links are dropped
    /// at the end, so that their workers stop.
    pub fn run(&self, jobs: Receiver<Job>, events: Receiver<Event>, stop: Receiver<()>) {
        {
            let d = crate::net::lock(&self.dispatcher);
            log::info!(
                "dispatcher: {} policy over {} servers",
                d.policy.name(),
                d.slots.len()
            );
        }
        let never = crossbeam_channel::never();
        let mut jobs_open = true;
        loop {
            let (timer, queue_full, draining) = {
                let d = crate::net::lock(&self.dispatcher);
                if d.drain_deadline.is_some() && d.is_idle() {
                    break;
                }
                (
                    d.next_timer(),
                    d.waiting.len() >= MAX_WAITING,
                    d.drain_deadline.is_some(),
                )
            };
            let timer = match timer {
                Some(at) => crossbeam_channel::at(at),
                None => crossbeam_channel::never(),
            };
            let jobs_in = if jobs_open && !queue_full {
                &jobs
            } else {
                &never
            };
            let stop_in = if draining {
                crossbeam_channel::never()
            } else {
                stop.clone()
            };
            select! {
                recv(jobs_in) -> job => match job {
                    Ok(job) => {
                        self.with(|d| d.submit(job));
                    }
                    Err(_) => {
                        jobs_open = false;
                        self.with(|d| d.begin_drain(Instant::now()));
                    }
                },
                recv(events) -> event => {
                    if let Ok(event) = event {
                        self.with(|d| d.on_event(event));
                    }
                }
                recv(stop_in) -> _ => {
                    self.with(|d| d.begin_drain(Instant::now()));
                }
                recv(timer) -> _ => {
                    if self.with(|d| d.on_timer(Instant::now())).0 {
                        break;
                    }
                }
            }
        }
        let mut d = crate::net::lock(&self.dispatcher);
        let forgets: usize = d.slots.values().map(|s| s.forget.len()).sum();
        if forgets > 0 {
            log::warn!("shutting down with {forgets} duplicate copies not yet removed from servers that were away");
        }
        d.slots.clear();
        log::info!("dispatcher stopped");
    }
}
