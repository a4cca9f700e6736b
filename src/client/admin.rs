//! `client admin`: the operator's view and control of the balancer's pool
//! of servers (list, add, drain, remove).

use super::{Config, Error};
use crate::proto::{self, ClientRequest, Reply, ServerView};
use std::io::{self, Write};

/// What an operator asks.
#[derive(Debug, Clone)]
pub enum AdminCommand {
    Servers,
    Add(String),
    Drain(String),
    Remove(String),
    Repair,
}

/// Carries out one admin command and prints the outcome. Returns whether
/// the balancer did what was asked.
pub fn run(config: &Config, command: &AdminCommand, out: &mut impl Write) -> Result<bool, Error> {
    let request = match command.clone() {
        AdminCommand::Servers => {
            let views = super::status::fetch(config, 1)?;
            write!(out, "{}", table(&views))?;
            return Ok(true);
        }
        AdminCommand::Add(addr) => ClientRequest::AddServer { id: 1, addr },
        AdminCommand::Drain(addr) => ClientRequest::DrainServer { id: 1, addr },
        AdminCommand::Remove(addr) => ClientRequest::RemoveServer { id: 1, addr },
        AdminCommand::Repair => ClientRequest::Repair { id: 1 },
    };
    let addr = config.balancer;
    let stream = super::login::open(config)?;
    let mut conn = proto::Connection::new(stream, proto::DEFAULT_MAX_FRAME);
    if let Some(key) = cluster_key(config)? {
        crate::handshake::initiate(&mut conn, &key, addr, 100).map_err(|e| {
            Error::Io(io::Error::other(format!(
                "cannot prove the cluster key to the balancer at {addr}: {e}"
            )))
        })?;
    }
    let reply = conn.call(&request).map_err(|e| {
        Error::Io(io::Error::other(format!(
            "the balancer at {addr} did not answer the `{}` request: {e}",
            request.kind()
        )))
    })?;
    match reply {
        Reply::Membership { message, .. } => {
            writeln!(out, "{message}")?;
            Ok(true)
        }
        Reply::Error(e) => {
            writeln!(out, "refused: {}", e.message)?;
            Ok(false)
        }
        other => {
            writeln!(out, "unexpected answer: {other:?}")?;
            Ok(false)
        }
    }
}

/// The cluster key, when its file exists (a missing file is no key: the
/// balancer may have users instead).
fn cluster_key(config: &Config) -> Result<Option<crate::auth::ClusterKey>, Error> {
    let Some(path) = &config.cluster_key_file else {
        return Ok(None);
    };
    match crate::auth::ClusterKey::from_file(path) {
        Ok(key) => Ok(Some(key)),
        Err(crate::auth::KeyError::Io(_, e)) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::Io(io::Error::other(e.to_string()))),
    }
}

/// One row per server: id, address, state, in flight, requests, failures,
/// files stored, last check.
pub fn table(views: &[ServerView]) -> String {
    let heads = [
        "ID",
        "ADDRESS",
        "STATE",
        "IN FLIGHT",
        "REQUESTS",
        "FAILURES",
        "STORED",
        "LAST CHECK",
    ];
    let right = [true, false, false, true, true, true, true, true];
    let rows: Vec<Vec<String>> = views
        .iter()
        .map(|v| {
            vec![
                v.id.to_string(),
                v.name.clone(),
                v.state.clone(),
                v.in_flight.to_string(),
                v.requests.to_string(),
                v.failures.to_string(),
                v.status
                    .as_ref()
                    .map_or("-".to_string(), |s| s.files_stored.to_string()),
                v.check_ms
                    .map_or("-".to_string(), |ms| format!("{ms:.1} ms")),
            ]
        })
        .collect();
    let mut text = super::status::align(&heads, &right, &rows);
    if views.is_empty() {
        text.push_str(
            "(no servers: start one with `server --balancer ADDR` or `client admin add ADDR`)\n",
        );
    }
    text
}
