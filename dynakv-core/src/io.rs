//! Writing a file all or nothing, and checking up front that it can be.
//!
//! Why: results, artifacts and plots are written at the end of runs that
//! take minutes to hours. A write goes to a uniquely named hidden file in
//! the target's directory (never a fixed `x.tmp`, which may be a user's own
//! file), renamed over the target on success and removed on failure; a
//! temporary left by a killed process is removed by the next write of the
//! same target once it is older than [`STALE`]. [`check_writable`] lets a
//! command refuse an unwritable destination before its long work starts.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Age after which a leftover temporary of the same target is removed.
pub const STALE: Duration = Duration::from_secs(600);

const MARK: &str = ".dynakv-";

fn parts(path: &Path) -> std::io::Result<(PathBuf, String)> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{}: not a file name", path.display()),
            )
        })?
        .to_string_lossy()
        .into_owned();
    Ok((dir, name))
}

/// Writes `path` through a temporary file beside it: `fill` writes the
/// temporary (given its path), which then replaces `path` in one rename.
/// The temporary keeps `path`'s extension last (some encoders choose their
/// format by it). On any error nothing is left at `path` that was not there.
pub fn write_atomically(
    path: &Path,
    fill: impl FnOnce(&Path) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let (dir, name) = parts(path)?;
    remove_stale(&dir, &name);
    let ext = path
        .extension()
        .map(|e| format!(".{}", e.to_string_lossy()))
        .unwrap_or_default();
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}{MARK}"))
        .suffix(&format!(".tmp{ext}"))
        .tempfile_in(&dir)?;
    fill(tmp.path())?;
    // a temporary file is private (0600); the result gets the permissions
    // of the file it replaces, or those of a plain new file (0644)
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let perms = std::fs::metadata(path)
            .map(|m| m.permissions())
            .unwrap_or_else(|_| std::fs::Permissions::from_mode(0o644));
        std::fs::set_permissions(tmp.path(), perms)?;
    }
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// [`write_atomically`] of `bytes`.
pub fn write_bytes_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomically(path, |tmp| std::fs::write(tmp, bytes))
}

/// Removes temporaries of `name` in `dir` older than [`STALE`] (best effort).
fn remove_stale(dir: &Path, name: &str) {
    let prefix = format!(".{name}{MARK}");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let stale = e.file_name().to_string_lossy().starts_with(&prefix)
            && e.metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > STALE);
        if stale {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Checks that `path` can be written: its directory exists and takes a new
/// file, and `path` itself is not a directory. Nothing is left behind.
pub fn check_writable(path: &Path) -> std::io::Result<()> {
    let (dir, _) = parts(path)?;
    if path.is_dir() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} is a directory", path.display()),
        ));
    }
    if !dir.is_dir() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{}: no such directory", dir.display()),
        ));
    }
    tempfile::Builder::new()
        .prefix(".dynakv-probe-")
        .tempfile_in(&dir)
        .map(drop)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", dir.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("dynakv-io-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn listing(d: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_users_tmp_file_survives_and_failures_leave_nothing() {
        let d = dir("atomic");
        let target = d.join("x.json");
        // the user's own x.tmp beside the target is not ours to delete
        std::fs::write(d.join("x.tmp"), "mine").unwrap();
        write_bytes_atomically(&target, b"1").unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"1");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(&target), 0o644, "a new file is not private");
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600)).unwrap();
            write_bytes_atomically(&target, b"1").unwrap();
            assert_eq!(mode(&target), 0o600, "a replaced file keeps its mode");
        }
        assert_eq!(std::fs::read(d.join("x.tmp")).unwrap(), b"mine");
        // a failed fill leaves the old target and no temporary
        let err = write_atomically(&target, |_| Err(std::io::Error::other("boom")));
        assert!(err.is_err());
        assert_eq!(std::fs::read(&target).unwrap(), b"1");
        assert_eq!(listing(&d), ["x.json", "x.tmp"]);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn the_temporary_keeps_the_extension_and_stale_ones_are_removed() {
        let d = dir("stale");
        let target = d.join("plot.png");
        write_atomically(&target, |tmp| {
            assert_eq!(tmp.extension().unwrap(), "png");
            std::fs::write(tmp, b"p")
        })
        .unwrap();
        // a leftover of a killed process, made old
        let old = d.join(".plot.png.dynakv-abc.tmp.png");
        std::fs::write(&old, b"x").unwrap();
        let f = std::fs::File::options().write(true).open(&old).unwrap();
        f.set_modified(std::time::SystemTime::now() - 2 * STALE)
            .unwrap();
        // a recent one (another writer's, perhaps) stays
        let recent = d.join(".plot.png.dynakv-def.tmp.png");
        std::fs::write(&recent, b"y").unwrap();
        write_bytes_atomically(&target, b"q").unwrap();
        assert!(!old.exists() && recent.exists());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn unwritable_destinations_are_named() {
        let d = dir("writable");
        assert!(check_writable(&d.join("out.jsonl")).is_ok());
        assert!(listing(&d).is_empty(), "the probe is removed");
        let e = check_writable(&d.join("missing/out.jsonl")).unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
        assert!(check_writable(&d).is_err(), "a directory");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
