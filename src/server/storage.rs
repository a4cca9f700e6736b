//! A server's storage folder: safe file names and atomic, never-overwriting
//! writes. Nothing here deletes a stored document.

use crate::proto::Document;
use serde::Serialize;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Longest title part of a stored file name, in characters.
pub const MAX_TITLE_CHARS: usize = 80;
/// And in bytes: with the number prefix and a `~N.json` suffix the name
/// stays well under the 255-byte limit of common file systems.
pub const MAX_TITLE_BYTES: usize = 200;

/// The JSON written for each stored document.
#[derive(Debug, Serialize)]
struct StoredDocument<'a> {
    titolo: &'a str,
    contenuto: &'a str,
    numero_richiesta: u64,
    a_count: u64,
    received_at: String,
}

pub struct Storage {
    dir: PathBuf,
    temp_seq: AtomicU64,
}

impl Storage {
    /// Opens (creating if needed) a storage folder.
    pub fn open(dir: &Path) -> io::Result<Storage> {
        fs::create_dir_all(dir)?;
        Ok(Storage {
            dir: dir.to_path_buf(),
            temp_seq: AtomicU64::new(0),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Number of stored documents already in the folder.
    pub fn count(&self) -> io::Result<u64> {
        Ok(self.stored_files()?.len() as u64)
    }

    fn stored_files(&self) -> io::Result<Vec<PathBuf>> {
        let mut files = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let path = entry?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if !name.starts_with('.') && name.ends_with(".json") && path.is_file() {
                files.push(path);
            }
        }
        Ok(files)
    }

    /// Removes stored documents (and leftover temporary files). Only on an
    /// explicit request from the operator.
    pub fn clean(&self) -> io::Result<u64> {
        let mut removed = 0;
        for entry in fs::read_dir(&self.dir)? {
            let path = entry?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if path.is_file() && (name.ends_with(".json") || name.starts_with(".tmp-")) {
                fs::remove_file(&path)?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Writes a document and returns its file name. The file appears whole or
    /// not at all (temporary file, fsync, link into place), and an existing
    /// file is never replaced: a clashing name gets a `~N` suffix.
    pub fn store(&self, request_number: u64, doc: &Document, a_count: u64) -> io::Result<String> {
        let record = StoredDocument {
            titolo: &doc.title,
            contenuto: &doc.content,
            numero_richiesta: request_number,
            a_count,
            received_at: rfc3339(SystemTime::now()),
        };
        let bytes = serde_json::to_vec_pretty(&record).map_err(io::Error::other)?;

        let seq = self.temp_seq.fetch_add(1, Ordering::Relaxed);
        let temp = self.dir.join(format!(".tmp-{}-{seq}", std::process::id()));
        let result = self.write_then_link(&temp, &bytes, request_number, &doc.title);
        // The temporary name is only a staging area; whatever happened, it
        // must not linger.
        let _ = fs::remove_file(&temp);
        result
    }

    fn write_then_link(
        &self,
        temp: &Path,
        bytes: &[u8],
        request_number: u64,
        title: &str,
    ) -> io::Result<String> {
        let mut file = File::options().write(true).create_new(true).open(temp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);

        let base = format!("{request_number}_{}", safe_title(title));
        for n in 0u32.. {
            let name = if n == 0 {
                format!("{base}.json")
            } else {
                format!("{base}~{n}.json")
            };
            // A hard link fails if the name exists, unlike rename, so two
            // documents can never overwrite each other.
            match fs::hard_link(temp, self.dir.join(&name)) {
                Ok(()) => {
                    if let Ok(d) = File::open(&self.dir) {
                        let _ = d.sync_all();
                    }
                    return Ok(name);
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
        unreachable!("u32 suffixes exhausted")
    }
}

/// Turns an untrusted title into one safe path component: letters and digits
/// (accents included) and `-`, `_`, `.` are kept; separators, control
/// characters and anything else become `_`; no `..`, no leading dot, bounded
/// length, never empty.
pub fn safe_title(title: &str) -> String {
    let mut out = String::new();
    for c in title.chars().take(MAX_TITLE_CHARS * 4) {
        let keep = c.is_alphanumeric() || matches!(c, '-' | '_' | '.');
        let c = if keep { c } else { '_' };
        // Collapse runs of '_' and of '.', which also removes every "..".
        if (c == '_' || c == '.') && out.ends_with(c) {
            continue;
        }
        out.push(c);
    }
    let mut trimmed = String::new();
    for c in out
        .trim_matches(|c| c == '_' || c == '.')
        .chars()
        .take(MAX_TITLE_CHARS)
    {
        if trimmed.len() + c.len_utf8() > MAX_TITLE_BYTES {
            break;
        }
        trimmed.push(c);
    }
    let trimmed = trimmed.trim_end_matches(['_', '.']);
    if trimmed.is_empty() {
        "untitled".to_string()
    } else {
        trimmed.to_string()
    }
}

/// Counts the letters `a` and `A`.
pub fn count_a(text: &str) -> u64 {
    text.chars().filter(|c| matches!(c, 'a' | 'A')).count() as u64
}

/// Formats a time as RFC 3339 in UTC with milliseconds.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, day) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian
/// (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn hostile_titles_become_one_safe_component() {
        for (input, expected) in [
            ("../../etc/x", "etc_x"),
            ("a/b", "a_b"),
            ("a\\b", "a_b"),
            ("nul\0byte", "nul_byte"),
            ("..", "untitled"),
            ("", "untitled"),
            ("  ", "untitled"),
            (".hidden", "hidden"),
            ("a..b", "a.b"),
            ("Città d'Arte", "Città_d_Arte"),
            ("line\nbreak\ttab", "line_break_tab"),
        ] {
            assert_eq!(safe_title(input), expected, "for {input:?}");
        }
        let long = "x".repeat(10_000);
        assert_eq!(safe_title(&long).chars().count(), MAX_TITLE_CHARS);
        let wide = safe_title(&"𝐀".repeat(100));
        assert!(
            wide.len() <= MAX_TITLE_BYTES && wide.starts_with("𝐀𝐀"),
            "{wide}"
        );
    }

    #[test]
    fn counts_both_cases_of_a_only() {
        assert_eq!(count_a("Abracadabra à A"), 6);
        assert_eq!(count_a(""), 0);
    }

    #[test]
    fn formats_dates() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_795_430_096_789);
        assert_eq!(rfc3339(t), "2026-11-23T10:34:56.789Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn store_never_overwrites_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path()).unwrap();
        let doc = Document {
            title: "../x".into(),
            content: "aaa".into(),
        };
        let first = storage.store(1, &doc, 3).unwrap();
        let second = storage.store(1, &doc, 3).unwrap();
        assert_eq!(first, "1_x.json");
        assert_eq!(second, "1_x~1.json");
        let mut names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["1_x.json", "1_x~1.json"]);
        let v: serde_json::Value =
            serde_json::from_slice(&fs::read(dir.path().join(&first)).unwrap()).unwrap();
        assert_eq!(v["titolo"], "../x");
        assert_eq!(v["a_count"], 3);
        assert_eq!(v["numero_richiesta"], 1);
        assert_eq!(storage.count().unwrap(), 2);
    }
}
