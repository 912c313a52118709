//! A fetched asset's fingerprint, so that a cached copy changed after its
//! download (a damaged model block, deleted corpus documents) is noticed
//! instead of silently giving other numbers.
//!
//! At fetch, when the archive's SHA-256 has just been checked, the unpacked
//! asset (a file, or every file under a directory) is hashed into a stamp
//! beside it: `.NAME.stamp.json` with the tree's SHA-256 and a cheap
//! fingerprint (file count, total size, latest modification time). Each use
//! compares the fingerprint; when it differs the tree is hashed again, and a
//! different hash is an error naming the asset and what to do.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::ModelError;

/// What a stamp records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamp {
    /// SHA-256 over every file's relative path, length and contents, in
    /// path order.
    pub sha256: String,
    pub fingerprint: Fingerprint,
}

/// Cheap to compute: changes whenever a file is added, removed, resized or
/// rewritten (modification times), so the hash is recomputed only then.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    pub files: u64,
    pub bytes: u64,
    pub latest_mtime_ns: u128,
}

fn io(path: &Path, e: std::io::Error) -> ModelError {
    ModelError::Io {
        path: path.display().to_string(),
        source: e,
    }
}

/// Every regular file under `root` (or `root` itself), sorted.
fn files(root: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let mut out = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(p) = todo.pop() {
        let meta = fs::metadata(&p).map_err(|e| io(&p, e))?;
        if meta.is_dir() {
            for e in fs::read_dir(&p).map_err(|e| io(&p, e))? {
                todo.push(e.map_err(|e| io(&p, e))?.path());
            }
        } else {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

/// The fingerprint of `root` now.
pub fn fingerprint(root: &Path) -> Result<Fingerprint, ModelError> {
    let mut f = Fingerprint {
        files: 0,
        bytes: 0,
        latest_mtime_ns: 0,
    };
    for p in files(root)? {
        let m = fs::metadata(&p).map_err(|e| io(&p, e))?;
        f.files += 1;
        f.bytes += m.len();
        let t = m
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        f.latest_mtime_ns = f.latest_mtime_ns.max(t);
    }
    Ok(f)
}

/// The tree hash of `root` (see [`Stamp::sha256`]).
pub fn tree_sha256(root: &Path) -> Result<String, ModelError> {
    let mut h = Sha256::new();
    for p in files(root)? {
        let rel = p
            .strip_prefix(root)
            .unwrap_or(&p)
            .to_string_lossy()
            .into_owned();
        let bytes = fs::read(&p).map_err(|e| io(&p, e))?;
        h.update((rel.len() as u64).to_le_bytes());
        h.update(rel.as_bytes());
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(&bytes);
    }
    Ok(format!("{:x}", h.finalize()))
}

/// A fresh stamp of `root`.
pub fn stamp(root: &Path) -> Result<Stamp, ModelError> {
    Ok(Stamp {
        sha256: tree_sha256(root)?,
        fingerprint: fingerprint(root)?,
    })
}

/// Writes `stamp` to `path`, all or nothing.
pub fn write(path: &Path, stamp: &Stamp) -> Result<(), ModelError> {
    let text = serde_json::to_string(stamp).map_err(|e| io(path, e.into()))?;
    dynakv_core::io::write_bytes_atomically(path, text.as_bytes()).map_err(|e| io(path, e))
}

/// How a check went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checked {
    /// The fingerprint matched the stamp.
    Unchanged,
    /// The fingerprint differed, the contents hash the same (the stamp's
    /// fingerprint was refreshed).
    Rehashed,
    /// No stamp yet (fetched by an earlier version): one was written.
    Stamped,
}

/// Checks `root` against the stamp at `path` (`force`: hash even when the
/// fingerprint matches). A mismatch is an error naming `what`.
pub fn check(root: &Path, path: &Path, what: &str, force: bool) -> Result<Checked, ModelError> {
    let bad = |message: String| ModelError::Asset {
        name: what.to_string(),
        message,
    };
    let Ok(text) = fs::read_to_string(path) else {
        write(path, &stamp(root)?)?;
        return Ok(Checked::Stamped);
    };
    let old: Stamp = serde_json::from_str(&text).map_err(|e| {
        bad(format!(
            "{}: unreadable stamp ({e}); delete it to re-stamp",
            path.display()
        ))
    })?;
    let now = fingerprint(root)?;
    if now == old.fingerprint && !force {
        return Ok(Checked::Unchanged);
    }
    let sha = tree_sha256(root)?;
    if sha != old.sha256 {
        return Err(bad(format!(
            "the cached copy at {} changed since it was fetched ({} files, {} bytes then; {} files, {} bytes now; contents differ): delete it to fetch it again",
            root.display(),
            old.fingerprint.files,
            old.fingerprint.bytes,
            now.files,
            now.bytes
        )));
    }
    write(
        path,
        &Stamp {
            sha256: sha,
            fingerprint: now,
        },
    )?;
    Ok(Checked::Rehashed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_changed_or_shrunk_copy_is_an_error_and_a_touched_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("corpus");
        fs::create_dir_all(root.join("sub")).unwrap();
        fs::write(root.join("a.txt"), "alpha").unwrap();
        fs::write(root.join("sub/b.txt"), "beta").unwrap();
        let st = dir.path().join(".corpus.stamp.json");
        assert_eq!(
            check(&root, &st, "corpus", false).unwrap(),
            Checked::Stamped
        );
        assert_eq!(
            check(&root, &st, "corpus", false).unwrap(),
            Checked::Unchanged
        );
        // rewritten with the same contents: rehashed, accepted
        fs::write(root.join("a.txt"), "alpha").unwrap();
        let f = fs::File::options()
            .write(true)
            .open(root.join("a.txt"))
            .unwrap();
        f.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(5))
            .unwrap();
        assert_eq!(
            check(&root, &st, "corpus", false).unwrap(),
            Checked::Rehashed
        );
        assert_eq!(
            check(&root, &st, "corpus", true).unwrap(),
            Checked::Rehashed
        );
        // one byte changed, same size: found once the fingerprint moves
        fs::write(root.join("a.txt"), "alphA").unwrap();
        let e = check(&root, &st, "corpus", true).unwrap_err().to_string();
        assert!(e.contains("corpus") && e.contains("changed"), "{e}");
        // a document deleted
        fs::write(root.join("a.txt"), "alpha").unwrap();
        fs::remove_file(root.join("sub/b.txt")).unwrap();
        let e = check(&root, &st, "corpus", false).unwrap_err().to_string();
        assert!(e.contains("2 files") && e.contains("1 files"), "{e}");
    }
}
