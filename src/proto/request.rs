//! Requests, one family per kind of peer, so that each side decodes only
//! what it carries out:
//!
//! - `ClientRequest`: a client asks the balancer (documents, files, the
//!   pool, transfers).
//! - `PoolRequest`: a storage server tells the balancer about itself
//!   (joining, leaving, a redirected upload's progress).
//! - `StorageRequest`: a storage server is asked, by the balancer, by a
//!   client holding a ticket, or by another server fetching a copy.
//! - `Handshake`: either end of a cluster connection proving the cluster
//!   key; `Login`: a user signing in to the balancer.
//!
//! A listener reads the union of what its peers send: `ToBalancer` or
//! `ToServer`. A type that belongs to another listener is answered
//! `bad_request` saying where it goes; a type of no family, `unknown_type`.

use super::file::{Chunk, ListKind, TransferEvent, UploadRequest};
use super::key::{ClientKey, KeyProbe};
use super::kinds::kinds;
use super::message::{Document, Message, Operation};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::fmt;

/// `Message` for a family that serde decodes as it is.
macro_rules! serde_message {
    ($family:ident) => {
        impl Message for $family {
            fn types() -> Vec<&'static str> {
                $family::TYPES.to_vec()
            }
            fn parse(payload: &[u8]) -> serde_json::Result<Self> {
                serde_json::from_slice(payload)
            }
            fn parse_value(_kind: &str, value: serde_json::Value) -> serde_json::Result<Self> {
                serde_json::from_value(value)
            }
        }
    };
}

/// Store a document. The balancer fills `request_number` before forwarding;
/// a client leaves it out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoreRequest {
    pub id: u64,
    #[serde(flatten)]
    pub doc: Document,
    #[serde(
        rename = "numero_richiesta",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub request_number: Option<u64>,
    /// Unix time in milliseconds after which a server must not store this
    /// document any more: the balancer has given up on it by then and may
    /// have stored it elsewhere. Set by the balancer only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after_ms: Option<u64>,
    /// The client's key of this document (see `ClientKey`): a server
    /// stores a key once, whatever request number it comes with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<ClientKey>,
    /// Set by a client sending a keyed document again through another
    /// balancer: that balancer asks the servers for the key first.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub resent: bool,
}

/// A client asks the balancer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientRequest {
    /// Store a document (balanced over the servers).
    Store(StoreRequest),
    /// Compute an operation on two random numbers (balanced like `store`).
    Calc {
        id: u64,
        #[serde(rename = "operazione")]
        operation: Operation,
    },
    /// Every server with its health and last status.
    Servers { id: u64 },
    /// Recent transfers from the balancer's state, newest first.
    Transfers {
        id: u64,
        /// Only those not finished yet.
        #[serde(default)]
        active: bool,
        /// Only failed ones (with `active`: either).
        #[serde(default)]
        failed: bool,
        /// Only those received at or after this Unix time in milliseconds.
        #[serde(default)]
        since_ms: Option<u64>,
        /// At most this many (100 when absent).
        #[serde(default)]
        limit: Option<u32>,
    },
    /// An operator adds a server to the pool.
    AddServer { id: u64, addr: String },
    /// An operator drains a server: no new work; it leaves once its
    /// requests in flight are done.
    DrainServer { id: u64, addr: String },
    /// An operator removes a server now; its requests in flight go to
    /// other servers.
    RemoveServer { id: u64, addr: String },
    /// An operator starts repairing entries with fewer live copies than
    /// `--replicas` now. Answered `membership` with a message.
    Repair { id: u64 },
    /// Start or resume uploading a file (see `proto::file`).
    Upload(UploadRequest),
    /// A chunk of the file being uploaded; its bytes follow as a raw frame.
    Chunk(Chunk),
    /// Every byte has been sent: check the checksum and put the file in
    /// place.
    UploadEnd { id: u64, sha256: String },
    /// Stored files and documents in the balancer's catalog of every
    /// server (only the user's own when users are on).
    List {
        id: u64,
        /// Files, documents or both (absent: both).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        kind: Option<ListKind>,
    },
    /// Download a stored file from `offset` on.
    Get {
        id: u64,
        name: String,
        #[serde(default)]
        offset: u64,
        /// An admin's choice of whose file; others get only their own.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        owner: Option<String>,
    },
    /// Remove a stored file: its bytes on every server and its catalog
    /// entry.
    Delete {
        id: u64,
        name: String,
        /// An admin's choice of whose file; others delete only their own.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        owner: Option<String>,
    },
}

kinds!(ClientRequest {
    Store => "store",
    Calc => "calc",
    Servers => "servers",
    Transfers => "transfers",
    AddServer => "add_server",
    DrainServer => "drain_server",
    RemoveServer => "remove_server",
    Repair => "repair",
    Upload => "upload",
    Chunk => "chunk",
    UploadEnd => "upload_end",
    List => "list",
    Get => "get",
    Delete => "delete",
});
serde_message!(ClientRequest);

impl ClientRequest {
    pub fn id(&self) -> u64 {
        match self {
            ClientRequest::Store(r) => r.id,
            ClientRequest::Upload(r) => r.id,
            ClientRequest::Chunk(c) => c.id,
            ClientRequest::Calc { id, .. }
            | ClientRequest::Servers { id }
            | ClientRequest::Transfers { id, .. }
            | ClientRequest::AddServer { id, .. }
            | ClientRequest::DrainServer { id, .. }
            | ClientRequest::RemoveServer { id, .. }
            | ClientRequest::Repair { id }
            | ClientRequest::UploadEnd { id, .. }
            | ClientRequest::List { id, .. }
            | ClientRequest::Get { id, .. }
            | ClientRequest::Delete { id, .. } => *id,
        }
    }
}

/// A storage server tells the balancer about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum PoolRequest {
    /// A server joins the balancer's pool (or says it is still there: it
    /// repeats this as its heartbeat). `addr` is where it takes requests.
    Register { id: u64, addr: String },
    /// A server leaves: the balancer sends it no new work and answers once
    /// the server's requests in flight are done.
    Deregister { id: u64, addr: String },
    /// A redirected upload's progress, signed with the cluster key.
    TransferEvent(Box<TransferEvent>),
}

kinds!(PoolRequest {
    Register => "register",
    Deregister => "deregister",
    TransferEvent => "transfer_event",
});
serde_message!(PoolRequest);

impl PoolRequest {
    pub fn id(&self) -> u64 {
        match self {
            PoolRequest::Register { id, .. } | PoolRequest::Deregister { id, .. } => *id,
            PoolRequest::TransferEvent(e) => e.id,
        }
    }
}

/// A storage server is asked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum StorageRequest {
    /// Store a document under the balancer's request number.
    Store(StoreRequest),
    /// Compute an operation on two random numbers.
    Calc {
        id: u64,
        #[serde(rename = "operazione")]
        operation: Operation,
    },
    /// The server's status (its load and what it holds).
    Status { id: u64 },
    /// These request numbers are stored on another server (the balancer
    /// retried them after losing track of this one): the server moves its
    /// copies aside and never stores them again. `keys` are client keys to
    /// forget likewise.
    Forget {
        id: u64,
        numbers: Vec<u64>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        keys: Vec<ClientKey>,
    },
    /// Which of these client keys does the server hold? A key it neither
    /// holds nor is writing is from then on stored there only under the
    /// request number given with it. Answered by `keys`.
    Lookup { id: u64, keys: Vec<KeyProbe> },
    /// What the server holds, in short (see `InventoryReport`).
    Inventory { id: u64 },
    /// Fetch a copy of `name` (a document or a file of `owner`) from server
    /// `from`, check its SHA-256 and put it in place under the same name.
    /// Answered `fetched` (repair, see `--replicas`).
    Fetch {
        id: u64,
        from: String,
        name: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        owner: Option<String>,
        /// A file's upload id (it keeps it on the new server); none for a
        /// document.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        upload_id: Option<String>,
    },
    /// Start or resume receiving a file (from the balancer, or from a
    /// client with a ticket).
    Upload(UploadRequest),
    /// A chunk of the file being uploaded; its bytes follow as a raw frame.
    Chunk(Chunk),
    /// Every byte has been sent: check the checksum and put the file in
    /// place.
    UploadEnd { id: u64, sha256: String },
    /// The server's stored files and documents.
    List {
        id: u64,
        /// Only files of this user.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        owner: Option<String>,
        /// Files, documents or both (absent: files).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        kind: Option<ListKind>,
    },
    /// Send a stored file from `offset` on.
    Get {
        id: u64,
        name: String,
        #[serde(default)]
        offset: u64,
        /// Only a file of this user.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        owner: Option<String>,
    },
    /// Remove a stored file; with only `upload_id`, a partial upload.
    Delete {
        id: u64,
        #[serde(default)]
        name: String,
        /// Only a file of this user.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        owner: Option<String>,
        /// Only if the file was written by this upload (the balancer never
        /// removes a newer copy that took the name).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        upload_id: Option<String>,
    },
}

kinds!(StorageRequest {
    Store => "store",
    Calc => "calc",
    Status => "status",
    Forget => "forget",
    Lookup => "lookup",
    Inventory => "inventory",
    Fetch => "fetch",
    Upload => "upload",
    Chunk => "chunk",
    UploadEnd => "upload_end",
    List => "list",
    Get => "get",
    Delete => "delete",
});
serde_message!(StorageRequest);

impl StorageRequest {
    pub fn id(&self) -> u64 {
        match self {
            StorageRequest::Store(r) => r.id,
            StorageRequest::Upload(r) => r.id,
            StorageRequest::Chunk(c) => c.id,
            StorageRequest::Calc { id, .. }
            | StorageRequest::Status { id }
            | StorageRequest::Forget { id, .. }
            | StorageRequest::Lookup { id, .. }
            | StorageRequest::Inventory { id }
            | StorageRequest::Fetch { id, .. }
            | StorageRequest::UploadEnd { id, .. }
            | StorageRequest::List { id, .. }
            | StorageRequest::Get { id, .. }
            | StorageRequest::Delete { id, .. } => *id,
        }
    }
}

/// The cluster handshake (see `crate::handshake`): the side that opens a
/// connection proves the cluster key to the side it reaches, and back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Handshake {
    /// First message: a fresh random nonce, hex. Answered by a `hello`
    /// reply proving the cluster key over it.
    Hello { id: u64, nonce: String },
    /// Last message: the opener's proof of the cluster key over both
    /// nonces. Answered by `welcome`.
    HelloProof { id: u64, proof: String },
}

kinds!(Handshake {
    Hello => "hello",
    HelloProof => "hello_proof",
});
serde_message!(Handshake);

impl Handshake {
    pub fn id(&self) -> u64 {
        match self {
            Handshake::Hello { id, .. } | Handshake::HelloProof { id, .. } => *id,
        }
    }
}

/// A user logs in to the balancer (first message of a connection when the
/// balancer runs with `--users`). Answered by `welcome`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename = "login")]
pub struct Login {
    pub id: u64,
    pub user: String,
    pub password: Password,
}

impl Login {
    pub const TYPES: &'static [&'static str] = &["login"];
}

/// A password on the wire; `Debug` never prints it, so a logged request
/// cannot leak one.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Password(pub String);

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(..)")
    }
}

/// What a balancer reads: from clients, and from servers of its pool.
/// Written as the message inside.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum ToBalancer {
    Client(ClientRequest),
    Pool(PoolRequest),
    Handshake(Handshake),
    Login(Login),
}

impl ToBalancer {
    pub fn id(&self) -> u64 {
        match self {
            ToBalancer::Client(r) => r.id(),
            ToBalancer::Pool(r) => r.id(),
            ToBalancer::Handshake(r) => r.id(),
            ToBalancer::Login(r) => r.id,
        }
    }

    /// A family's message, by its `type` (one of `types()`).
    fn of_kind(kind: &str, json: Json<'_>) -> serde_json::Result<Self> {
        Ok(if Handshake::TYPES.contains(&kind) {
            ToBalancer::Handshake(json.parse()?)
        } else if Login::TYPES.contains(&kind) {
            ToBalancer::Login(json.parse()?)
        } else if PoolRequest::TYPES.contains(&kind) {
            ToBalancer::Pool(json.parse()?)
        } else {
            ToBalancer::Client(json.parse()?)
        })
    }
}

impl Message for ToBalancer {
    fn types() -> Vec<&'static str> {
        [
            ClientRequest::TYPES,
            PoolRequest::TYPES,
            Handshake::TYPES,
            Login::TYPES,
        ]
        .concat()
    }

    fn parse(payload: &[u8]) -> serde_json::Result<Self> {
        if let Some(store) = frequent_store(payload) {
            return Ok(ToBalancer::Client(ClientRequest::Store(store)));
        }
        let kind = peek_type(payload)?;
        Self::of_kind(&kind, Json::Bytes(payload))
    }

    fn parse_value(kind: &str, value: serde_json::Value) -> serde_json::Result<Self> {
        Self::of_kind(kind, Json::Value(value))
    }

    fn misdirected(kind: &str) -> Option<String> {
        StorageRequest::TYPES
            .contains(&kind)
            .then(|| format!("`{kind}` is a request for storage servers, not for the balancer"))
    }
}

/// What a storage server reads. Written as the message inside.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum ToServer {
    Storage(StorageRequest),
    Handshake(Handshake),
}

impl ToServer {
    /// A family's message, by its `type` (one of `types()`).
    fn of_kind(kind: &str, json: Json<'_>) -> serde_json::Result<Self> {
        Ok(if Handshake::TYPES.contains(&kind) {
            ToServer::Handshake(json.parse()?)
        } else {
            ToServer::Storage(json.parse()?)
        })
    }
}

impl Message for ToServer {
    fn types() -> Vec<&'static str> {
        [StorageRequest::TYPES, Handshake::TYPES].concat()
    }

    fn parse(payload: &[u8]) -> serde_json::Result<Self> {
        if let Some(store) = frequent_store(payload) {
            return Ok(ToServer::Storage(StorageRequest::Store(store)));
        }
        let kind = peek_type(payload)?;
        Self::of_kind(&kind, Json::Bytes(payload))
    }

    fn parse_value(kind: &str, value: serde_json::Value) -> serde_json::Result<Self> {
        Self::of_kind(kind, Json::Value(value))
    }

    fn misdirected(kind: &str) -> Option<String> {
        let balancer = [ClientRequest::TYPES, PoolRequest::TYPES, Login::TYPES];
        balancer
            .iter()
            .any(|types| types.contains(&kind))
            .then(|| format!("`{kind}` is a request for the balancer, not for storage servers"))
    }
}

/// A message still to be parsed: the payload, or the JSON value an
/// invalid payload was read into to explain it.
enum Json<'a> {
    Bytes(&'a [u8]),
    Value(serde_json::Value),
}

impl Json<'_> {
    fn parse<T: DeserializeOwned>(self) -> serde_json::Result<T> {
        match self {
            Json::Bytes(bytes) => serde_json::from_slice(bytes),
            Json::Value(value) => serde_json::from_value(value),
        }
    }
}

/// The `type` of a payload, read without decoding the rest into anything.
fn peek_type(payload: &[u8]) -> serde_json::Result<Cow<'_, str>> {
    #[derive(Deserialize)]
    struct Tag<'a> {
        #[serde(rename = "type", borrow)]
        kind: Cow<'a, str>,
    }
    serde_json::from_slice::<Tag>(payload).map(|tag| tag.kind)
}

/// A `store`, the most frequent request, as clients and the balancer write
/// it (`type` first), decoded straight into its fields rather than through
/// serde's detour for a tagged enum; `None` sends it the general way.
fn frequent_store(payload: &[u8]) -> Option<StoreRequest> {
    if !payload.starts_with(br#"{"type":"store","#) {
        return None;
    }
    // The tag is an unknown field to `StoreRequest`, which skips it.
    serde_json::from_slice(payload).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{decode, ErrorCode};

    /// Every name in a family's list is a `type` serde knows for it: a
    /// bare `{"type": name}` fails for missing fields, never for the type.
    fn serde_knows<T: DeserializeOwned>(types: &[&str]) {
        for kind in types {
            let bare = serde_json::json!({ "type": kind });
            if let Err(e) = serde_json::from_value::<T>(bare) {
                assert!(!e.to_string().contains("unknown variant"), "{kind}: {e}");
            }
        }
        let mut sorted = types.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), types.len(), "a name twice: {types:?}");
    }

    #[test]
    fn every_listed_type_is_the_one_serde_reads() {
        serde_knows::<ClientRequest>(ClientRequest::TYPES);
        serde_knows::<PoolRequest>(PoolRequest::TYPES);
        serde_knows::<StorageRequest>(StorageRequest::TYPES);
        serde_knows::<Handshake>(Handshake::TYPES);
        serde_knows::<Login>(Login::TYPES);
        serde_knows::<crate::proto::Reply>(crate::proto::Reply::TYPES);
        let listener = ToBalancer::types();
        let (mut sorted, len) = (listener.clone(), listener.len());
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), len, "families of one listener overlap");
    }

    #[test]
    fn each_listener_reads_its_families_and_points_elsewhere_for_the_rest() {
        let hello = br#"{"type":"hello","id":1,"nonce":"ab"}"#;
        assert!(matches!(
            decode::<ToServer>(hello),
            Ok(ToServer::Handshake(Handshake::Hello { id: 1, .. }))
        ));
        assert!(matches!(
            decode::<ToBalancer>(hello),
            Ok(ToBalancer::Handshake(_))
        ));
        let register = br#"{"type":"register","id":2,"addr":"127.0.0.1:1"}"#;
        assert!(matches!(
            decode::<ToBalancer>(register),
            Ok(ToBalancer::Pool(PoolRequest::Register { id: 2, .. }))
        ));
        let e = decode::<ToServer>(register).unwrap_err();
        assert_eq!((e.code, e.id), (ErrorCode::BadRequest, Some(2)));
        assert!(e.message.contains("for the balancer"), "{}", e.message);
        let forget = br#"{"type":"forget","id":3,"numbers":[1]}"#;
        let e = decode::<ToBalancer>(forget).unwrap_err();
        assert_eq!((e.code, e.id), (ErrorCode::BadRequest, Some(3)));
        assert!(e.message.contains("for storage servers"), "{}", e.message);
        let login = br#"{"type":"login","id":4,"user":"u","password":"p"}"#;
        let Ok(ToBalancer::Login(login)) = decode::<ToBalancer>(login) else {
            panic!("a login")
        };
        assert_eq!((login.id, login.user.as_str()), (4, "u"));
        let json: serde_json::Value =
            serde_json::from_slice(&crate::proto::encode(&login)).unwrap();
        assert_eq!(json["type"], "login");
    }

    #[test]
    fn a_store_decodes_the_same_by_the_short_path_and_the_general_one() {
        let bytes = br#"{"type":"store","id":7,"titolo":"t","contenuto":"c","numero_richiesta":9}"#;
        let short = frequent_store(bytes).unwrap();
        let general: StorageRequest = serde_json::from_slice(bytes).unwrap();
        assert_eq!(StorageRequest::Store(short), general);
        // Not the usual shape: the general path.
        assert!(frequent_store(br#"{"id":7,"type":"store"}"#).is_none());
    }
}
