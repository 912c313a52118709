//! The Llama model on the real SmolLM2 file: decoding equals prefill, and
//! logits agree with llama.cpp (fixture: tools/make_parity_fixture.py).

mod common;

use burn::tensor::Tensor;
use dynakv_models::llama::nll_and_top1;

#[test]
fn step_by_step_decode_equals_prefill() {
    let r = common::real();
    let ids = r
        .tokenizer
        .encode("The quick brown fox jumps over the lazy dog. It was 1961 in Atlanta.")
        .unwrap();
    let mut cache = r.model.dense_cache().unwrap();
    let prefill = r.model.forward(&ids, 0, &mut cache).unwrap();
    let mut cache = r.model.dense_cache().unwrap();
    let mut steps = Vec::new();
    for (i, &t) in ids.iter().enumerate() {
        steps.push(r.model.forward(&[t], i, &mut cache).unwrap());
    }
    let steps = Tensor::cat(steps, 0);
    let scale: f32 = prefill.clone().abs().max().into_scalar();
    let diff: f32 = (prefill - steps).abs().max().into_scalar();
    assert!(diff / scale < 1e-4, "max diff {diff} (scale {scale})");
}

#[test]
fn parity_with_llama_cpp() {
    let fixture: serde_json::Value =
        serde_json::from_str(include_str!("fixtures/parity.json")).unwrap();
    let r = common::real();
    let ctx = fixture["ctx"].as_u64().unwrap() as usize;
    let tokens: Vec<u32> = fixture["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let want_top1: Vec<u32> = fixture["top1"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let want_ppl = fixture["ppl"].as_f64().unwrap();
    let (mut nll_sum, mut n, mut agree) = (0f64, 0usize, 0usize);
    for (w, win) in tokens.chunks_exact(ctx).enumerate() {
        let mut cache = r.model.dense_cache().unwrap();
        let logits = r.model.forward(&win[..ctx - 1], 0, &mut cache).unwrap();
        let (nll, top1) = nll_and_top1(logits, &win[1..]);
        for (i, &t) in top1.iter().enumerate() {
            agree += usize::from(t == want_top1[w * (ctx - 1) + i]);
        }
        nll_sum += nll.iter().map(|&x| x as f64).sum::<f64>();
        n += nll.len();
    }
    assert!(n >= 2000, "only {n} positions");
    let ppl = (nll_sum / n as f64).exp();
    let agreement = agree as f64 / n as f64;
    eprintln!("parity: {n} positions, top-1 agreement {agreement:.4}, PPL ours {ppl:.4} vs llama.cpp {want_ppl:.4}");
    assert!(agreement >= 0.99, "top-1 agreement {agreement}");
    assert!((ppl / want_ppl - 1.0).abs() <= 0.01, "PPL {ppl} vs {want_ppl}");
}

#[test]
fn brown_eval_tokens_match_the_fixture() {
    let fixture: serde_json::Value =
        serde_json::from_str(include_str!("fixtures/parity.json")).unwrap();
    let r = common::real();
    let dir = dynakv_models::assets::brown_dir().unwrap();
    let n_docs = fixture["docs"].as_u64().unwrap() as usize;
    let mut docs = dynakv_models::corpus::load_split(&dir, dynakv_models::corpus::Split::Eval).unwrap();
    docs.truncate(n_docs);
    let ids = dynakv_models::corpus::document_tokens(&r.tokenizer, &docs).unwrap();
    let want: Vec<u32> = fixture["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(&ids[..want.len()], &want[..]);
}
