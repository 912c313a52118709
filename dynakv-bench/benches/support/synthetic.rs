//! Shared set-up of the micro-benchmarks: SmolLM2's attention geometry (one
//! layer), a PCA basis of synthetic keys and values with a decaying spectrum,
//! and rank policies that give the bucket layouts the real policies give.
//!
//! Included with `#[path]` by each bench (benches are separate crates).

#![allow(dead_code)]

use std::sync::Arc;

use burn::tensor::{Device, Distribution, Tensor};
use dynakv_burn::cache::Precision;
use dynakv_burn::{
    AttentionCache, CacheGeometry, DenseCache, DynaKvBases, DynaKvCache, KvStorage, Rope, RopeStyle,
};
use dynakv_core::artifact::{
    Artifact, ArtifactHeader, ModelIdentity, RopePlacement, FORMAT_VERSION,
};
use dynakv_core::basis::{Basis, BasisKind};
use dynakv_core::levels::RankLevels;
use dynakv_core::policy::{EnergySample, KvKind, RankPolicy, UniformPolicy};
use dynakv_core::stats::MomentAccumulator;

pub const GEOMETRY: CacheGeometry = CacheGeometry {
    n_layers: 1,
    n_heads: 9,
    n_kv_heads: 3,
    head_dim: 64,
    rope_style: RopeStyle::Interleaved,
};

/// `cargo bench` passes `--bench`; `cargo test --benches` does not: then every
/// bench runs once on small sizes, so CI stays fast.
pub fn full_run() -> bool {
    std::env::args().any(|a| a == "--bench")
}

pub fn rope(device: &Device) -> Rope {
    Rope::new(RopeStyle::Interleaved, 64, 64, 100_000.0, 16_384, device).expect("rope")
}

/// A one-layer artifact whose basis is the PCA of synthetic vectors whose
/// coordinate i has scale 1 / (1 + i / 8).
pub fn artifact(placement: RopePlacement) -> Artifact {
    let d = GEOMETRY.d_kv();
    let mut acc = MomentAccumulator::new(d);
    let mut s = 11u64;
    let rows: Vec<f32> = (0..2048 * d)
        .map(|i| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let u = (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            u / (1.0 + (i % d) as f32 / 8.0)
        })
        .collect();
    acc.add_rows(&rows).expect("rows");
    let b = Basis::pca(&acc).expect("pca");
    Artifact {
        header: ArtifactHeader {
            format_version: FORMAT_VERSION,
            model: ModelIdentity {
                architecture: "synthetic".into(),
                n_layers: 1,
                n_heads: 9,
                n_kv_heads: 3,
                head_dim: 64,
                file_sha256: String::new(),
            },
            basis: BasisKind::Pca,
            rope: placement,
            levels: RankLevels::multiples(8, d).expect("levels"),
            calib_tokens: 2048,
            sample_positions: vec![],
            router: None,
            key_factor: None,
            policy: None,
        },
        bases: vec![[b.clone(), b]],
        sample: EnergySample::default(),
        routers: None,
    }
}

/// Ranks spread over the seven levels around `budget * d` (energy-like: many
/// buckets), token 0 at full rank; mean retained ≈ budget.
#[derive(Debug)]
pub struct Spread {
    pub center: usize,
}

impl RankPolicy for Spread {
    fn name(&self) -> &'static str {
        "spread"
    }
    fn needs_latents(&self) -> bool {
        false
    }
    fn ranks(&self, _l: usize, _k: KvKind, _lat: &[f32], positions: &[usize]) -> Vec<usize> {
        positions
            .iter()
            .map(|&p| {
                if p == 0 {
                    return GEOMETRY.d_kv();
                }
                let offset = (p * 7919 % 7) as isize - 3;
                (self.center as isize + 8 * offset).clamp(8, GEOMETRY.d_kv() as isize) as usize
            })
            .collect()
    }
}

pub fn uniform(budget: f64) -> Arc<dyn RankPolicy> {
    let levels = RankLevels::multiples(8, GEOMETRY.d_kv()).expect("levels");
    Arc::new(UniformPolicy::for_budget(budget, &levels, 1).expect("budget"))
}

pub fn spread(budget: f64) -> Arc<dyn RankPolicy> {
    let center = ((budget * GEOMETRY.d_kv() as f64 / 8.0).round() as usize * 8).max(32);
    Arc::new(Spread { center })
}

pub fn rand(shape: [usize; 4], device: &Device) -> Tensor<4> {
    Tensor::random(shape, Distribution::Normal(0.0, 1.0), device)
}

/// A cache filled with `t` random tokens.
pub fn filled<C: AttentionCache>(mut cache: C, t: usize, device: &Device) -> C {
    let (hk, dh) = (GEOMETRY.n_kv_heads, GEOMETRY.head_dim);
    let mut start = 0;
    while start < t {
        let n = (t - start).min(1024);
        let pos: Vec<usize> = (start..start + n).collect();
        cache
            .append(
                0,
                rand([1, hk, n, dh], device),
                rand([1, hk, n, dh], device),
                &pos,
            )
            .expect("append");
        start += n;
    }
    cache
}

pub fn dense(device: &Device) -> DenseCache {
    DenseCache::new(GEOMETRY, rope(device)).expect("dense")
}

/// The dense caches to measure: the native one, plus the tensor path where
/// the native one keeps host vectors (what a GPU runs, and this project's
/// dense cache before it had a host kernel).
pub fn dense_configs(device: &Device) -> Vec<(String, DenseCache)> {
    let native = dense(device);
    let mut out = vec![("dense".to_string(), native.clone())];
    if native.storage() == KvStorage::Host {
        let tensor =
            DenseCache::with_storage(GEOMETRY, rope(device), KvStorage::Device).expect("dense");
        out.push(("dense-tensor-path".to_string(), tensor));
    }
    // packed storage: llama.cpp's f16 / q8_0 / q4_0 (rotated) and KIVI 2-bit
    for kv in ["f16", "q8_0", "q4_0", "kivi2"] {
        let precision: Precision = format!("kv={kv}").parse().expect("precision");
        if kv == "kivi2" && native.storage() != KvStorage::Host {
            continue;
        }
        let cache = DenseCache::with_precision(GEOMETRY, rope(device), native.storage(), precision)
            .expect("dense");
        out.push((format!("dense-{kv}"), cache));
    }
    out
}

pub fn dynakv(
    placement: RopePlacement,
    policy: Arc<dyn RankPolicy>,
    storage: KvStorage,
    device: &Device,
) -> DynaKvCache {
    dynakv_with(placement, policy, storage, Precision::default(), device)
}

/// [`dynakv`] with latents stored at `precision`.
pub fn dynakv_with(
    placement: RopePlacement,
    policy: Arc<dyn RankPolicy>,
    storage: KvStorage,
    precision: Precision,
    device: &Device,
) -> DynaKvCache {
    let bases = Arc::new(
        DynaKvBases::with_dtype(
            &artifact(placement),
            GEOMETRY,
            device,
            storage,
            precision.basis,
        )
        .expect("bases"),
    );
    DynaKvCache::with_precision(GEOMETRY, rope(device), bases, policy, precision).expect("cache")
}

/// The caches every attention bench compares: dense, then DynaKV for both key
/// placements, budgets 0.47 / 0.30 / 0.20, one bucket (`uniform`) or seven
/// (`spread`), latents where the device wants them (host on a CPU: the fused
/// host kernel); plus the tensor path (`device` storage) at 0.30 spread, the
/// way a GPU runs it, to show what the host kernel changes on a CPU.
pub fn dynakv_configs(
    device: &Device,
) -> Vec<(String, RopePlacement, Arc<dyn RankPolicy>, KvStorage)> {
    let native = KvStorage::for_device(device);
    let mut out = Vec::new();
    for placement in [RopePlacement::Pre, RopePlacement::Post] {
        for budget in [0.47, 0.30, 0.20] {
            for (name, policy) in [("uniform", uniform(budget)), ("spread", spread(budget))] {
                let label = format!("dynakv-{placement:?}-{name}-{budget}").to_lowercase();
                out.push((label, placement, policy, native));
            }
        }
        if native == KvStorage::Host {
            let label = format!("dynakv-{placement:?}-spread-0.3-tensor-path").to_lowercase();
            out.push((label, placement, spread(0.30), KvStorage::Device));
        }
    }
    out
}

/// Forces the backend to finish.
pub fn sync(t: Tensor<4>) {
    let _ = t.narrow(3, 0, 1).into_data();
}
