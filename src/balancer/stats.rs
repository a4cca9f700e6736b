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

/// The kinds of work a server carries, each counted apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Document,
    Calc,
    /// A file sent to the server (relayed, or straight in redirect mode).
    Upload,
    /// A file relayed from the server to a client.
    Download,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Document, Kind::Calc, Kind::Upload, Kind::Download];

    /// Its label in the metrics.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Document => "document",
            Kind::Calc => "calc",
            Kind::Upload => "upload",
            Kind::Download => "download",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// What a server carried of one kind of work.
#[derive(Debug, Default)]
pub struct Carried {
    /// Sent to the server: forwards of documents and computations (each
    /// attempt), file transfers begun.
    pub started: AtomicU64,
    /// Bytes carried: a document's content once acknowledged, a file's
    /// bytes as they are relayed.
    pub bytes: AtomicU64,
    /// Failed on the server: an error answer, a broken or closed
    /// connection, no answer in time, the server killed mid-transfer.
    pub failures: AtomicU64,
    /// Under way now (file transfers).
    pub active: AtomicU64,
}

#[derive(Debug, Default)]
pub struct ServerStats {
    pub name: String,
    /// By kind of work (see `Kind`).
    carried: [Carried; Kind::ALL.len()],
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

    pub fn carried(&self, kind: Kind) -> &Carried {
        &self.carried[kind.index()]
    }

    /// A file transfer begins on this server: counted, and under way until
    /// the guard drops.
    pub fn transfer(self: &Arc<Self>, kind: Kind) -> Transfer {
        let carried = self.carried(kind);
        carried.started.fetch_add(1, Relaxed);
        carried.active.fetch_add(1, Relaxed);
        Transfer {
            server: self.clone(),
            kind,
        }
    }

    fn total(&self, field: impl Fn(&Carried) -> &AtomicU64) -> u64 {
        self.carried.iter().map(|c| field(c).load(Relaxed)).sum()
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
            *crate::sync::lock(&self.last_status) = Some((report, Instant::now()));
        }
    }

    pub fn view(&self, id: ServerId) -> ServerView {
        let check = self.check_micros.load(Relaxed);
        let last = crate::sync::lock(&self.last_status).clone();
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
            requests: self.total(|c| &c.started),
            failures: self.total(|c| &c.failures),
        }
    }
}

/// A file transfer under way on a server, counted in its `active` gauge
/// until dropped. Its bytes and how it ended are counted as they happen.
#[derive(Debug)]
pub struct Transfer {
    server: Arc<ServerStats>,
    kind: Kind,
}

impl Transfer {
    /// `n` more bytes carried.
    pub fn bytes(&self, n: u64) {
        self.server.carried(self.kind).bytes.fetch_add(n, Relaxed);
    }

    /// The counter of this transfer's bytes, for a thread that carries
    /// them without the guard.
    pub fn byte_counter(&self) -> &AtomicU64 {
        &self.server.carried(self.kind).bytes
    }

    /// It failed on the server's side.
    pub fn failed(&self) {
        self.server
            .carried(self.kind)
            .failures
            .fetch_add(1, Relaxed);
    }
}

impl Drop for Transfer {
    fn drop(&mut self) {
        self.server.carried(self.kind).active.fetch_sub(1, Relaxed);
    }
}

/// How a file transfer through the balancer ended, for
/// `lbft_file_transfers_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Stored (an upload) or delivered whole (a download).
    Done,
    /// The server failed, refused, or no server could take it.
    Failed,
    /// The client left or broke the exchange.
    Abandoned,
}

impl Ended {
    const ALL: [Ended; 3] = [Ended::Done, Ended::Failed, Ended::Abandoned];

    fn name(self) -> &'static str {
        match self {
            Ended::Done => "done",
            Ended::Failed => "failed",
            Ended::Abandoned => "abandoned",
        }
    }
}

/// Counts one open client connection in `Stats`, as a client's until it
/// turns out to be a server's registrations and heartbeats; uncounted when
/// dropped.
#[derive(Debug)]
pub struct OpenConnection {
    stats: Arc<Stats>,
    server: AtomicBool,
}

impl OpenConnection {
    pub fn new(stats: &Arc<Stats>) -> OpenConnection {
        stats.connections.fetch_add(1, Relaxed);
        stats.accepted.fetch_add(1, Relaxed);
        OpenConnection {
            stats: stats.clone(),
            server: AtomicBool::new(false),
        }
    }

    /// It registers a server (or deregisters one, or reports a transfer
    /// for one): a member of the cluster, not a client.
    pub fn is_a_server(&self) {
        if !self.server.swap(true, Relaxed) {
            self.stats.connections.fetch_sub(1, Relaxed);
            self.stats.server_connections.fetch_add(1, Relaxed);
        }
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        if self.server.load(Relaxed) {
            self.stats.server_connections.fetch_sub(1, Relaxed);
        } else {
            self.stats.connections.fetch_sub(1, Relaxed);
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

/// Repair's figures (`--replicas`).
#[derive(Debug, Default)]
pub struct RepairCounters {
    /// Entries short of copies, as the last pass found them, less those
    /// it has copied since.
    pub left: AtomicU64,
    pub bytes: AtomicU64,
    pub copies: AtomicU64,
}

impl RepairCounters {
    pub fn view(&self) -> crate::proto::RepairView {
        crate::proto::RepairView {
            entries_left: self.left.load(Relaxed),
            copies_made: self.copies.load(Relaxed),
            bytes_copied: self.bytes.load(Relaxed),
        }
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
    /// Requests given up on while a server may hold them (`maybe_stored`):
    /// their outcome is unknown, so they are not counted failed.
    pub unknown: AtomicU64,
    /// Requests waiting for a server.
    pub queue_depth: AtomicU64,
    /// What repair (`--replicas`) has done and has left.
    pub repair: RepairCounters,
    /// Open connections of clients (see `OpenConnection`).
    pub connections: AtomicU64,
    /// Open connections on which servers register and send heartbeats.
    pub server_connections: AtomicU64,
    /// Connections accepted since the start.
    pub accepted: AtomicU64,
    /// Logins that succeeded (the failed ones are limit hits).
    pub logins: AtomicU64,
    /// File transfers through the balancer by kind and how they ended.
    transfers_ended: [[AtomicU64; 3]; 2],
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

    /// The counters of the server of that name (as `Backend::name`), or
    /// detached ones when none is in the pool.
    pub fn server_named(&self, name: &str) -> Arc<ServerStats> {
        read(&self.servers)
            .values()
            .find(|s| s.name == name)
            .cloned()
            .unwrap_or_default()
    }

    /// A file transfer through the balancer ended.
    pub fn transfer_ended(&self, kind: Kind, ended: Ended) {
        let row = usize::from(kind == Kind::Download);
        let column = Ended::ALL.iter().position(|e| *e == ended).unwrap_or(0);
        self.transfers_ended[row][column].fetch_add(1, Relaxed);
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
        let servers = self.all();
        let mut text = Exposition {
            out: String::new(),
            servers: &servers,
        };
        text.render_work();
        text.render_server_state();
        self.render_requests(&mut text);
        self.render_transfers(&mut text);
        self.render_connections(&mut text);
        self.render_logins(&mut text);
        let mut out = text.out;
        self.limits.render(&mut out);
        self.render_latency(&mut out);
        out
    }

    fn render_requests(&self, text: &mut Exposition) {
        text.scalar(
            "lbft_requests_received_total",
            "counter",
            "Documents and computations received from clients.",
            self.received.load(Relaxed),
        );
        text.scalar(
            "lbft_requests_failed_total",
            "counter",
            "Documents and computations answered with an error after queueing (no server, failed everywhere).",
            self.failed.load(Relaxed),
        );
        text.scalar(
            "lbft_requests_unknown_total",
            "counter",
            "Documents and computations given up on while a server may have carried them out (maybe_stored).",
            self.unknown.load(Relaxed),
        );
        text.scalar(
            "lbft_queue_depth",
            "gauge",
            "Requests waiting for a server.",
            self.queue_depth.load(Relaxed),
        );
        text.scalar(
            "lbft_repair_entries_left",
            "gauge",
            "Entries with fewer live copies than --replicas, at the last repair pass.",
            self.repair.left.load(Relaxed),
        );
        text.scalar(
            "lbft_repair_bytes_copied_total",
            "counter",
            "Bytes repair copied from server to server.",
            self.repair.bytes.load(Relaxed),
        );
    }

    fn render_transfers(&self, text: &mut Exposition) {
        let name = "lbft_file_transfers_total";
        text.head(
            name,
            "counter",
            "File transfers through the balancer that ended: done, failed (a server failed or refused, or none could take it) or abandoned (the client left).",
        );
        for (row, kind) in [Kind::Upload, Kind::Download].iter().enumerate() {
            for (column, ended) in Ended::ALL.iter().enumerate() {
                let _ = writeln!(
                    text.out,
                    "{name}{{kind=\"{}\",result=\"{}\"}} {}",
                    kind.name(),
                    ended.name(),
                    self.transfers_ended[row][column].load(Relaxed)
                );
            }
        }
    }

    fn render_connections(&self, text: &mut Exposition) {
        text.scalar(
            "lbft_client_connections",
            "gauge",
            "Open connections of clients (not servers' registrations and heartbeats).",
            self.connections.load(Relaxed),
        );
        text.scalar(
            "lbft_registration_connections",
            "gauge",
            "Open connections on which servers register and send heartbeats.",
            self.server_connections.load(Relaxed),
        );
        text.scalar(
            "lbft_connections_accepted_total",
            "counter",
            "Connections accepted (clients and servers' registrations).",
            self.accepted.load(Relaxed),
        );
    }

    fn render_logins(&self, text: &mut Exposition) {
        use super::limits::Limit;
        let name = "lbft_logins_total";
        text.head(
            name,
            "counter",
            "Logins (with --users) by result: ok, failed (wrong credentials), throttled, locked.",
        );
        for (result, count) in [
            ("ok", self.logins.load(Relaxed)),
            ("failed", self.limits.count(Limit::LoginFailed)),
            ("throttled", self.limits.count(Limit::LoginThrottled)),
            ("locked", self.limits.count(Limit::LoginLocked)),
        ] {
            let _ = writeln!(text.out, "{name}{{result=\"{result}\"}} {count}");
        }
    }

    fn render_latency(&self, out: &mut String) {
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
    }
}

/// Metric families being written out, with the servers they are labelled by.
struct Exposition<'a> {
    out: String,
    servers: &'a [Arc<ServerStats>],
}

impl Exposition<'_> {
    fn head(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn scalar(&mut self, name: &str, kind: &str, help: &str, value: u64) {
        self.head(name, kind, help);
        let _ = writeln!(self.out, "{name} {value}");
    }

    /// One series per server.
    fn per_server(
        &mut self,
        name: &str,
        kind: &str,
        help: &str,
        value: &dyn Fn(&ServerStats) -> String,
    ) {
        self.head(name, kind, help);
        for s in self.servers {
            let _ = writeln!(
                self.out,
                "{name}{{server=\"{}\"}} {}",
                escape_label(&s.name),
                value(s)
            );
        }
    }

    /// One series per server and kind of work.
    fn per_kind(
        &mut self,
        name: &str,
        kind: &str,
        help: &str,
        kinds: &[Kind],
        field: &dyn Fn(&Carried) -> &AtomicU64,
    ) {
        self.head(name, kind, help);
        for s in self.servers {
            for k in kinds {
                let _ = writeln!(
                    self.out,
                    "{name}{{server=\"{}\",kind=\"{}\"}} {}",
                    escape_label(&s.name),
                    k.name(),
                    field(s.carried(*k)).load(Relaxed)
                );
            }
        }
    }

    /// What each server carried, by kind of work.
    fn render_work(&mut self) {
        self.per_kind(
            "lbft_server_requests_total",
            "counter",
            "Work sent to the server: documents and computations forwarded (each attempt), file uploads and downloads begun.",
            &Kind::ALL,
            &|c| &c.started,
        );
        self.per_kind(
            "lbft_server_bytes_total",
            "counter",
            "Bytes carried to or from the server: document content acknowledged, file bytes relayed.",
            &[Kind::Document, Kind::Upload, Kind::Download],
            &|c| &c.bytes,
        );
        self.per_kind(
            "lbft_server_failures_total",
            "counter",
            "Work that failed on the server: an error answer, a broken connection, no answer in time, a transfer cut off.",
            &Kind::ALL,
            &|c| &c.failures,
        );
        self.per_kind(
            "lbft_server_transfers_active",
            "gauge",
            "File transfers under way through the balancer with the server.",
            &[Kind::Upload, Kind::Download],
            &|c| &c.active,
        );
    }

    /// Each server's retries, load and health.
    fn render_server_state(&mut self) {
        let n = |a: &AtomicU64| a.load(Relaxed).to_string();
        self.per_server(
            "lbft_server_retries_total",
            "counter",
            "Requests moved to another server after failing on this one.",
            &|s| n(&s.retries),
        );
        self.per_server(
            "lbft_server_in_flight",
            "gauge",
            "Documents and computations sent to the server and not yet answered.",
            &|s| n(&s.in_flight),
        );
        self.per_server(
            "lbft_server_up",
            "gauge",
            "1 when the server takes requests (up and not overloaded).",
            &|s| u8::from(s.state() == State::Up).to_string(),
        );
        self.per_server(
            "lbft_server_overloaded",
            "gauge",
            "1 when the server reports itself overloaded.",
            &|s| u8::from(s.state() == State::Overloaded).to_string(),
        );
        self.per_server(
            "lbft_server_check_seconds",
            "gauge",
            "Duration of the last status probe.",
            &|s| format!("{}", s.check_micros.load(Relaxed) as f64 / 1e6),
        );
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
        stats
            .server(ServerId(0))
            .carried(Kind::Document)
            .started
            .fetch_add(3, Relaxed);
        stats.server(ServerId(0)).set_state(State::Up);
        stats.queue_depth.store(2, Relaxed);
        stats.latency.observe(Duration::from_millis(3));
        stats.latency.observe(Duration::from_millis(700));
        stats.latency.observe(Duration::from_secs(60));
        let text = stats.render();
        assert!(
            text.contains(
                "lbft_server_requests_total{server=\"127.0.0.1:5001\",kind=\"document\"} 3\n"
            ),
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
    fn connections_are_counted_by_kind_and_transfers_while_under_way() {
        let stats = Arc::new(Stats::new(["s".to_string()]));
        let client = OpenConnection::new(&stats);
        let heartbeats = OpenConnection::new(&stats);
        heartbeats.is_a_server();
        heartbeats.is_a_server();
        let text = stats.render();
        assert!(text.contains("lbft_client_connections 1\n"), "{text}");
        assert!(text.contains("lbft_registration_connections 1\n"), "{text}");
        assert!(
            text.contains("lbft_connections_accepted_total 2\n"),
            "{text}"
        );
        drop((client, heartbeats));
        let text = stats.render();
        assert!(text.contains("lbft_client_connections 0\n"), "{text}");
        assert!(text.contains("lbft_registration_connections 0\n"), "{text}");

        let upload = stats.server_named("s").transfer(Kind::Upload);
        upload.bytes(10);
        upload.byte_counter().fetch_add(5, Relaxed);
        let text = stats.render();
        let series = "{server=\"s\",kind=\"upload\"}";
        assert!(text.contains(&format!("lbft_server_transfers_active{series} 1\n")));
        assert!(text.contains(&format!("lbft_server_bytes_total{series} 15\n")));
        upload.failed();
        drop(upload);
        stats.transfer_ended(Kind::Upload, Ended::Failed);
        let text = stats.render();
        assert!(text.contains(&format!("lbft_server_transfers_active{series} 0\n")));
        assert!(text.contains(&format!("lbft_server_failures_total{series} 1\n")));
        assert!(text.contains(&format!("lbft_server_requests_total{series} 1\n")));
        assert!(text.contains("lbft_file_transfers_total{kind=\"upload\",result=\"failed\"} 1\n"));
        assert_eq!(stats.views()[0].requests, 1);
        assert_eq!(stats.views()[0].failures, 1);
        // A server not in the pool: counted nowhere, and no harm done.
        stats.server_named("gone").transfer(Kind::Download).bytes(1);
        assert!(!stats.render().contains("gone"));
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
