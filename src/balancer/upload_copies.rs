//! An uploaded file's other copies (`--replicas` over 1): once the file
//! is whole on the server that took it, each further copy is fetched by
//! another server from that one, server to server (`fetch`, the bytes
//! checked by SHA-256 on the receiving server before the file takes its
//! name), and the client hears `file_stored` only then. A copy that cannot
//! be made now is left to repair, which finds the entry short.

use super::catalog::{Change, Entry};
use super::context::Conn;
use crate::proto::{EntryKind, FileStored, Reply, StorageRequest};

/// Attempts at finding and filling servers for the copies, at most.
const ATTEMPTS_PER_COPY: usize = 2;

impl Conn {
    /// Makes the copies `--replicas` asks for beyond the first; returns
    /// how many copies there are in the end.
    pub(super) fn copy_upload(&self, stored: &FileStored, owner: Option<&str>) -> usize {
        let replicas = self.files.replicas;
        let Some(entry) = self.uploaded_entry(stored, owner) else {
            return 1;
        };
        let mut holders: Vec<String> = entry.copies.iter().map(|c| c.server.clone()).collect();
        let mut avoid = holders.clone();
        let mut attempts = ATTEMPTS_PER_COPY * replicas;
        while holders.len() < replicas && attempts > 0 {
            attempts -= 1;
            let Some(target) = self.pick_server(None, &avoid) else {
                break;
            };
            avoid.push(target.name.clone());
            if self.fetch_copy(stored, &entry, &target.name, target.addr) {
                holders.push(target.name);
            }
        }
        if holders.len() < replicas {
            log::warn!(
                "upload {}: {} of {replicas} copies ({}); repair makes the others when it can",
                stored.upload_id,
                holders.len(),
                holders.join(", ")
            );
        }
        holders.len()
    }

    /// The catalog's entry of the file just stored.
    fn uploaded_entry(&self, stored: &FileStored, owner: Option<&str>) -> Option<Entry> {
        let tracker = self.tracker.as_ref()?;
        let found = tracker
            .catalog_files(Some(owner.unwrap_or("")), &stored.name)
            .map_err(|e| log::warn!("upload {}: cannot read the catalog: {e}", stored.upload_id))
            .ok()?;
        found.into_iter().find(|e| {
            e.copies
                .iter()
                .any(|c| c.upload_id.as_deref() == Some(stored.upload_id.as_str()))
        })
    }

    /// Asks `target` to fetch the file from the server that stored it;
    /// records the copy once it is checked and in place.
    fn fetch_copy(
        &self,
        stored: &FileStored,
        entry: &Entry,
        target: &str,
        addr: std::net::SocketAddr,
    ) -> bool {
        let request = StorageRequest::Fetch {
            id: 1,
            from: stored.server.clone(),
            name: if stored.file.is_empty() {
                stored.name.clone()
            } else {
                stored.file.clone()
            },
            owner: entry.owner.clone(),
            upload_id: Some(stored.upload_id.clone()),
        };
        let answer = self
            .connect_server(addr)
            .map_err(|e| e.to_string())
            .and_then(|mut conn| conn.call(&request).map_err(|e| e.to_string()));
        let file = match answer {
            Ok(Reply::Fetched { file, sha256, .. }) if sha256 == stored.sha256 => file,
            Ok(other) => {
                log::warn!(
                    "upload {}: {target} made no copy: {other:?}",
                    stored.upload_id
                );
                return false;
            }
            Err(e) => {
                log::warn!("upload {}: {target} made no copy: {e}", stored.upload_id);
                return false;
            }
        };
        let change = Change::CopyAdded {
            entry: entry.id,
            kind: EntryKind::File,
            server: target.to_string(),
            file,
            upload_id: Some(stored.upload_id.clone()),
        };
        if let Some(Err(e)) = self.tracker.as_ref().map(|t| t.catalog_change(change)) {
            log::warn!(
                "upload {}: cannot record the copy on {target}: {e}",
                stored.upload_id
            );
        }
        log::info!("upload {}: copied to {target}", stored.upload_id);
        true
    }
}
