//! The tokenizer described by a GGUF file's metadata.
//!
//! Two kinds, by `tokenizer.ggml.model`:
//! - `gpt2`, byte-level BPE (SmolLM2): built with the `tokenizers` crate
//!   from `tokenizer.ggml.tokens` and `tokenizer.ggml.merges`; control
//!   tokens (type 3) become special tokens so that `<|im_start|>` in text
//!   encodes to its single id. The `smollm`, `gpt2` and `default`
//!   pre-tokenizers are supported.
//! - `llama`, SentencePiece with scores and byte fallback (Gemma 3): [`spm`],
//!   llama.cpp's algorithm.

mod pieces;
pub mod spm;

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
const TOKEN_TYPE_CONTROL: i64 = 3;

/// A text tokenizer with the model's special ids.
pub struct TextTokenizer {
    inner: Inner,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    /// Whether the model expects BOS before a text (`tokenizer.ggml.add_bos_token`;
    /// default: yes for SentencePiece, no for BPE, as llama.cpp).
    pub add_bos: bool,
    /// Ids that end generation (EOS, and `<|im_end|>` or `<end_of_turn>`
    /// when present).
    pub stop_ids: Vec<u32>,
    vocab_size: usize,
}

/// The tokenizer proper.
enum Inner {
    Bpe(Box<Tokenizer>),
    Spm(Box<spm::Spm>),
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
        let (inner, tokens) = match model {
            "gpt2" => {
                let (bpe, tokens) = bpe_from_gguf(gguf)?;
                (Inner::Bpe(Box::new(bpe)), tokens)
            }
            "llama" => {
                let (spm, tokens) = spm_from_gguf(gguf)?;
                (Inner::Spm(Box::new(spm)), tokens)
            }
            other => {
                return Err(ModelError::Unsupported(format!(
                    "tokenizer.ggml.model = `{other}` (supported: gpt2, the byte-level BPE; llama, SentencePiece)"
                )))
            }
        };
        // ids the model will embed must be tokens of the vocabulary
        let id_of = |key: &str| -> Result<Option<u32>, ModelError> {
            match gguf.meta(key).and_then(|v| v.as_u64()) {
                Some(v) if v < tokens.len() as u64 => Ok(Some(v as u32)),
                Some(v) => Err(tok_err(format!(
                    "{key} = {v}, beyond the {} tokens",
                    tokens.len()
                ))),
                None => Ok(None),
            }
        };
        let bos_id = id_of("tokenizer.ggml.bos_token_id")?;
        let eos_id = id_of("tokenizer.ggml.eos_token_id")?;
        let add_bos = match gguf.meta("tokenizer.ggml.add_bos_token") {
            Some(v) => v
                .as_bool()
                .ok_or_else(|| tok_err("tokenizer.ggml.add_bos_token is not a boolean"))?,
            None => matches!(inner, Inner::Spm(_)),
        };
        if add_bos && bos_id.is_none() {
            return Err(tok_err(
                "tokenizer.ggml.add_bos_token is set but there is no tokenizer.ggml.bos_token_id",
            ));
        }
        let mut stop_ids: Vec<u32> = eos_id.into_iter().collect();
        for end in ["<|im_end|>", "<end_of_turn>"] {
            if let Some(i) = tokens.iter().position(|t| *t == end) {
                if !stop_ids.contains(&(i as u32)) {
                    stop_ids.push(i as u32);
                }
            }
        }
        Ok(Self {
            inner,
            bos_id,
            eos_id,
            add_bos,
            stop_ids,
            vocab_size: tokens.len(),
        })
    }

    /// Encodes text; special-token strings in the text map to their ids. No BOS is added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        match &self.inner {
            Inner::Bpe(t) => Ok(t
                .encode_fast(text, false)
                .map_err(tok_err)?
                .get_ids()
                .to_vec()),
            Inner::Spm(t) => t.encode(text, true),
        }
    }

    /// [`TextTokenizer::encode`], with BOS first when the model expects it
    /// ([`TextTokenizer::add_bos`]).
    pub fn encode_text(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        let mut ids = Vec::new();
        if self.add_bos {
            ids.extend(self.bos_id);
        }
        ids.extend(self.encode(text)?);
        Ok(ids)
    }

    /// Decodes ids to text, special tokens included.
    pub fn decode(&self, ids: &[u32]) -> Result<String, ModelError> {
        match &self.inner {
            Inner::Bpe(t) => t.decode(ids, false).map_err(tok_err),
            Inner::Spm(t) => t.decode(ids),
        }
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// BOS when the model expects it before a text, else `None` (the
    /// perplexity protocol's windows: [`crate::corpus::protocol_stream`]).
    pub fn text_bos(&self) -> Option<u32> {
        self.bos_id.filter(|_| self.add_bos)
    }

    /// The id of a token string, if it is in the vocabulary.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        match &self.inner {
            Inner::Bpe(t) => t.token_to_id(token),
            Inner::Spm(t) => t.id(token),
        }
    }
}

/// The SentencePiece tokenizer and its pieces.
fn spm_from_gguf(gguf: &GgufFile) -> Result<(spm::Spm, Vec<&str>), ModelError> {
    let tokens = string_array(gguf, "tokenizer.ggml.tokens")?;
    let scores: Vec<f32> = match gguf.meta("tokenizer.ggml.scores") {
        Some(v) => v
            .as_array()
            .ok_or_else(|| tok_err("tokenizer.ggml.scores is not an array"))?
            .iter()
            .enumerate()
            .map(|(i, x)| {
                x.as_f64()
                    .map(|f| f as f32)
                    .ok_or_else(|| tok_err(format!("tokenizer.ggml.scores[{i}] is not a number")))
            })
            .collect::<Result<_, _>>()?,
        None => vec![0.0; tokens.len()],
    };
    let types = token_types(gguf, tokens.len())?;
    let add_space_prefix = match gguf.meta("tokenizer.ggml.add_space_prefix") {
        Some(v) => v
            .as_bool()
            .ok_or_else(|| tok_err("tokenizer.ggml.add_space_prefix is not a boolean"))?,
        None => true,
    };
    let spm = spm::Spm::new(&tokens, scores, types, add_space_prefix)?;
    Ok((spm, tokens))
}

/// `tokenizer.ggml.token_type`, or every token normal (type 1).
fn token_types(gguf: &GgufFile, n: usize) -> Result<Vec<i64>, ModelError> {
    let types: Vec<i64> = match gguf.meta("tokenizer.ggml.token_type") {
        Some(v) => v
            .as_array()
            .ok_or_else(|| tok_err("tokenizer.ggml.token_type is not an array"))?
            .iter()
            .map(|x| x.as_u64().map_or(1, |t| t as i64))
            .collect(),
        None => vec![1; n],
    };
    if types.len() != n {
        return Err(tok_err(format!(
            "tokenizer.ggml.tokens holds {n} tokens, tokenizer.ggml.token_type {} types",
            types.len()
        )));
    }
    Ok(types)
}

/// The byte-level BPE tokenizer and its tokens.
fn bpe_from_gguf(gguf: &GgufFile) -> Result<(Tokenizer, Vec<&str>), ModelError> {
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
    let types = token_types(gguf, tokens.len())?;
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.to_string(), i as u32))
        .collect();
    if tokens.len() > u32::MAX as usize {
        return Err(tok_err(format!(
            "tokenizer.ggml.tokens holds {} tokens",
            tokens.len()
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

    Ok((inner, tokens))
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

    /// A GGUF v3 header of no tensors and `kv` metadata entries.
    fn header(kv: u64) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(b"GGUF");
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&0u64.to_le_bytes()); // tensors
        b.extend_from_slice(&kv.to_le_bytes());
        b
    }

    /// A GGUF string.
    fn s(b: &mut Vec<u8>, x: &str) {
        b.extend_from_slice(&(x.len() as u64).to_le_bytes());
        b.extend_from_slice(x.as_bytes());
    }

    /// A metadata key and its value type.
    fn key(b: &mut Vec<u8>, k: &str, ty: u32) {
        s(b, k);
        b.extend_from_slice(&ty.to_le_bytes());
    }

    /// A GGUF holding only a small tokenizer: the seed of the fuzz targets.
    fn tokenizer_file() -> Vec<u8> {
        let mut b = header(7);
        key(&mut b, "tokenizer.ggml.model", 8);
        s(&mut b, "gpt2");
        key(&mut b, "tokenizer.ggml.pre", 8);
        s(&mut b, "smollm");
        let tokens = [
            "a",
            "b",
            "ab",
            "\u{120}",
            "\u{120}a",
            "<|im_end|>",
            "1",
            "2",
        ];
        key(&mut b, "tokenizer.ggml.tokens", 9);
        b.extend_from_slice(&8u32.to_le_bytes());
        b.extend_from_slice(&(tokens.len() as u64).to_le_bytes());
        for t in tokens {
            s(&mut b, t);
        }
        key(&mut b, "tokenizer.ggml.merges", 9);
        b.extend_from_slice(&8u32.to_le_bytes());
        b.extend_from_slice(&2u64.to_le_bytes());
        s(&mut b, "a b");
        s(&mut b, "\u{120} a");
        key(&mut b, "tokenizer.ggml.token_type", 9);
        b.extend_from_slice(&5u32.to_le_bytes());
        b.extend_from_slice(&(tokens.len() as u64).to_le_bytes());
        for t in [1i32, 1, 1, 1, 1, 3, 1, 1] {
            b.extend_from_slice(&t.to_le_bytes());
        }
        key(&mut b, "tokenizer.ggml.bos_token_id", 4);
        b.extend_from_slice(&5u32.to_le_bytes());
        key(&mut b, "tokenizer.ggml.eos_token_id", 4);
        b.extend_from_slice(&5u32.to_le_bytes());
        b
    }

    /// A GGUF holding only a small SentencePiece tokenizer (scores, types
    /// with byte pieces, a user-defined and a control token, add_bos): the
    /// seed of the SentencePiece fuzz runs.
    fn spm_tokenizer_file() -> Vec<u8> {
        let mut pieces: Vec<(String, f32, i32)> = vec![
            ("<unk>".into(), 0.0, 2),
            ("<bos>".into(), 0.0, 3),
            ("  ".into(), 0.0, 4),
            ("a".into(), -1.0, 1),
            ("b".into(), -1.0, 1),
            ("ab".into(), -0.5, 1),
            ("\u{2581}".into(), -2.0, 1),
            ("\u{2581}a".into(), -0.7, 1),
        ];
        for b in [0x31u8, 0x32, 0xC3, 0xA9] {
            pieces.push((format!("<0x{b:02X}>"), 0.0, 6));
        }
        let mut b = header(6);
        let n = pieces.len() as u64;
        key(&mut b, "tokenizer.ggml.model", 8);
        s(&mut b, "llama");
        key(&mut b, "tokenizer.ggml.tokens", 9);
        b.extend_from_slice(&8u32.to_le_bytes());
        b.extend_from_slice(&n.to_le_bytes());
        for (p, _, _) in &pieces {
            s(&mut b, p);
        }
        key(&mut b, "tokenizer.ggml.scores", 9);
        b.extend_from_slice(&6u32.to_le_bytes());
        b.extend_from_slice(&n.to_le_bytes());
        for (_, sc, _) in &pieces {
            b.extend_from_slice(&sc.to_le_bytes());
        }
        key(&mut b, "tokenizer.ggml.token_type", 9);
        b.extend_from_slice(&5u32.to_le_bytes());
        b.extend_from_slice(&n.to_le_bytes());
        for (_, _, t) in &pieces {
            b.extend_from_slice(&t.to_le_bytes());
        }
        key(&mut b, "tokenizer.ggml.bos_token_id", 4);
        b.extend_from_slice(&1u32.to_le_bytes());
        key(&mut b, "tokenizer.ggml.add_space_prefix", 7);
        b.push(0);
        b
    }

    #[test]
    fn the_sentencepiece_seed_tokenizer_works() {
        let gguf = GgufFile::from_bytes(&spm_tokenizer_file()).unwrap();
        let t = TextTokenizer::from_gguf(&gguf).unwrap();
        assert!(t.add_bos, "SentencePiece files default to BOS");
        assert_eq!(t.text_bos(), Some(1));
        let ids = t.encode("ab a  b<bos>12é").unwrap();
        assert_eq!(t.decode(&ids).unwrap(), "ab a  b<bos>12é");
        assert_eq!(ids[..2], [5, 7]);
    }

    #[test]
    fn fuzz_sentencepiece_from_metadata_fixed_inputs() {
        for b in dynakv_core::fuzz::seeded(&spm_tokenizer_file(), 20_000, 0x73706d) {
            tokenize_damaged(&b);
        }
    }

    /// Builds the tokenizer from a (damaged) file and round-trips a text:
    /// an error or a working tokenizer, never a panic.
    fn tokenize_damaged(b: &[u8]) {
        let Ok(gguf) = GgufFile::from_bytes(b) else {
            return;
        };
        if let Ok(t) = TextTokenizer::from_gguf(&gguf) {
            if let Ok(ids) = t.encode("ab a<|im_end|> 12  é<bos>") {
                assert!(ids.iter().all(|&i| (i as usize) < t.vocab_size()));
                let _ = t.decode(&ids);
            }
        }
    }

    #[test]
    fn the_seed_tokenizer_works() {
        let gguf = GgufFile::from_bytes(&tokenizer_file()).unwrap();
        let t = TextTokenizer::from_gguf(&gguf).unwrap();
        let ids = t.encode("ab a<|im_end|>").unwrap();
        assert_eq!(t.decode(&ids).unwrap(), "ab a<|im_end|>");
        assert_eq!(t.eos_id, Some(5));
    }

    #[test]
    fn fuzz_tokenizer_from_metadata_fixed_inputs() {
        for b in dynakv_core::fuzz::seeded(&tokenizer_file(), 20_000, 0x746f_6b65) {
            tokenize_damaged(&b);
        }
    }

    #[test]
    #[ignore = "random fuzzing: BOLERO_RANDOM_ITERATIONS=N cargo test --release -- --ignored fuzz_"]
    fn fuzz_tokenizer_from_metadata() {
        let seed = tokenizer_file();
        bolero::check!()
            .with_type::<(Vec<(u16, u8)>, Vec<(u16, u64)>, Option<u16>)>()
            .for_each(|(bytes, words, cut)| {
                tokenize_damaged(&dynakv_core::fuzz::mutate(&seed, bytes, words, *cut));
            });
    }

    #[test]
    fn chat_format() {
        assert_eq!(
            chat_prompt(&[("user", "Hi")]),
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }
}
