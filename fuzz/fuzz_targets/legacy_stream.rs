//! Any bytes on an original-format connection give documents, status probes
//! or a typed error; never a panic, never an object larger than the cap.
//! Each document read back from `dumps_document` is the same document.
#![no_main]

use lbft::proto::legacy::{dumps_document, LegacyReader, LegacyRequest};
use libfuzzer_sys::fuzz_target;
use std::io::BufReader;

const CAP: usize = 4096;

fuzz_target!(|stream: &[u8]| {
    let reader = LegacyReader::new(BufReader::new(stream), CAP);
    // Every object costs at least two bytes (`{}`), so this ends.
    for (n, item) in reader.enumerate() {
        assert!(
            n <= stream.len() / 2,
            "more objects than the stream can hold"
        );
        match item {
            Ok(LegacyRequest::Document {
                doc,
                request_number,
            }) => {
                assert!(doc.title.len() + doc.content.len() <= CAP);
                let text = dumps_document(&doc, request_number);
                let mut again = LegacyReader::new(text.as_bytes(), text.len());
                match again.next() {
                    Some(Ok(LegacyRequest::Document {
                        doc: back,
                        request_number: number,
                    })) => assert_eq!((back, number), (doc, request_number)),
                    other => panic!("{text:?} reads back as {other:?}"),
                }
            }
            Ok(LegacyRequest::Status) => {}
            Err(e) if e.is_recoverable() => {}
            Err(_) => break,
        }
    }
});
