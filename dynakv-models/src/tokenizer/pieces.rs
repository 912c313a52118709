//! A vocabulary's token texts held once: one buffer, the end of each text,
//! and a hash table of ids for lookups by text.
//!
//! Why: Gemma 3's SentencePiece vocabulary has 262,144 pieces. As a
//! `Vec<String>` plus a `HashMap<String, u32>` of clones it took about 28 MB
//! of heap (valgrind's massif: 17.3 MB of hash table, 6.3 MB of `String`
//! headers, the texts twice), about a tenth of the process; here it is
//! about 6 MB (the texts once, four bytes of end and about eight of table
//! per piece).

use std::hash::BuildHasher;

use hashbrown::HashTable;

use crate::error::ModelError;

/// Token texts by id, and ids by text.
pub(crate) struct Pieces {
    /// Every piece's text, one after another.
    text: String,
    /// Where piece `i` ends in `text` (it starts where piece `i - 1` ends).
    ends: Vec<u32>,
    /// Ids, found by hashing a text and comparing it with the ids' texts.
    index: HashTable<u32>,
    hasher: std::collections::hash_map::RandomState,
}

impl Pieces {
    /// Holds `pieces` (ids in order); a text given twice is found as its
    /// later id (as llama.cpp's map, which the later insert overwrites).
    /// An error when the texts exceed 4 GiB together or there are more than
    /// `u32::MAX` pieces.
    pub(crate) fn new<'a>(
        pieces: impl ExactSizeIterator<Item = &'a str>,
    ) -> Result<Self, ModelError> {
        let n = pieces.len();
        if n > u32::MAX as usize {
            return Err(ModelError::Tokenizer(format!(
                "{n} pieces (at most {})",
                u32::MAX
            )));
        }
        let mut p = Self {
            text: String::new(),
            ends: Vec::with_capacity(n),
            index: HashTable::with_capacity(n),
            hasher: Default::default(),
        };
        for (id, piece) in pieces.enumerate() {
            p.text.push_str(piece);
            let end = u32::try_from(p.text.len()).map_err(|_| {
                ModelError::Tokenizer("the pieces' texts exceed 4 GiB together".into())
            })?;
            p.ends.push(end);
            let id = id as u32;
            let hash = p.hasher.hash_one(piece);
            let (text, ends) = (&p.text, &p.ends);
            let at = |i: u32| piece_at(text, ends, i);
            match p.index.find_mut(hash, |&i| at(i) == Some(piece)) {
                Some(slot) => *slot = id,
                None => {
                    let hasher = &p.hasher;
                    p.index
                        .insert_unique(hash, id, |&i| hasher.hash_one(at(i).unwrap_or("")));
                }
            }
        }
        p.text.shrink_to_fit();
        Ok(p)
    }

    /// The number of pieces.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.ends.len()
    }

    /// The text of piece `id`.
    pub(crate) fn get(&self, id: u32) -> Option<&str> {
        piece_at(&self.text, &self.ends, id)
    }

    /// The id of a text.
    pub(crate) fn id(&self, piece: &str) -> Option<u32> {
        let hash = self.hasher.hash_one(piece);
        self.index
            .find(hash, |&i| self.get(i) == Some(piece))
            .copied()
    }
}

/// Piece `id`'s text in `text`, as [`Pieces::ends`] places it.
fn piece_at<'t>(text: &'t str, ends: &[u32], id: u32) -> Option<&'t str> {
    let i = id as usize;
    let end = *ends.get(i)? as usize;
    let start = match i {
        0 => 0,
        _ => ends[i - 1] as usize,
    };
    text.get(start..end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts_and_ids_both_ways() {
        let words = ["", "a", "ab", "▁the", "<0x0A>", "ab", "b"];
        let p = Pieces::new(words.iter().copied()).unwrap();
        assert_eq!(p.len(), words.len());
        for (i, w) in words.iter().enumerate() {
            assert_eq!(p.get(i as u32), Some(*w), "piece {i}");
        }
        assert_eq!(p.get(words.len() as u32), None);
        // a text held twice is found as its later id
        assert_eq!(p.id("ab"), Some(5));
        assert_eq!(p.id("a"), Some(1));
        assert_eq!(p.id(""), Some(0));
        assert_eq!(p.id("▁the"), Some(3));
        assert_eq!(p.id("abc"), None);
        assert_eq!(p.id("▁"), None);
    }

    #[test]
    fn many_pieces_are_all_found() {
        // enough to make the table grow past its first capacity guesses
        let words: Vec<String> = (0..50_000).map(|i| format!("w{i}")).collect();
        let p = Pieces::new(words.iter().map(|s| s.as_str())).unwrap();
        for (i, w) in words.iter().enumerate() {
            assert_eq!(p.id(w), Some(i as u32));
        }
    }
}
