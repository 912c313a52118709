//! The real model's GGUF with one metadata value damaged: each is refused
//! with an error naming the key, never loaded into a model that computes
//! something else (NaN logits, a shifted PPL) with no error.

use std::path::{Path, PathBuf};

use dynakv_burn::device::default_device;
use dynakv_models::gguf::GgufFile;
use dynakv_models::LlamaModel;

/// A copy of the default model with the 4-byte value after `key` replaced.
fn damaged(dir: &Path, key: &str, type_id: u32, value: [u8; 4]) -> PathBuf {
    let src = dynakv_models::assets::default_model().expect("fetch the default model");
    let mut bytes = std::fs::read(src).unwrap();
    let k = key.as_bytes();
    let at = bytes
        .windows(k.len())
        .position(|w| w == k)
        .unwrap_or_else(|| panic!("{key} not in the file"))
        + k.len();
    assert_eq!(bytes[at..at + 4], type_id.to_le_bytes(), "{key}'s type");
    bytes[at + 4..at + 8].copy_from_slice(&value);
    let path = dir.join(format!("{key}.gguf"));
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn damaged_metadata_is_named_not_loaded() {
    let dir = std::env::temp_dir().join(format!("dynakv-gguf-meta-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    const F32: u32 = 6;
    const U32: u32 = 4;
    let cases = [
        (
            "llama.attention.layer_norm_rms_epsilon",
            F32,
            f32::NAN.to_le_bytes(),
        ),
        (
            "llama.attention.layer_norm_rms_epsilon",
            F32,
            0f32.to_le_bytes(),
        ),
        ("llama.rope.freq_base", F32, f32::INFINITY.to_le_bytes()),
        ("llama.rope.freq_base", F32, (-1f32).to_le_bytes()),
        ("llama.context_length", U32, (1u32 << 31).to_le_bytes()),
        ("llama.block_count", U32, 29u32.to_le_bytes()),
        ("llama.block_count", U32, 31u32.to_le_bytes()),
        ("llama.rope.dimension_count", U32, 63u32.to_le_bytes()),
        ("llama.rope.dimension_count", U32, 128u32.to_le_bytes()),
        // even and in range, but not the whole head: llama weights rotate all of it
        ("llama.rope.dimension_count", U32, 32u32.to_le_bytes()),
    ];
    for (key, ty, value) in cases {
        let path = damaged(&dir, key, ty, value);
        let gguf = GgufFile::open(&path).unwrap();
        let err = LlamaModel::from_gguf(&gguf, &default_device())
            .err()
            .unwrap_or_else(|| panic!("{key} = {value:?} loaded"))
            .to_string();
        let short = key.trim_start_matches("llama.");
        assert!(err.contains(short), "{key}: {err}");
        std::fs::remove_file(&path).unwrap();
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A copy of the default model with the first element of the string array
/// `key` damaged by `damage(length field, string bytes)`.
fn damaged_first_string(
    dir: &Path,
    key: &str,
    tag: &str,
    damage: impl Fn(&mut [u8], &mut [u8]),
) -> PathBuf {
    let src = dynakv_models::assets::default_model().expect("fetch the default model");
    let mut bytes = std::fs::read(src).unwrap();
    let k = key.as_bytes();
    let at = bytes.windows(k.len()).position(|w| w == k).unwrap() + k.len();
    // type 9 (array), element type 8 (string), count u64, then the first string
    assert_eq!(bytes[at..at + 8], [9, 0, 0, 0, 8, 0, 0, 0]);
    let first = at + 16;
    let len = u64::from_le_bytes(bytes[first..first + 8].try_into().unwrap()) as usize;
    let (head, tail) = bytes.split_at_mut(first + 8);
    damage(&mut head[first..], &mut tail[..len]);
    let path = dir.join(format!("{tag}.gguf"));
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn damaged_token_arrays_are_named_by_element() {
    let dir = std::env::temp_dir().join(format!("dynakv-gguf-tok-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // a string length beyond the file
    let path = damaged_first_string(&dir, "tokenizer.ggml.tokens", "len", |len, _| {
        len.copy_from_slice(&(1u64 << 40).to_le_bytes())
    });
    let err = GgufFile::open(&path).err().unwrap().to_string();
    assert!(
        err.contains("tokenizer.ggml.tokens[0]") && err.contains("string length"),
        "{err}"
    );
    // a merge naming a token the vocabulary does not hold ("Ġ t" -> "q@ t")
    let path = damaged_first_string(&dir, "tokenizer.ggml.merges", "merge", |_, s| {
        s[..2].copy_from_slice(b"q@")
    });
    let gguf = GgufFile::open(&path).unwrap();
    let err = dynakv_models::TextTokenizer::from_gguf(&gguf)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("tokenizer.ggml.merges[0]") && err.contains("q@"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
