//! A load-balanced file transfer system.
//!
//! Data flows: client -> balancer connection thread (`balancer::conn`) ->
//! request queue -> dispatcher (`balancer::dispatch`, choosing a server with
//! a `policy`) -> server link (`balancer::link`) -> storage server
//! (`server`) -> acknowledgement back the same way to the client.
//!
//! - `proto`: the wire — frames, message types, size caps. Nobody else
//!   touches protocol bytes.
//! - `net`: sockets — connect with timeouts, first-byte detection, accept
//!   loops that stop when a channel disconnects and, when slots run short,
//!   close idle connections to make room (`net::admission`); TLS under the
//!   same `Stream` (`net::tls`, and `gen-certs`).
//! - `ids`: request numbers that never repeat.
//! - `balancer`: accept loop, flow control, dispatcher and pool membership,
//!   server links (one backend per wire), health monitor, transfer
//!   tracking and the catalog of stored files and documents (SQLite, kept
//!   in step with the servers' own listings), start and shutdown.
//! - `health`: pure state machine of one server's health.
//! - `policy`: pure balancing policies behind one trait.
//! - `server`: storage server — connections, storage folder (group commit,
//!   exactly-once index), files and their listings, own load, registration
//!   with balancers.
//! - `client`: sending documents and files and reporting what happened to
//!   them; listing, getting and deleting what is stored.
//! - `cli`: command-line values the binaries share (addresses with host
//!   names, counts, durations, sizes).
//! - `logging`: the logger the binaries install.
//! - `auth`: the cluster key that balancer and servers share (HMAC-SHA-256).
//! - `handshake`: balancer and server proving the cluster key to each other
//!   at the start of a connection.
//! - `error`: errors that stop a component from starting, and the one a
//!   server's `join` reports when some of its threads panicked.
//! - `throttle`: log lines for events that come in floods.
//! - `text`: small helpers several components need (so none imports
//!   another).
//! - `sync`: named threads, joining those that ended, a lock that outlives
//!   a panicked holder.

pub mod auth;
pub mod balancer;
pub mod cli;
pub mod client;
pub mod error;
pub mod handshake;
pub mod health;
pub mod ids;
pub mod logging;
pub mod net;
pub mod policy;
pub mod proto;
pub mod server;
pub mod sync;
pub mod text;
pub mod throttle;

pub use error::Error;
