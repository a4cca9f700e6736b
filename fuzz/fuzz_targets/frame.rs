//! Any bytes a peer sends into the frame reader give frames no longer than
//! the cap, or a typed error; never a panic, never an allocation larger
//! than the cap (or the reader's own fixed buffer).
#![no_main]

use lbft::proto::{FrameError, FrameReader};
use libfuzzer_sys::fuzz_target;
use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{self, Read};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// The system allocator, noting the largest single request while tracking.
struct Largest;

static TRACKING: AtomicBool = AtomicBool::new(false);
static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call goes to the system allocator unchanged, so its
// guarantees are this allocator's; noting a size only touches atomics
// (no allocation, so no recursion).
unsafe impl GlobalAlloc for Largest {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if TRACKING.load(Ordering::Relaxed) {
            LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        }
        // SAFETY: the caller keeps `alloc`'s contract, which is the system's.
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator, that is from `System`,
        // with `layout`.
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if TRACKING.load(Ordering::Relaxed) {
            LARGEST.fetch_max(new_size, Ordering::Relaxed);
        }
        // SAFETY: as in `dealloc`, and the caller keeps `realloc`'s contract
        // for `new_size`.
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOC: Largest = Largest;

/// The `BufReader` inside `FrameReader` allocates this much once.
const READ_BUFFER: usize = 8 * 1024;

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

fuzz_target!(|data: &[u8]| {
    let Some((&knobs, stream)) = data.split_first() else {
        return;
    };
    // A small cap, so that lengths above and below it are both reached.
    let cap = usize::from(knobs & 0x3f) * 16;
    let step = usize::from(knobs >> 6) * 3 + 1;
    let mut reader = FrameReader::new(
        Trickle {
            bytes: stream,
            step,
        },
        cap,
    );
    let mut frames = 0;
    LARGEST.store(0, Ordering::Relaxed);
    TRACKING.store(true, Ordering::Relaxed);
    let end = loop {
        match reader.frame() {
            Ok(Some(frame)) => {
                assert!(
                    frame.len() <= cap,
                    "frame of {} over cap {cap}",
                    frame.len()
                );
                frames += 1;
                // Every frame costs its 4-byte header, so this ends.
                assert!(frames * 4 <= stream.len());
            }
            Ok(None) => break None,
            Err(e) => break Some(e),
        }
    };
    TRACKING.store(false, Ordering::Relaxed);
    let largest = LARGEST.load(Ordering::Relaxed);
    assert!(
        largest <= cap.max(READ_BUFFER),
        "allocated {largest} bytes with a cap of {cap}"
    );
    match end {
        None => {}
        Some(FrameError::TooLarge { len, max }) => {
            assert!(len > max as u64 && max == cap);
            assert!(FrameError::TooLarge { len, max }.reply().is_some());
        }
        Some(FrameError::Truncated { expected, got }) => assert!(got < expected),
        Some(e) => panic!("an in-memory stream gave {e:?}"),
    }
});
