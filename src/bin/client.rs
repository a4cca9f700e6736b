use clap::{Parser, Subcommand};
use crossbeam_channel::Sender;
use lbft::cli::{parse_addr, parse_count, parse_duration, parse_size, TlsArgs};
use lbft::client::admin::AdminCommand;
use lbft::client::status::StatusOptions;
use lbft::client::transfers::TransfersOptions;
use lbft::client::{self, Config};
use lbft::proto::ListKind;
use signal_hook::consts::SIGINT;
use signal_hook::iterator::{Handle, Signals};
use std::io::{self, IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::thread::JoinHandle;
use std::time::Duration;

/// Client: sends documents to the balancer and shows where each one was
/// stored. Without a command it starts an interactive prompt (commands FTP,
/// CALC, help and exit). Results are printed as they arrive, in the order
/// the servers finish them; batches of more than 50 show progress and list
/// only the documents not stored (failed, unknown, not sent). At most
/// --window requests are unanswered at a time, so any count runs in the
/// same memory. Ctrl-C stops a batch with a summary of what was done (exit
/// code 130). Exits 0 only when every document was stored (or every
/// computation done): a failed, unknown (the connection closed before its
/// answer) or unsent one makes the exit code 1. Output into a pipe that
/// closes early ends the client quietly, with exit code 0.
#[derive(Parser, Debug)]
#[command(
    version,
    after_help = "Example: client ftp 20   (with a balancer started by `balancer --local-servers 3`)"
)]
struct Args {
    /// Balancer address, HOST:PORT; or several, comma-separated
    /// (A,B): documents go to the first that answers and, if it fails in
    /// the middle of a batch, on through the next, each document stored
    /// once (ftp, send and the prompt; other commands use the first).
    #[arg(long, global = true, default_value = "127.0.0.1:60002", value_parser = parse_addr,
          value_delimiter = ',', value_name = "HOST:PORT[,HOST:PORT...]")]
    balancer: Vec<SocketAddr>,
    /// Folder of sample documents picked by `ftp`.
    #[arg(long, global = true, default_value = "file", value_name = "DIR")]
    documents: PathBuf,
    /// How long to wait for each reply.
    #[arg(long, global = true, default_value = "60s", value_parser = parse_duration)]
    timeout: Duration,
    /// Requests sent and not yet answered, at most (ftp, send, calc).
    #[arg(long, global = true, default_value_t = client::DEFAULT_WINDOW,
          value_parser = parse_window)]
    window: usize,
    /// The balancer's largest frame (its --max-frame): a document whose
    /// request is larger is not sent.
    #[arg(long, global = true, default_value = "8MiB", value_parser = parse_size)]
    max_frame: usize,
    /// Connect with TLS, verifying the balancer's certificate against this
    /// CA (PEM); the certificate must name the balancer's IP address.
    #[arg(long, global = true, value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// Certificate (PEM) to present to a balancer that asks for client
    /// certificates (one started with --tls-client-certs). Needs --tls-key
    /// and --tls-ca.
    #[arg(long, global = true, value_name = "FILE", requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, global = true, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// The cluster key (the file the balancer uses): `admin add`, `drain`
    /// and `remove` prove it to a balancer that has no users (--users),
    /// where they are an operator's acts. Read only when it exists.
    #[arg(
        long,
        global = true,
        value_name = "FILE",
        default_value = "cluster.key"
    )]
    cluster_key_file: PathBuf,
    /// Log in as this user (balancers started with --users). The password
    /// comes from the FTP_PASSWORD environment variable; without it, from
    /// the first line of standard input when that is not a terminal
    /// (`echo "$PW" | client --user NAME ...`); else it is asked for.
    #[arg(long, global = true, value_name = "NAME")]
    user: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Send N documents picked at random from the documents folder.
    Ftp {
        #[arg(value_parser = parse_count)]
        count: u64,
    },
    /// Send files. A .json file goes as a document: one that is not a
    /// document ({"titolo": ..., "contenuto": ...}) is reported with its
    /// reason and not sent, unless --file. Any other file (binary
    /// included, any size) is streamed in chunks with a SHA-256 checksum
    /// the server verifies, and resumes by itself if the connection, the
    /// balancer or the server breaks (on another server if that one is
    /// gone). A file of a name you sent before replaces it once stored.
    /// After Ctrl-C or a crash, the same command resumes where it stopped.
    Send {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Send .json files as plain files, documents or not.
        #[arg(long)]
        file: bool,
        /// Refuse a file whose name you already have a file of, instead of
        /// replacing it.
        #[arg(long)]
        no_clobber: bool,
    },
    /// List the files and documents in the balancer's catalog (name, size,
    /// server, time, SHA-256; a file whose server is down is shown
    /// unavailable), or the files on one server with --server.
    List {
        /// Ask this server directly instead of the balancer.
        #[arg(long, value_name = "ADDR", value_parser = parse_addr)]
        server: Option<SocketAddr>,
        /// Only files.
        #[arg(long, conflicts_with = "docs")]
        files: bool,
        /// Only documents.
        #[arg(long)]
        docs: bool,
    },
    /// Download a stored file, by the name it was sent with, from a server
    /// that holds it, verified by its checksum. An interrupted download
    /// resumes from <OUTPUT>.part.
    Get {
        name: String,
        /// Where to write it (default: NAME in the current folder).
        #[arg(short = 'o', long, value_name = "PATH")]
        output: Option<PathBuf>,
        /// Ask this server directly instead of the balancer.
        #[arg(long, value_name = "ADDR", value_parser = parse_addr)]
        server: Option<SocketAddr>,
        /// Whose file (an admin, when several users have one of that name).
        #[arg(long, value_name = "USER")]
        owner: Option<String>,
    },
    /// Delete a stored file: its bytes on the servers and its catalog
    /// entry (recorded in `transfers`). Your own files; an admin's, anyone's.
    Delete {
        name: String,
        /// Whose file (an admin, when several users have one of that name).
        #[arg(long, value_name = "USER")]
        owner: Option<String>,
    },
    /// Send N compute requests, each with an operation drawn at random
    /// (somma, sottrazione, moltiplicazione, divisione).
    Calc {
        #[arg(value_parser = parse_count)]
        count: u64,
    },
    /// Show every server known to the balancer: health, CPU, memory, disk,
    /// network, uptime, active transfers, files stored.
    Status {
        /// Refresh the table every --interval; averages every 10 samples.
        #[arg(long)]
        watch: bool,
        /// Time between samples with --watch.
        #[arg(long, default_value = "2s", value_parser = parse_duration)]
        interval: Duration,
        /// Stop after this many samples (default: once, or forever with --watch).
        #[arg(long)]
        count: Option<u64>,
        /// Append every sample to this file, one JSON object per line
        /// (created if missing). Without it nothing is written.
        #[arg(long, value_name = "FILE")]
        history: Option<PathBuf>,
    },
    /// The balancer's pool of servers: list, add, drain, remove.
    Admin {
        #[command(subcommand)]
        command: Admin,
    },
    /// Show recent transfers from the balancer's state file, newest first:
    /// number, state, title, server(s), size, duration, age.
    Transfers {
        /// Only transfers not finished yet (queued, sending, retried).
        #[arg(long)]
        active: bool,
        /// Only failed transfers.
        #[arg(long)]
        failed: bool,
        /// Only transfers received within this long (e.g. 10m).
        #[arg(long, value_parser = parse_duration)]
        since: Option<Duration>,
        /// At most this many (default 100, at most 10000).
        #[arg(long, value_name = "N", value_parser = parse_limit)]
        limit: Option<u32>,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum Admin {
    /// One row per server: id, address, state, in flight, requests,
    /// failures, files stored, last check.
    Servers,
    /// Add a server to the pool (it takes work once a status check answers).
    Add { addr: String },
    /// No new work for the server; it leaves once its requests are done.
    Drain { addr: String },
    /// Take the server out now; its requests in flight go to other servers
    /// (with --replicas, repair makes its copies again elsewhere).
    Remove { addr: String },
    /// With --replicas: make the copies lost on servers that are down or
    /// removed again now, from the copies left (`status` shows progress).
    Repair,
}

fn parse_limit(s: &str) -> Result<u32, String> {
    let max = lbft::proto::MAX_TRANSFERS_LIMIT;
    match s.parse::<u64>() {
        Ok(n) if (1..=u64::from(max)).contains(&n) => Ok(n as u32),
        Ok(n) if n > u64::from(max) => Err(format!(
            "{n} is more than the balancer shows at once: at most {max}"
        )),
        _ => Err(format!("`{s}` is not a whole number from 1 to {max}")),
    }
}

fn parse_window(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("`{s}` is not a whole number of at least 1")),
    }
}

/// Ctrl-C during a batch is handed to the batch, which stops with a
/// summary; when no batch takes it (at the prompt, during `status`) the
/// client exits 130 at once, as it would without a handler.
fn on_interrupt(batch: Sender<()>) -> io::Result<(Handle, JoinHandle<()>)> {
    let mut signals = Signals::new([SIGINT])?;
    let handle = signals.handle();
    let thread = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for _ in signals.forever() {
                // A batch waiting for answers takes it at once; the bound
                // only covers a batch busy between two answers.
                if batch.send_timeout((), Duration::from_millis(500)).is_err() {
                    std::process::exit(130);
                }
            }
        })?;
    Ok((handle, thread))
}

fn main() -> ExitCode {
    let mut args = Args::parse();
    let tls = TlsArgs {
        tls_cert: args.tls_cert.clone(),
        tls_key: args.tls_key.clone(),
        tls_ca: args.tls_ca.clone(),
        ..TlsArgs::default()
    };
    // The handshake deadline applies to listeners only; the client has none.
    if let Err(e) = tls.install(Default::default(), false, Duration::from_secs(30)) {
        eprintln!("client: {e}");
        return ExitCode::FAILURE;
    }
    // Zero capacity: a Ctrl-C reaches a batch that is running, or nobody.
    let (interrupt_tx, interrupt) = crossbeam_channel::bounded(0);
    let signals = match on_interrupt(interrupt_tx) {
        Ok(signals) => Some(signals),
        Err(e) => {
            eprintln!("client: Ctrl-C will stop without a summary: {e}");
            None
        }
    };
    let command = args.command.take();
    let Some(config) = config(args, interrupt) else {
        return ExitCode::FAILURE;
    };
    let mut out = io::stdout().lock();
    let result = run(command, &config, &mut out);
    let _ = out.flush();
    drop(out);
    if let Some((handle, thread)) = signals {
        handle.close();
        let _ = thread.join();
    }
    exit_code(result)
}

/// The client's settings from its arguments; `None` (said why) when the
/// password cannot be read.
fn config(args: Args, interrupt: crossbeam_channel::Receiver<()>) -> Option<Config> {
    let login = match args.user.clone().map(client::login::Credentials::for_user) {
        None => None,
        Some(Ok(credentials)) => Some(credentials),
        Some(Err(e)) => {
            eprintln!(
                "client: cannot read the password ({e}); set {} or pipe it in to give it",
                client::login::PASSWORD_VAR
            );
            return None;
        }
    };
    Some(Config {
        login,
        cluster_key_file: Some(args.cluster_key_file.clone()),
        balancer: args.balancer[0],
        fallbacks: args.balancer[1..].to_vec(),
        documents: args.documents,
        reply_timeout: args.timeout,
        window: args.window,
        max_frame: args.max_frame,
        terminal: io::stdout().is_terminal(),
        interrupt: Some(interrupt),
        ..Config::default()
    })
}

/// Runs one command (none: the interactive prompt). True when all of it
/// went well.
fn run(
    command: Option<Command>,
    config: &Config,
    out: &mut impl Write,
) -> Result<bool, client::Error> {
    // A table: one arm per command, each handing its options over.
    match command {
        None => client::interactive(config, &mut io::stdin().lock(), out),
        Some(Command::Ftp { count }) => client::ftp(config, count, out),
        Some(Command::Send {
            paths,
            file,
            no_clobber,
        }) => {
            let options = client::files::SendOptions { no_clobber };
            client::send_paths(config, paths, file, options, out)
        }
        Some(Command::List {
            server,
            files,
            docs,
        }) => client::files::list(config, server, list_kind(files, docs), out),
        Some(Command::Get {
            name,
            output,
            server,
            owner,
        }) => {
            let options = client::files::GetOptions {
                output,
                server,
                owner,
            };
            client::files::get(config, &name, options, out).map(|_| true)
        }
        Some(Command::Delete { name, owner }) => client::files::delete(config, &name, owner, out),
        Some(Command::Calc { count }) => client::calc(config, count, out),
        Some(Command::Status {
            watch,
            interval,
            count,
            history,
        }) => {
            let options = StatusOptions {
                watch,
                interval,
                count,
                history,
            };
            client::status::run(config, &options, out)
        }
        Some(Command::Admin { command }) => client::admin::run(config, &command.into(), out),
        Some(Command::Transfers {
            active,
            failed,
            since,
            limit,
            json,
        }) => {
            let options = TransfersOptions {
                active,
                failed,
                since,
                limit,
                json,
            };
            client::transfers::run(config, &options, out)
        }
    }
}

/// What `list --files` / `--docs` asks for (neither: both).
fn list_kind(files: bool, docs: bool) -> Option<ListKind> {
    match (files, docs) {
        (true, _) => Some(ListKind::Files),
        (_, true) => Some(ListKind::Documents),
        _ => None,
    }
}

impl From<Admin> for AdminCommand {
    fn from(command: Admin) -> AdminCommand {
        match command {
            Admin::Servers => AdminCommand::Servers,
            Admin::Add { addr } => AdminCommand::Add(addr),
            Admin::Drain { addr } => AdminCommand::Drain(addr),
            Admin::Remove { addr } => AdminCommand::Remove(addr),
            Admin::Repair => AdminCommand::Repair,
        }
    }
}

fn exit_code(result: Result<bool, client::Error>) -> ExitCode {
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(client::Error::Interrupted) => ExitCode::from(130),
        // The reader went away (`client transfers | head`): nothing more
        // is wanted, and nothing went wrong.
        Err(client::Error::Io(e)) if e.kind() == io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("client: {e}");
            ExitCode::FAILURE
        }
    }
}
