//! What a server tells about what it holds: listings of its files and of
//! its documents, and the short `inventory` the balancer compares with its
//! catalog. The server is the source of truth for bytes; the balancer's
//! catalog is rebuilt from these listings when it is missing or behind.
//!
//! A listing streams: `files` frames of at most `LIST_PAGE` entries, each
//! but the last with `more`, so a folder of a million documents never
//! needs a frame (or a buffer) of its size.

use super::storage::{is_document_name, parse_name};
use super::Shared;
use crate::proto::file::LIST_PAGE;
use crate::proto::{
    EntryKind, ErrorCode, FileEntry, FileList, FrameWriter, InventoryReport, ListKind, Reply,
};
use crate::text::unix_ms;
use serde::Deserialize;
use std::io::{self, Write};
use std::path::Path;

/// `list`: files (the default) or documents, in pages; only `owner`'s
/// files when given (and then no documents: they carry no owner on a
/// server). An error is one `error` frame instead.
pub(super) fn list<W: Write>(
    id: u64,
    owner: Option<&str>,
    kind: Option<ListKind>,
    writer: &mut FrameWriter<W>,
    shared: &Shared,
) -> io::Result<()> {
    let addr = shared.addr.to_string();
    let kind = kind.unwrap_or(ListKind::Files);
    let mut entries = Vec::new();
    if kind.has(EntryKind::File) {
        match shared.files.list(owner) {
            Ok(files) => entries.extend(files.into_iter().map(|m| FileEntry {
                owner: m.owner.clone(),
                file: m.name.clone(),
                upload_id: Some(m.upload_id.clone()),
                ..FileEntry::file(m.sent_as(), m.size, &m.sha256, &addr, m.stored_ms)
            })),
            Err(e) => return writer.message(&cannot_list(id, &e)),
        }
    }
    let mut pages = Pages {
        id,
        writer,
        page: entries,
    };
    // Documents carry no owner here: only a listing of everyone's has them.
    if kind.has(EntryKind::Document) && owner.is_none() {
        if let Err(e) = documents(shared.storage.dir(), &addr, &mut |entry| pages.push(entry)) {
            // What went out already stands; the rest is an error.
            return pages.writer.message(&cannot_list(id, &e));
        }
    }
    pages.finish()
}

fn cannot_list(id: u64, e: &io::Error) -> Reply {
    Reply::error(
        Some(id),
        ErrorCode::Storage,
        format!("cannot list files: {e}"),
    )
}

/// Entries on their way out, a page at a time.
struct Pages<'a, W: Write> {
    id: u64,
    writer: &'a mut FrameWriter<W>,
    page: Vec<FileEntry>,
}

impl<W: Write> Pages<'_, W> {
    fn push(&mut self, entry: FileEntry) -> io::Result<()> {
        self.page.push(entry);
        while self.page.len() > LIST_PAGE {
            let rest = self.page.split_off(LIST_PAGE);
            let full = std::mem::replace(&mut self.page, rest);
            self.send(full, true)?;
        }
        Ok(())
    }

    fn finish(mut self) -> io::Result<()> {
        while self.page.len() > LIST_PAGE {
            let rest = self.page.split_off(LIST_PAGE);
            let full = std::mem::replace(&mut self.page, rest);
            self.send(full, true)?;
        }
        let last = std::mem::take(&mut self.page);
        self.send(last, false)
    }

    fn send(&mut self, files: Vec<FileEntry>, more: bool) -> io::Result<()> {
        self.writer.message(&Reply::Files(FileList {
            id: self.id,
            files,
            unreachable: Vec::new(),
            rebuilding: Vec::new(),
            more,
        }))
    }
}

/// What a listing reads of a stored document.
#[derive(Deserialize)]
struct StoredDoc {
    #[serde(default, rename = "titolo")]
    title: String,
    #[serde(default, rename = "contenuto")]
    content: String,
    #[serde(default, rename = "numero_richiesta")]
    number: Option<u64>,
}

/// Every stored document of the folder `dir` (number, title, size of its
/// content, file, time), handed to `each`. Reads every document once:
/// this is what rebuilding a catalog costs.
fn documents(
    dir: &Path,
    server: &str,
    each: &mut dyn FnMut(FileEntry) -> io::Result<()>,
) -> io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if !is_document_name(&name) || !entry.file_type()?.is_file() {
            continue;
        }
        // A document removed meanwhile (moved aside by `forget`) is not
        // listed; an unreadable one is listed by its name.
        let bytes = match std::fs::read(entry.path()) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let doc: Option<StoredDoc> = serde_json::from_slice(&bytes).ok();
        let stored_ms = entry
            .metadata()
            .and_then(|m| m.modified())
            .map_or(0, unix_ms);
        let number = doc
            .as_ref()
            .and_then(|d| d.number)
            .or_else(|| parse_name(&name).map(|(n, _)| n));
        let (title, size) = doc.map_or_else(
            || (name.clone(), bytes.len() as u64),
            |d| (d.title, d.content.len() as u64),
        );
        each(FileEntry {
            kind: EntryKind::Document,
            number,
            file: name,
            ..FileEntry::file(&title, size, "", server, stored_ms)
        })?;
    }
    Ok(())
}

/// `inventory`: files in place with their digest, and documents held.
pub(super) fn inventory(id: u64, shared: &Shared) -> Reply {
    let files = shared.files.inventory();
    Reply::Inventory(InventoryReport {
        id,
        files: files.files,
        files_digest: format!("{:016x}", files.digest),
        documents: shared.storage.count(),
    })
}
