//! Errors of a component as a whole: those that stop it from starting,
//! what a server's `join` reports when its threads panicked, and the
//! balancer's state store failing (at start, or later when a query or a
//! pool change cannot be read or written: reported, never fatal). Errors on
//! a single request never stop anything: they become error replies (see
//! `proto::ErrorCode`).

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Debug)]
pub enum Error {
    /// A listener could not be bound.
    Bind { addr: SocketAddr, source: io::Error },
    /// A storage folder could not be opened or prepared.
    Storage { dir: PathBuf, source: io::Error },
    /// The log file could not be opened.
    Log { path: PathBuf, source: io::Error },
    /// The balancer's state (`--state`: a file, or a database) cannot be
    /// opened or used; a damaged or foreign one is reported, never
    /// replaced. `store` names it ("state file PATH", "state database
    /// postgres://USER@HOST:PORT/DB", never with a password); the store's
    /// own error says why.
    State {
        store: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A setting makes no sense.
    Config(String),
    /// Anything else from the OS while starting (spawning a thread...).
    Io(io::Error),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Bind { addr, source } => write!(f, "cannot listen on {addr}: {source}"),
            Error::Storage { dir, source } => {
                write!(f, "cannot use storage folder {}: {source}", dir.display())
            }
            Error::Log { path, source } => {
                write!(f, "cannot open log file {}: {source}", path.display())
            }
            Error::State { store, source } => write!(f, "cannot use {store}: {source}"),
            Error::Config(msg) => f.write_str(msg),
            Error::Io(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Bind { source, .. }
            | Error::Storage { source, .. }
            | Error::Log { source, .. } => Some(source),
            Error::State { source, .. } => Some(source.as_ref()),
            Error::Io(e) => Some(e),
            Error::Config(_) => None,
        }
    }
}

impl From<crate::auth::KeyError> for Error {
    fn from(e: crate::auth::KeyError) -> Self {
        Error::Config(e.to_string())
    }
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        Error::Io(e)
    }
}
