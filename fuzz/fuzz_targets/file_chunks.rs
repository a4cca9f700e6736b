//! A stream of frames as a server (or the balancer's relay) reads an
//! upload: messages, and after each `chunk` its raw body, whose length must
//! match. Any bytes give messages, bodies of the announced length or a
//! typed error, never a panic; tickets are checked without panicking; and
//! a `store` payload's fields forwarded as the client wrote them decode to
//! the same document as the payload.
#![no_main]

use lbft::auth::ClusterKey;
use lbft::proto::file::{read_body_into, valid_upload_id};
use lbft::proto::{decode, decode_document_fields, raw_document_fields, FrameReader, StorageRequest};
use libfuzzer_sys::fuzz_target;

const CAP: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let key = ClusterKey::from_bytes([7; 32]);
    let mut reader = FrameReader::new(data, CAP);
    let mut body = Vec::new();
    loop {
        match reader.message::<StorageRequest>() {
            Ok(None) | Err(_) => break,
            Ok(Some(Err(_))) => continue,
            Ok(Some(Ok(StorageRequest::Chunk(chunk)))) => {
                if chunk.body_len > CAP as u64 {
                    break;
                }
                match read_body_into(&mut reader, chunk.body_len, &mut body) {
                    Ok(()) => assert_eq!(body.len() as u64, chunk.body_len),
                    Err(_) => break,
                }
            }
            Ok(Some(Ok(StorageRequest::Upload(upload)))) => {
                let _ = valid_upload_id(&upload.upload_id);
                if let Some(ticket) = &upload.ticket {
                    let _ = ticket.is_signed(&key, &upload.upload_id, upload.size);
                }
            }
            Ok(Some(Ok(_))) => {}
        }
    }
    if let Ok(StorageRequest::Store(store)) = decode::<StorageRequest>(data) {
        if let Some(fields) = raw_document_fields(data) {
            assert_eq!(decode_document_fields(&fields).ok(), Some(store.doc));
        }
    }
});
