//! The tokenizer built from GGUF metadata against llama.cpp's own tokenizer on
//! the same file (fixture: tools/make_tokenizer_fixture.py).

mod common;

/// A fixture's (text, llama.cpp's ids) cases.
fn cases(json: &str) -> Vec<(String, Vec<u32>)> {
    let fixture: serde_json::Value = serde_json::from_str(json).unwrap();
    fixture["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|case| {
            let ids = case["ids"].as_array().unwrap();
            (
                case["text"].as_str().unwrap().to_string(),
                ids.iter().map(|v| v.as_u64().unwrap() as u32).collect(),
            )
        })
        .collect()
}

#[test]
fn ids_match_llama_cpp() {
    let tok = &common::real().tokenizer;
    let cases = cases(include_str!("fixtures/tokenizer.json"));
    assert!(cases.len() >= 10);
    for (text, want) in &cases {
        let text = text.as_str();
        let got = tok.encode(text).unwrap();
        assert_eq!(&got, want, "text {text:?}");
        // Byte-level BPE round-trips every text.
        assert_eq!(tok.decode(&got).unwrap(), text);
    }
}

#[test]
fn special_tokens_are_single_ids() {
    let tok = &common::real().tokenizer;
    let im_start = tok.token_id("<|im_start|>").unwrap();
    assert_eq!(tok.encode("<|im_start|>").unwrap(), vec![im_start]);
    assert!(tok.stop_ids.contains(&tok.token_id("<|im_end|>").unwrap()));
}

/// Gemma 3's SentencePiece tokenizer against llama.cpp's on the same file
/// (fixture: `tools/make_tokenizer_fixture.py gemma3-270m`): whitespace runs
/// (user-defined pieces), tabs, emoji, CJK, byte fallback, special tokens.
#[test]
fn sentencepiece_ids_match_llama_cpp() {
    use dynakv_models::assets::KnownModel;
    use dynakv_models::gguf::GgufFile;
    let path = KnownModel::Gemma3.ensure().expect("fetch gemma3-270m");
    let gguf = GgufFile::open(&path).unwrap();
    let tok = dynakv_models::TextTokenizer::from_gguf(&gguf).unwrap();
    assert!(tok.add_bos, "Gemma 3 asks for BOS");
    assert_eq!(tok.bos_id, Some(2));
    assert!(tok.stop_ids.contains(&1) && tok.stop_ids.contains(&106));
    let cases = cases(include_str!("fixtures/tokenizer-gemma3.json"));
    assert!(cases.len() >= 15);
    for (text, want) in &cases {
        let text = text.as_str();
        let got = tok.encode(text).unwrap();
        assert_eq!(&got, want, "text {text:?}");
        // every text round-trips but one holding `▁` itself (a space's piece)
        if !text.contains('\u{2581}') {
            assert_eq!(tok.decode(&got).unwrap(), text);
        }
    }
    assert_eq!(tok.encode_text("Hi").unwrap()[0], 2);
}
