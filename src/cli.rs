//! Helpers shared by the binaries' command lines.

use std::net::SocketAddr;
use std::time::Duration;

/// Parses `HOST:PORT` where HOST is an IP address or a name
/// (`localhost:60002`); a name is resolved now and its first address taken.
pub fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    crate::net::resolve(s)
}

/// Parses a count of requests: a whole number of at least 1.
pub fn parse_count(s: &str) -> Result<u64, String> {
    let s = s.trim();
    match s.parse::<u64>() {
        Ok(0) => Err("a count must be at least 1".to_string()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!(
            "`{s}` is not a count: type a whole number of at least 1"
        )),
    }
}

/// Parses a duration with a unit: `250ms`, `10s`, `2m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("`{s}` needs a unit: ms, s, m or h (e.g. 500ms, 10s)"))?;
    let (number, unit) = s.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("`{s}` does not start with a whole number"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!("unknown unit `{unit}` in `{s}`: use ms, s, m or h")),
    }
}

/// Parses a file size in bytes with an optional unit, up to exbibytes:
/// `4096`, `500MiB`, `20GiB`, `1TiB`.
pub fn parse_file_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("`{s}` does not start with a whole number"))?;
    let shift = match unit {
        "" | "B" => 0,
        "KiB" | "K" => 10,
        "MiB" | "M" => 20,
        "GiB" | "G" => 30,
        "TiB" | "T" => 40,
        _ => {
            return Err(format!(
                "unknown unit `{unit}` in `{s}`: use B, KiB, MiB, GiB or TiB"
            ))
        }
    };
    match n.checked_mul(1u64 << shift) {
        Some(0) => Err(format!("`{s}` must be at least 1 byte")),
        Some(bytes) => Ok(bytes),
        None => Err(format!("`{s}` is too large")),
    }
}

/// Parses a size in bytes with an optional unit: `4096`, `64KiB`, `8MiB`.
pub fn parse_size(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: usize = number
        .parse()
        .map_err(|_| format!("`{s}` does not start with a whole number"))?;
    let factor = match unit {
        "" | "B" => 1,
        "KiB" | "K" => 1024,
        "MiB" | "M" => 1024 * 1024,
        _ => return Err(format!("unknown unit `{unit}` in `{s}`: use B, KiB or MiB")),
    };
    let bytes = n
        .checked_mul(factor)
        .ok_or_else(|| format!("`{s}` is too large"))?;
    if bytes == 0 || bytes > u32::MAX as usize {
        return Err(format!("`{s}` must be between 1 byte and 4 GiB"));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("10").unwrap_err().contains("unit"));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("1d").is_err());
        assert!(parse_duration("ms").is_err());
    }

    #[test]
    fn addresses_take_ips_and_host_names() {
        assert_eq!(
            parse_addr("127.0.0.1:60002"),
            Ok(SocketAddr::from(([127, 0, 0, 1], 60002)))
        );
        let local = parse_addr("localhost:5001").unwrap();
        assert!(local.ip().is_loopback(), "{local}");
        assert_eq!(local.port(), 5001);
        assert!(parse_addr("localhost").unwrap_err().contains("HOST:PORT"));
        assert!(parse_addr(":80").unwrap_err().contains("HOST:PORT"));
    }

    #[test]
    fn counts() {
        assert_eq!(parse_count("3"), Ok(3));
        assert_eq!(parse_count(" 20 "), Ok(20));
        assert_eq!(parse_count("0").unwrap_err(), "a count must be at least 1");
        assert!(parse_count("zero").unwrap_err().contains("at least 1"));
        assert!(parse_count("-1").is_err());
    }

    #[test]
    fn file_sizes() {
        assert_eq!(parse_file_size("1TiB"), Ok(1 << 40));
        assert_eq!(parse_file_size("20GiB"), Ok(20 << 30));
        assert_eq!(parse_file_size("7"), Ok(7));
        assert!(parse_file_size("0").is_err());
        assert!(parse_file_size("99999999TiB")
            .unwrap_err()
            .contains("too large"));
        assert!(parse_file_size("1PiB").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("8MiB"), Ok(8 << 20));
        assert!(parse_size("0").is_err());
        assert!(parse_size("5GiB").is_err());
    }
}

/// The TLS flags of the programs that listen (see `net::tls`): what a
/// listener presents and asks of its peers, and how this program checks
/// the peers it connects to, set apart as HAProxy's `bind ... ssl` and
/// `server ... ssl` are.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// This program's certificate (PEM, leaf first). With --tls-key, its
    /// listener speaks TLS only, and its own connections present the
    /// certificate to peers that ask for one. `balancer gen-certs` makes a
    /// set.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
    /// CA certificate (PEM) that checks the peers this program connects
    /// to: every connection it makes is TLS, and the peer's certificate
    /// must be signed by it and name the peer's IP address.
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<std::path::PathBuf>,
    /// Whether the listener asks connecting peers for a certificate:
    /// `none`, `optional` (checked when presented) or `required` (mutual
    /// TLS). Default: `none` on the balancer (clients check the balancer
    /// and log in with a password), `required` on a server that has a CA
    /// (only cluster members reach it).
    #[arg(long, value_enum, value_name = "MODE")]
    pub tls_client_certs: Option<crate::net::tls::ClientCerts>,
    /// CA certificate (PEM) that checks the certificates connecting peers
    /// present. Default: --tls-ca.
    #[arg(long, value_name = "FILE")]
    pub tls_client_ca: Option<std::path::PathBuf>,
}

impl TlsArgs {
    /// Loads the files and installs the process's TLS context; nothing
    /// when no TLS flag is given. `default_client_certs` is what the
    /// listener asks of its peers when --tls-client-certs is not given.
    pub fn install(
        &self,
        default_client_certs: crate::net::tls::ClientCerts,
        allow_legacy_plaintext: bool,
        handshake_timeout: Duration,
    ) -> Result<Option<crate::net::tls::Tls>, crate::Error> {
        let files = crate::net::tls::TlsFiles {
            cert: self.tls_cert.as_deref(),
            key: self.tls_key.as_deref(),
            ca: self.tls_ca.as_deref(),
            client_ca: self.tls_client_ca.as_deref(),
        };
        let client_certs = self.tls_client_certs.unwrap_or(default_client_certs);
        let tls = crate::net::tls::Tls::load(
            files,
            client_certs,
            allow_legacy_plaintext,
            handshake_timeout,
        )
        .map_err(crate::Error::Config)?;
        if let Some(tls) = &tls {
            crate::net::tls::install(tls.clone());
        }
        Ok(tls)
    }
}

/// The cluster key flags of the balancer and the server.
#[derive(clap::Args, Debug, Clone)]
pub struct KeyArgs {
    /// File holding the cluster key that the balancers and servers share
    /// (64 hex digits). Created with a new random key when missing, so
    /// that programs started from one folder share it; copy it to the
    /// other machines. With it, servers take work, registrations and
    /// `forget` only from peers that prove the key, the balancer proves it
    /// back, and upload tickets are signed with it.
    #[arg(long, value_name = "FILE", default_value = "cluster.key")]
    pub cluster_key_file: std::path::PathBuf,
    /// Run without a cluster key: anyone who can reach this program may
    /// then do what only cluster members may (store under a request
    /// number, `forget`, list and get every user's files on a server,
    /// register or deregister a server). Logged as a warning at start.
    #[arg(long)]
    pub no_cluster_key: bool,
}

impl KeyArgs {
    /// The key to use: read or created at --cluster-key-file, or none
    /// with --no-cluster-key. `who` names the program in the warning.
    pub fn load(&self, who: &str) -> Result<Option<crate::auth::ClusterKey>, crate::Error> {
        if self.no_cluster_key {
            log::warn!(
                "{who} runs WITHOUT a cluster key (--no-cluster-key): any process that can \
                 reach it may do what only cluster members should"
            );
            return Ok(None);
        }
        crate::handshake::load_key(&self.cluster_key_file).map(Some)
    }

    /// The key part of a program's start-up security line.
    pub fn describe(&self, key: &Option<crate::auth::ClusterKey>) -> String {
        match key {
            Some(_) => format!("cluster key {}", self.cluster_key_file.display()),
            None => "NO cluster key".into(),
        }
    }
}
