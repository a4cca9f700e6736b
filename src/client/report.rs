//! What the user reads: one line per request and a closing summary built
//! from running counts, so a run of any length costs the same memory. Pure
//! formatting, tested without sockets.

use super::pipeline::Fate;
use crate::proto::{self, ErrorCode, Reply};
use std::collections::BTreeMap;

/// Shown for a request the balancer announced it would not read.
pub const SHUTTING_DOWN: &str = "not sent: the balancer is shutting down";

/// The tag of each line: what became of the request, at a glance.
const DONE_TAG: &str = "  ok    ";
const FAILED_TAG: &str = "  FAIL  ";
const UNKNOWN_TAG: &str = "  ??    ";
const NOT_SENT_TAG: &str = "  --    ";

/// Shown for a stored document whose fate the connection took with it.
pub const UNKNOWN_STORE: &str =
    "unknown: the connection closed before an answer; it may have been stored";

/// Shown for a computation whose answer never came.
pub const UNKNOWN_CALC: &str = "unknown: the connection closed before an answer";

/// How one request counts in the summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict<'a> {
    /// Done by the named server.
    Done(&'a str),
    Failed,
    /// It may or may not have been carried out.
    Unknown,
    /// It never reached the balancer, or the balancer said it did not read
    /// it: certainly not carried out.
    NotSent,
}

/// Running counts for the summary line.
#[derive(Debug, Default)]
pub struct Tally {
    done: usize,
    failed: usize,
    unknown: usize,
    not_sent: usize,
    /// Requests done per server; a handful of servers, whatever the count.
    per_server: BTreeMap<String, usize>,
}

impl Tally {
    pub fn add(&mut self, verdict: Verdict<'_>) {
        match verdict {
            Verdict::Done(server) => {
                self.done += 1;
                match self.per_server.get_mut(server) {
                    Some(n) => *n += 1,
                    None => {
                        self.per_server.insert(server.to_string(), 1);
                    }
                }
            }
            Verdict::Failed => self.failed += 1,
            Verdict::Unknown => self.unknown += 1,
            Verdict::NotSent => self.not_sent += 1,
        }
    }

    pub fn total(&self) -> usize {
        self.done + self.failed + self.unknown + self.not_sent
    }

    /// True when every request was done.
    pub fn all_done(&self) -> bool {
        self.failed == 0 && self.unknown == 0 && self.not_sent == 0
    }

    pub fn failed(&self) -> usize {
        self.failed
    }

    /// `"{n} {noun}s: {done} {verb}, {failed} failed[, {unknown}
    /// unknown][, {not_sent} not sent] (per server: a: x, b: y)"`; `noun`
    /// is singular; the unknown and not-sent counts and the per-server
    /// part only when there is something to show.
    pub fn summary(&self, noun: &str, verb: &str) -> String {
        let head = counted(self.total() as u64, noun);
        self.summary_after(&head, verb, "")
    }

    /// The summary of a run the user interrupted: what was answered, and
    /// what was left in flight (it may still be carried out) or never sent.
    pub fn summary_interrupted(
        &self,
        count: u64,
        noun: &str,
        verb: &str,
        in_flight: u64,
        never_sent: u64,
    ) -> String {
        let head = format!(
            "interrupted after {} of {}",
            self.total(),
            counted(count, noun)
        );
        let rest =
            format!(", {in_flight} in flight (may still be {verb}), {never_sent} never sent");
        self.summary_after(&head, verb, &rest)
    }

    fn summary_after(&self, head: &str, verb: &str, rest: &str) -> String {
        let mut text = format!("{head}: {} {verb}, {} failed", self.done, self.failed);
        if self.unknown > 0 {
            text.push_str(&format!(", {} unknown", self.unknown));
        }
        if self.not_sent > 0 {
            text.push_str(&format!(", {} not sent", self.not_sent));
        }
        text.push_str(rest);
        if !self.per_server.is_empty() {
            let spread: Vec<String> = self
                .per_server
                .iter()
                .map(|(s, n)| format!("{s}: {n}"))
                .collect();
            text.push_str(&format!(" (per server: {})", spread.join(", ")));
        }
        text
    }
}

/// `1 document`, `2 documents`: `noun` is singular and takes an `s`.
pub fn counted(n: u64, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// A result for people: at most 2 decimals, no trailing zeros
/// (`2.33`, `2.5`, `12`). The wire keeps full precision.
pub fn rounded(x: f64) -> String {
    let text = format!("{x:.2}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    match text {
        "-0" => "0".to_string(),
        t => t.to_string(),
    }
}

/// The `[ 3/12]` part of a line; `index` counts from 0.
fn position(index: u64, total: u64) -> String {
    let width = total.to_string().len();
    format!("[{:>width$}/{total}]", index + 1)
}

/// `"title": ` when the title is known (a request never made has none).
fn quoted(title: Option<&str>) -> String {
    match title {
        Some(t) => format!("\"{}\": ", proto::truncate(t, 60)),
        None => String::new(),
    }
}

/// One line per document, and how it counts.
pub fn describe<'a>(
    index: u64,
    total: u64,
    title: Option<&str>,
    fate: &'a Fate,
) -> (String, Verdict<'a>) {
    let at = position(index, total);
    let fail = |text: String| {
        (
            format!("{FAILED_TAG}{at} {}{text}", quoted(title)),
            Verdict::Failed,
        )
    };
    let not_sent = |text: &str| {
        (
            format!("{NOT_SENT_TAG}{at} {}{text}", quoted(title)),
            Verdict::NotSent,
        )
    };
    match fate {
        Fate::Answered(Ok(Reply::Stored(s))) => (
            format!(
                "{DONE_TAG}{at} \"{}\" -> server {}, request #{}, stored as {}, {} letters A",
                proto::truncate(title.unwrap_or_default(), 60),
                s.server,
                s.request_number,
                s.file,
                s.a_count
            ),
            Verdict::Done(&s.server),
        ),
        Fate::Answered(Ok(other)) => fail(format!("unexpected reply {other:?}")),
        // The balancer gave up, but a server may hold it: not a failure.
        Fate::Answered(Err(e)) if e.code == ErrorCode::MaybeStored => (
            format!(
                "{UNKNOWN_TAG}{at} {}{}: {}",
                quoted(title),
                e.code,
                e.message
            ),
            Verdict::Unknown,
        ),
        Fate::Answered(Err(e)) => fail(format!("{}: {}", e.code, e.message)),
        Fate::NotSent(why) => not_sent(&format!("not sent: {why}")),
        Fate::ShuttingDown => not_sent(SHUTTING_DOWN),
        Fate::Unknown => (
            format!("{UNKNOWN_TAG}{at} {}{UNKNOWN_STORE}", quoted(title)),
            Verdict::Unknown,
        ),
    }
}

/// One line per computation, and how it counts.
pub fn describe_calc(index: u64, total: u64, fate: &Fate) -> (String, Verdict<'_>) {
    let at = position(index, total);
    let fail = |text: String| (format!("{FAILED_TAG}{at} {text}"), Verdict::Failed);
    let not_sent = |text: &str| (format!("{NOT_SENT_TAG}{at} {text}"), Verdict::NotSent);
    match fate {
        Fate::Answered(Ok(Reply::Calc(c))) => (
            format!(
                "{DONE_TAG}{at} {} {} {} = {} ({}) computed by server {}",
                c.a,
                c.operation.symbol(),
                c.b,
                rounded(c.result),
                c.operation,
                c.server
            ),
            Verdict::Done(&c.server),
        ),
        Fate::Answered(Ok(other)) => fail(format!("unexpected reply {other:?}")),
        // The balancer gave up on a server that had it: it may have run.
        Fate::Answered(Err(e)) if e.code == ErrorCode::MaybeStored => (
            format!("{UNKNOWN_TAG}{at} {}: {}", e.code, e.message),
            Verdict::Unknown,
        ),
        Fate::Answered(Err(e)) => fail(format!("{}: {}", e.code, e.message)),
        Fate::NotSent(why) => not_sent(&format!("not sent: {why}")),
        Fate::ShuttingDown => not_sent(SHUTTING_DOWN),
        Fate::Unknown => (
            format!("{UNKNOWN_TAG}{at} {UNKNOWN_CALC}"),
            Verdict::Unknown,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{ErrorReply, Stored};

    fn stored(server: &str, n: u64) -> Fate {
        Fate::Answered(Ok(Reply::Stored(Stored {
            id: n,
            server: server.into(),
            request_number: n,
            file: format!("{n}_x.json"),
            a_count: 2,
            existing: false,
            copies: Vec::new(),
            under_replicated: false,
        })))
    }

    fn tally(fates: &[Fate]) -> Tally {
        let mut tally = Tally::default();
        for (i, fate) in fates.iter().enumerate() {
            tally.add(describe(i as u64, fates.len() as u64, Some("t"), fate).1);
        }
        tally
    }

    #[test]
    fn summary_counts_per_server() {
        let no_server = Fate::Answered(Err(ErrorReply {
            id: Some(4),
            code: ErrorCode::NoServer,
            message: "none".into(),
        }));
        let t = tally(&[stored("s1", 1), stored("s2", 2), stored("s1", 3), no_server]);
        assert_eq!(
            t.summary("document", "stored"),
            "4 documents: 3 stored, 1 failed (per server: s1: 2, s2: 1)"
        );
        assert!(!t.all_done());
    }

    #[test]
    fn unknown_is_counted_apart_and_only_shown_when_there_is_some() {
        let t = tally(&[
            stored("s1", 1),
            Fate::Unknown,
            Fate::ShuttingDown,
            Fate::Unknown,
        ]);
        assert_eq!(
            t.summary("document", "stored"),
            "4 documents: 1 stored, 0 failed, 2 unknown, 1 not sent (per server: s1: 1)"
        );
        assert!(!t.all_done());
        let t = tally(&[Fate::NotSent("gone".into())]);
        assert_eq!(
            t.summary("document", "stored"),
            "1 document: 0 stored, 0 failed, 1 not sent"
        );
        assert!(!t.all_done());
        let maybe = Fate::Answered(Err(ErrorReply {
            id: Some(1),
            code: ErrorCode::MaybeStored,
            message: "it may have been stored on s1".into(),
        }));
        let t = tally(std::slice::from_ref(&maybe));
        assert_eq!(
            t.summary("document", "stored"),
            "1 document: 0 stored, 0 failed, 1 unknown"
        );
        let (line, verdict) = describe_calc(0, 1, &maybe);
        assert_eq!(verdict, Verdict::Unknown, "{line}");
        let t = tally(&[stored("s1", 1)]);
        assert!(t.all_done());
        assert!(Tally::default().all_done());
    }

    #[test]
    fn describe_lines() {
        let fate = stored("127.0.0.1:5001", 9);
        let (line, verdict) = describe(0, 12, Some("Città"), &fate);
        assert_eq!(
            line,
            "  ok    [ 1/12] \"Città\" -> server 127.0.0.1:5001, request #9, stored as 9_x.json, 2 letters A"
        );
        assert_eq!(verdict, Verdict::Done("127.0.0.1:5001"));
        let (line, verdict) = describe(11, 12, Some("x"), &Fate::ShuttingDown);
        assert_eq!(
            line,
            "  --    [12/12] \"x\": not sent: the balancer is shutting down"
        );
        assert_eq!(verdict, Verdict::NotSent);
        let (line, verdict) = describe(2, 12, Some("x"), &Fate::Unknown);
        assert_eq!(
            line,
            "  ??    [ 3/12] \"x\": unknown: the connection closed before an answer; it may have been stored"
        );
        assert_eq!(verdict, Verdict::Unknown);
        // A document never made has no title to show.
        let (line, _) = describe(
            3,
            12,
            None,
            &Fate::NotSent("the balancer closed the connection".into()),
        );
        assert_eq!(
            line,
            "  --    [ 4/12] not sent: the balancer closed the connection"
        );
    }

    #[test]
    fn results_are_rounded_for_people() {
        assert_eq!(rounded(7.0 / 3.0), "2.33");
        assert_eq!(rounded(2.5), "2.5");
        assert_eq!(rounded(12.0), "12");
        assert_eq!(rounded(-0.001), "0");
        assert_eq!(rounded(-1.126), "-1.13");
    }

    #[test]
    fn interrupted_summary_counts_what_is_in_flight() {
        let t = tally(&[stored("s1", 1), Fate::NotSent("too large".into())]);
        assert_eq!(
            t.summary_interrupted(10, "document", "stored", 3, 5),
            "interrupted after 2 of 10 documents: 1 stored, 0 failed, 1 not sent, \
             3 in flight (may still be stored), 5 never sent (per server: s1: 1)"
        );
    }

    #[test]
    fn describe_calc_lines() {
        let (line, verdict) = describe_calc(0, 3, &Fate::ShuttingDown);
        assert_eq!(
            line,
            "  --    [1/3] not sent: the balancer is shutting down"
        );
        assert_eq!(verdict, Verdict::NotSent);
        let (line, verdict) = describe_calc(1, 3, &Fate::Unknown);
        assert_eq!(
            line,
            "  ??    [2/3] unknown: the connection closed before an answer"
        );
        assert_eq!(verdict, Verdict::Unknown);
    }
}
