//! The client keys a storage folder holds: each stored with its document,
//! in the file's name (`{number}_{title}@{key}.json`, see `base_name`), so
//! that the key is durable exactly when the document is, with the same
//! syncs, and is read back from the names at start like the request
//! numbers. A copy moved into `.duplicates/` keeps its name, so a key
//! forgotten stays forgotten after a restart.
//!
//! A key is stored once, whatever request number it comes with. A balancer
//! placing a document sent again first asks every server for its key
//! (`lookup`); a server that answers "not here" fences the key to the
//! request number that balancer will use, so that an older forward of the
//! same document (from a balancer that died, still on its way) is refused
//! instead of becoming a second copy.

use crate::proto::{ClientKey, HeldKey, KeyProbe};
use std::collections::{HashMap, HashSet};

/// The keys of the stored files, and what each key may do next.
#[derive(Debug, Default)]
pub(super) struct KeyIndex {
    /// The stored file of each key held.
    pub files: HashMap<ClientKey, String>,
    /// Keys being written right now.
    pub writing: HashSet<ClientKey>,
    /// Keys stored on another server (`forget`): never stored here.
    pub forgotten: HashSet<ClientKey>,
    /// Keys a `lookup` found absent: stored here from then on only under
    /// the request number that came with the lookup. In memory only.
    pub fenced: HashMap<ClientKey, u64>,
}

/// What a store of a key may do.
pub(super) enum KeyClaim {
    /// Store it (and hold the key while writing).
    New,
    /// Already stored in this file.
    Existing(String),
    /// Being written by another store.
    InProgress,
    /// Forgotten, or fenced to another request number.
    Refused,
}

/// What `lookup` found, for the reply.
#[derive(Debug, Default, PartialEq)]
pub struct Found {
    /// Keys held, each with its file and that file's request number
    /// (`a_count` still 0: read by the caller, outside the index's lock).
    pub held: Vec<HeldKey>,
    /// Keys being written right now: the balancer asks again.
    pub busy: Vec<ClientKey>,
}

impl KeyIndex {
    /// Decides a store of `key` under `number`; takes the key for writing
    /// when it may go on.
    pub fn claim(&mut self, key: ClientKey, number: u64) -> KeyClaim {
        if self.forgotten.contains(&key) {
            return KeyClaim::Refused;
        }
        if let Some(file) = self.files.get(&key) {
            return KeyClaim::Existing(file.clone());
        }
        if self.fenced.get(&key).is_some_and(|&n| n != number) {
            return KeyClaim::Refused;
        }
        if !self.writing.insert(key) {
            return KeyClaim::InProgress;
        }
        KeyClaim::New
    }

    /// A stored file, whose name may carry a key.
    pub fn add(&mut self, file: &str) {
        if let Some(key) = parse_key(file) {
            self.files.entry(key).or_insert_with(|| file.to_string());
            self.fenced.remove(&key);
        }
    }

    /// A file moved aside: its key is never stored here again.
    pub fn moved_aside(&mut self, file: &str) {
        if let Some(key) = parse_key(file) {
            if self.files.get(&key).is_some_and(|f| f == file) {
                self.files.remove(&key);
            }
            self.forgotten.insert(key);
        }
    }

    /// Which of `probes` are held or being written; the others are fenced
    /// to the number that came with them (unless forgotten already).
    pub fn lookup(&mut self, probes: &[KeyProbe]) -> Found {
        let mut found = Found::default();
        for probe in probes {
            if let Some(file) = self.files.get(&probe.key) {
                found.held.push(HeldKey {
                    key: probe.key,
                    request_number: super::parse_name(file).map_or(0, |(n, _)| n),
                    file: file.clone(),
                    a_count: 0,
                });
            } else if self.writing.contains(&probe.key) {
                found.busy.push(probe.key);
            } else if !self.forgotten.contains(&probe.key) {
                self.fenced.insert(probe.key, probe.request_number);
            }
        }
        found
    }
}

/// The separator between a stored file's title and its key: never in a
/// safe title.
pub(super) const KEY_MARK: char = '@';

/// The client key in a stored file's name, if it has one.
pub(super) fn parse_key(name: &str) -> Option<ClientKey> {
    let stem = name.strip_suffix(".json").unwrap_or(name);
    // The `~N` suffix comes after the key.
    let stem = stem.rsplit_once('~').map_or(stem, |(s, _)| s);
    let (_, key) = stem.rsplit_once(KEY_MARK)?;
    key.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(key: u128, number: u64) -> KeyProbe {
        KeyProbe {
            key: ClientKey(key),
            request_number: number,
        }
    }

    #[test]
    fn names_give_back_their_keys() {
        let key = ClientKey(0xabc);
        let name = format!("12_title@{key}.json");
        assert_eq!(parse_key(&name), Some(key));
        assert_eq!(parse_key(&format!("12_title@{key}~3.json")), Some(key));
        assert_eq!(parse_key("12_title.json"), None);
        assert_eq!(parse_key("12_title~2.json"), None);
    }

    #[test]
    fn a_key_is_claimed_once_and_a_fence_refuses_other_numbers() {
        let mut index = KeyIndex::default();
        let key = ClientKey(7);
        assert!(matches!(index.claim(key, 1), KeyClaim::New));
        assert!(matches!(index.claim(key, 2), KeyClaim::InProgress));
        assert_eq!(index.lookup(&[probe(7, 3)]).busy, [key]);
        index.writing.remove(&key);
        // Found absent: only number 3 may store it now.
        assert_eq!(index.lookup(&[probe(7, 3)]), Found::default());
        assert!(matches!(index.claim(key, 1), KeyClaim::Refused));
        assert!(matches!(index.claim(key, 3), KeyClaim::New));
        index.writing.remove(&key);
        index.add(&format!("3_t@{key}.json"));
        assert!(
            matches!(index.claim(key, 9), KeyClaim::Existing(f) if f == format!("3_t@{key}.json"))
        );
        let found = index.lookup(&[probe(7, 4)]);
        assert_eq!(found.held[0].request_number, 3);
        index.moved_aside(&format!("3_t@{key}.json"));
        assert!(matches!(index.claim(key, 3), KeyClaim::Refused));
    }
}
