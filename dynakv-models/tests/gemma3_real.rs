//! Gemma 3 270M on the real file: the tokenizer on Brown text, logits
//! against llama.cpp at ctx 512 and 2,048 (fixture:
//! tools/make_parity_fixture_gemma3.py), and a decode past the sliding
//! window against a prefill of the same tokens.

use std::sync::OnceLock;

use burn::tensor::Tensor;
use dynakv_burn::device::default_device;
use dynakv_models::assets::KnownModel;
use dynakv_models::gguf::GgufFile;
use dynakv_models::llama::nll_and_top1;
use dynakv_models::{LlamaModel, TextTokenizer};

struct Gemma {
    model: LlamaModel,
    tokenizer: TextTokenizer,
}

fn gemma() -> &'static Gemma {
    static G: OnceLock<Gemma> = OnceLock::new();
    G.get_or_init(|| {
        let path = KnownModel::Gemma3.ensure().expect("fetch gemma3-270m");
        let gguf = GgufFile::open(&path).expect("open GGUF");
        Gemma {
            tokenizer: TextTokenizer::from_gguf(&gguf).expect("tokenizer"),
            model: LlamaModel::from_gguf(&gguf, &default_device()).expect("model"),
        }
    })
}

fn fixture() -> serde_json::Value {
    serde_json::from_str(include_str!("fixtures/parity-gemma3.json")).unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn config_is_gemma3_with_five_local_layers_per_global_one() {
    let c = &gemma().model.config;
    assert_eq!(
        (c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.head_dim),
        (18, 640, 4, 1, 256)
    );
    let global: Vec<usize> = (0..18).filter(|&l| c.layers[l].window.is_none()).collect();
    assert_eq!(global, vec![5, 11, 17]);
    assert!(c.layers.iter().all(|l| l.window.is_none_or(|w| w == 512)));
    assert_eq!(c.layers[0].rope_base, 10_000.0);
    assert_eq!(c.layers[5].rope_base, 1_000_000.0);
    assert_eq!(c.context_length, 32_768);
}

#[test]
fn brown_eval_tokens_match_llama_cpp() {
    let fx = fixture();
    let dir = dynakv_models::assets::brown_dir().unwrap();
    let mut docs =
        dynakv_models::corpus::load_split(&dir, dynakv_models::corpus::Split::Eval).unwrap();
    docs.truncate(fx["docs"].as_u64().unwrap() as usize);
    let tokens = dynakv_models::corpus::document_tokens(&gemma().tokenizer, &docs).unwrap();
    let want = ids(&fx["tokens"]);
    assert_eq!(&tokens[..want.len()], &want[..]);
    assert_eq!(
        gemma().tokenizer.text_bos(),
        Some(fx["bos"].as_u64().unwrap() as u32)
    );
}

/// Per-position NLL and top-1 of one window, the head run on slices of the
/// hidden states (a 2,048-token window's logits are 2 GB at once).
fn score(model: &LlamaModel, win: &[u32]) -> (Vec<f32>, Vec<u32>) {
    let mut cache = model.dense_cache().unwrap();
    let t = win.len() - 1;
    let h = model.hidden(&win[..t], 0, cache.as_mut()).unwrap();
    let (mut nll, mut top1) = (Vec::new(), Vec::new());
    for start in (0..t).step_by(256) {
        let n = 256.min(t - start);
        let logits = model.head(h.clone().narrow(0, start, n)).unwrap();
        let (a, b) = nll_and_top1(logits, &win[start + 1..start + 1 + n]);
        nll.extend(a);
        top1.extend(b);
    }
    (nll, top1)
}

/// Against llama.cpp on the same weights in f32: top-1 agreement >= 99% and
/// PPL within 1%; against llama.cpp on the Q4_K_M file (8-bit activations):
/// PPL within 1%. At ctx 512 and at 2,048, where the local layers' window
/// of 512 positions is exercised.
#[test]
fn parity_with_llama_cpp_at_ctx_512_and_2048() {
    let fx = fixture();
    let model = &gemma().model;
    for run in fx["runs"].as_array().unwrap() {
        let ctx = run["ctx"].as_u64().unwrap() as usize;
        let (mut nll, mut top1) = (Vec::new(), Vec::new());
        for w in run["windows"].as_array().unwrap() {
            let win = ids(w);
            assert_eq!(win.len(), ctx);
            let (a, b) = score(model, &win);
            nll.extend(a);
            top1.extend(b);
        }
        let ppl = (nll.iter().map(|&x| x as f64).sum::<f64>() / nll.len() as f64).exp();
        let agree = |r: &serde_json::Value| {
            let want = ids(&r["top1"]);
            assert_eq!(want.len(), top1.len());
            top1.iter().zip(&want).filter(|(a, b)| a == b).count() as f64 / want.len() as f64
        };
        let (ppl_f32, ppl_q) = (
            run["f32"]["ppl"].as_f64().unwrap(),
            run["quant"]["ppl"].as_f64().unwrap(),
        );
        let (agree_f32, agree_q) = (agree(&run["f32"]), agree(&run["quant"]));
        eprintln!(
            "gemma3 parity ctx {ctx}: {} positions; ours PPL {ppl:.4}; llama.cpp f32 weights PPL {ppl_f32:.4}, top-1 agreement {agree_f32:.4}; Q4_K_M file PPL {ppl_q:.4}, top-1 agreement {agree_q:.4}",
            nll.len()
        );
        assert!(
            agree_f32 >= 0.99,
            "ctx {ctx}: top-1 agreement with f32 llama.cpp {agree_f32}"
        );
        assert!(
            (ppl / ppl_f32 - 1.0).abs() <= 0.01,
            "ctx {ctx}: PPL {ppl} vs {ppl_f32}"
        );
        assert!(
            (ppl / ppl_q - 1.0).abs() <= 0.01,
            "ctx {ctx}: PPL {ppl} vs {ppl_q}"
        );
    }
}

/// A decode that crosses the local layers' window (one token at a time on
/// the host path, from position 500 to 539) gives the logits of one prefill
/// over all 540 tokens.
#[test]
fn decode_across_the_window_equals_prefill() {
    let g = gemma();
    let fx = fixture();
    let toks = ids(&fx["tokens"]);
    let mut win = vec![2u32];
    win.extend(&toks[..539]);
    let model = &g.model;
    let mut cache = model.dense_cache().unwrap();
    let h = model.hidden(&win, 0, cache.as_mut()).unwrap();
    let want = model.head(h.narrow(0, 500, 40)).unwrap();
    let mut cache = model.dense_cache().unwrap();
    model.hidden(&win[..500], 0, cache.as_mut()).unwrap();
    let mut steps = Vec::new();
    for p in 500..540 {
        steps.push(model.forward(&win[p..p + 1], p, cache.as_mut()).unwrap());
    }
    let got = Tensor::cat(steps, 0);
    let scale: f32 = want.clone().abs().max().into_scalar();
    let diff: f32 = (got - want).abs().max().into_scalar();
    assert!(diff / scale < 1e-3, "max diff {diff} (scale {scale})");
    // the local layers hold at most a window and a half; the global all
    let f = cache.footprint();
    let per_token = 2 * model.config.head_dim * model.config.n_kv_heads;
    let max = (3 * 540 + 15 * (512 + 256)) * per_token;
    assert!(f.values as usize <= max, "{} values", f.values);
}
