//! How a batch of documents or computations reports: a line per request
//! (or progress, for a long batch), a word when the balancer waits for a
//! server, and the summary.

use super::pipeline::{self, Fate, Observer, Outcome};
use super::report::{self, Tally, Verdict};
use super::{status, Config, Error, LONG_BATCH};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};
use std::fmt;
use std::io::{self, Write};

/// What one batch reports to: prints each request's line, and says so when
/// the balancer is waiting for a server.
pub(super) struct Batch<'a, W: Write> {
    config: &'a Config,
    pub(super) printer: Printer<'a, W>,
    count: u64,
    /// Requests the client refused to send (unreadable file, not a
    /// document, too large).
    pub(super) refused: u64,
    /// "waiting" has been printed; once per batch is enough.
    waiting_told: bool,
}

impl<'a, W: Write> Batch<'a, W> {
    pub(super) fn new(config: &'a Config, count: u64, out: &'a mut W) -> Self {
        Batch {
            config,
            printer: Printer::new(out, count, config.terminal),
            count,
            refused: 0,
            waiting_told: false,
        }
    }

    /// No answer for a while: if no server is up, say that the balancer is
    /// holding the requests, so a silent client does not look hung. Asked
    /// on a connection of its own.
    fn check_servers(&mut self) {
        if self.waiting_told {
            return;
        }
        let config = Config {
            reply_timeout: pipeline::QUIET_AFTER,
            connect_timeout: pipeline::QUIET_AFTER,
            ..self.config.clone()
        };
        let Ok(views) = status::fetch(&config, 1) else {
            return;
        };
        if views.is_empty() || views.iter().any(|v| v.state == "up") {
            return;
        }
        self.waiting_told = true;
        let states: Vec<String> = views
            .iter()
            .map(|v| format!("{} {}", v.name, v.state))
            .collect();
        self.printer.say(&format!(
            "waiting: every server is down ({}); the balancer holds the requests \
             until one is back or its --queue-timeout passes",
            states.join(", ")
        ));
    }
}

impl<W: Write> Observer<String> for &mut Batch<'_, W> {
    fn report(&mut self, id: u64, title: Option<String>, fate: Fate) {
        let made = title.is_some();
        if made && matches!(fate, Fate::NotSent(_)) {
            self.refused += 1;
        }
        let (line, verdict) = report::describe(id - 1, self.count, title.as_deref(), &fate);
        self.printer.line(&line, verdict);
    }

    fn quiet(&mut self) {
        self.check_servers();
    }
}

impl<W: Write> Observer<()> for &mut Batch<'_, W> {
    fn report(&mut self, id: u64, _made: Option<()>, fate: Fate) {
        let (line, verdict) = report::describe_calc(id - 1, self.count, &fate);
        self.printer.line(&line, verdict);
    }

    fn quiet(&mut self) {
        self.check_servers();
    }
}

/// How a batch shows its progress.
enum Display {
    /// A line per request (short batches).
    Lines,
    /// A long batch on a terminal: a progress bar, failures printed above.
    Bar(ProgressBar),
    /// A long batch elsewhere: failures, and a progress line every tenth.
    Milestones { next: u64 },
}

/// Prints what happens to each request and keeps the counts.
pub(super) struct Printer<'a, W: Write> {
    out: &'a mut W,
    tally: Tally,
    count: u64,
    display: Display,
    /// The first failed write; the run goes on (documents are still being
    /// stored) and the error is returned at the end.
    write_err: Option<io::Error>,
}

impl<'a, W: Write> Printer<'a, W> {
    fn new(out: &'a mut W, count: u64, terminal: bool) -> Self {
        let display = if count <= LONG_BATCH {
            Display::Lines
        } else if terminal {
            // Drawn on this thread only (no ticker thread), which holds the
            // lock of stdout.
            let bar = ProgressBar::with_draw_target(Some(count), ProgressDrawTarget::stdout());
            // Narrow, so that the `^C` a terminal echoes does not wrap the
            // line and leave the bar behind when it is cleared.
            if let Ok(style) = ProgressStyle::with_template(
                "{bar:40} {pos}/{len}  {rate}  ETA {eta}  (Ctrl-C stops with a summary)",
            ) {
                bar.set_style(style.with_key(
                    "rate",
                    |state: &ProgressState, w: &mut dyn fmt::Write| {
                        let _ = write!(w, "{:.0}/s", state.per_sec());
                    },
                ));
            }
            Display::Bar(bar)
        } else {
            Display::Milestones {
                next: count.div_ceil(10),
            }
        };
        let _ = out.flush();
        Printer {
            out,
            tally: Tally::default(),
            count,
            display,
            write_err: None,
        }
    }

    fn write(&mut self, line: &str) {
        if self.write_err.is_none() {
            self.write_err = writeln!(self.out, "{line}").err();
        }
    }

    /// Records one request. A long batch lists every request that was not
    /// done (failed, unknown, not sent), and only counts those done.
    fn line(&mut self, line: &str, verdict: Verdict<'_>) {
        self.tally.add(verdict);
        let listed = !matches!(verdict, Verdict::Done(_));
        match &mut self.display {
            Display::Lines => self.write(line),
            Display::Bar(bar) => {
                if listed {
                    bar.println(line);
                }
                bar.inc(1);
            }
            Display::Milestones { next } => {
                let done = self.tally.total() as u64;
                let milestone = done >= *next;
                if milestone {
                    *next = (done + self.count.div_ceil(10)).min(self.count);
                }
                if listed {
                    self.write(line);
                }
                if milestone {
                    let progress = format!(
                        "  ...   {done}/{} ({}%), {} failed so far",
                        self.count,
                        done * 100 / self.count,
                        self.tally.failed()
                    );
                    self.write(&progress);
                }
            }
        }
    }

    /// A message between the lines (above the bar, if there is one).
    pub(super) fn say(&mut self, text: &str) {
        match &self.display {
            Display::Bar(bar) => bar.println(text),
            _ => {
                self.write(text);
                if self.write_err.is_none() {
                    self.write_err = self.out.flush().err();
                }
            }
        }
    }

    /// Prints how the connection ended early (if it did) and the summary;
    /// returns whether every request was done, or `Interrupted` once the
    /// summary of an interrupted batch is printed.
    pub(super) fn finish(self, outcome: Outcome, noun: &str, verb: &str) -> Result<bool, Error> {
        if let Display::Bar(bar) = &self.display {
            // An interrupted batch leaves its bar where it stopped.
            if outcome.interrupted.is_some() {
                bar.abandon();
            } else {
                bar.finish_and_clear();
            }
        }
        if let Some(e) = self.write_err {
            return Err(e.into());
        }
        if let Some(note) = outcome.note {
            writeln!(self.out, "connection ended early: {note}")?;
        }
        if let Some(left) = outcome.interrupted {
            writeln!(
                self.out,
                "{}",
                self.tally.summary_interrupted(
                    self.count,
                    noun,
                    verb,
                    left.in_flight,
                    left.never_sent
                )
            )?;
            self.out.flush()?;
            return Err(Error::Interrupted);
        }
        writeln!(self.out, "{}", self.tally.summary(noun, verb))?;
        Ok(self.tally.all_done())
    }
}
