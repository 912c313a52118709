//! The SentencePiece tokenizer of GGUF files whose `tokenizer.ggml.model` is
//! `llama` (Llama 2, Gemma): pieces with scores, no merge list, byte
//! fallback.
//!
//! It follows llama.cpp's SPM tokenizer (`llm_tokenizer_spm_session`), the
//! reference the golden test compares with, step by step:
//! 1. special tokens (control, user-defined, unknown) are split out of the
//!    text first, longest text first; control and unknown ones only when
//!    special tokens are parsed, user-defined ones (Gemma's runs of spaces
//!    and newlines) always;
//! 2. in each remaining fragment spaces become `▁` (a leading `▁` only when
//!    the file says `add_space_prefix`);
//! 3. starting from single characters, the adjacent pair whose
//!    concatenation is a piece with the highest score is merged (ties: the
//!    leftmost), until no pair is a piece;
//! 4. a symbol that is not a piece (a character outside the vocabulary) is
//!    written as its UTF-8 bytes, `<0xXX>` pieces.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashSet};

use aho_corasick::AhoCorasick;

use super::pieces::Pieces;
use crate::error::ModelError;

/// ggml token types (`tokenizer.ggml.token_type`).
const TYPE_UNKNOWN: i64 = 2;
const TYPE_CONTROL: i64 = 3;
const TYPE_USER_DEFINED: i64 = 4;
const TYPE_BYTE: i64 = 6;

/// A SentencePiece vocabulary and the rules above.
pub struct Spm {
    /// Piece texts by id and ids by text; for a text held twice, the later
    /// id (as llama.cpp).
    pieces: Pieces,
    scores: Vec<f32>,
    types: Vec<i64>,
    /// Control, user-defined and unknown tokens, longest text first (then
    /// by id): the order llama.cpp splits them out.
    specials: Vec<u32>,
    /// Finds which specials occur in a text at all, so the exact
    /// longest-first splitting runs only over those.
    special_finder: Option<AhoCorasick>,
    /// The `<0xXX>` piece of each byte.
    byte_ids: [Option<u32>; 256],
    add_space_prefix: bool,
}

/// A text fragment: raw text still to tokenize, or a special token.
enum Fragment<'a> {
    Raw(&'a str),
    Token(u32),
}

impl Spm {
    /// Builds the tokenizer from the pieces, their scores and types.
    pub fn new(
        pieces: &[&str],
        scores: Vec<f32>,
        types: Vec<i64>,
        add_space_prefix: bool,
    ) -> Result<Self, ModelError> {
        let n = pieces.len();
        if scores.len() != n || types.len() != n || n == 0 || n > u32::MAX as usize {
            return Err(ModelError::Tokenizer(format!(
                "tokenizer.ggml.tokens holds {n} pieces, tokenizer.ggml.scores {} scores, tokenizer.ggml.token_type {} types",
                scores.len(),
                types.len()
            )));
        }
        if let Some(i) = scores.iter().position(|s| !s.is_finite()) {
            return Err(ModelError::Tokenizer(format!(
                "tokenizer.ggml.scores[{i}] = {} is not finite",
                scores[i]
            )));
        }
        let mut specials: Vec<u32> = (0..n as u32)
            .filter(|&i| {
                matches!(
                    types[i as usize],
                    TYPE_CONTROL | TYPE_USER_DEFINED | TYPE_UNKNOWN
                ) && !pieces[i as usize].is_empty()
            })
            .collect();
        specials.sort_by_key(|&i| std::cmp::Reverse(pieces[i as usize].len()));
        let table = Pieces::new(pieces.iter().copied())?;
        let special_finder = if specials.is_empty() {
            None
        } else {
            Some(
                AhoCorasick::new(specials.iter().map(|&i| pieces[i as usize]))
                    .map_err(|e| ModelError::Tokenizer(format!("special tokens: {e}")))?,
            )
        };
        let mut byte_ids = [None; 256];
        for (b, slot) in byte_ids.iter_mut().enumerate() {
            *slot = table.id(&format!("<0x{b:02X}>"));
        }
        Ok(Self {
            pieces: table,
            scores,
            types,
            specials,
            special_finder,
            byte_ids,
            add_space_prefix,
        })
    }

    /// The id of a piece's text.
    pub fn id(&self, piece: &str) -> Option<u32> {
        self.pieces.id(piece)
    }

    /// Token ids of `text` (no BOS); control tokens written in the text
    /// become their ids when `parse_special`.
    pub fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<u32>, ModelError> {
        let mut out = Vec::new();
        let mut prev_special = true;
        for fragment in self.partition(text, parse_special) {
            match fragment {
                Fragment::Token(id) => {
                    out.push(id);
                    prev_special = true;
                }
                Fragment::Raw(raw) => {
                    let mut s = String::with_capacity(raw.len() * 2);
                    if self.add_space_prefix && prev_special {
                        s.push('\u{2581}');
                    }
                    for c in raw.chars() {
                        if c == ' ' {
                            s.push('\u{2581}');
                        } else {
                            s.push(c);
                        }
                    }
                    self.encode_piecewise(&s, &mut out)?;
                    prev_special = false;
                }
            }
        }
        Ok(out)
    }

    /// Step 1: the text cut around special tokens, longest text first.
    fn partition<'a>(&self, text: &'a str, parse_special: bool) -> Vec<Fragment<'a>> {
        let mut fragments = vec![Fragment::Raw(text)];
        let Some(finder) = &self.special_finder else {
            return fragments;
        };
        if text.is_empty() {
            return Vec::new();
        }
        // which specials occur anywhere (overlaps included)
        let present: HashSet<usize> = finder
            .find_overlapping_iter(text)
            .map(|m| m.pattern().as_usize())
            .collect();
        for (k, &id) in self.specials.iter().enumerate() {
            if !present.contains(&k) {
                continue;
            }
            let ty = self.types[id as usize];
            if !parse_special && (ty == TYPE_CONTROL || ty == TYPE_UNKNOWN) {
                continue;
            }
            let Some(piece) = self.pieces.get(id) else {
                continue;
            };
            let mut next = Vec::with_capacity(fragments.len());
            for f in fragments {
                let Fragment::Raw(raw) = f else {
                    next.push(f);
                    continue;
                };
                let mut rest = 0;
                for (at, _) in raw.match_indices(piece) {
                    if at > rest {
                        next.push(Fragment::Raw(&raw[rest..at]));
                    }
                    next.push(Fragment::Token(id));
                    rest = at + piece.len();
                }
                if rest < raw.len() {
                    next.push(Fragment::Raw(&raw[rest..]));
                }
            }
            fragments = next;
        }
        fragments
    }

    /// Steps 3 and 4 on one escaped fragment.
    fn encode_piecewise(&self, s: &str, out: &mut Vec<u32>) -> Result<(), ModelError> {
        // symbols: byte ranges of `s`, linked as a list
        struct Sym {
            start: usize,
            len: usize,
            prev: Option<usize>,
            next: Option<usize>,
        }
        let mut syms: Vec<Sym> = Vec::new();
        for (start, c) in s.char_indices() {
            let i = syms.len();
            syms.push(Sym {
                start,
                len: c.len_utf8(),
                prev: i.checked_sub(1),
                next: None,
            });
            if let Some(p) = i.checked_sub(1) {
                syms[p].next = Some(i);
            }
        }
        if syms.is_empty() {
            return Ok(());
        }
        let mut queue = BinaryHeap::new();
        let bigram = |syms: &[Sym], left: usize, right: usize| -> Option<Bigram> {
            let text = &s[syms[left].start..syms[left].start + syms[left].len + syms[right].len];
            let id = self.pieces.id(text)?;
            Some(Bigram {
                score: self.scores[id as usize],
                left,
                right,
                len: text.len(),
            })
        };
        for i in 1..syms.len() {
            queue.extend(bigram(&syms, i - 1, i));
        }
        while let Some(b) = queue.pop() {
            let (l, r) = (&syms[b.left], &syms[b.right]);
            // stale: one side was merged since this pair was queued
            if l.len == 0 || r.len == 0 || l.len + r.len != b.len {
                continue;
            }
            let right_next = r.next;
            syms[b.left].len += syms[b.right].len;
            syms[b.right].len = 0;
            syms[b.left].next = right_next;
            if let Some(n) = right_next {
                syms[n].prev = Some(b.left);
            }
            if let Some(p) = syms[b.left].prev {
                queue.extend(bigram(&syms, p, b.left));
            }
            if let Some(n) = right_next {
                queue.extend(bigram(&syms, b.left, n));
            }
        }
        // every merged symbol is a piece (a merge needs one); a single
        // character outside the vocabulary goes out as bytes
        let mut i = Some(0);
        while let Some(k) = i {
            let sym = &syms[k];
            let text = &s[sym.start..sym.start + sym.len];
            match self.pieces.id(text) {
                Some(id) => out.push(id),
                None => {
                    for &byte in text.as_bytes() {
                        let id = self.byte_ids[byte as usize].ok_or_else(|| {
                            ModelError::Tokenizer(format!(
                                "{text:?} is not in the vocabulary and there is no <0x{byte:02X}> piece for its bytes"
                            ))
                        })?;
                        out.push(id);
                    }
                }
            }
            i = sym.next;
        }
        Ok(())
    }

    /// Text of `ids`: `▁` as spaces, `<0xXX>` pieces as their bytes, special
    /// tokens as their text.
    pub fn decode(&self, ids: &[u32]) -> Result<String, ModelError> {
        let mut bytes = Vec::new();
        for &id in ids {
            let piece = self.pieces.get(id).ok_or_else(|| {
                ModelError::Tokenizer(format!("token id {id} is outside the vocabulary"))
            })?;
            if self.types[id as usize] == TYPE_BYTE {
                if let Some(b) = piece
                    .strip_prefix("<0x")
                    .and_then(|h| h.strip_suffix('>'))
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    bytes.push(b);
                    continue;
                }
            }
            bytes.extend_from_slice(piece.replace('\u{2581}', " ").as_bytes());
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }
}

/// A pair of adjacent symbols whose concatenation is a piece.
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    /// Bytes of the concatenation when it was queued.
    len: usize,
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Bigram {}

impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Bigram {
    /// The heap's top: the highest score, then the leftmost pair.
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spm(pieces: &[(&str, f32, i64)], prefix: bool) -> Spm {
        Spm::new(
            &pieces.iter().map(|p| p.0).collect::<Vec<_>>(),
            pieces.iter().map(|p| p.1).collect(),
            pieces.iter().map(|p| p.2).collect(),
            prefix,
        )
        .unwrap()
    }

    fn toy() -> Spm {
        let mut p: Vec<(String, f32, i64)> = vec![
            ("<unk>".into(), 0.0, TYPE_UNKNOWN),
            ("<bos>".into(), 0.0, TYPE_CONTROL),
            ("  ".into(), 0.0, TYPE_USER_DEFINED),
            ("a".into(), -1.0, 1),
            ("b".into(), -1.0, 1),
            ("c".into(), -1.0, 1),
            ("\u{2581}".into(), -1.0, 1),
            ("ab".into(), -2.0, 1),
            ("bc".into(), -1.5, 1),
            ("abc".into(), -3.0, 1),
            ("\u{2581}a".into(), -0.5, 1),
        ];
        for b in 0..=255u8 {
            p.push((format!("<0x{b:02X}>"), 0.0, TYPE_BYTE));
        }
        let p: Vec<(&str, f32, i64)> = p.iter().map(|(s, f, t)| (s.as_str(), *f, *t)).collect();
        spm(&p, false)
    }

    #[test]
    fn the_best_scoring_pair_merges_first() {
        let t = toy();
        // "bc" (-1.5) merges before "ab" (-2); then "a" + "bc" is the piece
        // "abc"; the queued "ab" is stale and skipped
        let abc = t.encode("abc", false).unwrap();
        assert_eq!(abc, vec![t.id("abc").unwrap()]);
        assert_eq!(t.encode("ab", false).unwrap(), vec![t.id("ab").unwrap()]);
        // a space becomes ▁ and joins the next letter
        assert_eq!(
            t.encode("b a", false).unwrap(),
            vec![t.id("b").unwrap(), t.id("\u{2581}a").unwrap()]
        );
    }

    #[test]
    fn specials_and_byte_fallback() {
        let t = toy();
        // user-defined "  " splits always; <bos> only when parsed
        let ids = t.encode("a  b<bos>", true).unwrap();
        assert_eq!(ids[..3], [3, 2, 4]);
        assert_eq!(ids[3], 1);
        let raw = t.encode("<bos>", false).unwrap();
        assert!(raw.len() > 1 && !raw.contains(&1));
        // "é" is not a piece: two byte pieces, decoded back
        let e = t.encode("é", false).unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!(t.decode(&e).unwrap(), "é");
        assert_eq!(
            t.decode(&t.encode("b a  c", true).unwrap()).unwrap(),
            "b a  c"
        );
    }

    #[test]
    fn bad_vocabularies_are_errors() {
        assert!(Spm::new(&["a"], vec![], vec![1], false).is_err());
        assert!(Spm::new(&["a"], vec![f32::NAN], vec![1], false).is_err());
        // a character with neither a piece nor byte pieces
        let t = spm(&[("a", 0.0, 1)], false);
        assert!(t.encode("x", false).is_err());
    }
}
