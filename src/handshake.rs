//! The cluster handshake: how the two ends of a connection between a
//! balancer and a storage server prove to each other that they hold the
//! cluster key (`auth::ClusterKey`), before anything else is said.
//!
//! The side that opens the connection (the initiator: a balancer's link or
//! probe, a server's registrar) and the side that accepts it (the
//! responder) each pick a fresh random nonce:
//!
//! ```text
//! initiator -> hello        {nonce: Ni}
//! responder <- hello        {nonce: Nr, addr: A, proof: HMAC(key, RESPONDER, Ni, Nr, A)}
//! initiator -> hello_proof  {proof: HMAC(key, INITIATOR, Ni, Nr)}
//! responder <- welcome
//! ```
//!
//! `A` is the address the connection reached the responder at (its local
//! address); the initiator checks it against the address it dialed, so a
//! process at another address cannot pass on the proof of an honest server
//! it relayed the challenge to. Each proof covers the other side's fresh
//! nonce, so no recorded proof is accepted again; the two proofs carry
//! different labels, so neither side's proof can be reflected back as the
//! other's. Nothing after the handshake is signed: against someone who can
//! take over a TCP connection in the middle, only TLS helps.

use crate::auth::ClusterKey;
use crate::proto::{CallError, Connection, ErrorCode, Handshake, Reply};
use rand::RngCore;
use std::fmt;
use std::io::{Read, Write};
use std::net::SocketAddr;

/// Random bytes in a nonce (sent as twice as many hex digits).
pub const NONCE_LEN: usize = 32;
/// Shortest nonce accepted from a peer, in bytes.
const MIN_NONCE_LEN: usize = 16;
/// Longest nonce accepted from a peer, in bytes.
const MAX_NONCE_LEN: usize = 64;

const RESPONDER: &[u8] = b"lbft cluster hello: responder";
const INITIATOR: &[u8] = b"lbft cluster hello: initiator";

/// The key of `--cluster-key-file`: read, or created (random, mode 0600)
/// when the file does not exist yet, so that processes started with the
/// same path on one machine share it; copy the file to the others.
pub fn load_key(path: &std::path::Path) -> Result<ClusterKey, crate::Error> {
    let existed = path.exists();
    let key = ClusterKey::load_or_create(path).map_err(|e| crate::Error::Config(e.to_string()))?;
    if !existed {
        log::info!(
            "created a new cluster key in {}; give every balancer and server a copy",
            path.display()
        );
    }
    Ok(key)
}

/// A fresh nonce, hex.
pub fn nonce() -> String {
    crate::text::to_hex(&nonce_bytes())
}

fn parse_nonce(text: &str) -> Option<Vec<u8>> {
    crate::text::from_hex(text).filter(|b| (MIN_NONCE_LEN..=MAX_NONCE_LEN).contains(&b.len()))
}

fn responder_proof(key: &ClusterKey, ni: &[u8], nr: &[u8], addr: &str) -> [u8; 32] {
    key.sign(&[RESPONDER, ni, nr, addr.as_bytes()])
}

fn initiator_proof(key: &ClusterKey, ni: &[u8], nr: &[u8]) -> [u8; 32] {
    key.sign(&[INITIATOR, ni, nr])
}

fn verify_hex(key: &ClusterKey, parts: &[&[u8]], proof_hex: &str) -> bool {
    crate::text::from_hex(proof_hex).is_some_and(|tag| key.verify(parts, &tag))
}

/// Why the peer did not prove the cluster key.
#[derive(Debug)]
pub enum HandshakeError {
    /// The connection failed or the answer could not be read.
    Call(CallError),
    /// The peer answered with an error (it has no key, or another one).
    Refused(String),
    /// The peer's proof is wrong: it does not hold this cluster key.
    BadProof,
    /// The proof is for another address than the one dialed: the peer
    /// relayed the challenge to someone else.
    WrongAddress { dialed: SocketAddr, claimed: String },
    /// The peer answered something that is not part of the handshake.
    Unexpected(String),
}

impl fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HandshakeError::Call(e) => write!(f, "handshake failed: {e}"),
            HandshakeError::Refused(m) => write!(f, "it refused the handshake: {m}"),
            HandshakeError::BadProof => f.write_str("its proof of the cluster key is wrong"),
            HandshakeError::WrongAddress { dialed, claimed } => write!(
                f,
                "its proof is for {claimed}, not for {dialed} (a relayed challenge)"
            ),
            HandshakeError::Unexpected(m) => write!(f, "unexpected answer to hello: {m}"),
        }
    }
}

impl std::error::Error for HandshakeError {}

impl HandshakeError {
    /// True when the connection itself failed (connect, timeout, closed):
    /// the peer may simply be down, not an impostor.
    pub fn is_connection(&self) -> bool {
        matches!(self, HandshakeError::Call(_))
    }
}

impl From<CallError> for HandshakeError {
    fn from(e: CallError) -> Self {
        HandshakeError::Call(e)
    }
}

impl From<std::io::Error> for HandshakeError {
    fn from(e: std::io::Error) -> Self {
        HandshakeError::Call(e.into())
    }
}

/// The initiator's side: proves the key to the peer reached at `dialed`
/// and checks the peer's proof. Uses request ids `first_id` and
/// `first_id + 1`.
pub fn initiate<S: Read + Write>(
    conn: &mut Connection<S>,
    key: &ClusterKey,
    dialed: SocketAddr,
    first_id: u64,
) -> Result<(), HandshakeError> {
    let ni = nonce_bytes();
    let reply = conn.call(&Handshake::Hello {
        id: first_id,
        nonce: crate::text::to_hex(&ni),
    })?;
    let (nr, addr, proof) = match reply {
        Reply::Hello {
            nonce, addr, proof, ..
        } => (nonce, addr, proof),
        Reply::Error(e) => {
            return Err(HandshakeError::Refused(format!(
                "{}: {}",
                e.code, e.message
            )))
        }
        other => return Err(HandshakeError::Unexpected(format!("{other:?}"))),
    };
    let nr = parse_nonce(&nr).ok_or(HandshakeError::BadProof)?;
    if !verify_hex(key, &[RESPONDER, &ni, &nr, addr.as_bytes()], &proof) {
        return Err(HandshakeError::BadProof);
    }
    if addr != dialed.to_string() {
        return Err(HandshakeError::WrongAddress {
            dialed,
            claimed: addr,
        });
    }
    let proof = crate::text::to_hex(&initiator_proof(key, &ni, &nr));
    match conn.call(&Handshake::HelloProof {
        id: first_id + 1,
        proof,
    })? {
        Reply::Welcome { .. } => Ok(()),
        Reply::Error(e) => Err(HandshakeError::Refused(format!(
            "{}: {}",
            e.code, e.message
        ))),
        other => Err(HandshakeError::Unexpected(format!("{other:?}"))),
    }
}

/// The responder's side of one connection: answers `hello` and
/// `hello_proof`, and knows whether the peer has proven the key.
pub struct Gate {
    key: Option<ClusterKey>,
    /// The address the connection reached this side at.
    local: SocketAddr,
    state: State,
}

enum State {
    Start,
    /// Both nonces, waiting for the initiator's proof.
    Challenged {
        ni: Vec<u8>,
        nr: Vec<u8>,
    },
    Proven,
}

/// What the gate makes of a handshake message.
pub struct Answer {
    pub reply: Reply,
    /// The peer failed the handshake: close after the reply.
    pub close: bool,
}

impl Gate {
    pub fn new(key: Option<&ClusterKey>, local: SocketAddr) -> Gate {
        Gate {
            key: key.cloned(),
            local,
            state: State::Start,
        }
    }

    /// Whether this side has a cluster key at all.
    pub fn keyed(&self) -> bool {
        self.key.is_some()
    }

    /// Whether the peer has proven the cluster key on this connection.
    pub fn proven(&self) -> bool {
        matches!(self.state, State::Proven)
    }

    /// Answers a handshake message.
    pub fn handle(&mut self, message: &Handshake) -> Answer {
        match message {
            Handshake::Hello { id, nonce } => self.hello(*id, nonce),
            Handshake::HelloProof { id, proof } => self.hello_proof(*id, proof),
        }
    }

    /// A peer's `hello`: answered with this side's nonce and proof.
    fn hello(&mut self, id: u64, nonce: &str) -> Answer {
        let Some(key) = &self.key else {
            return refuse(
                id,
                ErrorCode::BadRequest,
                "no cluster key here (start it with --cluster-key-file)",
            );
        };
        if !matches!(self.state, State::Start) {
            return refuse(
                id,
                ErrorCode::BadRequest,
                "hello again on the same connection",
            );
        }
        let Some(ni) = parse_nonce(nonce) else {
            return refuse(
                id,
                ErrorCode::BadRequest,
                "nonce must be 16 to 64 random bytes in hex",
            );
        };
        let own = nonce_bytes();
        let addr = self.local.to_string();
        let proof = crate::text::to_hex(&responder_proof(key, &ni, &own, &addr));
        let reply = Reply::Hello {
            id,
            nonce: crate::text::to_hex(&own),
            addr,
            proof,
        };
        self.state = State::Challenged { ni, nr: own };
        Answer {
            reply,
            close: false,
        }
    }

    /// A peer's proof of the key, after this side's `hello` answer.
    fn hello_proof(&mut self, id: u64, proof: &str) -> Answer {
        let (Some(key), State::Challenged { ni, nr }) = (&self.key, &self.state) else {
            return refuse(
                id,
                ErrorCode::BadRequest,
                "hello_proof without a hello first",
            );
        };
        if !verify_hex(key, &[INITIATOR, ni, nr], proof) {
            self.state = State::Start;
            return refuse(
                id,
                ErrorCode::Unauthenticated,
                "wrong proof of the cluster key",
            );
        }
        self.state = State::Proven;
        Answer {
            reply: Reply::Welcome {
                id,
                user: None,
                admin: false,
            },
            close: false,
        }
    }
}

/// A handshake refused: the connection closes after the answer.
fn refuse(id: u64, code: ErrorCode, message: &str) -> Answer {
    Answer {
        reply: Reply::error(Some(id), code, message),
        close: true,
    }
}

fn nonce_bytes() -> Vec<u8> {
    let mut bytes = vec![0u8; NONCE_LEN];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    /// Plays the initiator by hand against a gate.
    fn hello(gate: &mut Gate, ni: &[u8]) -> (Vec<u8>, String, String) {
        let answer = gate.handle(&Handshake::Hello {
            id: 1,
            nonce: crate::text::to_hex(ni),
        });
        assert!(!answer.close);
        let Reply::Hello {
            nonce, addr, proof, ..
        } = answer.reply
        else {
            panic!("{:?}", answer.reply)
        };
        (crate::text::from_hex(&nonce).unwrap(), addr, proof)
    }

    #[test]
    fn both_sides_prove_the_key() {
        let key = ClusterKey::generate();
        let mut gate = Gate::new(Some(&key), addr(5001));
        let ni = nonce_bytes();
        let (nr, claimed, proof) = hello(&mut gate, &ni);
        assert_eq!(claimed, "127.0.0.1:5001");
        assert!(verify_hex(
            &key,
            &[RESPONDER, &ni, &nr, claimed.as_bytes()],
            &proof
        ));
        assert!(!gate.proven());
        let proof = crate::text::to_hex(&initiator_proof(&key, &ni, &nr));
        let answer = gate.handle(&Handshake::HelloProof { id: 2, proof });
        assert!(matches!(answer.reply, Reply::Welcome { id: 2, .. }));
        assert!(gate.proven());
    }

    #[test]
    fn wrong_key_replay_and_reflection_fail() {
        let key = ClusterKey::generate();
        let ni = nonce_bytes();
        // Another key.
        let mut gate = Gate::new(Some(&key), addr(5001));
        let (nr, _, _) = hello(&mut gate, &ni);
        let other = ClusterKey::generate();
        let proof = crate::text::to_hex(&initiator_proof(&other, &ni, &nr));
        let answer = gate.handle(&Handshake::HelloProof { id: 2, proof });
        assert!(answer.close && !gate.proven());

        // A proof recorded on one connection, replayed on the next: the
        // responder's nonce is new.
        let mut first = Gate::new(Some(&key), addr(5001));
        let (nr1, _, _) = hello(&mut first, &ni);
        let recorded = crate::text::to_hex(&initiator_proof(&key, &ni, &nr1));
        let mut second = Gate::new(Some(&key), addr(5001));
        hello(&mut second, &ni);
        let answer = second.handle(&Handshake::HelloProof {
            id: 2,
            proof: recorded,
        });
        assert!(answer.close && !second.proven());

        // The responder's own proof sent back as the initiator's.
        let mut gate = Gate::new(Some(&key), addr(5001));
        let (_, _, responder) = hello(&mut gate, &ni);
        let answer = gate.handle(&Handshake::HelloProof {
            id: 2,
            proof: responder,
        });
        assert!(answer.close && !gate.proven());
    }

    #[test]
    fn a_gate_without_a_key_or_out_of_order_messages_refuse() {
        let mut gate = Gate::new(None, addr(5001));
        let answer = gate.handle(&Handshake::Hello {
            id: 1,
            nonce: nonce(),
        });
        assert!(answer.close);
        let key = ClusterKey::generate();
        let mut gate = Gate::new(Some(&key), addr(5001));
        let answer = gate.handle(&Handshake::HelloProof {
            id: 1,
            proof: "00".into(),
        });
        assert!(answer.close);
        let answer = gate.handle(&Handshake::Hello {
            id: 1,
            nonce: "abcd".into(),
        });
        assert!(answer.close, "a short nonce is refused");
    }

    #[test]
    fn initiator_against_a_gate_over_a_socket() {
        let key = ClusterKey::generate();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let at = listener.local_addr().unwrap();
        let responder_key = key.clone();
        let responder = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let local = stream.local_addr().unwrap();
            let mut conn = Connection::new(stream, 1 << 16);
            let mut gate = Gate::new(Some(&responder_key), local);
            for _ in 0..2 {
                let request: Handshake = conn.recv().unwrap();
                let answer = gate.handle(&request);
                conn.send(&answer.reply).unwrap();
            }
            gate.proven()
        });
        let stream = std::net::TcpStream::connect(at).unwrap();
        let mut conn = Connection::new(stream, 1 << 16);
        initiate(&mut conn, &key, at, 1).unwrap();
        assert!(responder.join().unwrap());

        // The same responder reached at another address than dialed.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let at = listener.local_addr().unwrap();
        let responder_key = key.clone();
        let responder = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut conn = Connection::new(stream, 1 << 16);
            let mut gate = Gate::new(Some(&responder_key), addr(1));
            let request: Handshake = conn.recv().unwrap();
            conn.send(&gate.handle(&request).reply).unwrap();
        });
        let stream = std::net::TcpStream::connect(at).unwrap();
        let mut conn = Connection::new(stream, 1 << 16);
        let e = initiate(&mut conn, &key, at, 1).unwrap_err();
        assert!(matches!(e, HandshakeError::WrongAddress { .. }), "{e}");
        responder.join().unwrap();
    }
}
