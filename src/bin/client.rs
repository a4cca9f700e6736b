use clap::{Parser, Subcommand};
use lbft::cli::parse_duration;
use lbft::client::status::StatusOptions;
use lbft::client::transfers::TransfersOptions;
use lbft::client::{self, Config};
use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// Client: sends documents to the balancer and shows where each one was
/// stored. Without a command it starts an interactive prompt (commands FTP
/// and exit). At most --window requests are unanswered at a time, so any
/// count runs in the same memory. Exits 0 only when every document sent was
/// stored (or every computation done): a failed or unknown one (the
/// connection closed before its answer) makes the exit code 1.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Balancer address.
    #[arg(long, global = true, default_value = "127.0.0.1:60002")]
    balancer: SocketAddr,
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
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Send N documents picked at random from the documents folder.
    Ftp {
        #[arg(value_parser = clap::value_parser!(u64).range(1..))]
        count: u64,
    },
    /// Send the given JSON documents ({"titolo": ..., "contenuto": ...}).
    Send {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Send N compute requests, each with an operation drawn at random
    /// (somma, sottrazione, moltiplicazione, divisione).
    Calc {
        #[arg(value_parser = clap::value_parser!(u64).range(1..))]
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
        /// Append every sample to this file, one JSON object per line.
        #[arg(long, default_value = "historico.json")]
        history: PathBuf,
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
        /// At most this many (default 100).
        #[arg(long, value_name = "N")]
        limit: Option<u32>,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn parse_window(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("`{s}` is not a whole number of at least 1")),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config = Config {
        balancer: args.balancer,
        documents: args.documents,
        reply_timeout: args.timeout,
        window: args.window,
        ..Config::default()
    };
    let mut out = io::stdout().lock();
    let result = match args.command {
        None => client::interactive(&config, &mut io::stdin().lock(), &mut out),
        Some(Command::Ftp { count }) => client::ftp(&config, count, &mut out),
        Some(Command::Send { paths }) => client::send_files(&config, paths, &mut out),
        Some(Command::Calc { count }) => client::calc(&config, count, &mut out),
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
            client::status::run(&config, &options, &mut out)
        }
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
            client::transfers::run(&config, &options, &mut out)
        }
    };
    let _ = out.flush();
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("client: {e}");
            ExitCode::FAILURE
        }
    }
}
