// Properties of the wire, for any message and any bytes: every request and
// reply survives a frame round trip unchanged, and whatever bytes a peer
// sends, the frame reader gives frames within its cap or a typed error,
// without panicking and without allocating more than the cap.

use lbft::proto::{
    decode, encode, read_frame, write_frame, Chunk, ClientKey, ClientRequest, Computed, Deleted,
    Document, EntryKind, ErrorCode, ErrorReply, FileEntry, FileHeader, FileList, FileStored,
    FrameError, FrameReader, Handshake, HeldKey, InventoryReport, KeyProbe, ListKind, Login,
    Message, Operation, Password, PoolRequest, Redirect, Reply, ServerList, ServerView,
    StatusReport, StorageRequest, StoreRequest, Stored, StoredFile, Ticket, ToBalancer, ToServer,
    TransferEvent, TransferList, TransferView, UploadReady, UploadRequest,
};
use proptest::prelude::*;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::{self, Read};

// ------------------------------------------------- allocation bookkeeping

/// The system allocator, noting the largest single request made by a
/// thread while that thread tracks (other tests' threads are not counted).
struct Largest;

thread_local! {
    static TRACKING: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    // `try_with`: the thread may be tearing down its locals.
    let _ = TRACKING.try_with(|tracking| {
        if tracking.get() {
            let _ = LARGEST.try_with(|largest| largest.set(largest.get().max(size)));
        }
    });
}

// SAFETY: every call goes to the system allocator unchanged, so its
// guarantees are this allocator's; noting a size only sets thread-local
// cells (const-initialised: no allocation, so no recursion).
unsafe impl GlobalAlloc for Largest {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller keeps `alloc`'s contract, which is the system's.
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator, that is from `System`,
        // with `layout`.
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: as in `dealloc`, and the caller keeps `realloc`'s contract
        // for `new_size`.
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOC: Largest = Largest;

/// Runs `f` and returns its result with the largest single allocation it
/// made on this thread.
fn largest_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|l| l.set(0));
    TRACKING.with(|t| t.set(true));
    let out = f();
    TRACKING.with(|t| t.set(false));
    (out, LARGEST.with(Cell::get))
}

// ------------------------------------------------------------- strategies

/// Any text, control characters, quotes and non-ASCII included.
fn text() -> impl Strategy<Value = String> {
    "(?s).{0,24}"
}

fn finite_f32() -> impl Strategy<Value = f32> {
    any::<f32>().prop_filter("finite", |f| f.is_finite())
}

fn finite_f64() -> impl Strategy<Value = f64> {
    any::<f64>().prop_filter("finite", |f| f.is_finite())
}

fn document() -> impl Strategy<Value = Document> {
    (text(), text()).prop_map(|(title, content)| Document { title, content })
}

fn operation() -> impl Strategy<Value = Operation> {
    proptest::sample::select(Operation::ALL.to_vec())
}

fn error_code() -> impl Strategy<Value = ErrorCode> {
    proptest::sample::select(vec![
        ErrorCode::FrameTooLarge,
        ErrorCode::InvalidUtf8,
        ErrorCode::InvalidJson,
        ErrorCode::UnknownType,
        ErrorCode::BadRequest,
        ErrorCode::Timeout,
        ErrorCode::NoServer,
        ErrorCode::ServerFailed,
        ErrorCode::Storage,
        ErrorCode::Internal,
        ErrorCode::ShuttingDown,
        ErrorCode::Expired,
        ErrorCode::InProgress,
        ErrorCode::NotFound,
        ErrorCode::ChecksumMismatch,
        ErrorCode::SizeMismatch,
        ErrorCode::BadOffset,
        ErrorCode::BadTicket,
        ErrorCode::Unauthenticated,
        ErrorCode::Forbidden,
        ErrorCode::TooLarge,
        ErrorCode::Exists,
        ErrorCode::Unavailable,
    ])
}

/// Fails to compile when a request or reply type is added without a
/// strategy below (add it to its family's strategy or `reply()`, then
/// here).
#[allow(dead_code)]
fn every_variant_has_a_strategy(
    client: &ClientRequest,
    pool: &PoolRequest,
    storage: &StorageRequest,
    handshake: &Handshake,
    reply: &Reply,
) {
    match client {
        ClientRequest::Store(_)
        | ClientRequest::Calc { .. }
        | ClientRequest::Servers { .. }
        | ClientRequest::Transfers { .. }
        | ClientRequest::AddServer { .. }
        | ClientRequest::DrainServer { .. }
        | ClientRequest::RemoveServer { .. }
        | ClientRequest::Repair { .. }
        | ClientRequest::Upload(_)
        | ClientRequest::Chunk(_)
        | ClientRequest::UploadEnd { .. }
        | ClientRequest::List { .. }
        | ClientRequest::Get { .. }
        | ClientRequest::Delete { .. } => {}
    }
    match pool {
        PoolRequest::Register { .. }
        | PoolRequest::Deregister { .. }
        | PoolRequest::TransferEvent(_) => {}
    }
    match storage {
        StorageRequest::Store(_)
        | StorageRequest::Calc { .. }
        | StorageRequest::Status { .. }
        | StorageRequest::Forget { .. }
        | StorageRequest::Lookup { .. }
        | StorageRequest::Inventory { .. }
        | StorageRequest::Fetch { .. }
        | StorageRequest::Upload(_)
        | StorageRequest::Chunk(_)
        | StorageRequest::UploadEnd { .. }
        | StorageRequest::List { .. }
        | StorageRequest::Get { .. }
        | StorageRequest::Delete { .. } => {}
    }
    match handshake {
        Handshake::Hello { .. } | Handshake::HelloProof { .. } => {}
    }
    match reply {
        Reply::Stored(_)
        | Reply::Calc(_)
        | Reply::Status(_)
        | Reply::Servers(_)
        | Reply::Transfers(_)
        | Reply::Forgotten { .. }
        | Reply::Keys { .. }
        | Reply::Membership { .. }
        | Reply::Error(_)
        | Reply::UploadReady(_)
        | Reply::Redirect(_)
        | Reply::Chunk(_)
        | Reply::FileStored(_)
        | Reply::Files(_)
        | Reply::File(_)
        | Reply::Deleted(_)
        | Reply::Inventory(_)
        | Reply::Recorded { .. }
        | Reply::Fetched { .. }
        | Reply::Hello { .. }
        | Reply::Welcome { .. } => {}
    }
}

fn ticket() -> impl Strategy<Value = Ticket> {
    (
        text(),
        any::<u64>(),
        any::<u64>(),
        proptest::option::of(text()),
        proptest::option::of(text()),
        text(),
    )
        .prop_map(
            |(server, expires_ms, number, report_to, owner, mac)| Ticket {
                server,
                expires_ms,
                number,
                report_to,
                owner,
                mac,
            },
        )
}

fn chunk() -> impl Strategy<Value = Chunk> {
    (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(id, offset, body_len)| Chunk {
        id,
        offset,
        body_len,
    })
}

fn store_request() -> impl Strategy<Value = StoreRequest> {
    (
        any::<u64>(),
        document(),
        any::<Option<u64>>(),
        any::<Option<u64>>(),
    )
        .prop_map(|(id, doc, request_number, not_after_ms)| StoreRequest {
            id,
            doc,
            request_number,
            not_after_ms,
            key: None,
            resent: false,
        })
}

fn upload_request() -> impl Strategy<Value = UploadRequest> {
    (
        (any::<u64>(), text(), text(), any::<u64>()),
        (
            proptest::option::of(text()),
            proptest::option::of(ticket()),
            proptest::option::of(text()),
        ),
    )
        .prop_map(
            |((id, upload_id, name, size), (server, ticket, owner))| UploadRequest {
                id,
                upload_id,
                name,
                size,
                server,
                ticket,
                no_clobber: size % 2 == 0,
                owner,
            },
        )
}

fn list_kind() -> impl Strategy<Value = Option<ListKind>> {
    proptest::sample::select(vec![
        None,
        Some(ListKind::Files),
        Some(ListKind::Documents),
        Some(ListKind::All),
    ])
}

/// What a client asks the balancer.
fn client_request() -> impl Strategy<Value = ClientRequest> {
    let addr = || (any::<u64>(), text());
    prop_oneof![
        store_request().prop_map(ClientRequest::Store),
        (any::<u64>(), operation())
            .prop_map(|(id, operation)| ClientRequest::Calc { id, operation }),
        any::<u64>().prop_map(|id| ClientRequest::Servers { id }),
        (
            any::<u64>(),
            any::<bool>(),
            any::<bool>(),
            any::<Option<u64>>(),
            any::<Option<u32>>()
        )
            .prop_map(
                |(id, active, failed, since_ms, limit)| ClientRequest::Transfers {
                    id,
                    active,
                    failed,
                    since_ms,
                    limit,
                }
            ),
        addr().prop_map(|(id, addr)| ClientRequest::AddServer { id, addr }),
        addr().prop_map(|(id, addr)| ClientRequest::DrainServer { id, addr }),
        addr().prop_map(|(id, addr)| ClientRequest::RemoveServer { id, addr }),
        any::<u64>().prop_map(|id| ClientRequest::Repair { id }),
        upload_request().prop_map(ClientRequest::Upload),
        chunk().prop_map(ClientRequest::Chunk),
        (any::<u64>(), text()).prop_map(|(id, sha256)| ClientRequest::UploadEnd { id, sha256 }),
        (any::<u64>(), list_kind()).prop_map(|(id, kind)| ClientRequest::List { id, kind }),
        (
            any::<u64>(),
            text(),
            any::<u64>(),
            proptest::option::of(text())
        )
            .prop_map(|(id, name, offset, owner)| ClientRequest::Get {
                id,
                name,
                offset,
                owner
            }),
        (any::<u64>(), text(), proptest::option::of(text()))
            .prop_map(|(id, name, owner)| ClientRequest::Delete { id, name, owner }),
    ]
}

/// What a storage server tells the balancer.
fn pool_request() -> impl Strategy<Value = PoolRequest> {
    prop_oneof![
        (any::<u64>(), text()).prop_map(|(id, addr)| PoolRequest::Register { id, addr }),
        (any::<u64>(), text()).prop_map(|(id, addr)| PoolRequest::Deregister { id, addr }),
        (
            (any::<u64>(), any::<u64>(), text(), text()),
            (
                proptest::option::of(text()),
                proptest::option::of(text()),
                text()
            )
        )
            .prop_map(|((id, number, server, state), (file, error, mac))| {
                PoolRequest::TransferEvent(Box::new(TransferEvent {
                    id,
                    number,
                    server,
                    stored: file.clone().map(|name| StoredFile {
                        name,
                        owner: error.clone(),
                        size: number / 3,
                        sha256: mac.clone(),
                        upload_id: state.clone(),
                        stored_ms: id,
                    }),
                    state,
                    file,
                    error,
                    mac,
                }))
            }),
    ]
}

/// What a storage server is asked.
fn storage_request() -> impl Strategy<Value = StorageRequest> {
    prop_oneof![
        store_request().prop_map(StorageRequest::Store),
        (any::<u64>(), operation())
            .prop_map(|(id, operation)| StorageRequest::Calc { id, operation }),
        any::<u64>().prop_map(|id| StorageRequest::Status { id }),
        (
            any::<u64>(),
            proptest::collection::vec(any::<u64>(), 0..8),
            proptest::collection::vec(any::<u128>(), 0..4)
        )
            .prop_map(|(id, numbers, keys)| StorageRequest::Forget {
                id,
                numbers,
                keys: keys.into_iter().map(ClientKey).collect()
            }),
        (
            any::<u64>(),
            proptest::collection::vec((any::<u128>(), any::<u64>()), 0..4)
        )
            .prop_map(|(id, keys)| StorageRequest::Lookup {
                id,
                keys: keys
                    .into_iter()
                    .map(|(key, request_number)| KeyProbe {
                        key: ClientKey(key),
                        request_number
                    })
                    .collect()
            }),
        any::<u64>().prop_map(|id| StorageRequest::Inventory { id }),
        (
            any::<u64>(),
            text(),
            text(),
            proptest::option::of(text()),
            proptest::option::of(text())
        )
            .prop_map(|(id, from, name, owner, upload_id)| StorageRequest::Fetch {
                id,
                from,
                name,
                owner,
                upload_id
            }),
        upload_request().prop_map(StorageRequest::Upload),
        chunk().prop_map(StorageRequest::Chunk),
        (any::<u64>(), text()).prop_map(|(id, sha256)| StorageRequest::UploadEnd { id, sha256 }),
        (any::<u64>(), proptest::option::of(text()), list_kind())
            .prop_map(|(id, owner, kind)| StorageRequest::List { id, owner, kind }),
        (
            any::<u64>(),
            text(),
            any::<u64>(),
            proptest::option::of(text())
        )
            .prop_map(|(id, name, offset, owner)| StorageRequest::Get {
                id,
                name,
                offset,
                owner
            }),
        (
            any::<u64>(),
            text(),
            proptest::option::of(text()),
            proptest::option::of(text())
        )
            .prop_map(|(id, name, owner, upload_id)| StorageRequest::Delete {
                id,
                name,
                owner,
                upload_id
            }),
    ]
}

fn handshake() -> impl Strategy<Value = Handshake> {
    prop_oneof![
        (any::<u64>(), text()).prop_map(|(id, nonce)| Handshake::Hello { id, nonce }),
        (any::<u64>(), text()).prop_map(|(id, proof)| Handshake::HelloProof { id, proof }),
    ]
}

/// Whatever a balancer's listener reads.
fn to_balancer() -> impl Strategy<Value = ToBalancer> {
    prop_oneof![
        client_request().prop_map(ToBalancer::Client),
        pool_request().prop_map(ToBalancer::Pool),
        handshake().prop_map(ToBalancer::Handshake),
        (any::<u64>(), text(), text()).prop_map(|(id, user, password)| {
            ToBalancer::Login(Login {
                id,
                user,
                password: Password(password),
            })
        }),
    ]
}

/// Whatever a storage server's listener reads.
fn to_server() -> impl Strategy<Value = ToServer> {
    prop_oneof![
        storage_request().prop_map(ToServer::Storage),
        handshake().prop_map(ToServer::Handshake),
    ]
}

fn file_entry() -> impl Strategy<Value = FileEntry> {
    (
        (text(), any::<u64>(), text(), text()),
        (any::<u64>(), proptest::option::of(text())),
    )
        .prop_map(
            |((name, size, sha256, server), (stored_ms, owner))| FileEntry {
                kind: if size % 3 == 0 {
                    EntryKind::Document
                } else {
                    EntryKind::File
                },
                number: (size % 3 == 0).then_some(stored_ms),
                file: owner.clone().unwrap_or_default(),
                upload_id: owner.clone(),
                available: size % 2 == 0,
                owner,
                ..FileEntry::file(&name, size, &sha256, &server, stored_ms)
            },
        )
}

/// Replies added with files and users.
fn file_and_user_reply() -> impl Strategy<Value = Reply> {
    prop_oneof![
        (any::<u64>(), text(), text(), any::<u64>()).prop_map(|(id, upload_id, server, offset)| {
            Reply::UploadReady(UploadReady {
                id,
                upload_id,
                server,
                offset,
            })
        }),
        (any::<u64>(), text(), text(), ticket()).prop_map(|(id, upload_id, server, ticket)| {
            Reply::Redirect(Redirect {
                id,
                upload_id,
                server,
                ticket,
            })
        }),
        chunk().prop_map(Reply::Chunk),
        (
            (any::<u64>(), text(), text(), any::<u64>()),
            (text(), text(), any::<bool>())
        )
            .prop_map(
                |((id, upload_id, name, size), (sha256, server, existing))| {
                    Reply::FileStored(FileStored {
                        id,
                        stored_ms: size / 2,
                        file: if existing {
                            name.clone()
                        } else {
                            String::new()
                        },
                        upload_id,
                        name,
                        size,
                        sha256,
                        server,
                        existing,
                    })
                }
            ),
        (
            any::<u64>(),
            proptest::collection::vec(file_entry(), 0..3),
            proptest::collection::vec(text(), 0..2)
        )
            .prop_map(|(id, files, unreachable)| Reply::Files(FileList {
                id,
                more: files.len() == 1,
                rebuilding: unreachable.iter().rev().cloned().collect(),
                files,
                unreachable,
            })),
        (
            any::<u64>(),
            text(),
            proptest::collection::vec(text(), 0..2),
            proptest::collection::vec(text(), 0..2)
        )
            .prop_map(|(id, name, servers, pending)| Reply::Deleted(Deleted {
                id,
                name,
                servers,
                pending
            })),
        (any::<u64>(), any::<u64>(), text(), any::<u64>()).prop_map(
            |(id, files, files_digest, documents)| Reply::Inventory(InventoryReport {
                id,
                files,
                files_digest,
                documents
            })
        ),
        (
            (any::<u64>(), text(), any::<u64>()),
            (text(), text(), any::<u64>())
        )
            .prop_map(|((id, name, size), (sha256, server, offset))| {
                Reply::File(FileHeader {
                    id,
                    name,
                    size,
                    sha256,
                    server,
                    offset,
                })
            }),
        any::<u64>().prop_map(|id| Reply::Recorded { id }),
        (any::<u64>(), text(), any::<u64>(), text()).prop_map(|(id, file, size, sha256)| {
            Reply::Fetched {
                id,
                file,
                size,
                sha256,
            }
        }),
        (any::<u64>(), text(), text(), text()).prop_map(|(id, nonce, addr, proof)| {
            Reply::Hello {
                id,
                nonce,
                addr,
                proof,
            }
        }),
        (any::<u64>(), proptest::option::of(text()), any::<bool>())
            .prop_map(|(id, user, admin)| Reply::Welcome { id, user, admin }),
    ]
}

fn status_report() -> impl Strategy<Value = StatusReport> {
    (
        (any::<u64>(), any::<bool>(), any::<bool>()),
        proptest::array::uniform12(any::<u64>()),
        (finite_f32(), finite_f32()),
    )
        .prop_map(
            |((id, overloaded, storage_writable), n, (cpu, process_cpu))| StatusReport {
                id,
                overloaded,
                active: n[0],
                max_active: n[1],
                memory_bytes: n[2],
                max_memory_bytes: n[3],
                cpu_percent: cpu,
                process_cpu_percent: process_cpu,
                memory_used_bytes: n[4],
                memory_total_bytes: n[5],
                disk_used_bytes: n[6],
                disk_free_bytes: n[7],
                storage_writable,
                net_rx_bytes: n[8],
                net_tx_bytes: n[9],
                uptime_secs: n[10],
                files_stored: n[11],
            },
        )
}

fn server_view() -> impl Strategy<Value = ServerView> {
    (
        (any::<u32>(), text(), text(), any::<u64>()),
        proptest::option::of(status_report()),
        proptest::option::of(finite_f64()),
        (any::<u64>(), any::<u64>(), any::<Option<u64>>()),
    )
        .prop_map(
            |((id, name, state, in_flight), status, check_ms, (requests, failures, age))| {
                ServerView {
                    id,
                    name,
                    state,
                    in_flight,
                    status,
                    check_ms,
                    requests,
                    failures,
                    status_age_ms: age,
                }
            },
        )
}

fn transfer_view() -> impl Strategy<Value = TransferView> {
    (
        (any::<u64>(), text(), text(), any::<u64>()),
        proptest::collection::vec(text(), 0..3),
        (
            text(),
            proptest::option::of(text()),
            proptest::option::of(text()),
        ),
        (
            any::<u64>(),
            any::<Option<u64>>(),
            any::<Option<u64>>(),
            proptest::option::of(text()),
        ),
        proptest::option::of(text()),
    )
        .prop_map(
            |(
                (number, client, title, size),
                servers,
                (state, server, file),
                (started_ms, ended_ms, duration_ms, error),
                user,
            )| TransferView {
                number,
                client,
                title,
                size,
                servers,
                state,
                server,
                file,
                started_ms,
                ended_ms,
                duration_ms,
                error,
                balancer: user.as_ref().map(|u| format!("{u}.balancer:60002")),
                user,
            },
        )
}

fn reply() -> impl Strategy<Value = Reply> {
    prop_oneof![
        (
            any::<u64>(),
            text(),
            any::<u64>(),
            text(),
            any::<u64>(),
            any::<bool>()
        )
            .prop_map(|(id, server, request_number, file, a_count, existing)| {
                Reply::Stored(Stored {
                    id,
                    server,
                    request_number,
                    file,
                    a_count,
                    existing,
                    copies: Vec::new(),
                    under_replicated: false,
                })
            }),
        (
            any::<u64>(),
            text(),
            any::<i64>(),
            any::<i64>(),
            operation(),
            finite_f64()
        )
            .prop_map(|(id, server, a, b, operation, result)| {
                Reply::Calc(Computed {
                    id,
                    server,
                    a,
                    b,
                    operation,
                    result,
                })
            }),
        status_report().prop_map(Reply::Status),
        (any::<u64>(), proptest::collection::vec(server_view(), 0..3)).prop_map(|(id, servers)| {
            Reply::Servers(ServerList {
                id,
                servers,
                repair: None,
            })
        }),
        (
            any::<u64>(),
            proptest::collection::vec(transfer_view(), 0..3)
        )
            .prop_map(|(id, transfers)| Reply::Transfers(TransferList { id, transfers })),
        (any::<u64>(), any::<u64>()).prop_map(|(id, moved)| Reply::Forgotten { id, moved }),
        (
            any::<u64>(),
            proptest::collection::vec((any::<u128>(), any::<u64>(), text(), any::<u64>()), 0..3),
            proptest::collection::vec(any::<u128>(), 0..3)
        )
            .prop_map(|(id, held, busy)| Reply::Keys {
                id,
                held: held
                    .into_iter()
                    .map(|(key, request_number, file, a_count)| HeldKey {
                        key: ClientKey(key),
                        request_number,
                        file,
                        a_count
                    })
                    .collect(),
                busy: busy.into_iter().map(ClientKey).collect()
            }),
        (any::<u64>(), text()).prop_map(|(id, message)| Reply::Membership { id, message }),
        (any::<Option<u64>>(), error_code(), text())
            .prop_map(|(id, code, message)| Reply::Error(ErrorReply { id, code, message })),
        file_and_user_reply(),
    ]
}

// ----------------------------------------------------------------- helpers

/// A stream that hands out at most `step` bytes per read, as a socket may.
struct Trickle<'a> {
    bytes: &'a [u8],
    step: usize,
}

impl Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min(self.step).min(self.bytes.len());
        buf[..n].copy_from_slice(&self.bytes[..n]);
        self.bytes = &self.bytes[n..];
        Ok(n)
    }
}

/// The fixed read buffer `FrameReader` allocates once.
const READ_BUFFER: usize = 8 * 1024;

// ---------------------------------------------------------------- properties

/// Messages written as frames one after another are read back, each
/// unchanged, by the listener of their family.
fn round_trip<T>(messages: &[T]) -> Result<(), TestCaseError>
where
    T: Message + serde::Serialize + PartialEq + std::fmt::Debug,
{
    let mut wire = Vec::new();
    for m in messages {
        write_frame(&mut wire, &encode(m)).unwrap();
    }
    let mut reader = &wire[..];
    for m in messages {
        let payload = read_frame(&mut reader, wire.len()).unwrap().unwrap();
        prop_assert_eq!(&decode::<T>(&payload).unwrap(), m);
    }
    prop_assert!(read_frame(&mut reader, wire.len()).unwrap().is_none());
    Ok(())
}

proptest! {
    #[test]
    fn any_request_survives_a_frame_round_trip(
        to_balancer in proptest::collection::vec(to_balancer(), 1..4),
        to_server in proptest::collection::vec(to_server(), 1..4),
    ) {
        round_trip(&to_balancer)?;
        round_trip(&to_server)?;
    }

    #[test]
    fn any_reply_survives_a_frame_round_trip(replies in proptest::collection::vec(reply(), 1..4), step in 1usize..16) {
        let mut wire = Vec::new();
        for r in &replies {
            write_frame(&mut wire, &encode(r)).unwrap();
        }
        let mut reader = FrameReader::new(Trickle { bytes: &wire, step }, wire.len());
        for r in &replies {
            prop_assert_eq!(&reader.message::<Reply>().unwrap().unwrap().unwrap(), r);
        }
        prop_assert!(reader.frame().unwrap().is_none());
    }

    #[test]
    fn any_bytes_give_capped_frames_or_a_typed_error(
        bytes in proptest::collection::vec(any::<u8>(), 0..512),
        cap in 0usize..64,
        step in 1usize..8,
    ) {
        let mut reader = FrameReader::new(Trickle { bytes: &bytes, step }, cap);
        let (end, largest) = largest_allocation(|| loop {
            match reader.frame() {
                Ok(Some(frame)) => assert!(frame.len() <= cap),
                Ok(None) => break None,
                Err(e) => break Some(e),
            }
        });
        prop_assert!(largest <= cap.max(READ_BUFFER), "allocated {} with a cap of {}", largest, cap);
        match end {
            None | Some(FrameError::Truncated { .. }) => {}
            Some(FrameError::TooLarge { len, max }) => prop_assert!(len > max as u64),
            Some(e) => prop_assert!(false, "an in-memory stream gave {:?}", e),
        }
    }

    #[test]
    fn a_large_announced_length_allocates_only_what_arrives(
        len in 64u32 * 1024..u32::MAX,
        sent in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        // The cap allows the frame; the peer sends a header and stalls.
        let mut wire = len.to_be_bytes().to_vec();
        wire.extend_from_slice(&sent);
        let (result, largest) = largest_allocation(|| read_frame(&mut &wire[..], usize::MAX));
        let truncated = matches!(result, Err(FrameError::Truncated { .. }));
        prop_assert!(truncated);
        // The first payload buffer is 64 KiB (PROTOCOL.md, Frames), and
        // nothing larger follows.
        prop_assert_eq!(largest, 64 * 1024);
    }

    #[test]
    fn any_payload_decodes_or_fails_with_a_code(payload in proptest::collection::vec(any::<u8>(), 0..64)) {
        // Any listener or replies: a value or a typed error, never a panic.
        let _ = decode::<ToBalancer>(&payload);
        let _ = decode::<ToServer>(&payload);
        let _ = decode::<Reply>(&payload);
    }
}
