use clap::Parser;
use lbft::auth::ClusterKey;
use lbft::cli::{parse_addr, parse_duration, parse_file_size, parse_size, KeyArgs, TlsArgs};
use lbft::net::tls::ClientCerts;
use lbft::server::registrar::{Registrar, RegistrarSettings};
use lbft::server::{Config, Server};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// Storage server: stores the documents the balancer forwards, one JSON file
/// each, at most once per request number, and reports its load to the
/// balancer's status probes; with --balancer it joins balancers' pools by
/// itself. Never deletes stored documents unless asked with --clean.
#[derive(Parser, Debug)]
#[command(
    version,
    after_help = "Example: server --port 5001   (stores into json_files/5001)"
)]
struct Args {
    /// Port to listen on, on 127.0.0.1.
    #[arg(long, conflicts_with = "listen")]
    port: Option<u16>,
    /// Address to listen on, HOST:PORT (port 0 picks a free port). Default 127.0.0.1:5001.
    #[arg(long, value_parser = parse_addr)]
    listen: Option<SocketAddr>,
    /// Storage folder. Default: json_files/<port>.
    #[arg(long, value_name = "PATH")]
    dir: Option<PathBuf>,
    /// Delete the documents already in the storage folder before starting.
    #[arg(long)]
    clean: bool,
    /// Sleep this long per character counted, to simulate a slow server.
    #[arg(long, default_value_t = 0, value_name = "MS")]
    char_delay_ms: u64,
    /// How documents stored together are made durable before their names
    /// appear: `syncfs`, one sync of the folder's whole file system per
    /// batch (under 8 documents: one fdatasync each), or `fdatasync`, one per
    /// document, the batch written out together first. Choose fdatasync
    /// when other programs keep the same file system busy with writes:
    /// syncfs writes out their data too, and waits for it.
    #[arg(long, default_value = "syncfs", value_name = "MODE")]
    sync: lbft::server::storage::SyncMode,
    /// Report overloaded when this many documents are being stored at once
    /// (well above the balancer's --max-in-flight, so that its own traffic
    /// does not count as overload).
    #[arg(long, default_value_t = lbft::server::DEFAULT_MAX_ACTIVE)]
    max_active: u64,
    /// Report overloaded when the process uses more memory than this.
    #[arg(long, default_value_t = 1024, value_name = "MB")]
    max_memory_mb: u64,
    /// Largest frame a client of the balancer may send (e.g. 8MiB); the
    /// server accepts 1 KiB more, the room a forwarded request needs.
    #[arg(long, default_value = "8MiB", value_parser = parse_size)]
    max_frame: usize,
    /// Close a connection that sends nothing for this long.
    #[arg(long, default_value = "300s", value_parser = parse_duration)]
    idle_timeout: Duration,
    /// Node id (0..=511) in the request numbers this server gives documents
    /// sent to it directly. Default: random, logged at start.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(0..=511))]
    server_id: Option<u16>,
    /// A frame must arrive whole within this once its length has: a peer
    /// sending a byte now and then (slowloris) is cut off. A new connection
    /// must send its first whole request within this of connecting.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    frame_timeout: Duration,
    /// Connections open at once. Past it a new connection takes the place
    /// of an idle one (first one that has sent no whole request, then the
    /// longest idle; those that proved the cluster key, as the balancer's
    /// links and probes do, last; never one at work); with every one at
    /// work, new ones wait in the listen backlog. Default: three quarters
    /// of the open-file limit.
    #[arg(long, value_name = "N")]
    max_connections: Option<usize>,
    /// Connections open at once from one IP address. Past it a new one
    /// from that address takes the place of an idle one of its own, or is
    /// refused if they are all at work. Default: half of --max-connections,
    /// so one address never holds more than half.
    #[arg(long, value_name = "N")]
    max_connections_per_ip: Option<usize>,
    /// Join these balancers' pools (comma separated): register, repeat it
    /// every --heartbeat, and on SIGINT/SIGTERM leave once the balancers
    /// have let the requests in flight finish.
    #[arg(long, value_delimiter = ',', value_name = "ADDR", value_parser = parse_addr)]
    balancer: Vec<SocketAddr>,
    /// How often to tell the balancers this server is still there.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    heartbeat: Duration,
    /// Also append log lines to this file.
    #[arg(long)]
    log_file: Option<PathBuf>,
    /// Partial uploads (kept so an interrupted file can resume) are removed
    /// after this long without new bytes.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    partial_ttl: Duration,
    /// Largest file an upload may announce (e.g. 20GiB); larger ones are
    /// refused `too_large` before any byte is written.
    #[arg(long, default_value = "1TiB", value_name = "SIZE", value_parser = parse_file_size)]
    max_file_size: u64,
    #[command(flatten)]
    key: KeyArgs,
    #[command(flatten)]
    tls: TlsArgs,
    /// On a TLS port (--tls-cert), serve balancers of the original format
    /// (which has no TLS) in plaintext instead of refusing them.
    #[arg(long)]
    allow_legacy_plaintext: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("server: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Joins the pools of the balancers given, if any.
fn register(
    args: &Args,
    advertise: SocketAddr,
    key: Option<ClusterKey>,
) -> Result<Option<Registrar>, lbft::Error> {
    if args.balancer.is_empty() {
        return Ok(None);
    }
    let settings = RegistrarSettings {
        advertise,
        heartbeat: args.heartbeat,
        timeout: Duration::from_secs(2),
        leave_timeout: Duration::from_secs(60),
        key,
    };
    Ok(Some(Registrar::start(&args.balancer, settings)?))
}

/// The server's settings from its arguments.
fn config(args: &Args, cluster_key: Option<ClusterKey>) -> Config {
    let defaults = Config::default();
    let listen = match (args.listen, args.port) {
        (Some(addr), _) => addr,
        (None, Some(port)) => SocketAddr::from(([127, 0, 0, 1], port)),
        (None, None) => defaults.listen,
    };
    let max_connections = args
        .max_connections
        .unwrap_or_else(lbft::net::default_max_connections);
    Config {
        listen,
        dir: args.dir.clone(),
        clean: args.clean,
        char_delay: Duration::from_millis(args.char_delay_ms),
        sync: args.sync,
        max_active: args.max_active,
        max_memory_mb: args.max_memory_mb,
        max_frame: args.max_frame,
        idle_timeout: args.idle_timeout,
        frame_timeout: args.frame_timeout,
        max_connections,
        max_connections_per_ip: args
            .max_connections_per_ip
            .unwrap_or_else(|| lbft::net::default_max_per_ip(max_connections)),
        server_id: args.server_id,
        partial_ttl: args.partial_ttl,
        max_file_size: args.max_file_size,
        cluster_key,
        ..defaults
    }
}

fn run(args: Args) -> Result<(), lbft::Error> {
    lbft::logging::init(args.log_file.as_deref())?;
    // Mutual TLS by default: a server's peers are cluster members.
    let listens_tls = args.tls.tls_cert.is_some();
    let has_ca = args.tls.tls_ca.is_some() || args.tls.tls_client_ca.is_some();
    let default_client_certs = if listens_tls && has_ca {
        ClientCerts::Required
    } else {
        ClientCerts::None
    };
    let tls = args.tls.install(
        default_client_certs,
        args.allow_legacy_plaintext,
        args.frame_timeout,
    )?;
    let cluster_key = args.key.load("this server")?;
    let server = Server::bind(config(&args, cluster_key.clone()))?;
    // Registered before the readiness line, so that a signal sent as soon
    // as it appears stops the server cleanly instead of killing it.
    let mut signals = Signals::new([SIGINT, SIGTERM])?;
    log::info!(
        "server {}: security: {}",
        server.local_addr(),
        [
            lbft::net::tls::Tls::describe(tls.as_ref()),
            args.key.describe(&cluster_key),
        ]
        .join("; ")
    );
    let handle = server.start()?;
    let registrar = register(&args, handle.addr(), cluster_key)?;
    println!(
        "listening on {}, storing into {}",
        handle.addr(),
        handle.storage_dir().display()
    );
    if let Some(signal) = signals.forever().next() {
        log::info!("server {}: signal {signal}, stopping", handle.addr());
    }
    // Leave the balancers' pools first: they stop sending and answer once
    // what they sent is done.
    if let Some(registrar) = registrar {
        registrar.leave();
    }
    handle.shutdown();
    handle.join()?;
    log::info!("server stopped");
    Ok(())
}
