//! The balancer's numbers: counters and gauges written by the dispatcher,
//! the links, the monitor and the connection threads, read by the `servers`
//! request and the Prometheus endpoint. Plain atomics; the one lock guards a
//! server's last status report and is never held across I/O.

use super::ServerId;
use crate::health::State;
use crate::proto::{ServerView, StatusReport};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

/// Upper bounds of the latency histogram buckets, in seconds.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

#[derive(Debug, Default)]
pub struct ServerStats {
    pub name: String,
    /// Forwards sent to this server.
    pub requests: AtomicU64,
    /// Content bytes it acknowledged.
    pub bytes: AtomicU64,
    /// Forwards that failed on it (error reply or broken connection).
    pub failures: AtomicU64,
    /// Requests that failed on it and were sent to another server.
    pub retries: AtomicU64,
    pub in_flight: AtomicU64,
    state: AtomicU8,
    /// Taking no new work, leaving once its requests are done.
    pub draining: AtomicBool,
    /// Every end of a request on it is reported to the dispatcher (it
    /// drains, or its storage errors are being counted).
    pub watched: AtomicBool,
    check_micros: AtomicU64,
    /// The last report and when it came.
    last_status: Mutex<Option<(StatusReport, Instant)>>,
}

impl ServerStats {
    /// Fresh counters for the server called `name`.
    pub fn named(name: String) -> Arc<ServerStats> {
        Arc::new(ServerStats {
            name,
            ..ServerStats::default()
        })
    }

    pub fn set_state(&self, state: State) {
        self.state.store(state_code(state), Relaxed);
    }

    pub fn state(&self) -> State {
        match self.state.load(Relaxed) {
            1 => State::Up,
            2 => State::Overloaded,
            3 => State::Down,
            _ => State::Unknown,
        }
    }

    /// Records a probe: how long it took and, if it answered, its report.
    pub fn record_check(&self, took: Duration, report: Option<StatusReport>) {
        self.check_micros.store(took.as_micros() as u64, Relaxed);
        if let Some(report) = report {
            *crate::net::lock(&self.last_status) = Some((report, Instant::now()));
        }
    }

    pub fn view(&self, id: ServerId) -> ServerView {
        let check = self.check_micros.load(Relaxed);
        let last = crate::net::lock(&self.last_status).clone();
        ServerView {
            id: id.0,
            name: self.name.clone(),
            state: if self.draining.load(Relaxed) {
                "draining".to_string()
            } else {
                self.state().to_string()
            },
            in_flight: self.in_flight.load(Relaxed),
            status_age_ms: last.as_ref().map(|(_, at)| at.elapsed().as_millis() as u64),
            status: last.map(|(report, _)| report),
            check_ms: (check > 0).then(|| check as f64 / 1000.0),
            requests: self.requests.load(Relaxed),
            failures: self.failures.load(Relaxed),
        }
    }
}

fn state_code(state: State) -> u8 {
    match state {
        State::Unknown => 0,
        State::Up => 1,
        State::Overloaded => 2,
        State::Down => 3,
    }
}

#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = LATENCY_BUCKETS.iter().position(|&b| secs <= b) {
            self.buckets[i].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_micros.fetch_add(d.as_micros() as u64, Relaxed);
    }
}

#[derive(Debug, Default)]
pub struct Stats {
    /// By server id; servers come and go at run time.
    servers: RwLock<BTreeMap<ServerId, Arc<ServerStats>>>,
    /// Requests received from clients.
    pub received: AtomicU64,
    /// Requests answered with an error after queueing (no server, failed
    /// everywhere).
    pub failed: AtomicU64,
    /// Requests waiting for a server.
    pub queue_depth: AtomicU64,
    pub connections: AtomicU64,
    /// Time from receiving a request to its successful reply.
    pub latency: Histogram,
    /// Limits clients ran into.
    pub limits: super::limits::LimitHits,
}

impl Stats {
    /// Stats for servers with ids 0, 1, 2... in the order given.
    pub fn new(names: impl IntoIterator<Item = String>) -> Stats {
        let stats = Stats::default();
        for (i, name) in names.into_iter().enumerate() {
            stats.add(ServerId(i as u32), name);
        }
        stats
    }

    /// Starts counting for a server that joined.
    pub fn add(&self, id: ServerId, name: String) -> Arc<ServerStats> {
        let server = ServerStats::named(name);
        self.insert(id, server.clone());
        server
    }

    /// Shows the counters of a server that joined with them.
    pub fn insert(&self, id: ServerId, server: Arc<ServerStats>) {
        write(&self.servers).insert(id, server);
    }

    /// Forgets a server that left.
    pub fn remove(&self, id: ServerId) {
        write(&self.servers).remove(&id);
    }

    /// The counters of one server (detached ones for a server that has
    /// left, so late updates go nowhere).
    pub fn server(&self, id: ServerId) -> Arc<ServerStats> {
        read(&self.servers).get(&id).cloned().unwrap_or_default()
    }

    fn all(&self) -> Vec<Arc<ServerStats>> {
        read(&self.servers).values().cloned().collect()
    }

    pub fn views(&self) -> Vec<ServerView> {
        read(&self.servers)
            .iter()
            .map(|(id, s)| s.view(*id))
            .collect()
    }

    /// The Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let per_server = |out: &mut String,
                          name: &str,
                          kind: &str,
                          help: &str,
                          value: &dyn Fn(&ServerStats) -> String| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for s in &self.all() {
                let _ = writeln!(
                    out,
                    "{name}{{server=\"{}\"}} {}",
                    escape_label(&s.name),
                    value(s)
                );
            }
        };
        let n = |a: &AtomicU64| a.load(Relaxed).to_string();
        per_server(
            &mut out,
            "lbft_server_requests_total",
            "counter",
            "Requests forwarded to the server.",
            &|s| n(&s.requests),
        );
        per_server(
            &mut out,
            "lbft_server_bytes_total",
            "counter",
            "Content bytes the server acknowledged.",
            &|s| n(&s.bytes),
        );
        per_server(
            &mut out,
            "lbft_server_failures_total",
            "counter",
            "Forwards that failed on the server.",
            &|s| n(&s.failures),
        );
        per_server(
            &mut out,
            "lbft_server_retries_total",
            "counter",
            "Requests moved to another server after failing on this one.",
            &|s| n(&s.retries),
        );
        per_server(
            &mut out,
            "lbft_server_in_flight",
            "gauge",
            "Requests sent to the server and not yet answered (active transfers).",
            &|s| n(&s.in_flight),
        );
        per_server(
            &mut out,
            "lbft_server_up",
            "gauge",
            "1 when the server takes requests (up and not overloaded).",
            &|s| u8::from(s.state() == State::Up).to_string(),
        );
        per_server(
            &mut out,
            "lbft_server_overloaded",
            "gauge",
            "1 when the server reports itself overloaded.",
            &|s| u8::from(s.state() == State::Overloaded).to_string(),
        );
        per_server(
            &mut out,
            "lbft_server_check_seconds",
            "gauge",
            "Duration of the last status probe.",
            &|s| format!("{}", s.check_micros.load(Relaxed) as f64 / 1e6),
        );
        let scalar = |out: &mut String, name: &str, kind: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        };
        scalar(
            &mut out,
            "lbft_requests_received_total",
            "counter",
            "Requests received from clients.",
            self.received.load(Relaxed),
        );
        scalar(
            &mut out,
            "lbft_requests_failed_total",
            "counter",
            "Requests answered with an error after queueing.",
            self.failed.load(Relaxed),
        );
        scalar(
            &mut out,
            "lbft_queue_depth",
            "gauge",
            "Requests waiting for a server.",
            self.queue_depth.load(Relaxed),
        );
        scalar(
            &mut out,
            "lbft_client_connections",
            "gauge",
            "Open client connections.",
            self.connections.load(Relaxed),
        );

        self.limits.render(&mut out);

        let name = "lbft_request_duration_seconds";
        let _ = writeln!(out, "# HELP {name} Time from receiving a request to its successful reply.\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (bound, bucket) in LATENCY_BUCKETS.iter().zip(&self.latency.buckets) {
            cumulative += bucket.load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let count = self.latency.count.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.latency.sum_micros.load(Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count {count}");
        out
    }
}

fn escape_label(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let stats = Stats::new(["127.0.0.1:5001".to_string(), "b\"x".to_string()]);
        stats.server(ServerId(0)).requests.fetch_add(3, Relaxed);
        stats.server(ServerId(0)).set_state(State::Up);
        stats.queue_depth.store(2, Relaxed);
        stats.latency.observe(Duration::from_millis(3));
        stats.latency.observe(Duration::from_millis(700));
        stats.latency.observe(Duration::from_secs(60));
        let text = stats.render();
        assert!(
            text.contains("lbft_server_requests_total{server=\"127.0.0.1:5001\"} 3\n"),
            "{text}"
        );
        assert!(text.contains("lbft_server_up{server=\"127.0.0.1:5001\"} 1\n"));
        assert!(text.contains("lbft_server_up{server=\"b\\\"x\"} 0\n"));
        assert!(text.contains("lbft_queue_depth 2\n"));
        assert!(text.contains("lbft_request_duration_seconds_bucket{le=\"0.001\"} 0\n"));
        assert!(text.contains("lbft_request_duration_seconds_bucket{le=\"0.005\"} 1\n"));
        assert!(text.contains("lbft_request_duration_seconds_bucket{le=\"1\"} 2\n"));
        assert!(text.contains("lbft_request_duration_seconds_bucket{le=\"10\"} 2\n"));
        assert!(text.contains("lbft_request_duration_seconds_bucket{le=\"+Inf\"} 3\n"));
        assert!(text.contains("lbft_request_duration_seconds_count 3\n"));
    }

    #[test]
    fn views_carry_state_and_last_report() {
        let stats = Stats::new(["s".to_string()]);
        assert_eq!(stats.views()[0].state, "unknown");
        assert_eq!(stats.views()[0].check_ms, None);
        assert_eq!(stats.views()[0].status_age_ms, None);
        stats.server(ServerId(0)).set_state(State::Overloaded);
        stats.server(ServerId(0)).record_check(
            Duration::from_micros(1500),
            Some(StatusReport {
                files_stored: 4,
                ..StatusReport::default()
            }),
        );
        // A failed probe keeps the last report.
        stats
            .server(ServerId(0))
            .record_check(Duration::from_micros(2500), None);
        let view = &stats.views()[0];
        assert_eq!(view.state, "overloaded");
        assert_eq!(view.check_ms, Some(2.5));
        assert_eq!(view.status.as_ref().unwrap().files_stored, 4);
        assert!(view.status_age_ms.is_some());
    }
}
