//! DynaKV and SnapKV in your own burn model.
//!
//! The model below is written here, not taken from `dynakv-models`: a token
//! embedding and two attention layers. Its only contact with dynakv is the
//! one call a layer makes, `cache.forward(layer, q_rot, k_pre, v, positions)`.
//! Calibrate on your own data (synthetic here) through a closure that runs
//! the model, then build every cache from a spec through the factory.
//!
//! `cargo run --release -p dynakv-burn --features snapkv --example own_model`

use burn::tensor::{Distribution, Int, Tensor, TensorData};
use dynakv_burn::dynakv_core::artifact::{Artifact, ModelIdentity, RopePlacement};
use dynakv_burn::{
    calibrate, AttentionCache, CacheError, CacheFactory, CacheGeometry, CacheSpec,
    CalibrationConfig, CalibrationTarget, RecordingCache, Rope, RopeStyle,
};

pub const VOCAB: usize = 512;
pub const D_MODEL: usize = 64;
pub const GEOMETRY: CacheGeometry = CacheGeometry {
    n_layers: 2,
    n_heads: 4,
    n_kv_heads: 2,
    head_dim: 16,
    // This model's projections pair coordinates as Hugging Face does.
    rope_style: RopeStyle::SplitHalves,
};

/// One attention layer: projections only (no MLP, no norm), enough to show the seam.
struct Layer {
    wq: Tensor<2>,
    wk: Tensor<2>,
    wv: Tensor<2>,
    wo: Tensor<2>,
}

pub struct TinyModel {
    embed: Tensor<2>,
    layers: Vec<Layer>,
    pub rope: Rope,
}

impl TinyModel {
    pub fn new(device: &burn::tensor::Device) -> Result<Self, CacheError> {
        let g = GEOMETRY;
        let w = |i, o| Tensor::<2>::random([i, o], Distribution::Normal(0.0, 0.15), device);
        // Embeddings near an 8-dimensional subspace: the keys and values have
        // a decaying spectrum, as real models' do, so a few dimensions hold most
        // of each token.
        let embed = w(VOCAB, 8).matmul(w(8, D_MODEL)) * 3.0 + w(VOCAB, D_MODEL) * 0.05;
        let layers = (0..g.n_layers)
            .map(|_| Layer {
                wq: w(D_MODEL, g.n_heads * g.head_dim),
                wk: w(D_MODEL, g.d_kv()),
                wv: w(D_MODEL, g.d_kv()),
                wo: w(g.n_heads * g.head_dim, D_MODEL),
            })
            .collect();
        let rope = Rope::new(g.rope_style, g.head_dim, g.head_dim, 10_000.0, 1024, device)?;
        Ok(Self {
            embed,
            layers,
            rope,
        })
    }

    /// Hidden states `[T, D_MODEL]` of new tokens at positions `start..`.
    pub fn forward(
        &self,
        tokens: &[u32],
        start: usize,
        cache: &mut dyn AttentionCache,
    ) -> Result<Tensor<2>, CacheError> {
        let (g, t) = (GEOMETRY, tokens.len());
        let positions: Vec<usize> = (start..start + t).collect();
        let ids: Vec<i64> = tokens.iter().map(|&x| x as i64).collect();
        let ids = Tensor::<1, Int>::from_data(TensorData::new(ids, [t]), &self.embed.device());
        let mut h = self.embed.clone().select(0, ids);
        // [T, heads * D] -> [1, heads, T, D]
        let heads = |x: Tensor<2>, n| x.reshape([1, t, n, g.head_dim]).swap_dims(1, 2);
        for (l, layer) in self.layers.iter().enumerate() {
            let q = heads(h.clone().matmul(layer.wq.clone()), g.n_heads);
            let k_pre = heads(h.clone().matmul(layer.wk.clone()), g.n_kv_heads);
            let v = heads(h.clone().matmul(layer.wv.clone()), g.n_kv_heads);
            let q_rot = self.rope.apply(q, &positions)?;
            // The seam: the cache stores k and v its way and attends over them.
            let o = cache.forward(l, q_rot, k_pre, v, &positions)?;
            let o = o.swap_dims(1, 2).reshape([t, g.n_heads * g.head_dim]);
            h = h + o.matmul(layer.wo.clone());
        }
        Ok(h)
    }
}

/// Token sequences with some repetition, like text.
pub fn synthetic_text(n: usize, seed: u64) -> Vec<u32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    (0..n)
        .map(|_| (next() % 64 + next() % 8 * 56) as u32 % VOCAB as u32)
        .collect()
}

/// Bases and the policy sample from 8 windows of your data: `calibrate`
/// runs your forward pass over a recording cache. `placement`: latents of
/// keys before RoPE (the paper's choice, the default) or after.
pub fn calibrated(model: &TinyModel, placement: RopePlacement) -> Result<Artifact, CacheError> {
    let windows: Vec<Vec<u32>> = (0..8).map(|i| synthetic_text(128, i)).collect();
    let target = CalibrationTarget {
        geometry: GEOMETRY,
        rope: &model.rope,
        identity: ModelIdentity {
            architecture: "tiny-example".into(),
            n_layers: GEOMETRY.n_layers,
            n_heads: GEOMETRY.n_heads,
            n_kv_heads: GEOMETRY.n_kv_heads,
            head_dim: GEOMETRY.head_dim,
            file_sha256: "synthetic weights, seed 7".into(),
        },
        output_proj: None,
        window: None,
    };
    let config = CalibrationConfig {
        stats_windows: 6,
        sample_windows: 2,
        level_step: 4,
        rope: placement,
        ..CalibrationConfig::default()
    };
    let forward = |w: &Vec<u32>, cache: &mut RecordingCache| model.forward(w, 0, cache).map(|_| ());
    calibrate(&target, &config, &windows, forward, |_, _| {})
}

pub fn main() -> Result<(), CacheError> {
    let device = dynakv_burn::device::default_device();
    device.seed(7);
    let model = TinyModel::new(&device)?;

    // 1. Calibrate on your own data.
    let artifact = calibrated(&model, RopePlacement::Pre)?;

    // 2. Run a 96-token prompt and 16 decode steps with each cache.
    let text = synthetic_text(112, 99);
    let (prompt, decode) = text.split_at(96);
    // (decode outputs, bytes of the tokens, bytes of the bases)
    let run = |spec: &str| -> Result<(Tensor<2>, u64, u64), CacheError> {
        let spec: CacheSpec = spec.parse()?;
        let artifact = spec.dynakv.is_some().then_some(&artifact);
        let factory = CacheFactory::new(GEOMETRY, model.rope.clone(), &device, artifact, &spec)?;
        let mut cache = factory.make()?;
        model.forward(prompt, 0, cache.as_mut())?;
        let mut steps = Vec::new();
        for (i, &tok) in decode.iter().enumerate() {
            steps.push(model.forward(&[tok], prompt.len() + i, cache.as_mut())?);
        }
        let f = cache.footprint();
        Ok((
            Tensor::cat(steps, 0),
            f.bytes() - f.fixed_bytes,
            f.fixed_bytes,
        ))
    };
    let (dense, dense_bytes, _) = run("dense")?;
    let scale: f32 = dense.clone().abs().mean().into_scalar();
    println!("{:<62}   bytes  of dense  decode err   bases", "cache");
    for spec in [
        "dense",
        "dynakv:energy@0.5",
        "dynakv:energy@0.3",
        "dense+snapkv:recall@0.5",
        "dynakv:energy@0.5,recent=32+snapkv:recall@0.5,gqa=layer-max",
    ] {
        let (out, bytes, bases) = run(spec)?;
        let err = (out - dense.clone()).abs().mean().into_scalar::<f32>() / scale;
        let share = bytes as f64 / dense_bytes as f64;
        println!(
            "{spec:<62} {bytes:>7} {:>8.1}% {err:>11.4} {bases:>7}",
            100.0 * share
        );
    }
    println!("bytes: stored tokens and their metadata; bases: DynaKV's fixed cost per model");
    Ok(())
}
