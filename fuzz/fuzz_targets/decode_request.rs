//! Any frame payload gives a request or a typed decode error, and a decoded
//! request survives encoding and decoding again unchanged.
#![no_main]

use lbft::proto::{decode, encode, ErrorReply, Reply, Request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|payload: &[u8]| {
    match decode::<Request>(payload) {
        Ok(request) => {
            let again = decode::<Request>(&encode(&request))
                .unwrap_or_else(|e| panic!("{request:?} does not decode after encoding: {e}"));
            assert_eq!(again, request);
            let _ = (request.kind(), request.id());
        }
        Err(e) => {
            // The error goes back to the peer as a reply, which must encode.
            let reply = Reply::Error(ErrorReply::from(e));
            assert_eq!(decode::<Reply>(&encode(&reply)).ok(), Some(reply));
        }
    }
});
