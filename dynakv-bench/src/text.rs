//! Corpus text for evaluation commands.

use dynakv_models::corpus::{self, Document, Split};
use dynakv_models::ModelError;

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
