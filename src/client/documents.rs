//! Documents on disk: the `.json` files of a folder, each read and checked
//! to be a document (`titolo` and `contenuto`), said in the user's terms
//! when it is not.

use super::Error;
use crate::proto::Document;
use std::path::{Path, PathBuf};

/// The `.json` files of a folder, sorted by name.
pub fn list_documents(dir: &Path) -> Result<Vec<PathBuf>, Error> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::ReadDir(dir.to_path_buf(), e))?;
    let mut files = Vec::new();
    for entry in entries {
        let path = entry
            .map_err(|e| Error::ReadDir(dir.to_path_buf(), e))?
            .path();
        if path.is_file() && path.extension().is_some_and(|e| e == "json") {
            files.push(path);
        }
    }
    if files.is_empty() {
        return Err(Error::NoDocuments(dir.to_path_buf()));
    }
    files.sort();
    Ok(files)
}

/// What a document file must hold, said the same way for every mistake.
const DOCUMENT_SHAPE: &str = "expected an object with titolo and contenuto";

/// Reads a document: a JSON object with string fields `titolo` and
/// `contenuto` (other fields are ignored). A UTF-8 byte-order mark at the
/// start is skipped, as editors on Windows write one.
pub fn load_document(path: &Path) -> Result<Document, Error> {
    let bytes = std::fs::read(path).map_err(|e| Error::ReadFile(path.to_path_buf(), e))?;
    parse_document(&bytes).map_err(|why| Error::BadDocument(path.to_path_buf(), why))
}

fn parse_document(bytes: &[u8]) -> Result<Document, String> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| format!("not valid JSON: {e}"))?;
    let serde_json::Value::Object(mut object) = value else {
        return Err(DOCUMENT_SHAPE.into());
    };
    let mut field = |name: &str| match object.remove(name) {
        Some(serde_json::Value::String(s)) => Ok(s),
        Some(_) => Err(format!("{DOCUMENT_SHAPE}: `{name}` is not a string")),
        None => Err(format!("{DOCUMENT_SHAPE}: `{name}` is missing")),
    };
    Ok(Document {
        title: field("titolo")?,
        content: field("contenuto")?,
    })
}

/// Loads every `.json` document of a folder, once: `ftp` picks from these
/// for each request instead of reading a file per request. Returns the
/// documents and the files that are not documents, each with its reason;
/// it is an error only when no file is a document.
pub fn load_samples(dir: &Path) -> Result<(Vec<Document>, Vec<Error>), Error> {
    let mut good = Vec::new();
    let mut bad = Vec::new();
    for path in list_documents(dir)? {
        match load_document(&path) {
            Ok(doc) => good.push(doc),
            Err(e) => bad.push(e),
        }
    }
    if good.is_empty() {
        return Err(Error::NoUsableDocuments(dir.to_path_buf(), bad));
    }
    Ok((good, bad))
}

/// A folder as the user would type it: `file/`.
pub(super) fn folder(dir: &Path) -> String {
    let text = dir.display().to_string();
    if text.ends_with('/') {
        text
    } else {
        format!("{text}/")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_folder_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = list_documents(dir.path()).unwrap_err();
        assert!(err.to_string().contains("has no .json documents"), "{err}");
    }

    #[test]
    fn samples_are_loaded_once_each_and_a_bad_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("b.json"),
            r#"{"titolo":"b","contenuto":"2"}"#,
        )
        .unwrap();
        std::fs::write(
            dir.path().join("a.json"),
            r#"{"titolo":"a","contenuto":"1"}"#,
        )
        .unwrap();
        std::fs::write(dir.path().join("notes.txt"), "not a document").unwrap();
        let titles: Vec<String> = load_samples(dir.path())
            .unwrap()
            .0
            .into_iter()
            .map(|d| d.title)
            .collect();
        assert_eq!(titles, ["a", "b"]);

        // A bad file is left out and named with its reason.
        std::fs::write(dir.path().join("c.json"), r#"{"titolo":"c"}"#).unwrap();
        let (good, bad) = load_samples(dir.path()).unwrap();
        assert_eq!(good.len(), 2);
        let err = bad[0].to_string();
        assert!(err.contains("c.json") && err.contains("contenuto"), "{err}");

        // Only when no file is a document is it an error, listing each.
        let only_bad = tempfile::tempdir().unwrap();
        std::fs::write(only_bad.path().join("x.json"), "[1,2,3]").unwrap();
        std::fs::write(only_bad.path().join("y.json"), "{").unwrap();
        let err = load_samples(only_bad.path()).unwrap_err().to_string();
        assert!(err.contains("x.json") && err.contains("y.json"), "{err}");
        assert!(err.contains("nothing was sent"), "{err}");
    }

    #[test]
    fn documents_say_what_is_wrong_in_the_users_terms() {
        let shape = "expected an object with titolo and contenuto";
        assert_eq!(parse_document(b"[1,2,3]").unwrap_err(), shape);
        let err = parse_document(br#"{"titolo": 1, "contenuto": "x"}"#).unwrap_err();
        assert_eq!(err, format!("{shape}: `titolo` is not a string"));
        let err = parse_document(br#"{"titolo": "t"}"#).unwrap_err();
        assert_eq!(err, format!("{shape}: `contenuto` is missing"));
        assert!(parse_document(b"{")
            .unwrap_err()
            .starts_with("not valid JSON"));
        let bom = b"\xEF\xBB\xBF{\"titolo\": \"t\", \"contenuto\": \"c\"}";
        assert_eq!(parse_document(bom).unwrap().title, "t");
    }
}
