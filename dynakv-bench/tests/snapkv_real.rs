//! SnapKV on the real SmolLM2 model against NVIDIA kvpress's `SnapKVPress`:
//! the kept tokens per layer and KV head on a fixed Brown `eval` prompt
//! (fixture from `tools/make_snapkv_fixture.py`), and SnapKV composed with the
//! model's generation path.

use std::collections::BTreeSet;

use dynakv_burn::device::default_device;
use dynakv_burn::dynakv_snapkv::{SnapKvConfig, SnapKvPreset, SnapKvSpec};
use dynakv_burn::{AttentionCache, CacheSpec, DenseCache, Precision, SnapKvCache};
use dynakv_models::gguf::GgufFile;
use dynakv_models::LlamaModel;
use serde_json::Value;

fn model() -> LlamaModel {
    let path = dynakv_models::assets::default_model().unwrap();
    LlamaModel::from_gguf(&GgufFile::open(&path).unwrap(), &default_device()).unwrap()
}

fn fixture() -> Value {
    let text = include_str!("fixtures/kvpress_snapkv.json");
    serde_json::from_str(text).unwrap()
}

fn indices(v: &Value) -> BTreeSet<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect()
}

#[test]
fn kept_tokens_match_kvpress() {
    let fx = fixture();
    let tokens: Vec<u32> = fx["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    let press = &fx["press"];
    let mut config = SnapKvConfig::kvpress(press["compression_ratio"].as_f64().unwrap());
    config.window = press["window_size"].as_u64().unwrap() as usize;
    config.kernel = press["kernel_size"].as_u64().unwrap() as usize;
    let model = model();
    let dense = DenseCache::new(model.config.geometry(), model.rope().clone()).unwrap();
    let mut cache =
        SnapKvCache::new(dense, config, model.config.geometry(), model.rope().clone()).unwrap();
    model.forward_last(&tokens, 0, &mut cache).unwrap();

    let (mut same, mut total, mut unexplained) = (0usize, 0usize, Vec::new());
    let mut worst = 1.0f64;
    for (layer, heads) in fx["layers"].as_array().unwrap().iter().enumerate() {
        let (_, _, ours) = cache.inner().layer_kv(layer).unwrap();
        let (mut layer_same, mut layer_total) = (0, 0);
        for (h, head) in heads.as_array().unwrap().iter().enumerate() {
            let theirs = indices(&head["kept"]);
            let ours: BTreeSet<usize> = ours[h].iter().copied().collect();
            assert_eq!(ours.len(), theirs.len(), "layer {layer} head {h}");
            layer_same += ours.intersection(&theirs).count();
            layer_total += theirs.len();
            let near = head["near"].as_object().unwrap();
            for i in ours.symmetric_difference(&theirs) {
                if !near.contains_key(&i.to_string()) {
                    unexplained.push((layer, h, *i));
                }
            }
        }
        let frac = layer_same as f64 / layer_total as f64;
        worst = worst.min(frac);
        same += layer_same;
        total += layer_total;
    }
    eprintln!(
        "kvpress parity: {same}/{total} kept indices identical ({:.3}%), worst layer {:.3}%, \
         {} disagreements outside kvpress's near-tie band",
        100.0 * same as f64 / total as f64,
        100.0 * worst,
        unexplained.len()
    );
    assert!(worst >= 0.99, "worst layer agreement {worst}");
    assert!(unexplained.is_empty(), "{unexplained:?}");
}

#[test]
fn pruning_keeps_the_prefill_logits_and_shrinks_the_cache() {
    let model = model();
    let fx = fixture();
    let tokens: Vec<u32> = fx["tokens"].as_array().unwrap()[..300]
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    let mut dense: Box<dyn AttentionCache> = model.dense_cache().unwrap();
    // f32 rows, as the reference: the pruning is all that differs
    let spec = CacheSpec::dense()
        .with_precision(Precision::f32_rows())
        .with_snapkv(SnapKvSpec::ratio(SnapKvPreset::Kvpress, 0.75));
    let mut pruned = model.cache_factory(None, &spec).unwrap().make().unwrap();
    let a = model.forward_last(&tokens, 0, dense.as_mut()).unwrap();
    let b = model.forward_last(&tokens, 0, pruned.as_mut()).unwrap();
    // The prefill attends over everything: the same logits.
    let diff: f32 = (a - b).abs().max().into_scalar();
    assert!(diff < 1e-4, "{diff}");
    // floor(300 * 0.25) = 75 tokens kept per KV head in every layer.
    assert_eq!(pruned.len(0), 75);
    let f = pruned.footprint();
    assert!((f.retained() - 0.25).abs() < 1e-9, "{}", f.retained());
    // Decoding continues over the pruned cache and grows it by one token.
    let c = model
        .forward_last(&[tokens[0]], 300, pruned.as_mut())
        .unwrap();
    assert_eq!(c.dims(), [model.config.vocab_size]);
    assert_eq!(pruned.len(0), 76);
}
