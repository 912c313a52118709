//! The tokenizer built from GGUF metadata against llama.cpp's own tokenizer on
//! the same file (fixture: tools/make_tokenizer_fixture.py).

mod common;

#[test]
fn ids_match_llama_cpp() {
    let fixture: serde_json::Value =
        serde_json::from_str(include_str!("fixtures/tokenizer.json")).unwrap();
    let tok = &common::real().tokenizer;
    let cases = fixture["cases"].as_array().unwrap();
    assert!(cases.len() >= 10);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let got = tok.encode(text).unwrap();
        assert_eq!(got, want, "text {text:?}");
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
