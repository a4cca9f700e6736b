//! Limits that clients run into, counted for the metrics endpoint and
//! logged once per burst: a client hitting a limit a thousand times a
//! second gets one log line every `LOG_INTERVAL` (with the count of the
//! others), and every hit in `lbft_limit_hits_total{limit="..."}`.

use crate::throttle::{self, Throttle};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// At most one log line per limit this often.
const LOG_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Limit {
    /// A frame above `--max-frame` (the connection is closed).
    FrameTooLarge,
    /// A connection had `--client-window` requests outstanding: its reader
    /// paused.
    ClientWindow,
    /// All connections together held `--max-queued-bytes`: a reader paused.
    QueuedBytes,
    /// `--max-connections` were open, every one at work: a new connection
    /// waited in the listen backlog.
    MaxConnections,
    /// An idle connection, or one with no whole request yet, was closed to
    /// make room at `--max-connections` or `--max-connections-per-ip`.
    ConnectionsEvicted,
    /// `--max-connections-per-ip` were open from one address, every one at
    /// work: a new connection from it was refused.
    MaxConnectionsPerIp,
    /// A frame did not arrive whole within `--frame-timeout`.
    FrameTimeout,
    /// A login with wrong credentials.
    LoginFailed,
    /// A login refused at once: its turn on the account or address was
    /// too far away (see `logins`).
    LoginThrottled,
    /// A login refused at once: the account is locked.
    LoginLocked,
    /// A document above `--max-document-size`.
    DocumentTooLarge,
}

impl Limit {
    pub const ALL: [Limit; 11] = [
        Limit::FrameTooLarge,
        Limit::ClientWindow,
        Limit::QueuedBytes,
        Limit::MaxConnections,
        Limit::ConnectionsEvicted,
        Limit::MaxConnectionsPerIp,
        Limit::FrameTimeout,
        Limit::LoginFailed,
        Limit::LoginThrottled,
        Limit::LoginLocked,
        Limit::DocumentTooLarge,
    ];

    /// Its label in the metrics.
    pub fn name(self) -> &'static str {
        match self {
            Limit::FrameTooLarge => "max_frame",
            Limit::ClientWindow => "client_window",
            Limit::QueuedBytes => "max_queued_bytes",
            Limit::MaxConnections => "max_connections",
            Limit::ConnectionsEvicted => "connections_evicted",
            Limit::MaxConnectionsPerIp => "max_connections_per_ip",
            Limit::FrameTimeout => "frame_timeout",
            Limit::LoginFailed => "login_failed",
            Limit::LoginThrottled => "login_throttled",
            Limit::LoginLocked => "login_locked",
            Limit::DocumentTooLarge => "max_document_size",
        }
    }

    fn index(self) -> usize {
        Limit::ALL.iter().position(|l| *l == self).unwrap_or(0)
    }
}

/// How often each limit was hit.
#[derive(Debug)]
pub struct LimitHits {
    counts: [AtomicU64; Limit::ALL.len()],
    logged: Throttle<Limit>,
}

impl Default for LimitHits {
    fn default() -> Self {
        LimitHits {
            counts: Default::default(),
            logged: Throttle::new(LOG_INTERVAL),
        }
    }
}

impl LimitHits {
    /// Counts a hit, and logs `what` (built only when logged) if this is
    /// the first of a burst.
    pub fn hit(&self, limit: Limit, what: impl FnOnce() -> String) {
        self.counts[limit.index()].fetch_add(1, Relaxed);
        if let Some(skipped) = self.logged.check(&limit) {
            let what = what();
            log::warn!(
                "limit {} reached: {what}{}",
                limit.name(),
                throttle::more(skipped)
            );
        }
    }

    /// The counter itself, for code that logs on its own (admission, at
    /// `--max-connections` and `--max-connections-per-ip`; logins, by
    /// account).
    pub fn counter(&self, limit: Limit) -> &AtomicU64 {
        &self.counts[limit.index()]
    }

    pub fn count(&self, limit: Limit) -> u64 {
        self.counts[limit.index()].load(Relaxed)
    }

    /// The counters in the Prometheus text format.
    pub fn render(&self, out: &mut String) {
        let name = "lbft_limit_hits_total";
        let _ = writeln!(
            out,
            "# HELP {name} Times a client ran into a limit (see the limit label).\n# TYPE {name} counter"
        );
        for limit in Limit::ALL {
            let _ = writeln!(
                out,
                "{name}{{limit=\"{}\"}} {}",
                limit.name(),
                self.count(limit)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_every_hit_and_renders_each_limit() {
        let hits = LimitHits::default();
        let mut built = 0;
        for _ in 0..5 {
            hits.hit(Limit::ClientWindow, || {
                built += 1;
                "x".into()
            });
        }
        assert_eq!(built, 1, "logged once per burst");
        assert_eq!(hits.count(Limit::ClientWindow), 5);
        let mut text = String::new();
        hits.render(&mut text);
        assert!(text.contains("lbft_limit_hits_total{limit=\"client_window\"} 5\n"));
        assert!(text.contains("lbft_limit_hits_total{limit=\"max_frame\"} 0\n"));
        assert_eq!(
            text.matches("lbft_limit_hits_total{").count(),
            Limit::ALL.len()
        );
    }
}
