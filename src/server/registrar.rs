//! A server's membership in balancers' pools (`server --balancer ADDR`):
//! one thread per balancer registers this server, repeats the registration
//! every heartbeat interval (so a balancer that restarted learns it again),
//! and, when told to leave, deregisters and waits for the balancer's
//! answer, which comes once this server's requests in flight from that
//! balancer are done. Only then should the server stop.

use crate::auth::ClusterKey;
use crate::handshake;
use crate::net;
use crate::proto::{CallError, Connection, PoolRequest, Reply};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use std::net::SocketAddr;
use std::thread::JoinHandle;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct RegistrarSettings {
    /// Where this server takes requests; an unspecified IP (0.0.0.0) is
    /// replaced by the local address of the connection to each balancer.
    pub advertise: SocketAddr,
    pub heartbeat: Duration,
    pub timeout: Duration,
    /// How long to wait for a balancer to let this server go.
    pub leave_timeout: Duration,
    /// With a key, each connection to a balancer starts with the cluster
    /// handshake (a balancer with a key takes registrations only so).
    pub key: Option<ClusterKey>,
}

pub struct Registrar {
    /// Dropped to make every thread deregister.
    leave: Sender<()>,
    threads: Vec<JoinHandle<()>>,
}

impl Registrar {
    pub fn start(balancers: &[SocketAddr], settings: RegistrarSettings) -> std::io::Result<Self> {
        let (leave, told) = crossbeam_channel::bounded(0);
        let mut threads = Vec::new();
        for (i, balancer) in balancers.iter().copied().enumerate() {
            let told = told.clone();
            let settings = settings.clone();
            threads.push(crate::sync::spawn_named(
                format!("registrar{i}"),
                Some(256 * 1024),
                move || member_of(balancer, settings, told),
            )?);
        }
        Ok(Registrar { leave, threads })
    }

    /// Deregisters from every balancer, each waiting until it has let this
    /// server go (or `leave_timeout` passed).
    pub fn leave(self) {
        drop(self.leave);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

fn member_of(balancer: SocketAddr, settings: RegistrarSettings, told: Receiver<()>) {
    let mut link: Option<(Connection<net::Stream>, SocketAddr)> = None;
    let mut registered = false;
    let mut id = 0u64;
    loop {
        id += 1;
        match heartbeat(&mut link, balancer, id, &settings) {
            Ok(message) => {
                if !registered {
                    log::info!("registered with balancer {balancer}: {message}");
                }
                registered = true;
            }
            Err(e) => {
                if registered || id == 1 {
                    log::warn!(
                        "balancer {balancer}: {e}; retrying every {:?}",
                        settings.heartbeat
                    );
                }
                registered = false;
                link = None;
            }
        }
        match told.recv_timeout(settings.heartbeat) {
            Err(RecvTimeoutError::Timeout) => continue,
            Ok(()) | Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    if !registered {
        return;
    }
    let leave = RegistrarSettings {
        timeout: settings.leave_timeout,
        ..settings.clone()
    };
    let result = connect(&mut link, balancer, &leave).and_then(|(conn, addr)| {
        conn.get_ref()
            .set_read_timeout(Some(settings.leave_timeout))
            .map_err(|e| e.to_string())?;
        call(
            conn,
            PoolRequest::Deregister {
                id: id + 1,
                addr: addr.to_string(),
            },
        )
    });
    match result {
        Ok(message) => log::info!("left balancer {balancer}: {message}"),
        Err(e) => log::warn!("could not leave balancer {balancer} cleanly: {e}"),
    }
}

fn connect<'a>(
    link: &'a mut Option<(Connection<net::Stream>, SocketAddr)>,
    balancer: SocketAddr,
    settings: &RegistrarSettings,
) -> Result<&'a mut (Connection<net::Stream>, SocketAddr), String> {
    if link.is_none() {
        let stream = net::connect(&balancer, settings.timeout, settings.timeout)
            .map_err(|e| format!("cannot connect: {e}"))?;
        let mut advertise = settings.advertise;
        if advertise.ip().is_unspecified() {
            let local = stream.local_addr().map_err(|e| e.to_string())?;
            advertise.set_ip(local.ip());
        }
        let mut conn = Connection::new(stream, 1 << 20);
        if let Some(key) = &settings.key {
            handshake::initiate(&mut conn, key, balancer, 0)
                .map_err(|e| format!("the balancer did not prove the cluster key: {e}"))?;
        }
        *link = Some((conn, advertise));
    }
    Ok(link.as_mut().expect("just set"))
}

fn heartbeat(
    link: &mut Option<(Connection<net::Stream>, SocketAddr)>,
    balancer: SocketAddr,
    id: u64,
    settings: &RegistrarSettings,
) -> Result<String, String> {
    let (conn, addr) = connect(link, balancer, settings)?;
    let addr = addr.to_string();
    call(conn, PoolRequest::Register { id, addr })
}

fn call(conn: &mut Connection<net::Stream>, request: PoolRequest) -> Result<String, String> {
    match conn.call(&request) {
        Ok(Reply::Membership { message, .. }) => Ok(message),
        Ok(Reply::Error(e)) => Err(format!("{}: {}", e.code, e.message)),
        Ok(other) => Err(format!("unexpected answer {other:?}")),
        Err(CallError::Closed) => Err("the balancer closed the connection".into()),
        Err(e) => Err(e.to_string()),
    }
}
