//! Corpus text for evaluation commands.

use dynakv_models::corpus::{self, Document, Split};
use dynakv_models::{ModelError, TextTokenizer};

pub use dynakv_models::corpus::document_tokens;

/// The first `max_docs` documents of a Brown split (all when `None`), fetching
/// the corpus if needed.
pub fn brown_docs(split: Split, max_docs: Option<usize>) -> Result<Vec<Document>, ModelError> {
    let dir = dynakv_models::assets::brown_dir()?;
    let mut docs = corpus::load_split(&dir, split)?;
    if let Some(n) = max_docs {
        docs.truncate(n);
    }
    Ok(docs)
}

/// Token ids of a prompt, in one part, or in two split right after `context`
/// (its first occurrence in `text`): a cache that compresses at the end of
/// its prefill (SnapKV) then compresses the context without seeing what
/// follows it (query-agnostic). BOS first where the model takes one.
pub fn prompt_parts(
    tokenizer: &TextTokenizer,
    text: &str,
    split_after: Option<&str>,
) -> Result<Vec<Vec<u32>>, ModelError> {
    let Some(context) = split_after else {
        return Ok(vec![tokenizer.encode_text(text)?]);
    };
    let cut = text
        .find(context)
        .map(|i| i + context.len())
        .ok_or_else(|| ModelError::InvalidInput("the context is not in the prompt".into()))?;
    Ok(vec![
        tokenizer.encode_text(&text[..cut])?,
        tokenizer.encode(&text[cut..])?,
    ])
}
