//! Held-out texts of other kinds than Brown, to measure what calibration on
//! Brown carries over to: mailing-list mail, source code, and shuffled
//! sentences of many registers. None is ever used to calibrate or train;
//! each is fetched like the corpus ([`crate::assets`]) and read whole, in a
//! fixed document order.

use std::fs;
use std::path::Path;

use serde_json::Value;

use crate::assets::{self, AssetSpec};
use crate::corpus::Document;
use crate::error::ModelError;

/// Which held-out text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TextKind {
    /// Bodies of the SpamAssassin `easy-ham-1` mails (headers dropped):
    /// mailing-list discussion, quoted replies, URLs, signatures.
    Mail,
    /// lodash 4.17.21's `lodash.js`.
    Code,
    /// nlp-corpus 4.4.0: one document per file of shuffled sentences.
    Mixed,
}

impl TextKind {
    pub const ALL: [TextKind; 3] = [TextKind::Mail, TextKind::Code, TextKind::Mixed];

    pub fn asset(self) -> &'static AssetSpec {
        match self {
            TextKind::Mail => &assets::MAIL,
            TextKind::Code => &assets::CODE,
            TextKind::Mixed => &assets::MIXED,
        }
    }

    /// The text's documents, fetching its package if needed.
    pub fn documents(self) -> Result<Vec<Document>, ModelError> {
        self.read(&assets::ensure(self.asset())?)
    }

    /// The documents of an unpacked asset at `path` (its `inner_path`).
    pub fn read(self, path: &Path) -> Result<Vec<Document>, ModelError> {
        let docs = match self {
            TextKind::Code => vec![Document {
                id: "lodash.js".into(),
                text: read(path)?,
            }],
            TextKind::Mail => sorted_files(path)?
                .into_iter()
                .filter_map(|(name, p)| {
                    let v = match json(&p) {
                        Ok(v) => v,
                        Err(e) => return Some(Err(e)),
                    };
                    let text = v.get("text").and_then(Value::as_str)?;
                    // The body follows the first blank line.
                    let body = text.split_once("\n\n").map(|(_, b)| b.trim())?;
                    (!body.is_empty()).then(|| {
                        Ok(Document {
                            id: name,
                            text: body.to_string(),
                        })
                    })
                })
                .collect::<Result<Vec<_>, _>>()?,
            TextKind::Mixed => {
                let mut files = sorted_files(path)?;
                // doc-0.json, doc-1.json, ... in numeric order
                files.sort_by_key(|(name, _)| {
                    name.trim_start_matches("doc-")
                        .trim_end_matches(".json")
                        .parse::<u32>()
                        .unwrap_or(u32::MAX)
                });
                files
                    .into_iter()
                    .map(|(name, p)| {
                        let v = json(&p)?;
                        let lines: Vec<&str> = v
                            .as_array()
                            .map(|a| a.iter().filter_map(Value::as_str).collect())
                            .unwrap_or_default();
                        Ok(Document {
                            id: name,
                            text: lines.join("\n"),
                        })
                    })
                    .collect::<Result<Vec<_>, ModelError>>()?
            }
        };
        if docs.is_empty() {
            return Err(ModelError::Asset {
                name: self.asset().name.into(),
                message: format!("no documents in {}", path.display()),
            });
        }
        Ok(docs)
    }
}

impl std::str::FromStr for TextKind {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, ModelError> {
        match s {
            "mail" => Ok(TextKind::Mail),
            "code" => Ok(TextKind::Code),
            "mixed" => Ok(TextKind::Mixed),
            o => Err(ModelError::InvalidInput(format!(
                "text `{o}` (expected mail, code or mixed)"
            ))),
        }
    }
}

impl std::fmt::Display for TextKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TextKind::Mail => "mail",
            TextKind::Code => "code",
            TextKind::Mixed => "mixed",
        })
    }
}

fn io_err(path: &Path, e: std::io::Error) -> ModelError {
    ModelError::Io {
        path: path.display().to_string(),
        source: e,
    }
}

fn read(path: &Path) -> Result<String, ModelError> {
    fs::read_to_string(path).map_err(|e| io_err(path, e))
}

fn json(path: &Path) -> Result<Value, ModelError> {
    serde_json::from_str(&read(path)?)
        .map_err(|e| ModelError::InvalidInput(format!("{}: {e}", path.display())))
}

/// `(file name, path)` of the `.json` files in `dir`, by name.
fn sorted_files(dir: &Path) -> Result<Vec<(String, std::path::PathBuf)>, ModelError> {
    let mut files: Vec<(String, std::path::PathBuf)> = fs::read_dir(dir)
        .map_err(|e| io_err(dir, e))?
        .filter_map(|e| e.ok())
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
        .filter(|(n, p)| n.ends_with(".json") && p.is_file())
        .collect();
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_reads_its_layout() {
        let dir = tempfile::tempdir().unwrap();
        let mail = dir.path().join("mail");
        fs::create_dir(&mail).unwrap();
        fs::write(
            mail.join("00002.b.json"),
            r#"{"id":"2","text":"From: a@b\nSubject: x\n\nSecond body.\n"}"#,
        )
        .unwrap();
        fs::write(
            mail.join("00001.a.json"),
            r#"{"id":"1","text":"From: a@b\n\n  First body.\n-- sig"}"#,
        )
        .unwrap();
        fs::write(
            mail.join("00003.c.json"),
            r#"{"id":"3","text":"headers only"}"#,
        )
        .unwrap();
        let docs = TextKind::Mail.read(&mail).unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[0].text, "First body.\n-- sig");
        assert_eq!(docs[1].text, "Second body.");

        let mixed = dir.path().join("mixed");
        fs::create_dir(&mixed).unwrap();
        fs::write(mixed.join("doc-10.json"), r#"["c"]"#).unwrap();
        fs::write(mixed.join("doc-2.json"), r#"["a", "b"]"#).unwrap();
        let docs = TextKind::Mixed.read(&mixed).unwrap();
        assert_eq!(
            docs.iter().map(|d| d.text.as_str()).collect::<Vec<_>>(),
            ["a\nb", "c"]
        );

        let empty = dir.path().join("empty");
        fs::create_dir(&empty).unwrap();
        assert!(TextKind::Mail.read(&empty).is_err());
        fs::write(mixed.join("doc-3.json"), "not json").unwrap();
        assert!(TextKind::Mixed.read(&mixed).is_err());
        for k in TextKind::ALL {
            assert_eq!(k.to_string().parse::<TextKind>().unwrap(), k);
        }
    }
}
