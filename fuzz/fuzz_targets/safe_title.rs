//! Any title becomes one safe path component, the same every time.
#![no_main]

use lbft::server::storage::{safe_title, MAX_TITLE_BYTES, MAX_TITLE_CHARS};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let title = String::from_utf8_lossy(data);
    let name = safe_title(&title);
    assert!(!name.is_empty());
    assert!(name != "." && name != "..");
    assert!(!name.contains(['/', '\\', '\0', '~']), "{name:?}");
    assert!(!name.contains(".."), "{name:?}");
    assert!(!name.starts_with('.'), "{name:?}");
    assert!(!name.chars().any(char::is_control), "{name:?}");
    assert!(name.len() <= MAX_TITLE_BYTES && name.chars().count() <= MAX_TITLE_CHARS);
    assert_eq!(std::path::Path::new(&name).components().count(), 1);
    assert_eq!(safe_title(&title), name);
});
