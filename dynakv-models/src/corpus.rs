//! The Brown corpus as plain text, split into `calib` (odd-numbered documents)
//! and `eval` (even-numbered).
//!
//! Each file holds `word/tag` tokens in paragraphs. Detokenisation: tags are
//! stripped at the last `/`; the corpus's ``` `` ``` and `''` quotes become `"`,
//! alternating opening and closing within a paragraph; words are joined by
//! single spaces, except none before `, . ; : ? ! ) 's '` or a closing quote and
//! none after `(` or an opening quote; paragraphs are joined by "\n". The rule
//! is documented (`docs/protocol.md`) and mirrored in `tools/brown_text.py` so
//! that anyone can reproduce the token stream.

use std::fs;
use std::path::{Path, PathBuf};

use crate::error::ModelError;
use crate::tokenizer::TextTokenizer;

/// Which half of the corpus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Calib,
    Eval,
}

impl std::str::FromStr for Split {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "calib" => Ok(Split::Calib),
            "eval" => Ok(Split::Eval),
            o => Err(ModelError::InvalidInput(format!(
                "split `{o}` (expected calib or eval)"
            ))),
        }
    }
}

/// One document: its file name (e.g. `ca01`) and text.
#[derive(Debug, Clone)]
pub struct Document {
    pub id: String,
    pub text: String,
}

/// The document number of a Brown file name such as `ca01` (01).
fn doc_number(name: &str) -> Option<u32> {
    let b = name.as_bytes();
    if b.len() == 4 && b[0] == b'c' && b[1].is_ascii_lowercase() {
        name[2..].parse().ok()
    } else {
        None
    }
}

/// Reads the documents of one split, in file-name order.
pub fn load_split(dir: &Path, split: Split) -> Result<Vec<Document>, ModelError> {
    let mut files: Vec<(String, PathBuf)> = fs::read_dir(dir)
        .map_err(|e| ModelError::Io {
            path: dir.display().to_string(),
            source: e,
        })?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            doc_number(&name).map(|_| (name, e.path()))
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(ModelError::InvalidInput(format!(
            "no Brown documents (ca01 ...) in {}",
            dir.display()
        )));
    }
    let want_odd = split == Split::Calib;
    files
        .into_iter()
        .filter(|(name, _)| doc_number(name).is_some_and(|n| (n % 2 == 1) == want_odd))
        .map(|(id, path)| {
            let raw = fs::read_to_string(&path).map_err(|e| ModelError::Io {
                path: path.display().to_string(),
                source: e,
            })?;
            Ok(Document {
                id,
                text: detokenize(&raw),
            })
        })
        .collect()
}

/// Turns tagged Brown text into plain text (see the module doc for the rule).
pub fn detokenize(raw: &str) -> String {
    let mut paragraphs = Vec::new();
    for para in raw.split("\n\n") {
        let words: Vec<&str> = para
            .split_whitespace()
            .map(|tok| tok.rsplit_once('/').map_or(tok, |(w, _)| w))
            .filter(|w| !w.is_empty())
            .collect();
        if words.is_empty() {
            continue;
        }
        let mut s = String::new();
        // No space before the first word, nor after an opening bracket or quote.
        let mut glue_next = true;
        let mut in_quote = false;
        for w in words {
            let quote = matches!(w, "``" | "''" | "\"");
            let w = if quote { "\"" } else { w };
            let opening = w == "(" || (quote && !in_quote);
            let closing = matches!(w, "," | "." | ";" | ":" | "?" | "!" | ")" | "'s" | "'")
                || (quote && in_quote);
            if quote {
                in_quote = !in_quote;
            }
            if !glue_next && !closing {
                s.push(' ');
            }
            s.push_str(w);
            glue_next = opening;
        }
        paragraphs.push(s);
    }
    paragraphs.join("\n")
}

/// The documents of a split joined by "\n\n" (the perplexity protocol).
pub fn joined(docs: &[Document]) -> String {
    docs.iter()
        .map(|d| d.text.as_str())
        .collect::<Vec<_>>()
        .join("\n\n")
}

/// Token ids of documents, each tokenized without BOS, joined in order by the
/// tokens of "\n\n" (the perplexity protocol, `docs/protocol.md`).
pub fn document_tokens(tok: &TextTokenizer, docs: &[Document]) -> Result<Vec<u32>, ModelError> {
    let sep = tok.encode("\n\n")?;
    let mut ids = Vec::new();
    for (i, d) in docs.iter().enumerate() {
        if i > 0 {
            ids.extend_from_slice(&sep);
        }
        ids.extend(tok.encode(&d.text)?);
    }
    Ok(ids)
}

/// The token stream of the perplexity protocol (docs/protocol.md): for a
/// model that expects BOS (`bos`), the text's tokens cut into runs of
/// `ctx - 1`, each preceded by BOS, so that windows of `ctx` are BOS + run
/// and every text token is scored (the first from BOS's logits); the last
/// partial run is dropped. Without BOS, the tokens as they are (windows of
/// `ctx` text tokens, the first one unscored).
pub fn protocol_stream(ids: &[u32], ctx: usize, bos: Option<u32>) -> Vec<u32> {
    match bos {
        Some(b) if ctx >= 2 => {
            let mut out = Vec::with_capacity(ids.len() + ids.len() / (ctx - 1));
            for run in ids.chunks_exact(ctx - 1) {
                out.push(b);
                out.extend_from_slice(run);
            }
            out
        }
        _ => ids.to_vec(),
    }
}

/// Text tokens per window of `ctx` under [`protocol_stream`].
pub fn text_per_window(ctx: usize, bos: Option<u32>) -> usize {
    ctx - usize::from(bos.is_some() && ctx >= 2)
}

#[cfg(test)]
mod tests {
    #[test]
    fn bos_windows_hold_runs_of_ctx_minus_one() {
        let ids: Vec<u32> = (10..21).collect();
        let s = super::protocol_stream(&ids, 4, Some(1));
        assert_eq!(s, vec![1, 10, 11, 12, 1, 13, 14, 15, 1, 16, 17, 18]);
        assert_eq!(super::protocol_stream(&ids, 4, None), ids);
        assert_eq!(super::text_per_window(4, Some(1)), 3);
    }

    use super::*;

    #[test]
    fn detokenizes_tags_and_quotes() {
        let raw = "\n\n\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' ,/, that/cs (/( any/dti )/) ./.\n\n\n\tNext/ap ./.";
        assert_eq!(
            detokenize(raw),
            "The jury said \"no evidence\", that (any).\nNext."
        );
    }

    #[test]
    fn split_by_parity() {
        assert_eq!(doc_number("ca01"), Some(1));
        assert_eq!(doc_number("cr09"), Some(9));
        assert_eq!(doc_number("package.json"), None);
        assert!("test".parse::<Split>().is_err());
    }
}
