//! Any frame payload gives, at either listener (balancer or storage
//! server), a request or a typed decode error, and a decoded request
//! survives encoding and decoding again unchanged.
#![no_main]

use lbft::proto::{decode, encode, ErrorReply, Message, Reply, ToBalancer, ToServer};
use libfuzzer_sys::fuzz_target;
use std::fmt::Debug;

fn check<T: Message + PartialEq + Debug>(payload: &[u8], encode: fn(&T) -> Vec<u8>) {
    match decode::<T>(payload) {
        Ok(request) => {
            let again = decode::<T>(&encode(&request))
                .unwrap_or_else(|e| panic!("{request:?} does not decode after encoding: {e}"));
            assert_eq!(again, request);
        }
        Err(e) => {
            // The error goes back to the peer as a reply, which must encode.
            let reply = Reply::Error(ErrorReply::from(e));
            assert_eq!(decode::<Reply>(&lbft::proto::encode(&reply)).ok(), Some(reply));
        }
    }
}

fuzz_target!(|payload: &[u8]| {
    check::<ToBalancer>(payload, |r| encode(r));
    check::<ToServer>(payload, |r| encode(r));
});
