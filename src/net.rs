//! Sockets: connecting with timeouts (`connect`), telling which wire a
//! peer speaks from its first byte (`sniff`), the connection shared by the
//! threads that read and write it (`stream`), and accept loops that stop
//! when told (`accept`) and, when slots run short, close idle connections
//! before turning new ones away (`admission`). TLS plugs in here (`tls`):
//! `connect` and `detect_wire` set it up, and a `Stream` reads and writes
//! plaintext either way.

mod accept;
pub mod admission;
mod connect;
mod sniff;
mod stream;
pub mod tls;

pub use accept::{
    default_max_connections, default_max_per_ip, serve_connections, wake, Slot, Slots,
};
pub use admission::{Admission, Busy, CapNames, Counters, Mark, Policy};
pub use connect::{connect, connect_plain, listen, prepare, resolve};
pub use sniff::{detect_wire, Wire};
pub use stream::{close_gracefully, Paced, Stream};

// For the modules another change is rewriting; the rest import these from
// `crate::sync`.
