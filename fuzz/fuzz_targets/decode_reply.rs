//! Any frame payload gives a reply or a typed decode error, and a decoded
//! reply survives encoding and decoding again unchanged (the balancer
//! passes servers' replies and status figures on to clients).
#![no_main]

use lbft::proto::{decode, encode, Reply};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|payload: &[u8]| {
    if let Ok(reply) = decode::<Reply>(payload) {
        let again = decode::<Reply>(&encode(&reply))
            .unwrap_or_else(|e| panic!("{reply:?} does not decode after encoding: {e}"));
        assert_eq!(again, reply);
        let _ = reply.id();
    }
});
