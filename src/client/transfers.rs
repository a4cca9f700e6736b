//! `client transfers`: recent transfers from the balancer's state (with
//! balancers sharing one, every balancer's, each naming the balancer that
//! took it), as a table or (`--json`) one JSON object per line.
//!
//! One `transfers` request on a fresh connection. The table (`table`) is
//! pure so that it can be tested without sockets.

use super::status::{human_bytes, human_duration};
use super::{Config, Error};
use crate::proto::{self, ClientRequest, Reply, TransferView};
use std::io::{self, Write};
use std::time::Duration;

#[derive(Debug, Clone, Default)]
pub struct TransfersOptions {
    /// Only transfers not finished yet.
    pub active: bool,
    /// Only failed ones (with `active`: either).
    pub failed: bool,
    /// Only those received within this long.
    pub since: Option<Duration>,
    /// At most this many (the balancer's default when `None`).
    pub limit: Option<u32>,
    /// One JSON object per line instead of a table.
    pub json: bool,
}

/// Prints the transfers; returns whether the balancer answered them.
pub fn run(
    config: &Config,
    options: &TransfersOptions,
    out: &mut impl Write,
) -> Result<bool, Error> {
    let now = crate::text::now_ms();
    let request = ClientRequest::Transfers {
        id: 1,
        active: options.active,
        failed: options.failed,
        since_ms: options
            .since
            .map(|since| now.saturating_sub(since.as_millis() as u64)),
        limit: options.limit,
    };
    let transfers = fetch(config, &request)?;
    if options.json {
        for t in &transfers {
            let mut line = proto::encode(t);
            line.push(b'\n');
            out.write_all(&line)?;
        }
    } else if transfers.is_empty() {
        writeln!(out, "no transfers")?;
    } else {
        write!(out, "{}", table(&transfers, now))?;
    }
    Ok(true)
}

fn fetch(config: &Config, request: &ClientRequest) -> Result<Vec<TransferView>, Error> {
    match super::ask(config, request)? {
        Reply::Transfers(list) => Ok(list.transfers),
        other => Err(Error::Io(io::Error::other(format!(
            "the balancer at {} answered `transfers` with {other:?}",
            config.balancer
        )))),
    }
}

/// Milliseconds as `850ms`, `4.2s` or, from a minute on, `2m03s`.
pub fn human_ms(ms: u64) -> String {
    match ms {
        0..=999 => format!("{ms}ms"),
        1_000..=59_999 => format!("{:.1}s", ms as f64 / 1000.0),
        _ => human_duration(ms / 1000),
    }
}

/// The transfers as a table; `now_ms` is the time their age is taken from.
pub fn table(transfers: &[TransferView], now_ms: u64) -> String {
    let heads = [
        "NUMBER", "STATE", "TITLE", "SERVER", "SIZE", "DURATION", "AGE", "BALANCER",
    ];
    let right = [true, false, false, false, true, true, true, false];
    let rows: Vec<Vec<String>> = transfers
        .iter()
        .map(|t| {
            // Where it is (or was) stored, with the servers it failed on
            // before; every server tried while it is not stored.
            let servers = match &t.server {
                Some(stored) => {
                    let before: Vec<&str> = t
                        .servers
                        .iter()
                        .map(String::as_str)
                        .filter(|s| s != stored)
                        .collect();
                    if before.is_empty() {
                        stored.clone()
                    } else {
                        format!("{stored} (after {})", before.join(", "))
                    }
                }
                None if t.servers.is_empty() => "-".to_string(),
                None => t.servers.join(", "),
            };
            vec![
                t.number.to_string(),
                t.state.clone(),
                proto::truncate(&t.title, 40),
                servers,
                human_bytes(t.size),
                t.duration_ms.map_or("-".to_string(), human_ms),
                human_duration(now_ms.saturating_sub(t.started_ms) / 1000),
                t.balancer.clone().unwrap_or_else(|| "-".to_string()),
            ]
        })
        .collect();
    super::status::align(&heads, &right, &rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(number: u64, state: &str, servers: &[&str], server: Option<&str>) -> TransferView {
        TransferView {
            number,
            client: "127.0.0.1:4000".into(),
            title: format!("document {number}"),
            size: 2048,
            servers: servers.iter().map(|s| s.to_string()).collect(),
            state: state.into(),
            server: server.map(str::to_string),
            file: server.map(|_| format!("doc_{number}.json")),
            started_ms: 1_000_000,
            ended_ms: server.map(|_| 1_000_250),
            duration_ms: server.map(|_| 250),
            error: None,
            user: None,
            balancer: Some("127.0.0.1:60002".into()),
        }
    }

    #[test]
    fn table_shows_where_each_transfer_is() {
        let rows = [
            view(3, "sending", &["s0"], None),
            view(2, "stored", &["s0", "s1"], Some("s1")),
            view(1, "stored", &["s0"], Some("s0")),
        ];
        let text = table(&rows, 1_000_000 + 125_000);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(lines[0].starts_with("NUMBER  STATE"), "{text}");
        assert!(lines[1].contains("sending") && lines[1].ends_with("-  2m05s  127.0.0.1:60002"));
        assert!(lines[0].ends_with("AGE  BALANCER"), "{text}");
        assert!(lines[2].contains("s1 (after s0)") && lines[2].contains("250ms"));
        assert!(lines[3].contains("2.0K"), "{text}");
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(human_ms(850), "850ms");
        assert_eq!(human_ms(4_210), "4.2s");
        assert_eq!(human_ms(123_000), "2m03s");
    }
}
