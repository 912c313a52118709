//! The Llama model on the real SmolLM2 file: decoding equals prefill, and
//! logits agree with llama.cpp (fixture: tools/make_parity_fixture.py).

mod common;

use burn::tensor::Tensor;
use dynakv_burn::CacheSpec;
use dynakv_models::llama::nll_and_top1;

/// Decoding one token at a time gives the prefill's logits: up to float
/// rounding with the exact f32 cache; with the default f16 rows within a
/// rounding flip (a key or value that lands on the other side of an f16
/// step moves by 2^-11 relative; measured 2.5e-4 of the largest logit).
#[test]
fn step_by_step_decode_equals_prefill() {
    let r = common::real();
    let ids = r
        .tokenizer
        .encode("The quick brown fox jumps over the lazy dog. It was 1961 in Atlanta.")
        .unwrap();
    let default = || {
        r.model
            .cache_factory(None, &CacheSpec::dense())
            .unwrap()
            .make()
            .unwrap()
    };
    let exact = || r.model.dense_cache().unwrap();
    for (name, make, tol) in [
        ("f32", &exact as &dyn Fn() -> _, 1e-4),
        ("default (f16)", &default, 2e-3),
    ] {
        let mut cache = make();
        let prefill = r.model.forward(&ids, 0, cache.as_mut()).unwrap();
        let mut cache = make();
        let mut steps = Vec::new();
        for (i, &t) in ids.iter().enumerate() {
            steps.push(r.model.forward(&[t], i, cache.as_mut()).unwrap());
        }
        let steps = Tensor::cat(steps, 0);
        let scale: f32 = prefill.clone().abs().max().into_scalar();
        let diff: f32 = (prefill - steps).abs().max().into_scalar();
        assert!(
            diff / scale < tol,
            "{name}: max diff {diff} (scale {scale})"
        );
    }
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Our per-position top-1 and NLL on the fixture's windows.
fn ours(fixture: &serde_json::Value) -> (Vec<u32>, Vec<f32>) {
    ours_with(&common::real().model, fixture)
}

fn ours_with(
    model: &dynakv_models::LlamaModel,
    fixture: &serde_json::Value,
) -> (Vec<u32>, Vec<f32>) {
    let ctx = fixture["ctx"].as_u64().unwrap() as usize;
    let tokens = ids(&fixture["tokens"]);
    let (mut all_top1, mut all_nll) = (Vec::new(), Vec::new());
    for win in tokens.chunks_exact(ctx) {
        let mut cache = model.dense_cache().unwrap();
        let logits = model.forward(&win[..ctx - 1], 0, cache.as_mut()).unwrap();
        let (nll, top1) = nll_and_top1(logits, &win[1..]);
        all_top1.extend(top1);
        all_nll.extend(nll);
    }
    (all_top1, all_nll)
}

/// (top-1 agreement, our PPL, reference PPL)
fn compare(top1: &[u32], nll: &[f32], reference: &serde_json::Value) -> (f64, f64, f64) {
    let want = ids(&reference["top1"]);
    assert_eq!(want.len(), top1.len());
    let agree = top1.iter().zip(&want).filter(|(a, b)| a == b).count();
    let ppl = (nll.iter().map(|&x| x as f64).sum::<f64>() / nll.len() as f64).exp();
    (
        agree as f64 / want.len() as f64,
        ppl,
        reference["ppl"].as_f64().unwrap(),
    )
}

/// Against llama.cpp on the same weights computed in f32 (the fixture's `f32`
/// engine): top-1 agreement >= 99% and PPL within 1%. Against llama.cpp on the
/// Q4_1 file itself, whose matmuls quantize activations to 8 bits: PPL within
/// 1%; top-1 agreement is lower because of that quantization (see
/// docs/results.md) and is held to >= 95% so a regression still shows.
#[test]
fn parity_with_llama_cpp() {
    let fixture: serde_json::Value =
        serde_json::from_str(include_str!("fixtures/parity.json")).unwrap();
    let (top1, nll) = ours(&fixture);
    assert!(nll.len() >= 2000, "only {} positions", nll.len());
    let (agree_f32, ppl, ppl_f32) = compare(&top1, &nll, &fixture["f32"]);
    let (agree_q4, _, ppl_q4) = compare(&top1, &nll, &fixture["q4_1"]);
    eprintln!(
        "parity: {} positions; ours PPL {ppl:.4}; llama.cpp f32 weights: PPL {ppl_f32:.4}, top-1 agreement {agree_f32:.4}; llama.cpp Q4_1 file: PPL {ppl_q4:.4}, top-1 agreement {agree_q4:.4}",
        nll.len()
    );
    assert!(
        agree_f32 >= 0.99,
        "top-1 agreement with f32 llama.cpp {agree_f32}"
    );
    assert!(
        (ppl / ppl_f32 - 1.0).abs() <= 0.01,
        "PPL {ppl} vs {ppl_f32}"
    );
    assert!((ppl / ppl_q4 - 1.0).abs() <= 0.01, "PPL {ppl} vs {ppl_q4}");
    assert!(
        agree_q4 >= 0.95,
        "top-1 agreement with Q4_1 llama.cpp {agree_q4}"
    );
}

/// q8 numerics (activations quantised to 8 bits per block before each
/// product, following llama.cpp's x86 `quantize_row_q8_1` and
/// `ggml_vec_dot_q4_1_q8_1`) on the real model. They equal a NumPy emulation
/// of that code to 1.1e-5 at position 0 (`tools/q8_emulation.py`), but
/// they sum in the engine's own orders (tiles, its attention and exp), and
/// the 8-bit codes carry last-bit differences into about 4% of top-1
/// tokens. Held here: PPL within 1% of llama.cpp's run and top-1 >= 95%, so
/// a regression shows. Issue 13's 99.5% is met by the reference decoder,
/// which runs ggml's arithmetic bit for bit (`reference_decoder_*` below).
///
/// `DYNAKV_PARITY_FIXTURE=PATH` reads another fixture of the same form
/// (`tools/make_parity_fixture.py --q4-only --out PATH`, e.g. with
/// `--ubatch 1`, llama.cpp's one-token arithmetic; an absolute path, as
/// the test runs in this crate's folder) and prints the same figures
/// against it.
#[test]
fn q8_numerics_reproduce_llama_cpp_on_the_quantised_file() {
    let fixture: serde_json::Value = match std::env::var("DYNAKV_PARITY_FIXTURE") {
        Ok(path) => std::fs::read_to_string(&path)
            .map_err(|e| e.to_string())
            .and_then(|text| serde_json::from_str(&text).map_err(|e| e.to_string()))
            .unwrap_or_else(|e| panic!("DYNAKV_PARITY_FIXTURE={path}: {e}")),
        Err(_) => serde_json::from_str(include_str!("fixtures/parity.json")).unwrap(),
    };
    let (top1, nll) = ours_with(common::real_q8(), &fixture);
    let (agree_q4, ppl, ppl_q4) = compare(&top1, &nll, &fixture["q4_1"]);
    let agree_f32 = match fixture.get("f32") {
        Some(f32) => format!("{:.4}", compare(&top1, &nll, f32).0),
        None => "(not in this fixture)".into(),
    };
    eprintln!(
        "q8 parity: {} positions; ours PPL {ppl:.4}; llama.cpp Q4_1 file: PPL {ppl_q4:.4}, top-1 agreement {agree_q4:.4}; with llama.cpp f32 weights {agree_f32}",
        nll.len()
    );
    assert!(
        agree_q4 >= 0.95,
        "top-1 agreement with Q4_1 llama.cpp {agree_q4}"
    );
    assert!((ppl / ppl_q4 - 1.0).abs() <= 0.01, "PPL {ppl} vs {ppl_q4}");
}

/// The llama.cpp reference decoder ([`dynakv_models::llama::GgmlReference`],
/// reproducing `run`) on a fixture's windows: (top-1 agreement, our PPL,
/// the largest |NLL difference|, the first position whose NLL differs by
/// more than 1e-9). With every operation in ggml's order the logits are
/// llama.cpp's to the bit, so each NLL (both computed in f64 from the same
/// f32 logits) is within rounding of the fixture's.
fn reference_against(
    fixture: &serde_json::Value,
    run: dynakv_models::llama::LlamaCppRun,
    kv: dynakv_models::llama::LlamaCppKv,
    windows: usize,
) -> (f64, f64, f64, Option<usize>) {
    let ctx = fixture["ctx"].as_u64().unwrap() as usize;
    let tokens = ids(&fixture["tokens"]);
    let scored = windows * (ctx - 1);
    let want_top1 = &ids(&fixture["q4_1"]["top1"])[..scored];
    let want_nll: Vec<f64> = fixture["q4_1"]["nll"]
        .as_array()
        .unwrap()
        .iter()
        .take(scored)
        .map(|x| x.as_f64().unwrap())
        .collect();
    let mut reference = dynakv_models::llama::GgmlReference::new(common::real_q8())
        .unwrap()
        .with_run(run)
        .with_kv(kv);
    let (mut top1, mut nll) = (Vec::new(), Vec::new());
    for win in tokens.chunks_exact(ctx).take(windows) {
        reference.reset();
        for (i, &t) in win[..ctx - 1].iter().enumerate() {
            let logits = reference.step(t).unwrap();
            let (n, best) = dynakv_models::llama::nll_and_top1_f64(&logits, win[i + 1]);
            nll.push(n);
            top1.push(best);
        }
    }
    assert_eq!(top1.len(), want_top1.len());
    let agree =
        top1.iter().zip(want_top1).filter(|(a, b)| a == b).count() as f64 / top1.len() as f64;
    let diffs: Vec<f64> = nll
        .iter()
        .zip(&want_nll)
        .map(|(a, b)| (a - b).abs())
        .collect();
    let worst = diffs.iter().cloned().fold(0.0, f64::max);
    let first = diffs.iter().position(|&d| d > 1e-9);
    let ppl = (nll.iter().sum::<f64>() / nll.len() as f64).exp();
    let want_ppl = (want_nll.iter().sum::<f64>() / want_nll.len() as f64).exp();
    eprintln!(
        "reference decoder ({run:?}, {kv:?} cache): {} positions; top-1 agreement {agree:.5}; PPL {ppl:.4} vs {want_ppl:.4}; max |NLL difference| {worst:.3e}; first position over 1e-9: {first:?}",
        nll.len(),
    );
    (agree, ppl, worst, first)
}

/// [`reference_against`] held to issue 13's target (top-1 >= 99.5%) and to
/// equal logits (every NLL within 1e-9).
fn assert_reproduces(
    fixture: &serde_json::Value,
    run: dynakv_models::llama::LlamaCppRun,
    kv: dynakv_models::llama::LlamaCppKv,
    windows: usize,
) {
    let (agree, _, worst, first) = reference_against(fixture, run, kv, windows);
    assert!(agree >= 0.995, "{run:?}, {kv:?}: top-1 agreement {agree}");
    assert!(
        first.is_none(),
        "{run:?}, {kv:?}: NLL differs from position {first:?} (max {worst:e})"
    );
}

/// Issue 13's target, top-1 agreement >= 99.5% with llama.cpp on the Q4_1
/// file, against llama.cpp decoding the windows one token at a time
/// (`tools/make_parity_fixture.py --q4-only --ubatch 1`; its batched run on
/// a build with `-DGGML_LLAMAFILE=OFF` gives the same numbers).
#[test]
fn reference_decoder_reproduces_llama_cpp_one_token_run() {
    let fixture: serde_json::Value =
        serde_json::from_str(include_str!("fixtures/parity_one_token.json")).unwrap();
    assert_eq!(fixture["ubatch"].as_u64(), Some(1));
    use dynakv_models::llama::{LlamaCppKv, LlamaCppRun};
    assert_reproduces(&fixture, LlamaCppRun::OneToken, LlamaCppKv::F32, 2);
}

/// The same against the committed parity fixture: llama.cpp's default build
/// evaluating each 1,024-token window as one batch, whose value sums run
/// through llamafile's tiled product.
#[test]
fn reference_decoder_reproduces_llama_cpp_batched_run() {
    let fixture: serde_json::Value =
        serde_json::from_str(include_str!("fixtures/parity.json")).unwrap();
    use dynakv_models::llama::{LlamaCppKv, LlamaCppRun};
    assert_reproduces(&fixture, LlamaCppRun::Batched, LlamaCppKv::F32, 2);
}

/// llama.cpp's default f16 KV cache (`make_parity_fixture.py --q4-only --kv
/// f16`, one token at a time and batched), on the first window (1,023
/// positions; the second is the f32 tests' work again, at CI's cost).
#[test]
fn reference_decoder_reproduces_llama_cpp_with_an_f16_cache() {
    use dynakv_models::llama::{LlamaCppKv, LlamaCppRun};
    for (text, run) in [
        (
            include_str!("fixtures/parity_f16_one_token.json"),
            LlamaCppRun::OneToken,
        ),
        (
            include_str!("fixtures/parity_f16_batched.json"),
            LlamaCppRun::Batched,
        ),
    ] {
        let fixture: serde_json::Value = serde_json::from_str(text).unwrap();
        assert_eq!(fixture["kv"].as_str(), Some("f16"));
        assert_reproduces(&fixture, run, LlamaCppKv::F16, 1);
    }
}

/// Bad input to the reference decoder is an error that leaves it as it was,
/// and `reset` starts the same sequence over with the same bits.
#[test]
fn reference_decoder_refuses_bad_tokens_and_restarts_exactly() {
    let model = common::real_q8();
    let mut r = dynakv_models::llama::GgmlReference::new(model).unwrap();
    let vocab = model.config.vocab_size as u32;
    assert!(r.step(vocab).is_err());
    assert_eq!(r.position(), 0);
    let first = r.step(1).unwrap();
    let second = r.step(2).unwrap();
    assert!(r.step(u32::MAX).is_err());
    assert_eq!(r.position(), 2);
    r.reset();
    assert_eq!(r.step(1).unwrap(), first);
    assert_eq!(r.step(2).unwrap(), second);
}

/// llama.cpp's greedy continuation of a prompt (`tools/make_generation_fixture.py`:
/// the prompt as one batch, then one token at a time, f16 cache) is the
/// reference decoder's, token for token.
#[test]
fn reference_decoder_generates_llama_cpps_greedy_tokens() {
    let fixture: serde_json::Value =
        serde_json::from_str(include_str!("fixtures/generation.json")).unwrap();
    let r = common::real();
    let prompt = ids(&fixture["prompt_ids"]);
    assert_eq!(
        r.tokenizer
            .encode(fixture["prompt"].as_str().unwrap())
            .unwrap(),
        prompt
    );
    let want = ids(&fixture["greedy"]);
    let mut reference = dynakv_models::llama::GgmlReference::new(common::real_q8())
        .unwrap()
        .with_kv(dynakv_models::llama::LlamaCppKv::F16);
    let config = dynakv_models::generate::SamplingConfig {
        max_tokens: want.len(),
        ..Default::default()
    };
    let g = dynakv_models::generate::generate_llama_cpp(
        &mut reference,
        &r.tokenizer,
        &prompt,
        fixture["n_ubatch"].as_u64().unwrap() as usize,
        &config,
        |_| {},
    )
    .unwrap();
    assert_eq!(g.tokens, want);
    assert_eq!(g.text, fixture["text"].as_str().unwrap());
}

#[test]
fn brown_eval_tokens_match_the_fixture() {
    let fixture: serde_json::Value =
        serde_json::from_str(include_str!("fixtures/parity.json")).unwrap();
    let r = common::real();
    let dir = dynakv_models::assets::brown_dir().unwrap();
    let n_docs = fixture["docs"].as_u64().unwrap() as usize;
    let mut docs =
        dynakv_models::corpus::load_split(&dir, dynakv_models::corpus::Split::Eval).unwrap();
    docs.truncate(n_docs);
    let tokens = dynakv_models::corpus::document_tokens(&r.tokenizer, &docs).unwrap();
    let want = ids(&fixture["tokens"]);
    assert_eq!(&tokens[..want.len()], &want[..]);
}

/// On the CPU the weights stay in the file's blocks: the model holds about
/// the file's size (the norms in f32 on top), not the 5x of f32 copies.
#[test]
fn packed_weights_hold_about_the_file() {
    let path = dynakv_models::assets::default_model().unwrap();
    let file = std::fs::metadata(&path).unwrap().len() as f64;
    let held = common::real().model.weight_bytes() as f64;
    assert!(
        held <= 1.01 * file && held >= 0.9 * file,
        "{held} bytes of weights for a {file}-byte file"
    );
}
