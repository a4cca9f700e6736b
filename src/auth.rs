//! The cluster key: a secret that the balancer and its servers share, used
//! to sign what one of them hands to a third party (a redirect ticket the
//! client carries to a server) and to prove membership.
//!
//! The key file holds 32 random bytes as 64 hex digits (one line). Tags are
//! HMAC-SHA-256 over the parts given, each part prefixed by its length so
//! that `["ab", "c"]` and `["a", "bc"]` never sign the same bytes.

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use std::fmt;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

type HmacSha256 = Hmac<Sha256>;

/// Bytes of key material.
pub const KEY_LEN: usize = 32;

/// Why a key file could not be used.
#[derive(Debug)]
pub enum KeyError {
    Io(PathBuf, io::Error),
    /// The file does not hold 64 hex digits.
    Malformed(PathBuf),
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyError::Io(p, e) => write!(f, "cluster key file {}: {e}", p.display()),
            KeyError::Malformed(p) => write!(
                f,
                "cluster key file {} must hold {} hex digits on one line",
                p.display(),
                KEY_LEN * 2
            ),
        }
    }
}

impl std::error::Error for KeyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            KeyError::Io(_, e) => Some(e),
            KeyError::Malformed(_) => None,
        }
    }
}

/// The shared secret. `Debug` never prints it.
#[derive(Clone)]
pub struct ClusterKey([u8; KEY_LEN]);

impl fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterKey(..)")
    }
}

impl ClusterKey {
    /// A fresh random key.
    pub fn generate() -> ClusterKey {
        let mut k = [0u8; KEY_LEN];
        rand::rngs::OsRng.fill_bytes(&mut k);
        ClusterKey(k)
    }

    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> ClusterKey {
        ClusterKey(bytes)
    }

    /// Reads a key file written by [`ClusterKey::write_new`] (or by hand:
    /// `openssl rand -hex 32 > cluster.key`).
    pub fn from_file(path: &Path) -> Result<ClusterKey, KeyError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| KeyError::Io(path.to_path_buf(), e))?;
        let bytes = crate::text::from_hex(text.trim())
            .filter(|b| b.len() == KEY_LEN)
            .ok_or_else(|| KeyError::Malformed(path.to_path_buf()))?;
        let mut k = [0u8; KEY_LEN];
        k.copy_from_slice(&bytes);
        Ok(ClusterKey(k))
    }

    /// Writes a new random key to `path`, readable by its owner only, and
    /// returns it. An existing file is kept and read instead, so every
    /// process started with the same path shares one key. Processes that
    /// start together never see a half-written file: the key is written
    /// under another name and linked into place whole (a link, unlike a
    /// rename, never replaces a file another process put there first).
    pub fn load_or_create(path: &Path) -> Result<ClusterKey, KeyError> {
        match ClusterKey::from_file(path) {
            Err(KeyError::Io(_, e)) if e.kind() == io::ErrorKind::NotFound => {}
            other => return other,
        }
        let key = ClusterKey::generate();
        let io_err = |e| KeyError::Io(path.to_path_buf(), e);
        let mut staging = path.as_os_str().to_owned();
        staging.push(format!(
            ".new-{}-{:x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let staging = PathBuf::from(staging);
        let written = (|| {
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            let mut f = options.open(&staging)?;
            writeln!(f, "{}", crate::text::to_hex(&key.0))?;
            f.sync_all()?;
            std::fs::hard_link(&staging, path)
        })();
        let _ = std::fs::remove_file(&staging);
        match written {
            Ok(()) => Ok(key),
            // Another process created it first: use theirs.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => ClusterKey::from_file(path),
            Err(e) => Err(io_err(e)),
        }
    }

    /// HMAC-SHA-256 over `parts`, each prefixed by its length.
    pub fn sign(&self, parts: &[&[u8]]) -> [u8; 32] {
        self.mac(parts).finalize().into_bytes().into()
    }

    /// Whether `tag` is the signature of `parts`, compared in constant time.
    pub fn verify(&self, parts: &[&[u8]], tag: &[u8]) -> bool {
        self.mac(parts).verify_slice(tag).is_ok()
    }

    fn mac(&self, parts: &[&[u8]]) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("HMAC takes any key length");
        for part in parts {
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part);
        }
        mac
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_and_verify() {
        let k = ClusterKey::generate();
        let tag = k.sign(&[b"upload", b"42"]);
        assert!(k.verify(&[b"upload", b"42"], &tag));
        assert!(!k.verify(&[b"upload", b"43"], &tag));
        assert!(!k.verify(&[b"uploa", b"d42"], &tag), "parts are delimited");
        assert!(!ClusterKey::generate().verify(&[b"upload", b"42"], &tag));
        assert!(!k.verify(&[b"upload", b"42"], &tag[..31]));
    }

    #[test]
    fn key_file_is_created_once_and_shared() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster.key");
        let a = ClusterKey::load_or_create(&path).unwrap();
        let b = ClusterKey::load_or_create(&path).unwrap();
        assert_eq!(a.sign(&[b"x"]), b.sign(&[b"x"]));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::write(&path, "zz\n").unwrap();
        let e = ClusterKey::from_file(&path).unwrap_err();
        assert!(matches!(e, KeyError::Malformed(_)), "{e}");
        assert!(format!("{a:?}") == "ClusterKey(..)");
    }

    #[test]
    fn processes_starting_together_share_one_whole_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster.key");
        let keys: Vec<ClusterKey> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| s.spawn(|| ClusterKey::load_or_create(&path).unwrap()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let tag = keys[0].sign(&[b"x"]);
        assert!(keys.iter().all(|k| k.sign(&[b"x"]) == tag));
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "staging files left behind");
    }
}
