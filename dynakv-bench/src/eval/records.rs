//! The sweep's results file: one JSON object per line, each carrying the
//! configuration it was measured under, so that `--resume` reuses a record
//! only for the very cell it measured.
//!
//! Why: matching on labels alone reused a ctx-256 record for a ctx-512 run;
//! an interrupted write left a last line without its newline, onto which the
//! next record was appended; a line that was not an object passed. Here a
//! damaged line is named by file and line number, a damaged *last* line (the
//! trace of an interrupt) can be dropped on request, and the file is then
//! rewritten atomically.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::Value;

/// What can be wrong with a results file.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}, line {line}: {message}")]
    Damaged {
        path: PathBuf,
        line: usize,
        message: String,
    },
    /// A record of the same cell under another configuration; `detail`
    /// names the cell and the first field that differs.
    #[error("{path}, line {line}: {detail}; write to another --out")]
    Mismatch {
        path: PathBuf,
        line: usize,
        detail: Box<str>,
    },
}

/// The records of a results file, in order, with their line numbers.
#[derive(Debug, Default)]
pub struct Records {
    pub path: PathBuf,
    pub lines: Vec<(usize, Value)>,
    /// Each record's line as read or written (a rewrite keeps it verbatim).
    text: Vec<String>,
}

impl Records {
    /// Reads `path` (an absent file has no records). Every line must be a
    /// JSON object with a `label`; a damaged last line (no newline, or not
    /// an object) is an error unless `drop_damaged_tail`, which rewrites the
    /// file without it.
    pub fn read(path: &Path, drop_damaged_tail: bool) -> Result<Self, RecordError> {
        let io = |source| RecordError::Io {
            path: path.to_path_buf(),
            source,
        };
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(io(e)),
        };
        let (records, dropped) = Self::from_text(path, &text, drop_damaged_tail)?;
        if dropped {
            records.rewrite()?;
        }
        Ok(records)
    }

    /// [`Records::read`] of `text` (as if read from `path`), without
    /// rewriting: also whether a damaged last line was dropped.
    pub fn from_text(
        path: &Path,
        text: &str,
        drop_damaged_tail: bool,
    ) -> Result<(Self, bool), RecordError> {
        let raw: Vec<&str> = text.split_terminator('\n').collect();
        let mut lines = Vec::new();
        let mut kept = Vec::new();
        let mut dropped = false;
        for (i, line) in raw.iter().enumerate() {
            let last = i + 1 == raw.len();
            let complete = !last || text.ends_with('\n');
            let parsed = parse(line).and_then(|v| match complete {
                true => Ok(v),
                false => Err("the line has no newline: the write was interrupted".into()),
            });
            match parsed {
                Ok(v) => {
                    lines.push((i + 1, v));
                    kept.push(line.to_string());
                }
                Err(_) if last && drop_damaged_tail => dropped = true,
                Err(message) => {
                    let hint = if last {
                        " (the last line: pass --drop-damaged to drop it)"
                    } else {
                        ""
                    };
                    return Err(RecordError::Damaged {
                        path: path.to_path_buf(),
                        line: i + 1,
                        message: format!("{message}{hint}"),
                    });
                }
            }
        }
        let records = Self {
            path: path.to_path_buf(),
            lines,
            text: kept,
        };
        Ok((records, dropped))
    }

    /// Whether the cell `label` measured under `config` is done. A record
    /// of that label under another configuration (or one without any, from
    /// an older version) is an error naming the first field that differs.
    pub fn finished(&self, label: &str, config: &Value) -> Result<bool, RecordError> {
        for (line, v) in &self.lines {
            if v["label"].as_str() != Some(label) {
                continue;
            }
            let theirs = &v["config"];
            if theirs == config {
                return Ok(true);
            }
            let (field, t, o) = first_difference(theirs, config);
            return Err(RecordError::Mismatch {
                path: self.path.clone(),
                line: *line,
                detail: format!(
                    "cell `{label}` was measured under another configuration \
                     ({field}: {t} there, {o} now)"
                )
                .into(),
            });
        }
        Ok(false)
    }

    /// Appends one record as one line, flushed; the file is created if absent.
    pub fn append(&mut self, v: Value) -> Result<(), RecordError> {
        let io = |source| RecordError::Io {
            path: self.path.clone(),
            source,
        };
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(io)?;
        let mut line = serde_json::to_string(&v).map_err(|e| io(e.into()))?;
        line.push('\n');
        file.write_all(line.as_bytes()).map_err(io)?;
        file.flush().map_err(io)?;
        let n = self.lines.last().map_or(0, |(l, _)| *l) + 1;
        self.lines.push((n, v));
        self.text.push(line.trim_end().to_string());
        Ok(())
    }

    /// The records' values, in order.
    pub fn values(&self) -> impl Iterator<Item = &Value> {
        self.lines.iter().map(|(_, v)| v)
    }

    /// Writes the records to a temporary file beside the target, then
    /// renames it over the target (all or nothing; `dynakv_core::io`).
    fn rewrite(&self) -> Result<(), RecordError> {
        let mut text = String::new();
        for line in &self.text {
            text.push_str(line);
            text.push('\n');
        }
        dynakv_core::io::write_bytes_atomically(&self.path, text.as_bytes()).map_err(|source| {
            RecordError::Io {
                path: self.path.clone(),
                source,
            }
        })
    }
}

fn parse(line: &str) -> Result<Value, String> {
    let v: Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    if !v.is_object() {
        return Err("not a JSON object".into());
    }
    if !v["label"].is_string() {
        return Err("a record without a `label`".into());
    }
    Ok(v)
}

/// The first field (in `ours`' order) whose value differs, and both values.
fn first_difference(theirs: &Value, ours: &Value) -> (String, String, String) {
    if theirs.is_null() {
        return (
            "config".into(),
            "none recorded (an older version)".into(),
            ours.to_string(),
        );
    }
    if let (Some(t), Some(o)) = (theirs.as_object(), ours.as_object()) {
        for (k, ov) in o {
            let tv = t.get(k).unwrap_or(&Value::Null);
            if tv != ov {
                return (k.clone(), tv.to_string(), ov.to_string());
            }
        }
        for (k, tv) in t {
            if !o.contains_key(k) {
                return (k.clone(), tv.to_string(), "absent".into());
            }
        }
    }
    ("config".into(), theirs.to_string(), ours.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn file(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("dynakv-records-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    const SEED: &str = "{\"label\":\"full\",\"config\":{\"ctx\":1024},\"ppl\":33.7}\n\
                        {\"label\":\"dynakv/0.3\",\"config\":{\"ctx\":1024},\"ppl\":40.1}\n";

    /// Reading a damaged results file returns records (each an object with
    /// a label) or an error naming a line, never a panic.
    fn read_damaged(b: &[u8], drop: bool) {
        let text = String::from_utf8_lossy(b);
        let config = serde_json::json!({"ctx": 1024});
        if let Ok((r, _)) = Records::from_text(Path::new("fuzz.jsonl"), &text, drop) {
            for v in r.values() {
                let label = v["label"].as_str().expect("a record has a label");
                let _ = r.finished(label, &config);
            }
        }
    }

    #[test]
    fn fuzz_record_reader_fixed_inputs() {
        for (i, b) in dynakv_core::fuzz::seeded(SEED.as_bytes(), 20_000, 0x7265_6373).enumerate() {
            read_damaged(&b, i % 2 == 0);
        }
    }

    #[test]
    #[ignore = "random fuzzing: BOLERO_RANDOM_ITERATIONS=N cargo test --release -- --ignored fuzz_"]
    fn fuzz_record_reader() {
        bolero::check!()
            .with_type::<(Vec<(u16, u8)>, Option<u16>, bool)>()
            .for_each(|(bytes, cut, drop)| {
                read_damaged(
                    &dynakv_core::fuzz::mutate(SEED.as_bytes(), bytes, &[], *cut),
                    *drop,
                );
            });
    }

    #[test]
    fn a_record_is_reused_only_under_its_own_configuration() {
        let c256 = json!({"ctx": 256, "spec": "dense"});
        let c512 = json!({"ctx": 512, "spec": "dense"});
        let p = file("cfg.jsonl", "");
        let mut r = Records::read(&p, false).unwrap();
        r.append(json!({"label": "full", "config": c256})).unwrap();
        let r = Records::read(&p, false).unwrap();
        assert!(r.finished("full", &c256).unwrap());
        assert!(!r.finished("other", &c512).unwrap());
        let e = r.finished("full", &c512).unwrap_err().to_string();
        assert!(
            e.contains("line 1") && e.contains("ctx") && e.contains("256"),
            "{e}"
        );
        // an older record without a configuration is not silently reused
        let p = file("old.jsonl", "{\"label\":\"full\",\"ppl\":3.0}\n");
        let e = Records::read(&p, false)
            .unwrap()
            .finished("full", &c256)
            .unwrap_err()
            .to_string();
        assert!(e.contains("older version"), "{e}");
    }

    #[test]
    fn damaged_lines_are_named_and_only_a_damaged_tail_can_be_dropped() {
        let good = "{\"label\":\"a\",\"config\":1}\n";
        // not an object, not JSON, no label: named by line, never dropped
        for bad in ["[1,2]\n", "{oops\n", "{\"ppl\":1}\n"] {
            let p = file("mid.jsonl", &format!("{bad}{good}"));
            let e = Records::read(&p, true).unwrap_err().to_string();
            assert!(e.contains("mid.jsonl, line 1"), "{e}");
        }
        // an interrupted last write: no newline
        let p = file("tail.jsonl", &format!("{good}{{\"label\":\"b\",\"con"));
        let e = Records::read(&p, false).unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("--drop-damaged"), "{e}");
        // a complete object without its newline is damaged too (the next
        // record would be glued onto it)
        let p2 = file("nonl.jsonl", &format!("{good}{}", good.trim_end()));
        assert!(Records::read(&p2, false).is_err());
        // dropped on request, and the file rewritten without it
        let mut r = Records::read(&p, true).unwrap();
        assert_eq!(r.lines.len(), 1);
        assert_eq!(std::fs::read_to_string(&p).unwrap(), good);
        r.append(json!({"label": "c", "config": 2})).unwrap();
        let back = Records::read(&p, false).unwrap();
        assert_eq!(back.lines.len(), 2);
        assert_eq!(back.lines[1].0, 2);
    }
}
