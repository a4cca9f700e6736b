//! What tests of uploads read back: the complete files in server folders,
//! and the byte a client said it resumed from.

use std::path::{Path, PathBuf};

/// Complete files stored under `dirs` (their `files/` folders), sorted.
pub fn stored_files_in(dirs: &[impl AsRef<Path>]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for d in dirs {
        if let Ok(entries) = std::fs::read_dir(d.as_ref().join("files")) {
            out.extend(entries.map(|e| e.unwrap().path()));
        }
    }
    out.sort();
    out
}

/// The byte in a client's "resuming at byte N" line.
pub fn resumed_from(said: &str) -> u64 {
    said.split("resuming at byte ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no resume byte in: {said}"))
}
