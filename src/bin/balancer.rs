use clap::Parser;
use lbft::auth::ClusterKey;
use lbft::balancer::relay::Mode;
use lbft::balancer::store::Location;
use lbft::balancer::{Backend, BackendWire, Balancer, Config, Stopper};
use lbft::cli::{parse_addr, parse_duration, parse_file_size, parse_size, KeyArgs, TlsArgs};
use lbft::net::tls::ClientCerts;
use lbft::policy::PolicyKind;
use lbft::server;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// Load balancer: accepts documents from clients, queues them and spreads
/// them over the storage servers that are up, not overloaded and able to
/// store (round robin unless --policy says otherwise). Writes every event
/// to the log file.
#[derive(Parser, Debug)]
#[command(
    version,
    after_help = "Examples:\n  balancer --local-servers 3   (balancer plus three servers in one process)\n  \
                  balancer user add alice --admin   (then: balancer --users ...)"
)]
struct Args {
    /// Address to accept clients on, HOST:PORT (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:60002", value_parser = parse_addr)]
    listen: SocketAddr,
    /// Storage servers to use, HOST:PORT comma separated. Ignored with --local-servers.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "127.0.0.1:5001,127.0.0.1:5002,127.0.0.1:5003",
        value_parser = parse_addr
    )]
    servers: Vec<SocketAddr>,
    /// Protocol spoken to the servers: `framed` (ours, acknowledged) or
    /// `legacy` (the original Python servers: no acknowledgement, one-byte
    /// status probe).
    #[arg(long, value_enum, default_value_t = Wire::Framed)]
    backend_wire: Wire,
    /// Start this many storage servers inside this process instead.
    #[arg(long, value_name = "N")]
    local_servers: Option<u16>,
    /// First port of the local servers (they take consecutive ports); 0 picks free ports.
    #[arg(long, default_value_t = 5001, value_name = "PORT")]
    local_base_port: u16,
    /// Local servers store into <DIR>/<port>.
    #[arg(long, default_value = "json_files", value_name = "DIR")]
    storage_dir: PathBuf,
    /// Local servers sleep this long per character counted, to simulate load.
    #[arg(long, default_value_t = 0, value_name = "MS")]
    char_delay_ms: u64,
    /// Which server takes the next request: `round-robin` (in turn),
    /// `least-active` (fewest requests in flight) or `resources` (CPU,
    /// memory and disk from the status reports, and requests in flight).
    #[arg(long, value_enum, default_value_t = PolicyKind::RoundRobin)]
    policy: PolicyKind,
    /// How often each server is asked for its status.
    #[arg(long, default_value = "500ms", value_parser = parse_duration)]
    check_interval: Duration,
    /// Good status probes in a row that bring a down server back (a server
    /// never seen before is up at its first one).
    #[arg(long, default_value_t = 2, value_name = "N")]
    rise: u32,
    /// Failed status probes in a row that take a server down (a failed
    /// forward takes it down at once).
    #[arg(long, default_value_t = 2, value_name = "N")]
    fall: u32,
    /// Connect and read timeout of a status probe.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    probe_timeout: Duration,
    /// How long a request may wait while NO server can take work (all down
    /// or overloaded) before the client gets `no_server`. Waiting for busy
    /// servers that are up never fails.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    queue_timeout: Duration,
    /// How long a server may take to answer one request; a server must not
    /// store a document later than half of this after it was sent.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    server_timeout: Duration,
    /// A client silent (or stalled mid-frame) this long is disconnected.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    client_timeout: Duration,
    /// A frame must arrive whole within this once its length has: a peer
    /// sending a byte now and then (slowloris) is cut off. A new connection
    /// must send its first whole request within this of connecting.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    frame_timeout: Duration,
    /// Idle limit between documents for clients of the original format,
    /// which keep one connection open for a whole session (each document
    /// must still arrive within --frame-timeout once begun).
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    legacy_client_timeout: Duration,
    /// Forwards of one document that may reach a server before giving up.
    #[arg(long, default_value_t = 3)]
    max_attempts: u32,
    /// Requests on the wire to one server at once; more wait in the queue.
    #[arg(long, default_value_t = 256)]
    max_in_flight: usize,
    /// Connections to each server, each carrying many requests at once
    /// (pipelined; the server answers them in any order).
    #[arg(long, default_value_t = 2, value_name = "N")]
    server_connections: usize,
    /// Largest frame accepted (e.g. 8MiB).
    #[arg(long, default_value = "8MiB", value_parser = parse_size)]
    max_frame: usize,
    /// Payload bytes all clients together may have queued or in flight; at
    /// the limit the balancer stops reading from clients until some are done.
    #[arg(long, default_value = "256MiB", value_parser = parse_size)]
    max_queued_bytes: usize,
    /// Largest document content a client may send (e.g. 1MiB); a larger
    /// one is answered `too_large`. Default: whatever fits in --max-frame.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    max_document_size: Option<usize>,
    /// Largest file an upload may announce (e.g. 20GiB); a larger one is
    /// answered `too_large` before any byte is sent.
    #[arg(long, default_value = "1TiB", value_name = "SIZE", value_parser = parse_file_size)]
    max_file_size: u64,
    /// Copies of each document and file, each on a different server. A
    /// document is acknowledged once that many servers hold it durably;
    /// with fewer servers up, new documents are refused (`too_few_servers`)
    /// unless --min-replicas allows fewer. 1: one copy, as before.
    #[arg(long, default_value_t = 1, value_name = "N")]
    replicas: usize,
    /// With fewer than --replicas servers up, store this many copies at
    /// least (the document is acknowledged `under_replicated`, and repair
    /// makes the rest later). Default: --replicas (refuse instead).
    #[arg(long, value_name = "M")]
    min_replicas: Option<usize>,
    /// A server down this long has its copies made again on other servers
    /// (`admin remove` and `admin repair` start a repair at once).
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    repair_after: Duration,
    /// Bytes per second a repair copies at most (e.g. 50MiB); default: no
    /// limit.
    #[arg(long, value_name = "SIZE", value_parser = parse_file_size)]
    repair_rate: Option<u64>,
    /// Requests one client connection may have queued or in flight; at the
    /// limit the balancer stops reading that connection (TCP slows the
    /// client down; nothing fails).
    #[arg(long, default_value_t = 1024, value_name = "N")]
    client_window: usize,
    /// On SIGINT/SIGTERM, how long to finish queued and in-flight requests
    /// before answering the rest `shutting_down`.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    drain_timeout: Duration,
    /// Client connections open at once. Past it a new connection takes the
    /// place of an idle one (first one that has sent no whole request, then
    /// the longest idle; logged-in users and servers last; never one at
    /// work); with every one at work, new ones wait in the listen backlog.
    /// Default: three quarters of the open-file limit.
    #[arg(long, value_name = "N")]
    max_connections: Option<usize>,
    /// Client connections open at once from one IP address. Past it a new
    /// one from that address takes the place of an idle one of its own, or
    /// is refused if they are all at work. Default: half of
    /// --max-connections, so one address never holds more than half.
    #[arg(long, value_name = "N")]
    max_connections_per_ip: Option<usize>,
    /// This balancer's id (0-511) inside request numbers, so that several
    /// balancers in front of the same servers never give the same number.
    /// Default: with --state postgres://..., one leased from the shared
    /// database (unique among the balancers using it); else random. Logged
    /// at start.
    #[arg(long, value_name = "ID")]
    balancer_id: Option<u16>,
    /// Serve Prometheus metrics on this address (GET /metrics).
    #[arg(long, value_name = "ADDR", value_parser = parse_addr)]
    metrics: Option<SocketAddr>,
    /// Log file, appended to.
    #[arg(long, global = true, default_value = "loadbalancer.log")]
    log_file: PathBuf,
    /// Where the state is kept: every transfer (see `client transfers`),
    /// the servers that joined the pool, the users (--users) and the file
    /// catalog, across restarts. A PATH is a SQLite file of this
    /// balancer's (default: balancer.db next to the log file);
    /// postgres://USER@HOST[:PORT]/DB is a PostgreSQL database that several
    /// balancers share, acting as one service. Its password comes from the
    /// URL, --state-password-file or PGPASSWORD, and is never shown.
    #[arg(long, global = true, value_name = "PATH|URL")]
    state: Option<String>,
    /// A file whose first line is the password of --state postgres://...
    /// (when the URL has none; else PGPASSWORD is used).
    #[arg(long, global = true, value_name = "PATH")]
    state_password_file: Option<PathBuf>,
    /// Record no transfers and remember no pool (no state file).
    #[arg(long, conflicts_with = "state")]
    no_state: bool,
    /// How clients upload files: `proxy` (through the balancer, which
    /// relays every chunk) or `redirect` (the balancer picks a server and
    /// answers with its address and a signed ticket; the client uploads
    /// straight to it). Redirect needs --cluster-key-file, or
    /// --local-servers (which share a key made at start).
    #[arg(long, value_enum, default_value_t = UploadMode::Proxy)]
    mode: UploadMode,
    #[command(flatten)]
    key: KeyArgs,
    /// How long a redirect ticket is valid.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    ticket_ttl: Duration,
    /// Clients must log in (client --user NAME): users are managed with
    /// `balancer user add|remove|list` and kept in the state file. A user
    /// sees only their own transfers; `servers` and the admin requests
    /// need an admin user.
    #[arg(long, conflicts_with = "no_state")]
    users: bool,
    /// Failed logins in a row that lock an account, with --users (0: never
    /// lock). Attempts on an account, or from an address that failed, wait
    /// 0.5 s, 1 s, 2 s... up to 8 s between them in any case.
    #[arg(long, default_value_t = 10, value_name = "N")]
    login_lock_after: u32,
    /// How long a locked account refuses every login, the right password
    /// included; `balancer user unlock NAME` lifts it sooner.
    #[arg(long, default_value = "15m", value_parser = parse_duration, value_name = "DURATION")]
    login_lock_for: Duration,
    /// With --backend-wire legacy: drive original servers anyway, which
    /// cannot prove the cluster key (the key then guards registrations
    /// only). Logged as a warning at start.
    #[arg(long)]
    allow_unauthenticated_legacy: bool,
    #[command(flatten)]
    tls: TlsArgs,
    /// On a TLS port (--tls-cert), serve clients of the original format
    /// (which has no TLS) in plaintext instead of refusing them.
    #[arg(long)]
    allow_legacy_plaintext: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Subcommand, Debug)]
enum UserAction {
    /// Add a user, or set an existing user's password (at least 8
    /// characters). The password is asked for without echo on a terminal,
    /// or read as one line from standard input otherwise (for scripts).
    Add {
        /// 1 to 64 letters, digits, -, _, . or @.
        name: String,
        /// May list and manage the servers, and sees every transfer.
        #[arg(long)]
        admin: bool,
    },
    /// Remove a user (their transfers stay in the history).
    Remove {
        /// The user to remove.
        name: String,
    },
    /// Lift the lock that too many failed logins put on a user (a
    /// running balancer sees it at the next login).
    Unlock {
        /// The user to unlock.
        name: String,
    },
    /// List the users, and which are locked.
    List,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq)]
enum UploadMode {
    Proxy,
    Redirect,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Write a local CA and certificates signed by it for a test
    /// deployment: ca.pem, ca-key.pem, balancer.pem, server1.pem ...
    /// serverN.pem and client.pem, each with its -key.pem (mode 0600),
    /// valid for 127.0.0.1, ::1 and localhost plus --hosts.
    GenCerts {
        /// Folder to write into (created if missing; files are replaced).
        dir: PathBuf,
        /// How many server certificates to make.
        #[arg(long, default_value_t = 3, value_name = "N")]
        servers: u16,
        /// More addresses or names the certificates are valid for, comma
        /// separated. Peers are verified by IP address: list the IP
        /// addresses the programs connect to.
        #[arg(long, value_delimiter = ',', value_name = "HOST")]
        hosts: Vec<String>,
    },
    /// Manage the users who may log in (balancer --users), in the state
    /// file (--state).
    #[command(subcommand)]
    User(UserAction),
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum Wire {
    Framed,
    Legacy,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(Command::User(action)) = &args.command {
        return match manage_users(&args, action) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("balancer: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(Command::GenCerts {
        dir,
        servers,
        hosts,
    }) = &args.command
    {
        return match lbft::net::tls::certs::generate(dir, *servers, hosts) {
            Ok(written) => {
                for file in written.files {
                    println!("wrote {}", file.display());
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("balancer: {e}");
                ExitCode::FAILURE
            }
        };
    }
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("balancer: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), lbft::Error> {
    lbft::logging::init(Some(&args.log_file))?;
    let tls = install_tls(&args)?;
    let cluster_key = cluster_key(&args)?;
    if args.allow_unauthenticated_legacy && matches!(args.backend_wire, Wire::Legacy) {
        log::warn!(
            "--allow-unauthenticated-legacy: the original-format servers cannot prove the \
             cluster key; anyone at their addresses gets documents"
        );
    }
    log::info!(
        "security: {}; {}; {}",
        lbft::net::tls::Tls::describe(tls.as_ref()),
        args.key.describe(&cluster_key),
        if args.users {
            "users must log in (--users)"
        } else {
            "no logins (anyone who reaches the listener may send; admin requests need the cluster key)"
        }
    );
    // The local servers run for as long as their handles live.
    let (servers, local_servers) = match args.local_servers {
        Some(n) => start_local_servers(&args, n, &cluster_key)?,
        None => (
            args.servers.iter().copied().map(Backend::new).collect(),
            Vec::new(),
        ),
    };
    let balancer = Balancer::bind(config(&args, servers, cluster_key)?)?;
    let metrics = balancer.metrics_addr()?;
    let handle = balancer.start()?;
    let (signals, signal_thread) = on_signal(handle.stopper())?;
    if let Some(addr) = metrics {
        println!("metrics listening on {addr}");
    }
    println!("listening on {}", handle.addr());
    handle.join();
    // Local servers stop after the balancer has drained into them.
    for server in &local_servers {
        server.shutdown();
    }
    for server in local_servers {
        server.join()?;
    }
    signals.close();
    let _ = signal_thread.join();
    Ok(())
}

/// TLS as the flags ask, checked against the other flags.
fn install_tls(args: &Args) -> Result<Option<lbft::net::tls::Tls>, lbft::Error> {
    // Clients check the balancer and log in; asking them for certificates
    // is a choice of its own (--tls-client-certs required).
    let tls = args.tls.install(
        ClientCerts::None,
        args.allow_legacy_plaintext,
        args.frame_timeout,
    )?;
    if let (Some(tls), Some(_)) = (&tls, args.local_servers) {
        // The in-process servers listen with this process's certificate
        // and are reached with its CA: both or neither.
        if tls.accepts() != tls.connects() {
            return Err(lbft::Error::Config(
                "--local-servers with TLS needs --tls-cert, --tls-key and --tls-ca together: \
                 the local servers present the balancer's certificate and the balancer \
                 verifies them against the CA"
                    .into(),
            ));
        }
    }
    if tls.as_ref().is_some_and(|t| t.connects()) && matches!(args.backend_wire, Wire::Legacy) {
        log::warn!(
            "--backend-wire legacy: servers of the original format are reached in plaintext"
        );
    }
    if tls.as_ref().is_some_and(|t| t.accepts() && !t.connects()) && args.local_servers.is_none() {
        log::warn!(
            "clients reach this balancer over TLS, but it reaches its servers in plaintext: \
             give it --tls-ca to check them (and the servers --tls-cert/--tls-key)"
        );
    }
    Ok(tls)
}

/// The cluster key: from its file; generated for in-process servers in
/// redirect mode; none with --no-cluster-key (not in redirect mode).
fn cluster_key(args: &Args) -> Result<Option<ClusterKey>, lbft::Error> {
    Ok(
        match (
            args.key.load("this balancer")?,
            args.mode,
            args.local_servers,
        ) {
            (Some(key), _, _) => Some(key),
            // In-process servers share a key that needs no file.
            (None, UploadMode::Redirect, Some(_)) => Some(ClusterKey::generate()),
            (None, UploadMode::Redirect, None) => {
                return Err(lbft::Error::Config(
                    "--mode redirect signs upload tickets with the cluster key: it cannot go \
                 with --no-cluster-key"
                        .into(),
                ))
            }
            (None, UploadMode::Proxy, _) => None,
        },
    )
}

/// The balancer's settings from the flags.
fn config(
    args: &Args,
    servers: Vec<Backend>,
    cluster_key: Option<ClusterKey>,
) -> Result<Config, lbft::Error> {
    let (max_connections, max_connections_per_ip) = connection_caps(args);
    Ok(Config {
        listen: args.listen,
        servers,
        remember_servers: args.local_servers.is_none(),
        backend_wire: match args.backend_wire {
            Wire::Framed => BackendWire::Framed,
            Wire::Legacy => BackendWire::Legacy,
        },
        check_interval: args.check_interval,
        probe_timeout: args.probe_timeout,
        queue_timeout: args.queue_timeout,
        server_timeout: args.server_timeout,
        client_timeout: args.client_timeout,
        frame_timeout: args.frame_timeout,
        legacy_client_timeout: args.legacy_client_timeout,
        max_attempts: args.max_attempts,
        max_in_flight: args.max_in_flight,
        server_connections: args.server_connections,
        max_frame: args.max_frame,
        max_queued_bytes: args.max_queued_bytes,
        client_window: args.client_window,
        drain_timeout: args.drain_timeout,
        max_connections,
        max_connections_per_ip,
        balancer_id: args.balancer_id,
        metrics: args.metrics,
        policy: args.policy,
        rise: args.rise,
        fall: args.fall,
        state: state_location(args)?,
        mode: match args.mode {
            UploadMode::Proxy => Mode::Proxy,
            UploadMode::Redirect => Mode::Redirect,
        },
        cluster_key,
        ticket_ttl: args.ticket_ttl,
        allow_unauthenticated_legacy: args.allow_unauthenticated_legacy,
        users: args.users,
        logins: lbft::balancer::logins::Settings {
            lock_after: args.login_lock_after,
            lock_for: args.login_lock_for,
            ..Default::default()
        },
        max_document_size: args.max_document_size,
        max_file_size: args.max_file_size,
        replicas: replicas(args),
        repair: lbft::balancer::repair::RepairSettings {
            after: args.repair_after,
            rate: args.repair_rate,
        },
    })
}

/// `--max-connections` and `--max-connections-per-ip`, or their defaults.
fn connection_caps(args: &Args) -> (usize, usize) {
    let max = args
        .max_connections
        .unwrap_or_else(lbft::net::default_max_connections);
    let per_ip = args
        .max_connections_per_ip
        .unwrap_or_else(|| lbft::net::default_max_per_ip(max));
    (max, per_ip)
}

/// `--replicas` and `--min-replicas` (by default as many).
fn replicas(args: &Args) -> lbft::balancer::replicas::Replicas {
    lbft::balancer::replicas::Replicas {
        target: args.replicas,
        min: args.min_replicas.unwrap_or(args.replicas),
    }
}

/// `balancer user list`: each user, whether an admin, whether locked.
fn print_users(path: &Location) -> Result<(), lbft::Error> {
    let all = lbft::balancer::users::list(path)?;
    if all.is_empty() {
        println!("no users in {}", path.name());
    }
    let now_ms = lbft::text::now_ms();
    for user in all {
        let locked = user.locked_for(now_ms).map(|left| {
            format!(
                "  (locked for {} more min: balancer user unlock {})",
                left.as_secs().div_ceil(60),
                user.name
            )
        });
        println!(
            "{}{}{}",
            user.name,
            if user.admin { "  (admin)" } else { "" },
            locked.unwrap_or_default()
        );
    }
    Ok(())
}

/// `--state` read: `None` with --no-state.
fn state_location(args: &Args) -> Result<Option<Location>, lbft::Error> {
    if args.no_state {
        return Ok(None);
    }
    let text = match &args.state {
        Some(text) => text.clone(),
        None => args
            .log_file
            .with_file_name("balancer.db")
            .display()
            .to_string(),
    };
    let env = std::env::var("PGPASSWORD").ok();
    let location = Location::parse(&text, args.state_password_file.as_deref(), env)
        .map_err(|e| lbft::Error::Config(e.to_string()))?;
    Ok(Some(location))
}

/// `balancer user add|remove|list`.
fn manage_users(args: &Args, action: &UserAction) -> Result<(), lbft::Error> {
    use lbft::balancer::users;
    let Some(path) = state_location(args)? else {
        return Err(lbft::Error::Config(
            "users live in the state file: --no-state leaves nowhere to keep them".into(),
        ));
    };
    match action {
        UserAction::Add { name, admin } => {
            users::check_name(name).map_err(lbft::Error::Config)?;
            let password = read_password(name)?;
            let new = users::add(&path, name, &password, *admin)?;
            println!(
                "{} {name}{} in {}",
                if new { "added" } else { "updated" },
                if *admin { " (admin)" } else { "" },
                path.name()
            );
        }
        UserAction::Remove { name } => {
            if users::remove(&path, name)? {
                println!("removed {name} from {}", path.name());
            } else {
                return Err(lbft::Error::Config(format!(
                    "no user {name} in {}",
                    path.name()
                )));
            }
        }
        UserAction::Unlock { name } => match users::unlock(&path, name)? {
            users::Unlocked::WasLocked => println!("unlocked {name} in {}", path.name()),
            users::Unlocked::WasNotLocked => println!("{name} was not locked"),
            users::Unlocked::NoSuchUser => {
                return Err(lbft::Error::Config(format!(
                    "no user {name} in {}",
                    path.name()
                )))
            }
        },
        UserAction::List => print_users(&path)?,
    }
    Ok(())
}

/// A new password: asked twice without echo on a terminal, else one line
/// of standard input.
fn read_password(name: &str) -> Result<String, lbft::Error> {
    use std::io::{BufRead, IsTerminal};
    let io = |e: std::io::Error| lbft::Error::Config(format!("cannot read the password: {e}"));
    if std::io::stdin().is_terminal() {
        let first = rpassword::prompt_password(format!("password for {name}: ")).map_err(io)?;
        let again = rpassword::prompt_password("again: ").map_err(io)?;
        if first != again {
            return Err(lbft::Error::Config("the passwords differ".into()));
        }
        return Ok(first);
    }
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line).map_err(io)?;
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

/// SIGINT or SIGTERM starts a clean shutdown; a second one ends the process
/// at once.
fn on_signal(
    stopper: Stopper,
) -> Result<(signal_hook::iterator::Handle, std::thread::JoinHandle<()>), lbft::Error> {
    let mut signals = Signals::new([SIGINT, SIGTERM])?;
    let handle = signals.handle();
    let thread = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut seen = 0;
            for signal in signals.forever() {
                seen += 1;
                if seen > 1 {
                    log::warn!("second signal {signal}: exiting without draining");
                    std::process::exit(130);
                }
                log::info!("signal {signal}: shutting down (again to exit at once)");
                stopper.shutdown();
            }
        })?;
    Ok((handle, thread))
}

fn start_local_servers(
    args: &Args,
    n: u16,
    cluster_key: &Option<ClusterKey>,
) -> Result<(Vec<Backend>, Vec<server::ServerHandle>), lbft::Error> {
    if n == 0 {
        return Err(lbft::Error::Config(
            "--local-servers needs at least 1".into(),
        ));
    }
    let mut backends = Vec::new();
    let mut handles = Vec::new();
    for i in 0..n {
        let port = match args.local_base_port {
            0 => 0,
            base => base.checked_add(i).ok_or_else(|| {
                lbft::Error::Config(format!(
                    "--local-base-port {base} leaves no room for {n} servers"
                ))
            })?,
        };
        let listen = SocketAddr::new(args.listen.ip(), port);
        let server = server::Server::bind(server::Config {
            listen,
            storage_root: args.storage_dir.clone(),
            char_delay: Duration::from_millis(args.char_delay_ms),
            max_frame: args.max_frame,
            max_file_size: args.max_file_size,
            cluster_key: cluster_key.clone(),
            ..server::Config::default()
        })?;
        let addr = server.local_addr();
        println!(
            "storage server listening on {addr}, storing into {}",
            server.storage_dir().display()
        );
        handles.push(server.start()?);
        backends.push(Backend::new(addr));
    }
    Ok((backends, handles))
}
