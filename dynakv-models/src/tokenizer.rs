//! The byte-level BPE tokenizer described by a GGUF file's metadata.
//!
//! Built with the `tokenizers` crate from `tokenizer.ggml.tokens` and
//! `tokenizer.ggml.merges`; control tokens (type 3) become special tokens so
//! that `<|im_start|>` in text encodes to its single id. Only the `gpt2` model
//! with the `smollm`, `gpt2` or `default` pre-tokenizers is supported.

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, Tokenizer};

use crate::error::ModelError;
use crate::gguf::GgufFile;

/// ggml token type of control tokens such as `<|im_start|>`.
const TOKEN_TYPE_CONTROL: u64 = 3;

/// A text tokenizer with the model's special ids.
pub struct TextTokenizer {
    inner: Tokenizer,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    /// Ids that end generation (EOS and `<|im_end|>` when present).
    pub stop_ids: Vec<u32>,
    vocab_size: usize,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("vocab_size", &self.vocab_size)
            .finish()
    }
}

fn tok_err(e: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer(e.to_string())
}

impl TextTokenizer {
    /// Builds the tokenizer from GGUF metadata.
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self, ModelError> {
        let model = gguf.meta_str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(ModelError::Unsupported(format!(
                "tokenizer.ggml.model = `{model}` (only the byte-level BPE `gpt2` is supported)"
            )));
        }
        let pre = gguf
            .meta("tokenizer.ggml.pre")
            .and_then(|v| v.as_str())
            .unwrap_or("default");
        let split_digits = match pre {
            "smollm" => true,
            "gpt2" | "default" => false,
            other => {
                return Err(ModelError::Unsupported(format!(
                    "tokenizer.ggml.pre = `{other}` (supported: smollm, gpt2, default)"
                )))
            }
        };
        let tokens = string_array(gguf, "tokenizer.ggml.tokens")?;
        let merges = string_array(gguf, "tokenizer.ggml.merges")?;
        let types: Vec<u64> = match gguf.meta("tokenizer.ggml.token_type") {
            Some(v) => v
                .as_array()
                .ok_or_else(|| tok_err("tokenizer.ggml.token_type is not an array"))?
                .iter()
                .map(|x| x.as_u64().unwrap_or(1))
                .collect(),
            None => vec![1; tokens.len()],
        };
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), i as u32))
            .collect();
        if tokens.len() > u32::MAX as usize || types.len() != tokens.len() {
            return Err(tok_err(format!(
                "tokenizer.ggml.tokens holds {} tokens, tokenizer.ggml.token_type {} types",
                tokens.len(),
                types.len()
            )));
        }
        // every merge must name two tokens of the vocabulary, and make one
        // (checked here so a damaged file is named by merge, not by the BPE
        // builder's message about an empty token)
        let merges = merges
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let (a, b) = m.split_once(' ').ok_or_else(|| {
                    tok_err(format!("tokenizer.ggml.merges[{i}] = {m:?} has no space"))
                })?;
                for part in [a, b, &format!("{a}{b}")] {
                    if !vocab.contains_key(part) {
                        return Err(tok_err(format!(
                            "tokenizer.ggml.merges[{i}] = {m:?}: {part:?} is not in tokenizer.ggml.tokens (a damaged file?)"
                        )));
                    }
                }
                Ok((a.to_string(), b.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(tok_err)?;
        let mut inner = Tokenizer::new(bpe);
        let byte_level = ByteLevel::new(false, true, true);
        let mut pres: Vec<PreTokenizerWrapper> = Vec::new();
        if split_digits {
            pres.push(Digits::new(true).into());
        }
        pres.push(byte_level.into());
        inner.with_pre_tokenizer(Some(Sequence::new(pres)));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        let specials: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, &t)| t == TOKEN_TYPE_CONTROL)
            .map(|(s, _)| AddedToken::from(s.to_string(), true))
            .collect();
        inner.add_special_tokens(specials).map_err(tok_err)?;

        let id_of = |key: &str| gguf.meta(key).and_then(|v| v.as_u64()).map(|v| v as u32);
        let bos_id = id_of("tokenizer.ggml.bos_token_id");
        let eos_id = id_of("tokenizer.ggml.eos_token_id");
        let mut stop_ids: Vec<u32> = eos_id.into_iter().collect();
        if let Some(i) = tokens.iter().position(|t| *t == "<|im_end|>") {
            if !stop_ids.contains(&(i as u32)) {
                stop_ids.push(i as u32);
            }
        }
        Ok(Self {
            inner,
            bos_id,
            eos_id,
            stop_ids,
            vocab_size: tokens.len(),
        })
    }

    /// Encodes text; special-token strings in the text map to their ids. No BOS is added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        Ok(self
            .inner
            .encode_fast(text, false)
            .map_err(tok_err)?
            .get_ids()
            .to_vec())
    }

    /// Decodes ids to text, special tokens included.
    pub fn decode(&self, ids: &[u32]) -> Result<String, ModelError> {
        self.inner.decode(ids, false).map_err(tok_err)
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The id of a token string, if it is in the vocabulary.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}

fn string_array<'a>(gguf: &'a GgufFile, key: &str) -> Result<Vec<&'a str>, ModelError> {
    gguf.meta(key)
        .ok_or_else(|| ModelError::MissingMetadata(key.to_string()))?
        .as_array()
        .ok_or_else(|| tok_err(format!("{key} is not an array")))?
        .iter()
        .map(|v| {
            v.as_str()
                .ok_or_else(|| tok_err(format!("{key} holds a non-string")))
        })
        .collect()
}

/// Formats a conversation in the ChatML format of SmolLM2-Instruct:
/// `<|im_start|>role\ncontent<|im_end|>\n` per message, then the assistant's
/// opening tag so the model answers.
pub fn chat_prompt(messages: &[(&str, &str)]) -> String {
    let mut s = String::new();
    for (role, content) in messages {
        s.push_str("<|im_start|>");
        s.push_str(role);
        s.push('\n');
        s.push_str(content);
        s.push_str("<|im_end|>\n");
    }
    s.push_str("<|im_start|>assistant\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_format() {
        assert_eq!(
            chat_prompt(&[("user", "Hi")]),
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }
}
